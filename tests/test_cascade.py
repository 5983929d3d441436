"""Tests for pfp.setup, pfp.rounds, pfp.cascade and pfp.compare, on synthetic data."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from pfp import rounds
from pfp import setup as setup_mod
from pfp.cascade import choose, run_cascade
from pfp.compare import run_compare
from pfp.config import ConfigError, RunConfig
from pfp.data import InMemoryImageDataset
from pfp.models import build_model
from pfp.resources import count_flops, count_params
from pfp.results import RoundResult
from pfp.rounds import RoundSpec, run_round
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


@contextlib.contextmanager
def captured_log():
    """The messages the pfp loggers emit at INFO and above inside the block."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("pfp")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade")
    cfg = tiny_config(out)
    calls = []
    real_prune = rounds.prune

    def recording_prune(model, *args, **kwargs):
        calls.append({"input_params": count_params(model), "reference": kwargs.get("reference")})
        return real_prune(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, captured_log() as lines:
        mp.setattr(rounds, "prune", recording_prune)
        result = run_cascade(cfg, progress=False)
    return cfg, result, "\n".join(lines), calls


# --------------------------------------------------------------------------- cascade


def test_cascade_writes_results_plot_and_models(cascade):
    cfg, result, log, _ = cascade
    run = Path(cfg.output_dir) / cfg.name
    assert result.trained_base and "train lenet5" in log
    assert result.results_path == run / "results.json"
    saved = json.loads(result.results_path.read_text())
    assert len(saved["rounds"]) == 2 and saved["chosen"] == result.chosen
    assert saved["base"]["params"] == result.base.params > 0
    assert result.plot_path == run / "cascade.png"
    assert result.plot_path.read_bytes()[:8] == PNG_MAGIC

    base, _ = load_model(run / "base.pt", build_model)
    example = torch.zeros(1, 1, 16, 16)
    base_flops = count_flops(base, example)
    assert base_flops == result.base.flops

    previous_flops = base_flops
    previous_widths = {n: m.weight.shape[0] for n, m in base.named_modules() if hasattr(m, "weight")}
    for i, (row, ratio) in enumerate(zip(result.rounds, cfg.prune.keep_ratios)):
        assert row.error is None and not row.reused
        assert row.round == i + 1 and row.keep_ratio == ratio
        # the budget is on the ORIGINAL network's FLOPs, met from below up to rounding
        assert row.flops <= ratio * base_flops * 1.001
        assert row.flops >= ratio * base_flops * 0.9
        assert row.flops_removed_pct == pytest.approx(100 * (1 - row.flops / base_flops))
        assert 0 <= row.acc_before_retrain <= 100 and 0 <= row.acc <= 100
        model, info = load_model(row.model_path, build_model)
        assert count_params(model) == row.params
        assert count_flops(model, example) == row.flops < previous_flops
        previous_flops = row.flops
        # each round prunes the previous round's network: no layer grows back
        widths = {n: m.weight.shape[0] for n, m in model.named_modules() if hasattr(m, "weight")}
        assert widths.keys() == previous_widths.keys()
        assert all(widths[n] <= previous_widths[n] for n in widths), (widths, previous_widths)
        previous_widths = widths
        assert info["meta"]["report"]["method"] == "pfp"
        assert RoundResult.model_validate(info["meta"]["row"]).acc == row.acc  # the model file holds its row
        report = json.loads(Path(row.report_path).read_text())
        assert report["original_flops"] == base_flops and report["flops"] == row.flops
        # the measured guarantee comes with the row
        assert row.preact_err_p95_max == max(m["rel_p95"] for m in report["guarantee"])
        assert Path(row.model_path).parent == run / f"round_{i + 1}"
        assert not (run / f"round_{i + 1}" / "retrain.ckpt").exists()
        assert not (run / f"round_{i + 1}" / "done.json").exists()


def test_each_round_prunes_the_last_retrained_network_against_the_original(cascade):
    _, result, _, calls = cascade
    assert [c["input_params"] for c in calls] == [result.base.params, result.rounds[0].params]
    assert all(c["reference"] == (result.base.params, result.base.flops) for c in calls)


def test_cascade_round_model_is_the_one_evaluated(cascade):
    cfg, result, _, _ = cascade
    from pfp.data import build_data, make_loader

    data = build_data(cfg.data)
    loader = make_loader(data.test, 128, shuffle=False)
    row = result.rounds[-1]
    model, _ = load_model(row.model_path, build_model)
    assert evaluate(model, loader, "cpu")["acc"] == pytest.approx(row.acc)


def test_cascade_choice_follows_the_tolerance(cascade):
    cfg, result, log, _ = cascade
    base_acc = result.base.acc
    ok = [i for i, r in enumerate(result.rounds) if r.acc >= base_acc - cfg.prune.tolerance]
    expected = min(ok, key=lambda i: result.rounds[i].flops) if ok else None
    assert result.chosen == expected
    chosen_copy = Path(cfg.output_dir) / cfg.name / "chosen.pt"
    assert chosen_copy.exists() == (expected is not None)
    assert ("chosen" in log) == (expected is not None)


def test_choose_rule():
    def row(acc, flops, error=None):
        return RoundResult(method="pfp", target="flops", keep_ratio=0.5, acc=acc, flops=flops, error=error)

    rows = [row(90.0, 50), row(89.6, 30), row(80.0, 15), row(None, None, "PruneError: too small")]
    assert choose(90.0, rows, 0.5) == 1
    assert choose(90.0, rows, 0.3) == 0
    assert choose(95.0, rows, 0.5) is None
    assert choose(70.0, rows, 0.0) == 2


def test_choose_reads_the_task_metric_in_its_direction():
    def row(score, flops, acc=None):
        return RoundResult(method="pfp", target="flops", keep_ratio=0.5, metric="mse", score=score, acc=acc,
                           flops=flops)

    # lower is better: within 0.5 above the base's 1.0, the smallest network wins
    rows = [row(1.2, 50), row(1.4, 30), row(2.0, 15)]
    assert choose(1.0, rows, 0.5, higher_is_better=False) == 1
    assert choose(1.0, rows, 0.1, higher_is_better=False) is None
    assert choose(1.0, rows, 1.0, higher_is_better=False) == 2
    # the score, not acc, decides when both are set
    assert choose(1.0, [row(1.1, 10, acc=0.0)], 0.5, higher_is_better=False) == 0


def _must_not(what: str):
    def fail(*a, **k):
        raise AssertionError(what)

    return fail


def test_rerun_reuses_base_and_rounds(cascade, monkeypatch):
    cfg, first, _, _ = cascade
    base = Path(cfg.output_dir) / cfg.name / "base.pt"
    stamp = base.stat().st_mtime_ns

    monkeypatch.setattr(setup_mod, "train", _must_not("a re-run must not train"))
    monkeypatch.setattr(rounds, "train", _must_not("a re-run must not retrain finished rounds"))
    monkeypatch.setattr(rounds, "prune", _must_not("a re-run must not prune finished rounds again"))
    with captured_log() as lines:
        again = run_cascade(cfg, progress=False)
    assert again.trained_base is False
    assert "reusing" in "\n".join(lines)
    assert base.stat().st_mtime_ns == stamp
    assert json.loads(again.results_path.read_text())["base"]["trained_now"] is False
    assert [r.acc for r in again.rounds] == [r.acc for r in first.rounds]
    assert all(r.reused for r in again.rounds)
    assert again.chosen == first.chosen


def test_the_flow_step_and_the_cascade_share_run_round(cascade, monkeypatch):
    # A cascade round asked for one at a time (as flows.steps.iterate does) is the same round.
    cfg, first, _, _ = cascade
    monkeypatch.setattr(rounds, "prune", _must_not("the finished round is reused"))
    setup = setup_mod.cached_setup(cfg, progress=False)
    row = run_round(setup, RoundSpec.cascade(cfg, 1, setup.run_dir), first.rounds[0].model_path, progress=False)
    assert row.reused and row.model_dump(exclude={"reused"}) == first.rounds[1].model_dump(exclude={"reused"})
    with pytest.raises(ConfigError, match="no round 3"):
        RoundSpec.cascade(cfg, 2, setup.run_dir)


def test_changed_config_retrains_and_keeps_the_old_base(cascade, tmp_path):
    cfg, _, _, _ = cascade
    shutil.copytree(Path(cfg.output_dir) / cfg.name, tmp_path / cfg.name)
    changed = tiny_config(tmp_path, train={"epochs": 1})
    setup = setup_mod.prepare(changed, progress=False, calibration=False)
    assert setup.trained_now
    aside = list((tmp_path / cfg.name).glob("base-*.pt"))
    assert len(aside) == 1, "the base trained with the other config is moved aside, not overwritten"
    _, info = load_model(tmp_path / cfg.name / "base.pt", build_model)
    assert info["meta"]["config_hash"] == setup_mod.base_config_hash(changed) != setup_mod.base_config_hash(cfg)


def test_interrupted_training_resumes_from_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"epochs": 3})
    real_train = setup_mod.train

    class Interrupted(RuntimeError):
        pass

    def crash_after_first_epoch(*args, **kwargs):
        def boom(stats):
            raise Interrupted  # the checkpoint of this epoch is already written

        return real_train(*args, **{**kwargs, "on_epoch": boom})

    monkeypatch.setattr(setup_mod, "train", crash_after_first_epoch)
    with pytest.raises(Interrupted):
        setup_mod.prepare(cfg, progress=False, calibration=False)
    assert (tmp_path / "tiny" / "train.ckpt").exists() and not (tmp_path / "tiny" / "base.pt").exists()

    epochs_run = []

    def counting(*args, **kwargs):
        return real_train(*args, **{**kwargs, "on_epoch": lambda s: epochs_run.append(s.epoch)})

    monkeypatch.setattr(setup_mod, "train", counting)
    setup = setup_mod.prepare(cfg, progress=False, calibration=False)
    assert epochs_run == [1, 2], "the second run continues after the first epoch"
    assert setup.trained_now and (tmp_path / "tiny" / "base.pt").exists()


