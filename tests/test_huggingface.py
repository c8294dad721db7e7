"""Hugging Face ``transformers.Trainer`` with a PDMPOptimizer over two transformer towers (a tiny BertModel and a tiny
ViTModel, built from configs: nothing is downloaded), against plain-torch reference loops: ``optimizers=(pdmp,
scheduler)`` with the Trainer's clipping before PDMP's scaling, the other order through a callback, gradient
accumulation, bf16 mixed precision on CPU, a ``Trainer`` subclass whose ``create_optimizer`` wraps the optimizer
``TrainingArguments`` choose ("lr" mode, against the reference twin), and ``resume_from_checkpoint``, which restores
the gammas from the saved param groups.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest

transformers = pytest.importorskip(
    "transformers", reason="needs the [transformers] extra: pip install 'pdmp-optim[transformers]'"
)
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _helpers import reference_scale_grads  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTModel,
)

from pdmp_optim import PDMPOptimizer  # noqa: E402
from pdmp_optim.reference import PDMPReference  # noqa: E402

GAMMAS = {"text": 15.0, "image": 1 / 15}
STEPS, BATCH, SAMPLES, MAX_NORM = 4, 4, 16, 0.05
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(before)


class TwoTower(nn.Module):
    """A text tower (BERT) and an image tower (ViT), their first tokens concatenated into a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.text = BertModel(
            BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0),
            add_pooling_layer=False,
        )  # fmt: skip
        self.image = ViTModel(
            ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32),
            add_pooling_layer=False,
        )  # fmt: skip
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict:
        text = self.text(input_ids=input_ids).last_hidden_state[:, 0]
        image = self.image(pixel_values=pixel_values).last_hidden_state[:, 0]
        logits = self.head(torch.cat([text, image], dim=1))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    def groups(self) -> dict[str, nn.Module]:
        return {"text": self.text, "image": self.image}

    def modality_params(self) -> dict[str, list[torch.Tensor]]:
        return {m: list(module.parameters()) for m, module in self.groups().items()}


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(0, 50, (6,), generator=g),
            "pixel_values": torch.randn(3, 8, 8, generator=g),
            "labels": torch.randint(0, 3, (), generator=g),
        }
        for _ in range(SAMPLES)
    ]


def micro_batches(size: int) -> list[dict[str, torch.Tensor]]:
    """The Trainer's batches in order (``train_sampling_strategy="sequential"``)."""
    data = dataset()
    return [{k: torch.stack([s[k] for s in data[i : i + size]]) for k in data[0]} for i in range(0, SAMPLES, size)]


def arguments(out, **overrides) -> TrainingArguments:
    options = dict(
        max_steps=STEPS, per_device_train_batch_size=BATCH, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, train_sampling_strategy="sequential", max_grad_norm=MAX_NORM,
    )  # fmt: skip
    return TrainingArguments(str(out), **{**options, **overrides})


def pdmp_sgd(model: TwoTower) -> tuple[PDMPOptimizer, torch.optim.lr_scheduler.LRScheduler]:
    pdmp = PDMPOptimizer(torch.optim.SGD(model.parameters(), **SGD), model.groups(), gammas=GAMMAS)
    assert pdmp.mode == "grad"
    return pdmp, torch.optim.lr_scheduler.StepLR(pdmp, step_size=2, gamma=0.5)


