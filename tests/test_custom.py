"""Your own model, data and task through the local pipeline (docs/custom.md).

The two shipped examples run through the real `pfp local run` in a subprocess; bad input of
each kind gives exit status 2 and one stderr line through the CLI app; an import-path model
with kwargs starts from a plain state_dict; the Python API example runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from typer.testing import CliRunner

import pfp
from examples.regression import BlobRegressor, Regression, blobs
from examples.segmentation import TinySegNet
from flows.cli import app
from pfp.config import ConfigError, config_from_dict
from pfp.models import build_model
from pfp.serialization import load_model
from pfp.setup import prepare
from pfp.tasks import Classification, softmax_kl

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# --------------------------------------------------------------------------- helpers named by import path


class DictOutput(nn.Module):
    """A model whose output is a dict: classification cannot read it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict:
        return {"out": self.conv(x)}


class NoSuchMetric(Regression):
    """A task whose metric is not in its evaluation's dict."""

    metric = "r2"


def raising_data(**kwargs):
    raise RuntimeError("disk on fire")


# --------------------------------------------------------------------------- the examples through the real CLI


def _cli_run(config: Path, tmp_path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "-q", "local", "run", str(config), "--set", f"output_dir={tmp_path}",
         "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = yaml.safe_load(config.read_text())["name"]
    return json.loads((tmp_path / name / "results.json").read_text())


def _check_half_flops(result: dict) -> dict:
    (row,) = result["rounds"]
    assert row["error"] is None
    assert 45.0 <= row["flops_removed_pct"] <= 55.0  # pruned to 50% of the FLOPs
    assert row["acc"] is None and result["base"]["acc"] is None  # not a classification task
    for key in ("score_before_retrain", "score", "score_change"):
        assert row[key] is not None
    assert row["metrics"][row["metric"]] == pytest.approx(row["score"])
    return row


def test_regression_example_through_pfp_local_run(tmp_path):
    result = _cli_run(REPO / "examples" / "regression.yaml", tmp_path)
    base, row = result["base"], _check_half_flops(result)
    assert base["metric"] == row["metric"] == "mse" and base["higher_is_better"] is False
    # the network learned: far below predicting the mean target (about 20 in these units)
    assert base["score"] < 5.0 and row["score"] < 5.0
    assert row["score_change"] == pytest.approx(base["score"] - row["score"])  # lower is better
    assert (result["chosen"] == 0) == (row["score"] <= base["score"] + result["tolerance"])
    model, info = load_model(row["model_path"], build_model)  # the import-path spec rebuilds it
    assert info["spec"] == {"name": "examples.regression:BlobRegressor", "kwargs": {"in_channels": 1, "width": 16}}
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    assert info["meta"]["input_shape"] == [1, 32, 32]


def test_segmentation_example_through_pfp_local_run(tmp_path):
    result = _cli_run(REPO / "examples" / "segmentation.yaml", tmp_path)
    base, row = result["base"], _check_half_flops(result)
    assert base["metric"] == row["metric"] == "miou" and base["higher_is_better"] is True
    assert base["score"] > 60.0  # three classes: chance is about 33
    assert set(row["metrics"]) == {"miou", "pixel_acc", "loss"}
    assert row["score_change"] == pytest.approx(row["score"] - base["score"])


# --------------------------------------------------------------------------- bad input: one line, exit status 2


def _write(tmp_path: Path, **sections) -> Path:
    raw = {
        "name": "bad", "device": "cpu", "output_dir": str(tmp_path / "runs"),
        "task": "examples.regression:Regression",
        "data": {"name": "examples.regression:blobs", "kwargs": {"train": 128, "test": 32, "size": 32}},
        "model": {"name": "examples.regression:BlobRegressor"},
        "train": {"epochs": 0}, "retrain": {"epochs": 0},
        "prune": {"keep_ratios": [0.5], "calib_split": 48, "calib_size": 16, "holdout_size": 8},
    }  # fmt: skip
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_error_line(tmp_path: Path, *expected: str, **sections) -> str:
    result = runner.invoke(app, ["-q", "local", "run", str(_write(tmp_path, **sections)), "--no-progress"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_an_import_path_that_does_not_resolve(tmp_path):
    _one_error_line(tmp_path, "model.name", "examples.nope", model={"name": "examples.nope:Net"})
    _one_error_line(tmp_path, "data.name", "has no attribute 'nothing'", data={"name": "examples.regression:nothing"})
    _one_error_line(tmp_path, "task", "examples.regression", "Nope", task="examples.regression:Nope")


def test_a_callable_that_raises_is_named_with_its_error(tmp_path):
    _one_error_line(tmp_path, "data.name", "raising_data", "RuntimeError: disk on fire",
                    data={"name": "tests.test_custom:raising_data", "kwargs": {}})
    _one_error_line(tmp_path, "model.name", "BlobRegressor", "TypeError", "colour",
                    model={"name": "examples.regression:BlobRegressor", "kwargs": {"colour": "red"}})


def test_a_model_output_that_is_not_a_tensor_without_a_task(tmp_path):
    _one_error_line(tmp_path, "returns dict", "task", task=None, model={"name": "tests.test_custom:DictOutput"},
                    data={"name": "examples.segmentation:shapes", "kwargs": {"train": 96, "test": 16, "size": 32}})


def test_a_checkpoint_that_does_not_match(tmp_path):
    other = tmp_path / "seg.pt"
    torch.save(TinySegNet(in_channels=1).state_dict(), other)
    line = _one_error_line(tmp_path, str(other), "missing keys", "unexpected keys",
                           model={"pretrained_checkpoint": str(other)})
    assert "'features.0.weight'" in line and "'encoder.0.weight'" in line and "more)" in line
    narrow = tmp_path / "narrow.pt"
    torch.save({"state_dict": BlobRegressor(width=8).state_dict()}, narrow)
    _one_error_line(tmp_path, str(narrow), "features.0.weight", "shape", model={"pretrained_checkpoint": str(narrow)})


def test_a_model_that_does_not_fit_the_data(tmp_path):
    _one_error_line(tmp_path, "model.name examples.regression:BlobRegressor", "1x16x16", "RuntimeError",
                    data={"kwargs": {"train": 128, "test": 32, "size": 16}})


def test_a_task_whose_metric_is_not_in_its_evaluation(tmp_path):
    _one_error_line(tmp_path, "'r2'", "mse", task="tests.test_custom:NoSuchMetric")


def test_weights_only_for_torchvision_and_kwargs_only_for_import_paths(tmp_path):
    _one_error_line(tmp_path, "model.weights", "tv:", model={"weights": "DEFAULT"})
    _one_error_line(tmp_path, "model.kwargs", "lenet5", model={"name": "lenet5", "kwargs": {"width": 2}})
    _one_error_line(tmp_path, "model.weights", "NOPE", "IMAGENET1K_V1", model={"name": "tv:resnet18", "weights": "NOPE"})


def test_timm_is_an_optional_extra():
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ConfigError, match="pip install timm"):
            build_model("timm:resnet18")
    else:
        assert isinstance(build_model("timm:resnet18", num_classes=4), nn.Module)


# --------------------------------------------------------------------------- import-path model + plain state_dict


def test_import_path_model_with_kwargs_starts_from_a_plain_state_dict(tmp_path):
    torch.manual_seed(1)
    trained = BlobRegressor(in_channels=1, width=8)
    ckpt = tmp_path / "weights.pt"
    # saved from inside DistributedDataParallel: the "module." prefix is dropped
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, ckpt)
    cfg = config_from_dict(yaml.safe_load(_write(
        tmp_path, model={"kwargs": {"width": 8}, "pretrained_checkpoint": str(ckpt)}).read_text()))
    setup = prepare(cfg, progress=False, calibration=False)
    assert not setup.trained_now
    assert setup.spec == {"name": "examples.regression:BlobRegressor", "kwargs": {"width": 8}}
    for k, v in trained.state_dict().items():
        assert torch.equal(setup.model.state_dict()[k].cpu(), v), k
    assert setup.metric == "mse" and setup.acc is None
    assert setup.score == pytest.approx(Regression().evaluate(trained.eval(), setup.test_loader, torch.device("cpu"))["mse"])
    assert setup.example_input.shape == (1, 1, 32, 32)


def test_non_square_inputs_keep_their_shape(tmp_path):
    def fake(n):
        return torch.utils.data.TensorDataset(torch.randn(n, 1, 12, 20), torch.rand(n, 3))

    import examples.regression as reg

    reg.__dict__["wide"] = lambda: (fake(64), fake(16))  # a data callable returning (train, test)
    try:
        from pfp.data import build_data

        data = build_data(config_from_dict({"data": {"name": "examples.regression:wide"}}).data)
    finally:
        del reg.__dict__["wide"]
    assert data.example_shape == (1, 12, 20) and data.num_classes is None


# --------------------------------------------------------------------------- the probe judges with the task's divergence


def test_probe_uses_the_task_divergence_not_a_softmax_kl():
    y = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    shifted = y + 5.0  # the same softmax, a large regression error
    assert softmax_kl(y, shifted) == pytest.approx(0.0, abs=1e-9)
    assert Regression().divergence(y, shifted) > 1.0
    assert Classification().divergence(y, shifted) == pytest.approx(0.0, abs=1e-9)



def test_the_measuring_allocation_judges_with_the_task_divergence():
    seen = []

    class Spy(Regression):
        def divergence(self, y, y_hat):
            seen.append(tuple(y.shape))
            return super().divergence(y, y_hat)

    torch.manual_seed(0)
    model = BlobRegressor(width=8).eval()
    train, _ = blobs(train=256, test=8, size=32)
    loader = torch.utils.data.DataLoader(train, batch_size=64)
    small, report = pfp.prune(model, loader, keep=0.5, example_input=train[:1][0], task=Spy(), allocation="holdout")
    assert seen and all(s[1] == 3 for s in seen)  # the probe's [N, 3] outputs went through the task's divergence
    assert report.flops <= 0.55 * report.original_flops
    assert small(train[:2][0]).shape == (2, 3)


# --------------------------------------------------------------------------- the Python API


def test_python_api_example_runs():
    from examples.python_api import main

    out = main(epochs=1)
    assert 0.4 <= out["flops_removed"] <= 0.6
    assert out["after"] == out["after"] and out["before"] > 0  # finite numbers


# --------------------------------------------------------------------------- the examples through the pipeline


@pytest.mark.parametrize("example,metric", [("regression", "mse"), ("segmentation", "miou")])
def test_examples_through_pfp_run(tmp_path, example, metric):
    """`pfp run` (Prefect flow, export to ONNX, timing, gate, MLflow registry) on a custom task."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "-q", "run", str(REPO / "examples" / f"{example}.yaml"),
         "--set", f"output_dir={tmp_path / 'runs'}", "--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
         "--set", "train.epochs=2", "--set", "retrain.epochs=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / example / "flow_result.json").read_text())
    assert result["base"]["metric"] == metric and result["rounds"][0]["error"] is None
    assert result["version"] == "1"  # exported, timed and registered like a classifier
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name(example)
    (round1,) = client.search_runs([exp.experiment_id], "tags.`pfp.round` = '1'")
    assert metric in round1.data.metrics  # the task's own metric, under its name
    parent = client.get_run(result["parent_run_id"])
    assert f"| round | keep | {metric} |" in parent.data.tags["mlflow.note.content"]
