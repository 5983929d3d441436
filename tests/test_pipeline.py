"""Tests for pfp.pipeline (the cascade and its shared setup) and pfp.compare, on synthetic data."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from pfp import pipeline
from pfp.compare import run_compare
from pfp.config import ConfigError, RunConfig
from pfp.data import InMemoryImageDataset
from pfp.models import build_model
from pfp.resources import count_flops, count_params
from pfp.serialization import CheckpointError, load_model, save_model
from pfp.train import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_config(out: Path, **sections) -> RunConfig:
    """LeNet5 on 16px one-channel synthetic data: a whole cascade takes seconds."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "output_dir": str(out),
        "data": {
            "name": "synthetic", "synthetic_channels": 1, "synthetic_size": 16, "synthetic_train": 384,
            "synthetic_test": 128, "batch_size": 64, "eval_batch_size": 128,
        },
        "model": {"name": "lenet5"},
        "train": {"epochs": 2, "lr": 0.05, "schedule": "cosine", "amp": "off", "channels_last": "off"},
        "retrain": {"epochs": 1, "lr": 0.02, "schedule": "cosine", "amp": "off", "channels_last": "off"},
        "prune": {"keep_ratios": [0.6, 0.35], "round_to": 1, "calib_size": 32, "holdout_size": 32,
                  "calib_split": 0.25},
    }  # fmt: skip
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return RunConfig.model_validate(raw)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def console_text(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade")
    cfg = tiny_config(out)
    con = quiet()
    calls = []
    real_prune = pipeline.prune

    def recording_prune(model, *args, **kwargs):
        calls.append({"input_params": count_params(model), "reference": kwargs.get("reference")})
        return real_prune(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "prune", recording_prune)
        result = pipeline.run_cascade(cfg, console=con, progress=False)
    result.prune_calls = calls  # type: ignore[attr-defined]
    return cfg, result, console_text(con)


# --------------------------------------------------------------------------- cascade


def test_cascade_writes_results_plot_and_models(cascade):
    cfg, result, log = cascade
    run = Path(cfg.output_dir) / cfg.name
    assert result.trained_base and "train lenet5" in log
    assert result.results_path == run / "results.json"
    saved = json.loads(result.results_path.read_text())
    assert len(saved["rounds"]) == 2 and saved["chosen"] == result.chosen
    assert saved["base"]["params"] == result.base["params"] > 0
    assert result.plot_path == run / "cascade.png"
    assert result.plot_path.read_bytes()[:8] == PNG_MAGIC

    base, _ = load_model(run / "base.pt", build_model)
    example = torch.zeros(1, 1, 16, 16)
    base_flops = count_flops(base, example)
    assert base_flops == result.base["flops"]

    previous_flops = base_flops
    previous_widths = {n: m.weight.shape[0] for n, m in base.named_modules() if hasattr(m, "weight")}
    for i, (row, ratio) in enumerate(zip(result.rounds, cfg.prune.keep_ratios)):
        assert row["error"] is None
        assert row["round"] == i + 1 and row["keep_ratio"] == ratio
        # the budget is on the ORIGINAL network's FLOPs, met from below up to rounding
        assert row["flops"] <= ratio * base_flops * 1.001
        assert row["flops"] >= ratio * base_flops * 0.9
        assert row["flops_removed_pct"] == pytest.approx(100 * (1 - row["flops"] / base_flops))
        assert 0 <= row["acc_before_retrain"] <= 100 and 0 <= row["acc"] <= 100
        model, info = load_model(row["model_path"], build_model)
        assert count_params(model) == row["params"]
        assert count_flops(model, example) == row["flops"] < previous_flops
        previous_flops = row["flops"]
        # each round prunes the previous round's network: no layer grows back
        widths = {n: m.weight.shape[0] for n, m in model.named_modules() if hasattr(m, "weight")}
        assert widths.keys() == previous_widths.keys()
        assert all(widths[n] <= previous_widths[n] for n in widths), (widths, previous_widths)
        previous_widths = widths
        assert info["meta"]["report"]["method"] == "pfp"
        report = json.loads(Path(row["report_path"]).read_text())
        assert report["original_flops"] == base_flops and report["flops"] == row["flops"]
        assert Path(row["model_path"]).parent == run / f"round_{i + 1}"
        assert not (run / f"round_{i + 1}" / "retrain.ckpt").exists()


def test_each_round_prunes_the_last_retrained_network_against_the_original(cascade):
    _, result, _ = cascade
    calls = result.prune_calls
    assert [c["input_params"] for c in calls] == [result.base["params"], result.rounds[0]["params"]]
    assert all(c["reference"] == (result.base["params"], result.base["flops"]) for c in calls)


def test_cascade_round_model_is_the_one_evaluated(cascade):
    cfg, result, _ = cascade
    from pfp.data import build_data, make_loader

    data = build_data(cfg.data)
    loader = make_loader(data.test, 128, shuffle=False)
    row = result.rounds[-1]
    model, _ = load_model(row["model_path"], build_model)
    assert evaluate(model, loader, "cpu")["acc"] == pytest.approx(row["acc"])


def test_cascade_choice_follows_the_tolerance(cascade):
    cfg, result, log = cascade
    base_acc = result.base["acc"]
    ok = [i for i, r in enumerate(result.rounds) if r["acc"] >= base_acc - cfg.prune.tolerance]
    expected = min(ok, key=lambda i: result.rounds[i]["flops"]) if ok else None
    assert result.chosen == expected
    chosen_copy = Path(cfg.output_dir) / cfg.name / "chosen.pt"
    assert chosen_copy.exists() == (expected is not None)
    assert ("chosen" in log) == (expected is not None)


def test_choose_rule():
    rows = [
        {"acc": 90.0, "flops": 50, "error": None},
        {"acc": 89.6, "flops": 30, "error": None},
        {"acc": 80.0, "flops": 15, "error": None},
        {"acc": None, "flops": None, "error": "PruneError: too small"},
    ]
    assert pipeline.choose(90.0, rows, 0.5) == 1
    assert pipeline.choose(90.0, rows, 0.3) == 0
    assert pipeline.choose(95.0, rows, 0.5) is None
    assert pipeline.choose(70.0, rows, 0.0) == 2


def test_rerun_reuses_base_and_rounds(cascade, monkeypatch):
    cfg, first, _ = cascade
    base = Path(cfg.output_dir) / cfg.name / "base.pt"
    stamp = base.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("a re-run must not train")

    def no_pruning(*a, **k):
        raise AssertionError("a re-run must not prune finished rounds again")

    monkeypatch.setattr(pipeline, "train", no_training)
    monkeypatch.setattr(pipeline, "prune", no_pruning)
    con = quiet()
    again = pipeline.run_cascade(cfg, console=con, progress=False)
    assert again.trained_base is False
    assert "reusing" in console_text(con)
    assert base.stat().st_mtime_ns == stamp
    assert json.loads(again.results_path.read_text())["base"]["trained_now"] is False
    assert [r["acc"] for r in again.rounds] == [r["acc"] for r in first.rounds]
    assert again.chosen == first.chosen


def test_changed_config_retrains_and_keeps_the_old_base(cascade, tmp_path):
    cfg, _, _ = cascade
    shutil.copytree(Path(cfg.output_dir) / cfg.name, tmp_path / cfg.name)
    changed = tiny_config(tmp_path, train={"epochs": 1})
    setup = pipeline.prepare(changed, console=quiet(), progress=False, calibration=False)
    assert setup.trained_now
    aside = list((tmp_path / cfg.name).glob("base-*.pt"))
    assert len(aside) == 1, "the base trained with the other config is moved aside, not overwritten"
    _, info = load_model(tmp_path / cfg.name / "base.pt", build_model)
    assert info["meta"]["config_hash"] == pipeline.base_config_hash(changed) != pipeline.base_config_hash(cfg)


def test_interrupted_training_resumes_from_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"epochs": 3})
    real_train = pipeline.train

    class Interrupted(RuntimeError):
        pass

    def crash_after_first_epoch(*args, **kwargs):
        log = kwargs["log"]

        def boom(stats):
            log(stats)
            raise Interrupted  # the checkpoint of this epoch is already written

        return real_train(*args, **{**kwargs, "log": boom})

    monkeypatch.setattr(pipeline, "train", crash_after_first_epoch)
    with pytest.raises(Interrupted):
        pipeline.prepare(cfg, console=quiet(), progress=False, calibration=False)
    assert (tmp_path / "tiny" / "train.ckpt").exists() and not (tmp_path / "tiny" / "base.pt").exists()

    epochs_run = []

    def counting(*args, **kwargs):
        log = kwargs["log"]
        return real_train(*args, **{**kwargs, "log": lambda s: (epochs_run.append(s.epoch), log(s))})

    monkeypatch.setattr(pipeline, "train", counting)
    setup = pipeline.prepare(cfg, console=quiet(), progress=False, calibration=False)
    assert epochs_run == [1, 2], "the second run continues after the first epoch"
    assert setup.trained_now and (tmp_path / "tiny" / "base.pt").exists()


