"""DDP and FSDP2: two gloo processes on CPU, each with half of every global batch, end where one process on the
whole batch ends with the reference loop of ``pdmp_optim.reference`` on a plain optimizer (tight tolerance: the
all-reduce sums in another order).

The module spawns its two processes once and runs every variant in them; the parent computes the
single-process reference and compares.
"""

from __future__ import annotations

import gc
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import GAMMAS, TwoModal, free_port, loss_fn, make_batches, reference_scale_grads
from torch.nn.parallel import DistributedDataParallel as DDP

from pdmp_optim import PDMPOptimizer
from pdmp_optim.diagnostics import modality_grad_norms
from pdmp_optim.reference import reference_grad_step, reference_lr_step

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD, STEPS, GLOBAL_BATCH, MAX_NORM = 2, 3, 8, 0.05
DDP_VARIANTS = ("grad", "lr", "sgd-lr", "grad-clip", "grad-accum")
FSDP_VARIANTS = ("grad", "lr", "sgd-lr", "grad-clip")


def make_optimizer(model, variant: str) -> PDMPOptimizer:
    if variant == "lr":
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if variant == "sgd-lr":  # the zero-cost twin of grad mode: lr * gamma, weight_decay / gamma
        return PDMPOptimizer(inner, model.groups(), gammas=GAMMAS, mode="lr")
    opt = PDMPOptimizer(inner, model.groups(), gammas=GAMMAS)
    assert opt.mode == ("lr" if variant == "lr" else "grad")
    return opt


def local_part(batch, rank: int, world: int):
    """This rank's contiguous share of a global batch."""
    per_rank = batch[0].shape[0] // world
    return tuple(t[rank * per_rank : (rank + 1) * per_rank] for t in batch)


def train_step(model, opt, batches, variant: str, no_sync=None) -> None:
    """One optimizer step over ``batches`` (several only for ``grad-accum``)."""
    opt.zero_grad()
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        if no_sync is not None and not last:
            with no_sync():
                (loss_fn(model, batch) / len(batches)).backward()
        else:
            (loss_fn(model, batch) / len(batches)).backward()
    if variant == "grad-clip":
        opt.scale_grads_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()


def reference_params(variant: str) -> dict[str, torch.Tensor]:
    """One process, the whole global batch, a plain optimizer stepped by the reference twin ("sgd-lr" is checked
    against grad mode's reference: it is its hyperparameter twin)."""
    model = TwoModal()
    if variant == "lr":  # the groups lr mode splits Adam's single group into
        modules = (model.audio, model.visual, model.head)
        opt = torch.optim.Adam([{"params": m.parameters()} for m in modules], lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    accum = 2 if variant == "grad-accum" else 1
    batches = make_batches(STEPS * accum, n=GLOBAL_BATCH)
    for step in range(STEPS):
        opt.zero_grad()
        for batch in batches[step * accum : (step + 1) * accum]:
            (loss_fn(model, batch) / accum).backward()
        if variant == "lr":
            reference_lr_step(opt, [GAMMAS["audio"], GAMMAS["visual"], 1.0])
        elif variant == "grad-clip":
            reference_scale_grads(model)
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            opt.step()
        else:
            reference_grad_step(opt, model.modality_params(), GAMMAS)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def ddp_section(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    results = {}
    for variant in DDP_VARIANTS:
        model = TwoModal()
        ddp = DDP(model)
        opt = make_optimizer(model, variant)  # DDP shares the module's parameters
        accum = 2 if variant == "grad-accum" else 1
        batches = [local_part(b, rank, WORLD) for b in make_batches(STEPS * accum, n=GLOBAL_BATCH)]
        for step in range(STEPS):
            train_step(ddp, opt, batches[step * accum : (step + 1) * accum], variant, no_sync=ddp.no_sync)
        results[variant] = {k: v.detach().clone() for k, v in model.named_parameters()}
    return results


def fsdp_section(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for variant in FSDP_VARIANTS:
        model = TwoModal()
        for module in (model.audio, model.visual, model.head):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = make_optimizer(model, variant)
        batches = [local_part(b, rank, WORLD) for b in make_batches(STEPS, n=GLOBAL_BATCH)]
        for step in range(STEPS):
            if step == 0 and variant == "grad":
                # the diagnostics work on DTensor gradient shards: read them with .full_tensor()
                opt.zero_grad()
                loss_fn(model, batches[0]).backward()
                assert all(isinstance(p.grad, DTensor) for p in model.parameters())
                before = {m: n.full_tensor() for m, n in modality_grad_norms(opt).items()}
                opt.scale_grads_()
                after = {m: n.full_tensor() for m, n in modality_grad_norms(opt).items()}
                full = {m: torch.cat([p.grad.full_tensor().flatten() for p in mod.parameters()]).norm()
                        for m, mod in model.groups().items()}  # fmt: skip
                results["norms"] = {"before": before, "after": after, "full": full}
                opt.step()
                continue
            train_step(model, opt, batches[step : step + 1], variant)
        results[variant] = {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}
    return results


def worker(rank: int, port: int, out: str) -> None:
    """Run every DDP and FSDP2 variant in one pair of processes (spawning is the expensive part).

    A section that raises is recorded as its traceback, so that only its own test fails.
    """
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict[str, object] = {}
    try:
        for name, section in (("ddp", ddp_section), ("fsdp2", fsdp_section)):
            try:
                results[name] = section(rank)
            except Exception:
                results[name] = traceback.format_exc()
            dist.barrier()
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        # release models, gradients and gloo work while the interpreter is fully alive (gloo's threads can
        # otherwise abort the process at exit)
        results.clear()
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def section(ranks: list[dict], name: str) -> list[dict]:
    for rank, results in enumerate(ranks):
        if isinstance(results[name], str):
            pytest.fail(f"{name} failed on rank {rank}:\n{results[name]}")
    return [results[name] for results in ranks]


def assert_close_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def test_ddp_two_processes_match_one_process_on_the_whole_batch(ranks):
    ranks = section(ranks, "ddp")
    initial = dict(TwoModal().named_parameters())
    for variant in DDP_VARIANTS:
        want = reference_params(variant)
        for rank, results in enumerate(ranks):
            assert_close_params(results[variant], want, f"DDP {variant} rank {rank}")
        # both ranks hold identical replicas, and training moved every modality
        for name, value in ranks[0][variant].items():
            assert torch.equal(value, ranks[1][variant][name])
            assert not torch.equal(value, initial[name])


def test_fsdp2_two_processes_match_one_process_on_the_whole_batch(ranks):
    ranks = section(ranks, "fsdp2")
    for variant in FSDP_VARIANTS:
        want = reference_params(variant)
        for rank, results in enumerate(ranks):
            assert_close_params(results[variant], want, f"FSDP2 {variant} rank {rank}")
    for results in ranks:
        norms = results["norms"]
        for m, gamma in GAMMAS.items():
            torch.testing.assert_close(norms["before"][m] * gamma, norms["after"][m])
            torch.testing.assert_close(norms["after"][m], norms["full"][m])
