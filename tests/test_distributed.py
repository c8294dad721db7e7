"""DDP and FSDP2: two gloo processes on CPU, each with half of every global batch, end where one process on the
whole batch ends with the reference twin, ``pdmp_optim.reference.PDMPReference`` (tight tolerance: the all-reduce
sums in another order). Under FSDP2, an lr-mode run checkpointed through torch's distributed checkpoint (the
optimizer's param groups carry the gammas) resumes bit for bit.

The module spawns its two processes once and runs every variant in them; the parent computes the
single-process reference and compares.
"""

from __future__ import annotations

import copy
import gc
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import GAMMAS, TwoModal, free_port, loss_fn, make_batches
from torch.nn.parallel import DistributedDataParallel as DDP

from pdmp_optim import PDMPOptimizer
from pdmp_optim.diagnostics import modality_grad_norms
from pdmp_optim.reference import PDMPReference

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD, STEPS, GLOBAL_BATCH, MAX_NORM = 2, 3, 8, 0.05
DDP_VARIANTS = ("grad", "lr", "sgd-lr", "grad-clip", "grad-accum")
FSDP_VARIANTS = ("grad", "lr", "sgd-lr", "grad-clip")
DCP_STEPS, DCP_SAVE, DCP_CHANGE = 4, 2, 1  # steps in all, checkpoint after, gammas changed after step
DCP_GAMMAS = {"audio": 0.5, "visual": 4.0}  # set after step DCP_CHANGE: the checkpoint must bring them back


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
    """One process, the whole global batch, the reference twin ("sgd-lr" is checked against grad mode's reference:
    it is its hyperparameter twin)."""
    model = TwoModal()
    if variant == "lr":
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = PDMPReference(inner, model.groups(), gammas=GAMMAS)
    accum = 2 if variant == "grad-accum" else 1
    batches = make_batches(STEPS * accum, n=GLOBAL_BATCH)
    for step in range(STEPS):
        opt.zero_grad()
        for batch in batches[step * accum : (step + 1) * accum]:
            (loss_fn(model, batch) / accum).backward()
        if variant == "grad-clip":
            opt.scale_grads_()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def interleaved(model: TwoModal) -> list[torch.Tensor]:
    """All parameters in one list whose modalities alternate (the split must keep each one's state under its name)."""
    a, v, h = (list(m.parameters()) for m in (model.audio, model.visual, model.head))
    return [a[0], v[0], h[0], a[1], v[1], h[1], a[2], a[3]]


def dcp_steps(model, opt, batches, steps: range) -> None:
    """AdamW steps of the checkpoint run; the gammas change after step ``DCP_CHANGE`` (a modulation schedule)."""
    for step in steps:
        opt.zero_grad()
        loss_fn(model, batches[step]).backward()
        opt.step()
        if step == DCP_CHANGE:
            opt.gammas = DCP_GAMMAS


def dcp_reference_params() -> dict[str, torch.Tensor]:
    """The checkpoint run on one process, uninterrupted, with the reference twin."""
    model = TwoModal()
    opt = PDMPReference(torch.optim.AdamW(interleaved(model), lr=1e-2), model.groups(), gammas=GAMMAS)
    dcp_steps(model, opt, make_batches(DCP_STEPS, n=GLOBAL_BATCH), range(DCP_STEPS))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def ddp_section(rank: int, out: Path) -> dict[str, dict[str, torch.Tensor]]:
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


def fsdp_section(rank: int, out: Path) -> dict[str, dict[str, torch.Tensor]]:
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


