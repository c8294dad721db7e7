"""Every code example in README.md and docs/ runs, the API page covers the public names, the metadata parses.

The convention (CONTRIBUTING.md, "Docs code blocks"):

* every ```python block of a page runs, in order, in one namespace per page, with the repository root as cwd;
* a page whose text holds ``<!-- docs-test: requires=lightning,accelerate -->`` is skipped when one of those
  modules cannot be imported;
* a ```python block holding only snippet includes (``--8<-- "examples/x.py"``) is not run here (a test of its
  own runs that file), but every file a page includes must exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import pdmp_optim

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
SNIPPET = re.compile(r"""^\s*-{2}8<-{2}\s+["']?(?P<path>[^"'\s]+)["']?\s*$""")
REQUIRES = re.compile(r"<!--\s*docs-test:\s*requires=(?P<modules>[\w.,\s]+?)\s*-->")
PYTHON = {"python", "py", "python3"}


@dataclass
class Block:
    """One fenced code block: its language, first code line (1-based) and dedented source."""

    language: str
    line: int
    source: str

    @property
    def snippet_paths(self) -> list[str] | None:
        """The included paths if the block holds only snippet-include lines, else ``None``."""
        lines = [line for line in self.source.splitlines() if line.strip()]
        matches = [SNIPPET.match(line) for line in lines]
        if not lines or not all(matches):
            return None
        return [m["path"] for m in matches if m]


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order (nested fences inside a block are kept as text)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].lower().lstrip("{.").rstrip("}")
        body: list[str] = []
        j = i + 1
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        blocks.append(Block(language, i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_pages_are_found() -> None:
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 1, "no docs/**/*.md found"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_examples_run(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the page's python blocks in order in one namespace; a failure names the page and block line."""
    text = page.read_text(encoding="utf-8")
    name = page_id(page)

    for line_no, line in enumerate(text.splitlines(), start=1):
        match = SNIPPET.match(line)
        if match:
            target = ROOT / match["path"]
            assert target.is_file(), f"{name}:{line_no} includes {match['path']!r}, which does not exist"

    requires = REQUIRES.search(text)
    if requires:
        for module in (m.strip() for m in requires["modules"].split(",") if m.strip()):
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{name} needs {module!r}, which is not installed")

    blocks = [b for b in parse_blocks(text) if b.language in PYTHON and b.snippet_paths is None]
    if not blocks:
        return
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    default_dtype, grad_enabled, threads = torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the examples use tiny tensors: threads only add overhead, badly so on a busy machine
    namespace: dict[str, object] = {"__name__": "docs_example_" + re.sub(r"\W", "_", name)}
    failure = None
    try:
        for block in blocks:
            # pad with newlines so tracebacks give the page's own line numbers
            code = compile("\n" * (block.line - 1) + block.source, str(page), "exec")
            try:
                exec(code, namespace)
            except Exception:
                failure = f"{name}: the python block starting at line {block.line} failed:\n{traceback.format_exc()}"
                break
    finally:
        torch.set_default_dtype(default_dtype)
        torch.set_grad_enabled(grad_enabled)
        torch.set_num_threads(threads)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_parse_blocks_handles_fences_snippets_and_lines() -> None:
    text = (
        "intro\n"
        "```python\n"
        "x = 1\n"
        "```\n"
        "!!! note\n"
        "    ```python\n"
        "    y = x + 1\n"
        "    ```\n"
        "````markdown\n"
        "```python\n"
        "not_run()\n"
        "```\n"
        "````\n"
        '```python\n--8<-- "examples/demo.py"\n```\n'
    )
    blocks = parse_blocks(text)
    assert [(b.language, b.line) for b in blocks] == [("python", 3), ("python", 7), ("markdown", 10), ("python", 15)]
    assert blocks[1].source == "y = x + 1\n"
    assert "not_run()" in blocks[2].source
    assert blocks[3].snippet_paths == ["examples/demo.py"]
    assert blocks[0].snippet_paths is None


def test_api_page_lists_every_public_name() -> None:
    """Each public name has a mkdocstrings entry (``__version__`` and other dunders: a mention)."""
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    entries = {target.rsplit(".", 1)[-1] for target in re.findall(r"^:::\s+([\w.]+)", api, flags=re.MULTILINE)}
    missing = [
        name for name in pdmp_optim.__all__ if (name not in api if name.startswith("__") else name not in entries)
    ]
    assert not missing, f"docs/api.md has no entry for {missing}; add a '::: pdmp_optim.NAME' entry for each"


