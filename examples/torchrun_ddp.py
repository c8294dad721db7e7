"""Train a two-modality model with PDMP under DistributedDataParallel, or FSDP2 with ``--fsdp``.

Two processes on CPU (gloo):      torchrun --nproc-per-node 2 examples/torchrun_ddp.py [--fsdp]
One process per GPU (NCCL):       torchrun --nproc-per-node 4 examples/torchrun_ddp.py [--fsdp]

DDP averages the gradients during ``backward()``, so when ``opt.step()`` runs every rank holds the same
averaged gradients and PDMP multiplies them exactly as it would in one process. Nothing PDMP-specific is
needed beyond building ``groups`` from the model's modules (the model before wrapping, or ``ddp.module``).
FSDP2's ``fully_shard`` replaces every parameter by a DTensor shard whose gradient is the shard of the averaged
gradient; build the optimizer and ``PDMPOptimizer`` after sharding, from the sharded modules.
The data are those of ``examples/demo.py``: "audio" is learnt fast but capped, "visual" is slow but ends
higher, so "visual" is the performance-dominant modality and "audio" the optimization-dominant one.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pdmp_optim import PDMPOptimizer
from pdmp_optim.diagnostics import modality_grad_norms

CLASSES = 4


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=g)
    shown = torch.where(torch.rand(n, generator=g) < 0.6, y, torch.randint(CLASSES, (n,), generator=g))
    audio = 3.0 * nn.functional.one_hot(shown, CLASSES).float() + torch.randn(n, CLASSES, generator=g)
    means = torch.randn(CLASSES, 32, generator=torch.Generator().manual_seed(0))
    visual = 0.3 * means[y] + torch.randn(n, 32, generator=g)
    return TensorDataset(audio, visual, y)


class Fusion(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(CLASSES, 32), nn.ReLU())
        self.visual = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(64, CLASSES)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.audio(audio), self.visual(visual)], dim=1))


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP2 shard) is gathered, a plain tensor is returned as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = Fusion().to(device)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for module in (model.audio, model.visual, model.head):
            fully_shard(module, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)  # the same module, now with DTensor parameters
    else:
        wrapped = DDP(model, device_ids=[device.index] if use_cuda else None)
    sgd = torch.optim.SGD(model.parameters(), lr=5e-3, momentum=0.9, weight_decay=1e-4)
    opt = PDMPOptimizer(
        sgd, {"audio": model.audio, "visual": model.visual}, dominant="visual", optimization_dominant="audio"
    )
    if rank == 0:
        print(opt)

    train, test = make_data(args.train_size, seed=1), make_data(1024, seed=2)
    sampler = DistributedSampler(train, shuffle=True, seed=0)  # each rank sees its own share of every epoch
    loader = DataLoader(train, batch_size=args.global_batch // world, sampler=sampler, drop_last=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for index, (audio, visual, y) in enumerate(loader):
            loss = nn.functional.cross_entropy(wrapped(audio.to(device), visual.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()  # DDP all-reduces (FSDP2 reduce-scatters) the averaged gradients here
            if index == len(loader) - 1:  # once an epoch: gradient norms before and after PDMP's scaling
                before = modality_grad_norms(opt)
                opt.scale_grads_()  # step() will not scale again
                after = modality_grad_norms(opt)
                # under FSDP2 each norm is a DTensor: full() completes it, a collective that every rank runs
                readout = {m: f"{full(before[m]):.3g}/{full(after[m]):.3g}" for m in before}
                if rank == 0:
                    print("grad norms before/after PDMP:", readout)
            opt.step()  # PDMP multiplies the averaged gradients, then SGD steps: identical on every rank
        with torch.no_grad():  # every rank evaluates: FSDP2's forward needs all of them
            audio, visual, y = (t.to(device) for t in test.tensors)
            accuracy = (wrapped(audio, visual).argmax(1) == y).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}, test accuracy {accuracy:.3f}")

    # every replica must hold the same parameters (under FSDP2: the same full parameters)
    flat = torch.cat([full(p.detach()).flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        assert all(torch.equal(g, flat) for g in gathered), "replicas diverged"
        print(f"{world} replicas in sync")


def run() -> None:
    """``main()``, then a clean shutdown: the model, its gradients and any pending gloo work are released while
    the interpreter is still fully alive (otherwise gloo's threads can abort the process at exit)."""
    try:
        main()
        dist.barrier()
    finally:
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run()
