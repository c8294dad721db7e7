"""FSDP1 (``FullyShardedDataParallel``) on two gloo processes on CPU: what a user of an engine that flattens the
parameters gets (issue 12, section 2).

With ``use_orig_params=False`` FSDP1 replaces each unit's parameters by one ``FlatParameter`` shard, and the
optimizer owns only those. What works, each compared with one process on the whole batch stepped by the reference
twin (as ``tests/test_distributed.py`` does):

* each encoder its own FSDP unit: ``groups=`` names the units, whose flat parameters hold exactly one modality;
* ``use_orig_params=True``: the optimizer owns the original parameters (views into the flat shards);
* the backward-hook helper, ``scale_encoder_grads``, on the encoder units with a plain optimizer.

What must be a clear error naming the way out, never a silent no-op: encoders flattened into a unit they share
with other parameters (the root unit), and an encoder split across flat parameters. The hook helper works on an
encoder flattened into a shared unit (its modules hold views of the flat parameter).
"""

from __future__ import annotations

import gc
import os
import re
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import GAMMAS, TwoModal, free_port, loss_fn, make_batches

from pdmp_optim import PDMPOptimizer, scale_encoder_grads
from pdmp_optim.reference import PDMPReference

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD, STEPS, GLOBAL_BATCH = 2, 3, 8
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def local_part(batch, rank: int):
    per_rank = batch[0].shape[0] // WORLD
    return tuple(t[rank * per_rank : (rank + 1) * per_rank] for t in batch)


def reference_params() -> dict[str, torch.Tensor]:
    """One process, the whole global batch, SGD stepped by the reference twin."""
    model = TwoModal()
    opt = PDMPReference(torch.optim.SGD(model.parameters(), **SGD), model.groups(), gammas=GAMMAS)
    for batch in make_batches(STEPS, n=GLOBAL_BATCH):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ------------------------------------------------------------------------------------- the worker's sections