def test_impossible_round_is_recorded_and_stops_the_cascade(cascade, tmp_path):
    cfg, first, _ = cascade
    shutil.copytree(Path(cfg.output_dir) / cfg.name, tmp_path / cfg.name)
    bad = tiny_config(tmp_path, prune={"keep_ratios": [0.6, 0.001, 0.0005]})
    con = quiet()
    result = pipeline.run_cascade(bad, console=con, progress=False)
    assert not result.trained_base
    assert len(result.rounds) == 2  # the third round is not attempted
    assert result.rounds[0]["acc"] == first.rounds[0]["acc"]  # round 1 reused
    assert result.rounds[1]["error"].startswith("PruneError") and result.rounds[1]["acc"] is None
    assert "PruneError" in console_text(con)
    saved = json.loads(result.results_path.read_text())
    assert saved["rounds"][1]["error"] == result.rounds[1]["error"]
    assert result.chosen in (None, 0)


# --------------------------------------------------------------------------- base model from a checkpoint


def test_pretrained_checkpoint_is_used_without_training(cascade, tmp_path, monkeypatch):
    cfg, first, _ = cascade
    base = Path(cfg.output_dir) / cfg.name / "base.pt"
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("must not train"))
    cfg2 = tiny_config(tmp_path, model={"name": "lenet5", "pretrained_checkpoint": str(base)})
    setup = pipeline.prepare(cfg2, console=quiet(), progress=False, calibration=False)
    assert not setup.trained_now
    assert setup.acc == pytest.approx(first.base["acc"])


