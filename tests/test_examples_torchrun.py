"""The launch story: ``examples/torchrun_ddp.py`` runs under ``torchrun --nproc-per-node 2`` on CPU (gloo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_torchrun_ddp_example_trains_with_two_processes():
    # --standalone picks a free rendezvous port, so parallel runs do not collide
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["examples/torchrun_ddp.py", "--epochs", "2", "--train-size", "512"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "PDMPOptimizer(mode='grad'" in result.stdout
    assert "visual: gamma=15" in result.stdout and "audio: gamma=0.0666667" in result.stdout
    accuracies = [float(a) for a in re.findall(r"test accuracy ([0-9.]+)", result.stdout)]
    assert len(accuracies) == 2, output
    assert accuracies[-1] > 0.4, output  # 4 classes: chance is 0.25
    assert "2 replicas in sync" in result.stdout