def wrap(model: TwoModal, units: str, use_orig_params: bool = False):
    """FSDP1 around ``model``: ``units`` says which submodules become FSDP units of their own."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    own = {
        "root": set(),
        "encoders": {model.audio, model.visual},
        "split": {model.audio[2], model.visual},  # audio's first layer stays in the root unit, with the head
    }[units]
    policy = (lambda module, recurse, nonwrapped_numel: recurse or module in own) if own else None
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=use_orig_params, device_id=torch.device("cpu"))


def train(fsdp, opt, rank: int) -> None:
    for batch in make_batches(STEPS, n=GLOBAL_BATCH):
        opt.zero_grad()
        loss_fn(fsdp, local_part(batch, rank)).backward()
        opt.step()


def full_params(fsdp) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(fsdp, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


def outcome(build) -> str:
    """``"accepted"`` or the exception PDMP raised, as ``"Type: message"``."""
    try:
        build()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "accepted"


def sections(rank: int) -> dict[str, object]:
    out: dict[str, object] = {}

    model = TwoModal()  # each encoder its own unit: groups= are the units
    fsdp = wrap(model, "encoders")
    assert type(model.audio).__name__ == "FullyShardedDataParallel"
    opt = PDMPOptimizer(torch.optim.SGD(fsdp.parameters(), **SGD), model.groups(), gammas=GAMMAS)
    out["units-flat"] = [bool(getattr(p, "_is_flat_param", False)) for p in opt.params_by_modality()["audio"]]
    train(fsdp, opt, rank)
    out["units"] = full_params(fsdp)

    model = TwoModal()  # use_orig_params=True: the original parameters, as views into the flat shards
    fsdp = wrap(model, "root", use_orig_params=True)
    opt = PDMPOptimizer(torch.optim.SGD(fsdp.parameters(), **SGD), model.groups(), gammas=GAMMAS)
    train(fsdp, opt, rank)
    out["orig-params"] = full_params(fsdp)

    model = TwoModal()  # the hook helper on the encoder units, with a plain optimizer
    fsdp = wrap(model, "encoders")
    opt = torch.optim.SGD(fsdp.parameters(), **SGD)
    with scale_encoder_grads(model.groups(), GAMMAS):
        train(fsdp, opt, rank)
    out["hooks-units"] = full_params(fsdp)

    model = TwoModal()  # the root unit only: the encoders' parameters are flattened with the head's
    before = model.modality_params()
    fsdp = wrap(model, "root")
    sgd = torch.optim.SGD(fsdp.parameters(), **SGD)
    out["root-modules"] = outcome(lambda: PDMPOptimizer(sgd, model.groups(), gammas=GAMMAS))
    out["root-params"] = outcome(lambda: PDMPOptimizer(sgd, before, gammas=GAMMAS))  # lists taken before wrapping
    out["root-hooks"] = outcome(lambda: scale_encoder_grads(model.groups(), GAMMAS).remove())

    model = TwoModal()  # the hook helper on encoders flattened into the root unit (asked for)
    fsdp = wrap(model, "root")
    opt = torch.optim.SGD(fsdp.parameters(), **SGD)
    try:
        with scale_encoder_grads(model.groups(), GAMMAS):
            train(fsdp, opt, rank)
        out["hooks-root"] = full_params(fsdp)
    except Exception as error:
        out["hooks-root"] = f"{type(error).__name__}: {error}"

    model = TwoModal()  # audio split: its last layer a unit of its own, its first layer in the root unit
    fsdp = wrap(model, "split")
    sgd = torch.optim.SGD(fsdp.parameters(), **SGD)
    out["split"] = outcome(lambda: PDMPOptimizer(sgd, model.groups(), gammas=GAMMAS))
    if out["split"] == "accepted":
        train(fsdp, PDMPOptimizer(sgd, model.groups(), gammas=GAMMAS), rank)
        out["split-params"] = full_params(fsdp)
    return out


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict[str, object] = {}
    try:
        try:
            results = sections(rank)
        except Exception:
            results = {"failed": traceback.format_exc()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        results.clear()
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp1")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank, result in enumerate(results):
        if "failed" in result:
            pytest.fail(f"FSDP1 worker failed on rank {rank}:\n{result['failed']}")
    return results


def assert_matches_reference(got: dict[str, torch.Tensor], what: str) -> None:
    want = reference_params()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


# ------------------------------------------------------------------------------------------------ what works
def test_each_encoder_its_own_unit_matches_one_process(ranks) -> None:
    for rank, results in enumerate(ranks):
        assert results["units-flat"] == [True]  # PDMP scales the unit's FlatParameter shard: one modality only
        assert_matches_reference(results["units"], f"FSDP1 encoder units, rank {rank}")


def test_use_orig_params_true_matches_one_process(ranks) -> None:
    for rank, results in enumerate(ranks):
        assert_matches_reference(results["orig-params"], f"FSDP1 use_orig_params=True, rank {rank}")


def test_the_hook_helper_on_encoder_units_matches_one_process(ranks) -> None:
    for rank, results in enumerate(ranks):
        assert_matches_reference(results["hooks-units"], f"scale_encoder_grads under FSDP1, rank {rank}")


# ------------------------------------------------------------------------- flattened encoders: a clear error
WAY_OUT = r"(?s)FSDP.*(scale_encoder_grads|own FSDP unit|use_orig_params=True)"


def test_encoders_flattened_into_a_shared_unit_are_refused(ranks) -> None:
    """Refused at construction: the encoder's modules share a flat parameter with the head, and parameter lists taken
    before wrapping are not what the optimizer holds."""
    for results in ranks:
        assert results["root-modules"].startswith("ValueError: groups['audio']: some of its parameters are flattened")
        assert results["root-params"].startswith(
            "ValueError: groups['audio'] holds a trainable parameter of shape (8, 6) that the optimizer does not own"
        )


def test_the_refusal_names_the_flat_parameters_and_the_way_out(ranks) -> None:
    for results in ranks:
        for case in ("root-modules", "root-params"):
            assert results[case].startswith("ValueError"), results[case]
            assert re.search(WAY_OUT, results[case]), results[case]


def test_an_encoder_split_across_flat_parameters_is_refused(ranks) -> None:
    for results in ranks:
        assert results["split"] != "accepted", "PDMP silently scales only the audio layers in a unit of their own"
        assert re.search(WAY_OUT, results["split"]), results["split"]


def test_the_hook_helper_works_on_encoders_flattened_into_the_root_unit(ranks) -> None:
    for rank, results in enumerate(ranks):
        assert not isinstance(results["hooks-root"], str), results["hooks-root"]
        assert_matches_reference(results["hooks-root"], f"scale_encoder_grads on the root unit, rank {rank}")
