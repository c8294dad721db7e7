"""examples/demo.py runs end to end and prints the ranking, the gammas and both accuracies."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_ranking_gammas_and_both_accuracies():
    result = subprocess.run(
        [sys.executable, "examples/demo.py"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    out = result.stdout
    assert "performance_dominant='visual'" in out and "optimization_dominant='audio'" in out
    assert "gammas: {'visual': 15.0, 'audio': 0.06666666666666667}" in out
    accuracies = dict(re.findall(r"^(vanilla|PDMP)\s+test accuracy: (\d\.\d+)$", out, flags=re.MULTILINE))
    assert set(accuracies) == {"vanilla", "PDMP"}
    assert all(0.25 < float(a) <= 1.0 for a in accuracies.values())  # 4 classes: better than chance
