"""The launch story: ``examples/torchrun_ddp.py`` runs under ``torchrun --nproc-per-node 2`` on CPU (gloo),
with DDP and with FSDP2 (``--fsdp``)."""

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
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_example_trains_with_two_processes(sharding):
    # --standalone picks a free rendezvous port, so parallel runs do not collide
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["examples/torchrun_ddp.py", "--epochs", "2", "--train-size", "512"]
    command += ["--fsdp"] if sharding == "fsdp" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "PDMPOptimizer(mode='grad'" in result.stdout
    assert "visual: gamma=15" in result.stdout and "audio: gamma=0.0666667" in result.stdout
    accuracies = [float(a) for a in re.findall(r"test accuracy ([0-9.]+)", result.stdout)]
    assert len(accuracies) == 2, output
    assert accuracies[-1] > 0.4, output  # 4 classes: chance is 0.25
    # the diagnostics readout: PDMP multiplied visual's gradient norm by 15 and audio's by 1/15
    norms = re.findall(r"'(audio|visual)': '([0-9.e-]+)/([0-9.e-]+)'", result.stdout)
    assert len(norms) == 4, output
    for modality, before, after in norms:
        gamma = 15.0 if modality == "visual" else 1 / 15
        assert float(after) == pytest.approx(gamma * float(before), rel=0.01)
    assert "2 replicas in sync" in result.stdout