def test_impossible_round_is_recorded_and_stops_the_cascade(cascade, tmp_path):
    cfg, first, _, _ = cascade
    shutil.copytree(Path(cfg.output_dir) / cfg.name, tmp_path / cfg.name)
    bad = tiny_config(tmp_path, prune={"keep_ratios": [0.6, 0.001, 0.0005]})
    with captured_log() as lines:
        result = run_cascade(bad, progress=False)
    assert not result.trained_base
    assert len(result.rounds) == 2  # the third round is not attempted
    assert result.rounds[0].acc == first.rounds[0].acc and result.rounds[0].reused  # round 1 reused
    assert Path(result.rounds[0].model_path).parent == tmp_path / cfg.name / "round_1"  # in this run's folder
    assert result.rounds[1].error.startswith("PruneError") and result.rounds[1].acc is None
    assert "PruneError" in "\n".join(lines)
    saved = json.loads(result.results_path.read_text())
    assert saved["rounds"][1]["error"] == result.rounds[1].error
    assert result.chosen in (None, 0)


# --------------------------------------------------------------------------- base model from a checkpoint


def test_pretrained_checkpoint_is_used_without_training(cascade, tmp_path, monkeypatch):
    cfg, first, _, _ = cascade
    base = Path(cfg.output_dir) / cfg.name / "base.pt"
    monkeypatch.setattr(setup_mod, "train", lambda *a, **k: pytest.fail("must not train"))
    cfg2 = tiny_config(tmp_path, model={"name": "lenet5", "pretrained_checkpoint": str(base)})
    setup = setup_mod.prepare(cfg2, progress=False, calibration=False)
    assert not setup.trained_now
    assert setup.acc == pytest.approx(first.base.acc)


