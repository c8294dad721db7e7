"""Train a two-modality model with PDMP under DistributedDataParallel.

Two processes on CPU (gloo):      torchrun --nproc-per-node 2 examples/torchrun_ddp.py
One process per GPU (NCCL):       torchrun --nproc-per-node 4 examples/torchrun_ddp.py

DDP averages the gradients during ``backward()``, so when ``opt.step()`` runs every rank holds the same
averaged gradients and PDMP multiplies them exactly as it would in one process. Nothing PDMP-specific is
needed beyond building ``groups`` from the model's modules (the unwrapped model, or ``ddp.module``).
The data are those of ``examples/demo.py``: "audio" is learnt fast but capped, "visual" is slow but ends
higher, so "visual" is the performance-dominant modality and "audio" the optimization-dominant one.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pdmp_optim import PDMPOptimizer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=64)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # DDP broadcasts rank 0's initial weights anyway
    model = Fusion().to(device)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
    sgd = torch.optim.SGD(ddp.parameters(), lr=5e-3, momentum=0.9, weight_decay=1e-4)
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
        for audio, visual, y in loader:
            loss = nn.functional.cross_entropy(ddp(audio.to(device), visual.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()  # DDP all-reduces (averages) the gradients here
            opt.step()  # PDMP multiplies the averaged gradients, then SGD steps: identical on every rank
        if rank == 0:
            with torch.no_grad():
                audio, visual, y = (t.to(device) for t in test.tensors)
                accuracy = (model(audio, visual).argmax(1) == y).float().mean().item()
            print(f"epoch {epoch}: loss {loss.item():.4f}, test accuracy {accuracy:.3f}")

    # every replica must hold the same parameters
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        assert all(torch.equal(g, flat) for g in gathered), "replicas diverged"
        print(f"{world} replicas in sync")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