def test_pretrained_checkpoint_errors_name_the_file(cascade, tmp_path):
    cfg, _, _ = cascade
    base = Path(cfg.output_dir) / cfg.name / "base.pt"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        pipeline.prepare(
            tiny_config(tmp_path, model={"pretrained_checkpoint": str(garbage)}), console=quiet(), calibration=False
        )
    other_classes = tiny_config(
        tmp_path, model={"pretrained_checkpoint": str(base)}, data={"synthetic_classes": 5}
    )
    with pytest.raises(CheckpointError, match=r"base\.pt.*10 classes.*5"):
        pipeline.prepare(other_classes, console=quiet(), calibration=False)
    other_size = tiny_config(tmp_path, model={"pretrained_checkpoint": str(base)}, data={"synthetic_size": 24})
    with pytest.raises(CheckpointError, match=r"base\.pt.*does not accept 1x24x24"):
        pipeline.prepare(other_size, console=quiet(), calibration=False)


# --------------------------------------------------------------------------- calibration data


def test_eval_view_drops_augmentation_and_shares_the_images():
    x = torch.randint(0, 255, (10, 1, 8, 8), dtype=torch.uint8)
    ds = InMemoryImageDataset(x, torch.arange(10) % 2, augment=True, pad=2)
    view = pipeline.eval_view(ds)
    assert ds.augment and not view.augment
    assert view.images is ds.images
    sub = pipeline.eval_view(torch.utils.data.Subset(ds, [3, 4]))
    assert not sub.dataset.augment and list(sub.indices) == [3, 4]
    torch.manual_seed(0)
    a = view[3][0]
    torch.manual_seed(1)
    assert torch.equal(a, view[3][0])  # no random crop / flip


