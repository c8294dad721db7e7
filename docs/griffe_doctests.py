"""A Griffe extension for the API reference: doctest examples as code blocks, Sphinx roles as links.

Our docstrings carry runnable ``>>>`` examples anywhere in their text (pytest runs them with
``--doctest-modules``), not only in an ``Examples:`` section. Markdown would render such lines as nested block
quotes and read ``{...}`` or ``[...](...)`` in them as attributes and links. This extension, loaded by
mkdocstrings (see ``mkdocs.yml``), wraps every run of doctest lines (the prompt lines and the expected output up
to the next blank line) in a fenced ``pycon`` block before the docstring is parsed. It also turns Sphinx roles
such as ``:func:`~pdmp_optim.rank_modalities``` into cross-references to the API page (or into plain code when
the target is not a documented ``pdmp_optim`` object).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import griffe

_PROMPT = re.compile(r"^(?P<indent>\s*)>>>( |$)")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+)`")


def fence_doctests(text: str) -> str:
    """Return ``text`` with each doctest run wrapped in a fenced ``pycon`` block.

    A run starts at a ``>>>`` line outside an existing code fence and ends before the next blank line (or code
    fence); a blank line is inserted before the opening fence when the run follows text directly.
    tests/test_docs_examples.py checks this function.
    """
    lines = text.split("\n")
    out: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            in_fence = not in_fence
        prompt = None if in_fence else _PROMPT.match(line)
        if prompt is None:
            out.append(line)
            i += 1
            continue
        indent = prompt["indent"]
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip() and not _FENCE.match(lines[i]):
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")  # the blank line that ended the run (if any) follows as usual
    return "\n".join(out)


def link_roles(text: str, resolve: Callable[[str], str | None]) -> str:
    """Replace Sphinx roles with Markdown cross-references ``[`name`][path]``, or with ``name`` in code.

    ``resolve`` maps a role's target to the full path of a documented object, or ``None``.
    """

    def replace(match: re.Match[str]) -> str:
        target = match["target"]
        shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
        path = resolve(target)
        return f"[`{shown}`][{path}]" if path else f"`{shown}`"

    return _ROLE.sub(replace, text)


def _resolver(obj: griffe.Object) -> Callable[[str], str | None]:
    """Resolve a role target as Sphinx would: a full ``pdmp_optim`` path, or a name seen from ``obj``."""

    def documented(found: griffe.Object | griffe.Alias) -> bool:
        # only objects with a docstring get a section (and an anchor) on the API page
        try:
            return found.docstring is not None
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return False

    def resolve(target: str) -> str | None:
        if target.startswith("pdmp_optim."):
            return target
        head, *rest = target.split(".")
        scope: griffe.Object | None = obj
        while scope is not None:
            if head in scope.members:
                found = scope.members[head]
                try:
                    for part in rest:
                        found = found.members[part]
                except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                    return None
                return found.path if documented(found) else None
            scope = scope.parent
        return None

    return resolve


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)  # type: ignore[arg-type]


class DoctestFences(griffe.Extension):
    """Wrap doctest examples in code fences and link Sphinx roles, in every docstring Griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        # roles are resolved once the whole package is loaded, so that re-exported names resolve too
        for obj in _walk(pkg):
            if obj.docstring is not None and ":`" in obj.docstring.value:
                obj.docstring.value = link_roles(obj.docstring.value, _resolver(obj))