def test_pretrained_checkpoint_errors_name_the_file(cascade, tmp_path):
    cfg, _, _, _ = cascade
    base = Path(cfg.output_dir) / cfg.name / "base.pt"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        setup_mod.prepare(tiny_config(tmp_path, model={"pretrained_checkpoint": str(garbage)}), calibration=False)
    other_classes = tiny_config(
        tmp_path, model={"pretrained_checkpoint": str(base)}, data={"synthetic_classes": 5}
    )
    with pytest.raises(CheckpointError, match=r"base\.pt.*10 classes.*5"):
        setup_mod.prepare(other_classes, calibration=False)
    other_size = tiny_config(tmp_path, model={"pretrained_checkpoint": str(base)}, data={"synthetic_size": 24})
    with pytest.raises(CheckpointError, match=r"base\.pt.*does not accept 1x24x24"):
        setup_mod.prepare(other_size, calibration=False)


# --------------------------------------------------------------------------- calibration data


def test_eval_view_drops_augmentation_and_shares_the_images():
    x = torch.randint(0, 255, (10, 1, 8, 8), dtype=torch.uint8)
    ds = InMemoryImageDataset(x, torch.arange(10) % 2, augment=True, pad=2)
    view = setup_mod.eval_view(ds)
    assert ds.augment and not view.augment
    assert view.images is ds.images
    sub = setup_mod.eval_view(torch.utils.data.Subset(ds, [3, 4]))
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
    train, pool = setup_mod.split_training(cfg, data.train)
    assert len(pool) == 96 and len(train) == 384 - 96
    assert not set(train.indices) & set(pool.indices)  # never trained on
    model = build_model("lenet5", 10, 1, 16)
    cal = setup_mod.calibration_loaders(cfg, data, model, torch.zeros(1, 1, 16, 16), pool=pool)
    assert (cal.calib_size, cal.holdout_size, cal.postprocess_size) == (40, 24, 72)
    calib, hold, post = (set(l.dataset.indices) for l in (cal.calib, cal.holdout, cal.postprocess))
    assert len(calib) == 40 and len(hold) == 24 and len(post) == 72
    assert not calib & hold and not post & hold  # the guarantee's points are distinct from S and the refit's
    assert calib <= post
    # |S| from the spec's formula when calib_size is unset
    cfg2 = tiny_config(tmp_path, prune={"calib_size": None, "holdout_size": 8, "calib_split": 0.9})
    _, pool2 = setup_mod.split_training(cfg2, data.train)
    cal2 = setup_mod.calibration_loaders(cfg2, data, model, torch.zeros(1, 1, 16, 16), pool=pool2)
    assert 50 < cal2.calib_size < 384