def test_calibration_sets_are_held_out_disjoint_and_sized(tmp_path):
    cfg = tiny_config(tmp_path, prune={"calib_size": 40, "holdout_size": 24, "calib_split": 0.25,
                                       "postprocess_points": 80})
    from pfp.data import build_data

    data = build_data(cfg.data)
    train, pool = pipeline.split_training(cfg, data.train)
    assert len(pool) == 96 and len(train) == 384 - 96
    assert not set(train.indices) & set(pool.indices)  # never trained on
    model = build_model("lenet5", 10, 1, 16)
    cal = pipeline.calibration_loaders(cfg, data, model, torch.zeros(1, 1, 16, 16), quiet(), pool=pool)
    assert (cal.calib_size, cal.holdout_size, cal.postprocess_size) == (40, 24, 72)
    calib, hold, post = (set(l.dataset.indices) for l in (cal.calib, cal.holdout, cal.postprocess))
    assert len(calib) == 40 and len(hold) == 24 and len(post) == 72
    assert not calib & hold and not post & hold  # the guarantee's points are distinct from S and the refit's
    assert calib <= post
    # |S| from the spec's formula when calib_size is unset
    cfg2 = tiny_config(tmp_path, prune={"calib_size": None, "holdout_size": 8, "calib_split": 0.9})
    _, pool2 = pipeline.split_training(cfg2, data.train)
    cal2 = pipeline.calibration_loaders(cfg2, data, model, torch.zeros(1, 1, 16, 16), quiet(), pool=pool2)
    assert 50 < cal2.calib_size < 384


def test_a_calib_split_smaller_than_s_is_one_clear_error_before_training(tmp_path):
    cfg = tiny_config(tmp_path, prune={"calib_size": 40, "calib_split": 0.05})
    with pytest.raises(ConfigError) as err:
        pipeline.prepare(cfg, console=quiet(), progress=False)
    msg = str(err.value)
    assert msg.startswith("prune.calib_split: 0.05 of the 384 training images holds out 19, fewer than the |S| = 40")
    assert not (tmp_path / "tiny" / "base.pt").exists()  # nothing was trained
    with pytest.raises(ValueError, match="neither a fraction below 1 nor a whole number"):
        tiny_config(tmp_path, prune={"calib_split": 2.5})


# --------------------------------------------------------------------------- compare


def test_compare_two_methods_records_failures_and_goes_on(cascade):
    cfg, _, _ = cascade
    con = quiet()
    rows = run_compare(cfg, ["pfp", "sfp"], [0.5, 0.999], console=con, progress=False)
    # each method plain, then with the shared post-processing
    assert [(r["method"], r["postprocess"], r["reduction"]) for r in rows] == [
        (m, pp, red) for m in ("pfp", "sfp") for pp in ("plain", "shared") for red in (0.5, 0.999)]
    ok = [r for r in rows if r["reduction"] == 0.5]
    orders = {(r["method"], r["postprocess"]): json.loads(Path(r["report_path"]).read_text())["postprocess"]["order"]
              for r in ok}
    assert orders[("pfp", "plain")] is None and orders[("sfp", "plain")] is None
    assert orders[("pfp", "shared")] in ("refit", "refit+bn", "refit+bn_unrestored")
    assert orders[("sfp", "shared")] is None  # SFP cannot be refit before removal, and LeNet5 has no BN
    failed = [r for r in rows if r["reduction"] == 0.999]
    for r in ok:
        assert r["error"] is None
        assert 49.0 <= r["flops_removed_pct"] <= 55.0
        assert r["target_flops_removed_pct"] == pytest.approx(50.0)
        assert 0 <= r["acc_before_retrain"] <= 100 and 0 <= r["acc"] <= 100
    for r in failed:
        assert r["error"].startswith("PruneError") and r["acc"] is None
    text = console_text(con)
    assert "reusing" in text  # the cascade's base model, not a new training

    out = Path(cfg.output_dir) / cfg.name / "compare"
    saved = json.loads((out / "compare.json").read_text())
    assert len(saved["rows"]) == 8
    with open(out / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and table[1]["method"] == "pfp" and "PruneError" in table[1]["error"]
    assert table[0]["error"] == ""
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    model, _ = load_model(ok[0]["model_path"], build_model)
    assert count_flops(model, torch.zeros(1, 1, 16, 16)) == ok[0]["flops"]


def test_compare_rejects_unknown_method_before_any_work(tmp_path):
    from pfp.config import ConfigError

    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        run_compare(cfg, ["pfp", "nope"], None, console=quiet())
    assert not (tmp_path / "tiny").exists()


def test_save_model_meta_roundtrip_of_rows(tmp_path):
    # rows and reports go into model files as meta: they must be plain data
    row = pipeline._error_row("pfp", "flops", 0.5, ValueError("x\ny"))
    save_model(tmp_path / "m.pt", build_model("lenet5", 10, 1, 16), {"name": "lenet5", "num_classes": 10,
               "in_channels": 1, "input_size": 16}, meta={"row": row})
    _, info = load_model(tmp_path / "m.pt", build_model)
    assert info["meta"]["row"]["error"] == "ValueError: x"
