"""A Griffe extension for the API reference: show docstring ``>>>`` examples as code blocks.

Our docstrings carry runnable ``>>>`` examples anywhere in their text (pytest runs them with
``--doctest-modules``), not only in an ``Examples:`` section. Markdown would render such lines as nested block
quotes and read ``{...}`` or ``[...](...)`` in them as attributes and links. This extension, loaded by
mkdocstrings (see ``mkdocs.yml``), wraps every run of doctest lines (the prompt lines and the expected output up
to the next blank line) in a fenced ``pycon`` block before the docstring is parsed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_PROMPT = re.compile(r"^(?P<indent>\s*)>>>( |$)")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


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


class DoctestFences(griffe.Extension):
    """Wrap doctest examples in code fences in every docstring Griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