def test_a_calib_split_smaller_than_s_is_one_clear_error_before_training(tmp_path):
    cfg = tiny_config(tmp_path, prune={"calib_size": 40, "calib_split": 0.05})
    with pytest.raises(ConfigError) as err:
        setup_mod.prepare(cfg, progress=False)
    msg = str(err.value)
    assert msg.startswith("prune.calib_split: 0.05 of the 384 training images holds out 19, fewer than the |S| = 40")
    assert not (tmp_path / "tiny" / "base.pt").exists()  # nothing was trained
    with pytest.raises(ValueError, match="neither a fraction below 1 nor a whole number"):
        tiny_config(tmp_path, prune={"calib_split": 2.5})


# --------------------------------------------------------------------------- compare


def test_compare_two_methods_records_failures_and_goes_on(cascade):
    cfg, _, _, _ = cascade
    with captured_log() as lines:
        rows = run_compare(cfg, ["pfp", "sfp"], [0.5, 0.999], progress=False).rows
    # each method plain, then with the shared post-processing
    assert [(r.method, r.postprocess, r.reduction) for r in rows] == [
        (m, pp, red) for m in ("pfp", "sfp") for pp in ("plain", "shared") for red in (0.5, 0.999)]
    ok = [r for r in rows if r.reduction == 0.5]
    orders = {(r.method, r.postprocess): json.loads(Path(r.report_path).read_text())["postprocess"]["order"]
              for r in ok}
    assert orders[("pfp", "plain")] is None and orders[("sfp", "plain")] is None
    assert orders[("pfp", "shared")] in ("refit", "refit+bn", "refit+bn_unrestored")
    assert orders[("sfp", "shared")] is None  # SFP cannot be refit before removal, and LeNet5 has no BN
    failed = [r for r in rows if r.reduction == 0.999]
    for r in ok:
        assert r.error is None
        assert 49.0 <= r.flops_removed_pct <= 55.0
        assert 0 <= r.acc_before_retrain <= 100 and 0 <= r.acc <= 100
    for r in failed:
        assert r.error.startswith("PruneError") and r.acc is None
    text = "\n".join(lines)
    assert "reusing" in text  # the cascade's base model, not a new training

    out = Path(cfg.output_dir) / cfg.name / "compare"
    saved = json.loads((out / "compare.json").read_text())
    assert len(saved["rows"]) == 8
    with open(out / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and table[1]["method"] == "pfp" and "PruneError" in table[1]["error"]
    assert table[0]["error"] == "" and float(table[0]["target_flops_removed_pct"]) == pytest.approx(50.0)
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    model, _ = load_model(ok[0].model_path, build_model)
    assert count_flops(model, torch.zeros(1, 1, 16, 16)) == ok[0].flops

    # a second comparison reuses every finished point from its model file
    again = run_compare(cfg, ["pfp"], [0.5], progress=False).rows
    assert [r.reused for r in again] == [True, True] and [r.acc for r in again] == [r.acc for r in ok if r.method == "pfp"]


def test_compare_rejects_unknown_method_before_any_work(tmp_path):
    from pfp.config import ConfigError

    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        run_compare(cfg, ["pfp", "nope"], None)
    assert not (tmp_path / "tiny").exists()


def test_save_model_meta_roundtrip_of_rows(tmp_path):
    # rows and reports go into model files as meta: they must be plain data
    row = RoundResult.failed("pfp", "flops", 0.5, ValueError("x\ny"))
    save_model(tmp_path / "m.pt", build_model("lenet5", 10, 1, 16), {"name": "lenet5", "num_classes": 10,
               "in_channels": 1, "input_size": 16}, meta={"row": row.model_dump(mode="json")})
    _, info = load_model(tmp_path / "m.pt", build_model)
    assert info["meta"]["row"]["error"] == "ValueError: x"
    assert RoundResult.model_validate(info["meta"]["row"]) == row