def fsdp_dcp_section(rank: int, out: Path) -> dict[str, object]:
    """lr mode (AdamW, one group of interleaved modalities, split by PDMP) under FSDP2: uninterrupted, and
    checkpointed after ``DCP_SAVE`` steps with ``get_optimizer_state_dict`` + ``dcp.save`` then resumed into a fresh
    model and optimizer (other weights, the original gammas) with ``dcp.load`` + ``set_optimizer_state_dict``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    batches = [local_part(b, rank, WORLD) for b in make_batches(DCP_STEPS, n=GLOBAL_BATCH)]

    def build(seed: int = 0) -> tuple[TwoModal, PDMPOptimizer]:
        model = TwoModal(seed=seed)
        for module in (model.audio, model.visual, model.head):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = PDMPOptimizer(torch.optim.AdamW(interleaved(model), lr=1e-2), model.groups(), gammas=GAMMAS)
        assert opt.mode == "lr"
        return model, opt

    def full(model: TwoModal) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}

    whole, whole_opt = build()
    dcp_steps(whole, whole_opt, batches, range(DCP_STEPS))

    first, first_opt = build()
    dcp_steps(first, first_opt, batches, range(DCP_SAVE))
    saved = {"model": get_model_state_dict(first), "optim": get_optimizer_state_dict(first, first_opt)}
    groups = [{k: v for k, v in g.items() if k in ("params", "modality", "pdmp_gamma", "pdmp_split")}
              for g in saved["optim"]["param_groups"]]  # fmt: skip
    dcp.save(saved, checkpoint_id=out / "dcp")

    resumed, resumed_opt = build(seed=1)  # other weights, the original gammas: all must come from the checkpoint
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(state, checkpoint_id=out / "dcp")
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
    gammas = dict(resumed_opt.gammas)
    dcp_steps(resumed, resumed_opt, batches, range(DCP_SAVE, DCP_STEPS))
    return {"whole": full(whole), "resumed": full(resumed), "groups": groups, "gammas": gammas}


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
        for name, section in (("ddp", ddp_section), ("fsdp2", fsdp_section), ("fsdp2-dcp", fsdp_dcp_section)):
            try:
                results[name] = section(rank, Path(out))
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


def test_fsdp2_lr_mode_resumes_through_distributed_checkpoint_bit_for_bit(ranks):
    """DCP saves the split groups with their modality, gamma and split record under parameter names, and a fresh
    optimizer built with other gammas continues exactly where the uninterrupted run goes."""
    ranks = section(ranks, "fsdp2-dcp")
    names = {m: [f"{m}.{n}" for n, _ in module.named_parameters()] for m, module in TwoModal().groups().items()}
    names[None] = [f"head.{n}" for n, _ in TwoModal().head.named_parameters()]
    want = dcp_reference_params()
    for rank, results in enumerate(ranks):
        assert results["groups"] == [
            {"params": names["audio"], "modality": "audio", "pdmp_gamma": 0.5, "pdmp_split": [8, [0, 3, 6, 7]]},
            {"params": names["visual"], "modality": "visual", "pdmp_gamma": 4.0, "pdmp_split": [8, [1, 4]]},
            {"params": names[None], "modality": None, "pdmp_gamma": 1.0, "pdmp_split": [8, [2, 5]]},
        ]
        assert results["gammas"] == DCP_GAMMAS  # restored from the param groups, not the constructor's
        for name, value in results["whole"].items():
            assert torch.equal(results["resumed"][name], value), f"rank {rank}: {name} resumed elsewhere"
        assert_close_params(results["whole"], want, f"FSDP2 DCP lr rank {rank}")


def test_a_plain_adamw_checkpoint_resumes_under_pdmp_through_distributed_checkpoint():
    """One process (DCP needs no process group): a run of plain AdamW, checkpointed with ``get_optimizer_state_dict``,
    continues under PDMP (its one group split) exactly as when the plain state dict is loaded with
    ``load_state_dict``; the hyperparameters come from the checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    plain_model = TwoModal()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        plain.zero_grad()
        loss_fn(plain_model, make_batches(2)[step]).backward()
        plain.step()

    def resumed(load) -> tuple[TwoModal, PDMPOptimizer]:
        model = TwoModal(seed=1)
        model.load_state_dict(plain_model.state_dict())
        opt = PDMPOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model.groups(), gammas=GAMMAS)
        load(model, opt)
        return model, opt

    # deep copies, as from disk: a loaded state dict's tensors are otherwise those of the plain optimizer's state
    by_torch, by_torch_opt = resumed(lambda model, opt: opt.load_state_dict(copy.deepcopy(plain.state_dict())))
    by_dcp, by_dcp_opt = resumed(
        lambda model, opt: set_optimizer_state_dict(
            model, opt, copy.deepcopy(get_optimizer_state_dict(plain_model, plain))
        )
    )
    for opt in (by_torch_opt, by_dcp_opt):
        assert [(g["modality"], g.get("lr"), g.get("weight_decay")) for g in opt.param_groups] == [
            ("audio", 1e-2, 0.1),
            ("visual", 1e-2, 0.1),
            (None, 1e-2, 0.1),
        ]
    for model, opt in ((by_torch, by_torch_opt), (by_dcp, by_dcp_opt)):
        opt.zero_grad()
        loss_fn(model, make_batches(3)[2]).backward()
        opt.step()
    for (name, p), q in zip(by_dcp.named_parameters(), by_torch.parameters(), strict=True):
        assert torch.equal(p, q), name