def test_api_page_entries_resolve() -> None:
    """Every ``::: dotted.path`` in docs/api.md imports (mkdocstrings would fail the docs build otherwise)."""
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    targets = re.findall(r"^:::\s+([\w.]+)", api, flags=re.MULTILINE)
    assert targets, "docs/api.md has no mkdocstrings entries"
    for target in targets:
        module_name, _, attr = target, "", ""
        while True:
            try:
                obj = importlib.import_module(module_name)
                break
            except ModuleNotFoundError:
                module_name, _, last = module_name.rpartition(".")
                assert module_name, f"docs/api.md: cannot import any prefix of {target!r}"
                attr = f"{last}.{attr}" if attr else last
        for part in filter(None, attr.split(".")):
            assert hasattr(obj, part), f"docs/api.md: {target!r} does not resolve ({part!r} missing)"
            obj = getattr(obj, part)


def test_version_matches_changelog() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(pdmp_optim.__version__)}\]", changelog, flags=re.MULTILINE), (
        f"CHANGELOG.md has no '## [{pdmp_optim.__version__}]' section for the package's __version__"
    )


def test_citation_cff_parses() -> None:
    text = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    required = ["cff-version", "message", "title", "authors", "type", "version", "license", "preferred-citation"]
    if importlib.util.find_spec("yaml") is not None:
        import yaml

        data = yaml.safe_load(text)
        assert data["cff-version"] == "1.2.0"
        assert [key for key in required if key not in data] == []
        assert str(data["version"]) == pdmp_optim.__version__
        paper = data["preferred-citation"]
        assert "Performance-Dominant Modality Prioritization" in paper["title"]
        assert [a["family-names"] for a in paper["authors"]] == ["Wei", "Luo", "Zhu", "Luo"]
        assert paper["year"] == 2026
    else:  # a light check without PyYAML: top-level keys present
        keys = set(re.findall(r"^([\w-]+):", text, flags=re.MULTILINE))
        assert [key for key in required if key not in keys] == []
        assert re.search(rf"^version:\s*[\"']?{re.escape(pdmp_optim.__version__)}", text, flags=re.MULTILINE)


def test_figure_script_runs_fast(tmp_path: Path) -> None:
    """docs/figures/make_figures.py trains both models for real and writes a PNG."""
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("make_figures", DOCS / "figures" / "make_figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = module.run(fast=True)
    finally:
        torch.set_num_threads(threads)
    epochs = results["epochs"]
    for curves in (results["unimodal"], results["fused"], results["ratio"]):
        assert set(curves) in ({"audio", "visual"}, {"vanilla", "PDMP"})
        assert all(len(values) == epochs + 1 for values in curves.values())
    assert all(0.0 <= a <= 1.0 for curve in results["fused"].values() for a in curve)
    assert all(0.0 < w < float("inf") for curve in results["ratio"].values() for w in curve)
    # training worked: both fused models beat chance (0.25) by the end
    assert all(curve[-1] > 0.4 for curve in results["fused"].values())
    path = module.draw(results, tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (DOCS / "figures" / module.FIGURE_NAME).is_file(), "the committed figure is missing; run the script"


def _griffe_extension():
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_doctests", DOCS / "griffe_doctests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_griffe_extension_links_roles() -> None:
    """Sphinx roles become cross-references when the target resolves, plain code otherwise."""
    module = _griffe_extension()
    text = "See :func:`~pdmp_optim.rank_modalities`, :meth:`scale_grads_` and :attr:`unknown.thing`."
    resolve = {
        "pdmp_optim.rank_modalities": "pdmp_optim.rank_modalities",
        "scale_grads_": "pdmp_optim.PDMPOptimizer.scale_grads_",
    }.get
    assert module.link_roles(text, resolve) == (
        "See [`rank_modalities`][pdmp_optim.rank_modalities], "
        "[`scale_grads_`][pdmp_optim.PDMPOptimizer.scale_grads_] and `unknown.thing`."
    )


def test_griffe_extension_fences_doctests() -> None:
    """docs/griffe_doctests.py wraps docstring examples in code fences for the API reference."""
    module = _griffe_extension()
    text = "Use it:\n>>> d = {'a': 1}\n>>> d\n{'a': 1}\n\nThen:\n    >>> x = 1\n```python\n>>> kept\n```"
    assert module.fence_doctests(text).split("\n") == [
        "Use it:",
        "",
        "```pycon",
        ">>> d = {'a': 1}",
        ">>> d",
        "{'a': 1}",
        "```",
        "",
        "Then:",
        "",
        "    ```pycon",
        "    >>> x = 1",
        "    ```",
        "```python",
        ">>> kept",
        "```",
    ]
