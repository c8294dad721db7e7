"""The Table VI benchmark's smoke run works end to end and writes well-formed results."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "table_vi.py"


def load_script():
    spec = importlib.util.spec_from_file_location("table_vi_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    try:
        result = load_script().main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() pins one thread for its timings
    saved = json.loads((tmp_path / "table_vi.json").read_text())
    assert saved == json.loads(json.dumps(result))
    task = saved["tasks"]["fast_vs_slow"]
    assert list(task["subsets"]) == ["0.1", "0.2", "0.4", "1"]
    for row in task["subsets"].values():
        for key in ("m_p_match", "m_o_match", "both_match", "pooled_agreement"):
            assert 0.0 <= row[key] <= 1.0
        assert row["both_match"] <= min(row["m_p_match"], row["m_o_match"])
        assert row["seconds_per_seed"] > 0 and row["cost_fraction_per_seed"] > 0
    # at 100% the pooled ranking is the reference itself
    full = task["subsets"]["1"]
    assert (full["pooled_m_p"], full["pooled_m_o"]) == (
        task["full_data_ranking"]["m_p"],
        task["full_data_ranking"]["m_o"],
    )
    markdown = (tmp_path / "table_vi.md").read_text()
    assert "| 10% |" in markdown and "| 100% |" in markdown and "## fast_vs_slow" in markdown


def test_generated_tasks_are_seeded_and_checked() -> None:
    torch = pytest.importorskip("torch")
    table_vi = load_script()
    a = table_vi.make_task("three_views", n_train=16, n_val=8, seed=3)
    b = table_vi.make_task("three_views", n_train=16, n_val=8, seed=3)
    c = table_vi.make_task("three_views", n_train=16, n_val=8, seed=4)
    assert all(torch.equal(a.train[0][m], b.train[0][m]) for m in a.dims)
    assert not torch.equal(a.train[0]["depth"], c.train[0]["depth"])
    assert a.expected == {"m_p": "depth", "m_o": "rgb"}
    with pytest.raises(ValueError, match="unknown task"):
        table_vi.make_task("nope")
