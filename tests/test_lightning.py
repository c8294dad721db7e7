"""Lightning: ``configure_optimizers`` returning a ``PDMPOptimizer``, ``Trainer.fit`` on CPU, and a resume.

Lightning steps through ``optimizer.step(closure)``; its closure runs ``training_step``, ``backward``,
``on_before_optimizer_step`` and gradient clipping, and PDMP multiplies the gradients when it returns.
Every run is compared with a plain-torch loop over the same batches.
"""

from __future__ import annotations

import pytest

pl = pytest.importorskip("lightning.pytorch", reason="needs the [lightning] extra: pip install 'pdmp-optim[lightning]'")

import torch  # noqa: E402
from _helpers import GAMMAS, TwoModal, assert_same_params, loss_fn, make_batches, reference_scale_grads  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from pdmp_optim import PDMPOptimizer  # noqa: E402

STEPS, MAX_NORM = 4, 0.05


def sgd(params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


class PDMPModule(pl.LightningModule):
    def __init__(self, gammas: dict[str, float] = GAMMAS, scale_before_clip: bool = False, mode: str = "auto") -> None:
        super().__init__()
        self.model = TwoModal()
        self.gammas = gammas
        self.scale_before_clip = scale_before_clip
        self.mode = mode

    def training_step(self, batch, batch_idx):
        return loss_fn(self.model, batch)

    def configure_optimizers(self):
        return PDMPOptimizer(sgd(self.model.parameters()), self.model.groups(), gammas=self.gammas, mode=self.mode)

    def on_before_optimizer_step(self, optimizer):
        if self.scale_before_clip:
            optimizer.scale_grads_()  # Lightning clips right after this hook


def loader(steps: int = STEPS, micro: int = 1) -> DataLoader:
    batches = make_batches(steps * micro, n=8 // micro)
    return DataLoader(TensorDataset(*(torch.cat(t) for t in zip(*batches, strict=True))), batch_size=8 // micro)


def trainer(max_steps: int = STEPS, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**options, **kwargs})


def reference(steps: int = STEPS, clip: str | None = None, micro: int = 1):
    model = TwoModal()
    opt = sgd(model.parameters())
    batches = make_batches(steps * micro, n=8 // micro)
    for step in range(steps):
        opt.zero_grad()
        for batch in batches[step * micro : (step + 1) * micro]:
            (loss_fn(model, batch) / micro).backward()
        if clip == "clip-scale":
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        reference_scale_grads(model)
        if clip == "scale-clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
    return model


def test_fit_applies_pdmp():
    module = PDMPModule()
    trainer().fit(module, loader())
    assert isinstance(module.optimizers().optimizer, PDMPOptimizer)
    assert_same_params(module.model, reference())


def test_accumulate_grad_batches_scales_once_per_step():
    module = PDMPModule()
    trainer(accumulate_grad_batches=2).fit(module, loader(micro=2))
    assert module.global_step == STEPS
    assert_same_params(module.model, reference(micro=2))


def test_gradient_clip_val_clips_before_pdmp_scales():
    module = PDMPModule()
    trainer(gradient_clip_val=MAX_NORM).fit(module, loader())
    assert_same_params(module.model, reference(clip="clip-scale"))


def test_scale_grads_in_on_before_optimizer_step_then_lightning_clips():
    module = PDMPModule(scale_before_clip=True)
    trainer(gradient_clip_val=MAX_NORM).fit(module, loader())
    assert_same_params(module.model, reference(clip="scale-clip"))


@pytest.mark.parametrize("options", [{}, {"accumulate_grad_batches": 2}, {"gradient_clip_val": MAX_NORM}],
                         ids=["fit", "accumulate", "clip"])  # fmt: skip
def test_sgd_lr_mode_the_zero_cost_twin_follows_grad_mode(options):
    module = PDMPModule(mode="lr")
    micro = options.get("accumulate_grad_batches", 1)
    trainer(**options).fit(module, loader(micro=micro))
    want = reference(micro=micro, clip="clip-scale" if "gradient_clip_val" in options else None)
    for p, q in zip(module.model.parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_restores_the_gammas_from_the_param_groups(tmp_path):
    # one batch per epoch: Lightning 2.6 replays the epoch's first batches when it resumes a plain
    # DataLoader, so with a single batch the resumed and the uninterrupted runs see the same data
    whole = PDMPModule()
    trainer().fit(whole, loader(1))

    first = PDMPModule()
    first_trainer = trainer(max_steps=2)
    first_trainer.fit(first, loader(1))
    path = tmp_path / "half.ckpt"
    first_trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]
    assert "pdmp" not in saved  # the inner optimizer's own state dict, one param group per modality
    assert [(g["modality"], g["pdmp_gamma"], g["params"]) for g in saved["param_groups"]] == [
        ("audio", GAMMAS["audio"], [0, 1, 2, 3]),
        ("visual", GAMMAS["visual"], [4, 5]),
        (None, 1.0, [6, 7]),
    ]

    resumed = PDMPModule()
    resumed.model = TwoModal(seed=123)  # different weights: everything must come from the checkpoint
    trainer().fit(resumed, loader(1), ckpt_path=path)
    assert_same_params(resumed.model, whole.model)
    assert resumed.optimizers().optimizer.gammas == GAMMAS

    # control: the same weights with a fresh optimizer (momentum lost) end elsewhere
    weights_only = PDMPModule()
    weights_only.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    trainer(max_steps=2).fit(weights_only, loader(1))
    assert not torch.equal(weights_only.model.audio[0].weight, whole.model.audio[0].weight)

    # the gammas travel in the checkpoint's param groups: a module built with others resumes with the checkpoint's
    other = PDMPModule(gammas={"audio": 1.0, "visual": 15.0})
    trainer().fit(other, loader(1), ckpt_path=path)
    assert other.optimizers().optimizer.gammas == GAMMAS
    assert [g["pdmp_gamma"] for g in other.optimizers().optimizer.param_groups] == [
        GAMMAS["audio"],
        GAMMAS["visual"],
        1.0,
    ]
    assert_same_params(other.model, whole.model)