def reference(micro: int = 1, order: str = "clip-scale", autocast: bool = False) -> TwoTower:
    """Plain SGD and StepLR; the Trainer's loop written out: micro-batch losses divided by their number, then clip
    and PDMP's scaling in ``order``, step, scheduler step."""
    model = TwoTower()
    opt = torch.optim.SGD(model.parameters(), **SGD)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    batches = micro_batches(BATCH // micro)
    for step in range(STEPS):
        for batch in batches[step * micro : (step + 1) * micro]:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with ctx:
                loss = model(**batch)["loss"]
            (loss / micro).backward()
        if order == "clip-scale":
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        reference_scale_grads(model, GAMMAS)
        if order == "scale-clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        scheduler.step()
        model.zero_grad()
    return model


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs: max |diff| = {(p - q).abs().max().item():.3g}"


def train(model: TwoTower, args: TrainingArguments, pdmp=None, scheduler=None, trainer_cls=Trainer, resume=None,
          **kwargs):  # fmt: skip
    optimizers = (pdmp, scheduler) if pdmp is not None else (None, None)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset(), optimizers=optimizers, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="pdmp_optim")
        warnings.filterwarnings("error", message=".*lr_scheduler.step\\(\\)")  # the scheduler sees real steps
        trainer.train(resume_from_checkpoint=resume)
    return trainer


# ------------------------------------------------------------------ optimizers=(PDMPOptimizer(...), scheduler)
def test_trainer_clips_then_pdmp_scales(tmp_path) -> None:
    model = TwoTower()
    pdmp, scheduler = pdmp_sgd(model)
    trainer = train(model, arguments(tmp_path), pdmp, scheduler)
    assert isinstance(trainer.optimizer, AcceleratedOptimizer) and trainer.optimizer.optimizer is pdmp
    assert trainer.optimizer.param_groups is pdmp.param_groups
    assert scheduler.last_epoch == STEPS  # stepped once per optimizer step
    assert_same(model, reference(order="clip-scale"))


class ScaleThenClip(TrainerCallback):
    """The other order: with ``max_grad_norm=0`` the Trainer only measures the norm; scale, then clip, here."""

    def __init__(self, pdmp: PDMPOptimizer, max_norm: float) -> None:
        self.pdmp, self.max_norm = pdmp, max_norm

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.pdmp.scale_grads_()  # the Trainer's step() then does not scale again
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)


def test_scale_then_clip_through_a_callback(tmp_path) -> None:
    model = TwoTower()
    pdmp, scheduler = pdmp_sgd(model)
    train(model, arguments(tmp_path, max_grad_norm=0.0), pdmp, scheduler, callbacks=[ScaleThenClip(pdmp, MAX_NORM)])
    assert_same(model, reference(order="scale-clip"))


