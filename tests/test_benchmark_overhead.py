"""``benchmarks/overhead.py --quick`` runs end to end and writes complete, sane results (no timing thresholds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "overhead.py"


FIGURES = ("overhead_step.png", "overhead_train_step.png", "overhead_size.png", "overhead_modalities.png")


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")


def ratios_in(node: object) -> list[float]:
    """Every ratio median/q25/q75 found anywhere under a ``"ratios"`` key."""
    found: list[float] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ratios":
                for summary in value.values():
                    found += [summary["median"], summary["q25"], summary["q75"]]
            else:
                found += ratios_in(value)
    elif isinstance(node, list):
        for item in node:
            found += ratios_in(item)
    return found


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("overhead")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "overhead.json").read_text()), out, proc.stdout


def test_quick_run_writes_json_png_and_a_table(quick_results: tuple[dict, Path, str]) -> None:
    results, out, stdout = quick_results
    assert set(results) == {
        "meta",
        "step",
        "scaling_params",
        "scaling_modalities",
        "train_step",
        "hook_cost",
        "compile",
    }
    for name in FIGURES:
        assert png_width(out / name) == 1000  # drawn at the docs column width
    markdown = (out / "overhead.md").read_text()
    assert "| optimizer | bare ms | lr mode | grad mode | floor | research loop |" in markdown
    assert "pdmp/floor" in stdout and "shared, noisy machine" in stdout
    meta = results["meta"]
    assert meta["quick"] is True and meta["command"] == "python benchmarks/overhead.py --quick"
    assert len(meta["loadavg_start"]) == 3 and len(meta["loadavg_end"]) == 3 and meta["caveat"]
    assert results["compile"]["status"] == "skipped"


def test_every_case_has_the_expected_comparisons(quick_results: tuple[dict, Path, str]) -> None:
    results = quick_results[0]
    by_optimizer = {case["optimizer"]: case for case in results["step"]}
    assert set(by_optimizer) == {"sgd", "sgd-foreach", "adamw"}
    for case in results["step"]:
        assert {"pdmp/floor", "pdmp/bare", "floor/bare", "research/pdmp"} <= set(case["ratios"])
        assert case["n_tensors"] > 100  # realistic per-layer tensors of two ResNet-18 trunks
    assert by_optimizer["sgd"]["pdmp_mode"] == "grad" and by_optimizer["adamw"]["pdmp_mode"] == "lr"
    assert "pdmp_grad/floor" in by_optimizer["adamw"]["ratios"]
    for kind in ("sgd", "sgd-foreach"):  # the zero-cost twin beside grad mode
        assert {"pdmp_lr/bare", "pdmp_lr/pdmp"} <= set(by_optimizer[kind]["ratios"])
    sizes = [case["n_params"] for case in results["scaling_params"]]
    assert len(sizes) >= 2 and sizes == sorted(sizes)
    counts = [case["modalities"] for case in results["scaling_modalities"]]
    assert len(counts) >= 2 and counts == sorted(counts)
    # the paper's rule gives two distinct gammas however many modalities: two buckets
    assert all(case["pdmp_buckets"] == 2 for case in results["scaling_modalities"])
    assert all(case["pdmp_distinct_buckets"] == case["modalities"] for case in results["scaling_modalities"])
    for case in [*results["train_step"], results["hook_cost"]]:
        assert {"grad/unmodulated", "lr/unmodulated", "hook/unmodulated", "hook/grad"} == set(case["ratios"])
        assert {"grad-unmodulated", "lr-unmodulated", "hook-unmodulated"} == set(case["added_us"])
        assert all(math.isfinite(v["median"]) for v in case["added_us"].values())


def test_all_ratios_are_finite_and_positive(quick_results: tuple[dict, Path, str]) -> None:
    values = ratios_in(quick_results[0])
    assert len(values) > 30
    assert all(math.isfinite(v) and v > 0 for v in values)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message given without a GPU")
def test_device_cuda_without_a_gpu_says_so_and_measures_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no CUDA device here" in proc.stdout
    assert not (tmp_path / "overhead.json").exists()


def test_replot_redraws_from_the_json_and_the_docs_page_shows_its_tables(tmp_path: Path) -> None:
    # --replot measures nothing: figures and overhead.md come from the saved JSON, and the docs page's tables are
    # the ones it writes from benchmarks/results/overhead.json (after a new run: copy them from overhead.md)
    saved = ROOT / "benchmarks" / "results" / "overhead.json"
    (tmp_path / "overhead.json").write_text(saved.read_text())
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--replot", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(png_width(tmp_path / name) == 1000 for name in FIGURES)
    markdown = (tmp_path / "overhead.md").read_text()
    page = (ROOT / "docs" / "benchmarks" / "overhead.md").read_text()
    tables = [block for block in markdown.split("\n\n") if block.startswith("| ")]
    assert len(tables) > 10
    for table in tables[:4]:  # the step, training-step, fixed-cost and compile tables
        assert table in page, f"docs/benchmarks/overhead.md lacks this table of the saved results:\n{table}"
    assert (ROOT / "benchmarks" / "results" / "overhead.md").read_text() == markdown
    results = json.loads(saved.read_text())
    sgd = next(case for case in results["step"] if case["optimizer"] == "sgd")
    row = f"| SGD | {sgd['median_ms']['bare']:.0f} | {sgd['ratios']['pdmp_lr/bare']['median']:.2f} |"
    assert row in tables[0]