def test_gradient_accumulation_scales_once_per_step(tmp_path) -> None:
    model = TwoTower()
    pdmp, scheduler = pdmp_sgd(model)
    args = arguments(tmp_path, per_device_train_batch_size=BATCH // 2, gradient_accumulation_steps=2)
    train(model, args, pdmp, scheduler)
    assert_same(model, reference(micro=2))


def test_bf16_mixed_precision_on_cpu(tmp_path) -> None:
    model = TwoTower()
    pdmp, scheduler = pdmp_sgd(model)
    trainer = train(model, arguments(tmp_path, bf16=True), pdmp, scheduler)
    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.scaler is None
    assert_same(model, reference(autocast=True))


# ------------------------------------------------------ a Trainer subclass: TrainingArguments choose lr and decay
class PDMPTrainer(Trainer):
    """Wraps whatever optimizer ``TrainingArguments`` choose (AdamW by default: PDMP's "lr" mode)."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            super().create_optimizer(model)
            self.optimizer = PDMPOptimizer(self.optimizer, self.model.groups(), gammas=GAMMAS)
        return self.optimizer


def test_subclass_wraps_the_optimizer_training_arguments_choose(tmp_path) -> None:
    model = TwoTower()
    args = arguments(tmp_path, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    trainer = train(model, args, trainer_cls=PDMPTrainer)
    pdmp = trainer.optimizer.optimizer
    assert isinstance(pdmp, PDMPOptimizer) and pdmp.mode == "lr"
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert isinstance(pdmp.optimizer, cls)

    # every group holds one modality: the Trainer's decay/no-decay groups, each split by modality
    decay = set(trainer.get_decay_parameter_names(model))
    names = {p: n for n, p in model.named_parameters()}
    modality = {p: m for m, ps in model.modality_params().items() for p in ps}
    for group in pdmp.param_groups:
        assert {modality.get(p) for p in group["params"]} == {group["modality"]}
        assert {names[p] in decay for p in group["params"]} == {group["weight_decay"] > 0}
        assert group["pdmp_gamma"] == GAMMAS.get(group["modality"], 1.0)
    assert [(g["modality"], g["weight_decay"]) for g in pdmp.param_groups] == [
        ("text", 0.1), ("image", 0.1), (None, 0.1), ("text", 0.0), ("image", 0.0), (None, 0.0),
    ]  # fmt: skip

    # the reference twin over the same optimizer with the Trainer's two (unsplit) groups and the same schedule
    ref = TwoTower()
    groups = [{"params": [p for n, p in ref.named_parameters() if (n in decay) == wanted], "weight_decay": wd}
              for wanted, wd in ((True, 0.1), (False, 0.0))]  # fmt: skip
    opt = PDMPReference(cls(groups, **kwargs), ref.groups(), gammas=GAMMAS)
    assert opt.mode == "lr"
    scheduler = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
    for batch in micro_batches(BATCH):
        ref(**batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        scheduler.step()
        ref.zero_grad()
    assert_same(model, ref)


# ---------------------------------------------------------------------------------- resume_from_checkpoint
class PauseModulation(TrainerCallback):
    """Sets both gammas to 1 after the first step (an OGM-GE-style modulation window)."""

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 1:
            optimizer.optimizer.gammas = {"text": 1.0, "image": 1.0}  # the PDMPOptimizer in the AcceleratedOptimizer


def run_to_resume(out, kind: str, resume=None, callbacks=()) -> tuple[TwoTower, PDMPOptimizer, Trainer]:
    """``STEPS`` steps saving a checkpoint after 2: PDMP over SGD handed to the Trainer, or wrapped in
    ``create_optimizer`` around the AdamW it builds (lr mode, groups split)."""
    model = TwoTower()
    args = arguments(out, save_strategy="steps", save_steps=2, **({"learning_rate": 1e-2} if kind == "adamw" else {}))
    if kind == "sgd":
        trainer = train(model, args, *pdmp_sgd(model), resume=resume, callbacks=list(callbacks))
    else:
        trainer = train(model, args, trainer_cls=PDMPTrainer, resume=resume, callbacks=list(callbacks))
    return model, trainer.optimizer.optimizer, trainer


@pytest.mark.parametrize("kind", ["sgd", "adamw"], ids=["handed-to-trainer", "create-optimizer-lr-mode"])
def test_resume_from_checkpoint_continues_bit_for_bit_with_the_saved_gammas(tmp_path, kind) -> None:
    whole, pdmp, _ = run_to_resume(tmp_path, kind, callbacks=[PauseModulation()])
    assert dict(pdmp.gammas) == {"text": 1.0, "image": 1.0}
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert "pdmp" not in saved  # the inner optimizer's own state dict: the gammas travel in its param groups
    assert [(g["modality"], g["pdmp_gamma"]) for g in saved["param_groups"]] == [
        (g["modality"], 1.0) for g in pdmp.param_groups
    ]
    assert len(saved["param_groups"]) == (3 if kind == "sgd" else 6)

    # built as before the first run (gammas 15 and 1/15): the checkpoint brings the weights and the gammas
    resumed, pdmp2, trainer2 = run_to_resume(tmp_path / "again", kind, resume=str(tmp_path / "checkpoint-2"))
    assert dict(pdmp2.gammas) == {"text": 1.0, "image": 1.0}
    assert [g["pdmp_gamma"] for g in pdmp2.param_groups] == [1.0] * len(saved["param_groups"])
    assert trainer2.lr_scheduler.last_epoch == STEPS
    assert_same(resumed, whole)
