"""Tests for the `pfp` command line (`pfp local`, errors, logging) and the shipped configs."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pfp import data as D
from flows.cli import app
from pfp.cli import load_run_config, parse_sets, quickstart_text
from pfp.config import ConfigError, RunConfig, load_config
from pfp.models import build_model
from pfp.resources import count_flops
from pfp.serialization import load_model

REPO = Path(__file__).resolve().parents[1]
# Run and pipeline configs; targets_*.yaml describe devices (tests/test_targets.py).
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("targets_"))
runner = CliRunner()


def tiny_yaml(tmp_path: Path, **extra) -> Path:
    raw = {
        "name": "cli",
        "device": "cpu",
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "name": "synthetic", "synthetic_channels": 1, "synthetic_size": 16, "synthetic_train": 256,
            "synthetic_test": 128, "batch_size": 64, "eval_batch_size": 128,
        },
        "model": {"name": "lenet5"},
        "train": {"epochs": 1, "lr": 0.05, "amp": "off", "channels_last": "off"},
        "retrain": {"epochs": 1, "lr": 0.02, "amp": "off", "channels_last": "off"},
        "prune": {"keep_ratios": [0.5], "round_to": 1, "calib_size": 32, "holdout_size": 16, "calib_split": 0.25},
    }  # fmt: skip
    raw.update(extra)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# --------------------------------------------------------------------------- configs


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "quickstart.yaml", "fmnist_resnet20.yaml", "fmnist_resnet56.yaml", "cifar10_resnet56.yaml",
        "cifar10_vgg16.yaml", "imagenet_resnet50.yaml",
    } <= names  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_names_a_real_model(path):
    from flows.config import PipelineConfig

    kind = PipelineConfig if path.name.startswith("pipeline_") else RunConfig  # pipeline configs: more sections
    cfg = load_config(path, model=kind)
    assert isinstance(cfg, kind)
    assert path.read_text().startswith("#"), "each config starts with a comment saying what it is for"
    assert cfg.retrain is not None and cfg.prune.keep_ratios
    from pfp.models import available_models

    assert cfg.model.name in available_models()
    # overrides touch only the named section (no YAML anchors sharing train and retrain)
    changed = load_config(path, {"train.epochs": 1}, model=kind)
    assert changed.train.epochs == 1 and changed.retrain.epochs == cfg.retrain.epochs


def test_quickstart_configs_are_the_shipped_files():
    from flows.config import load_pipeline_config, pipeline_quickstart_text

    # configs/ holds byte-identical copies of the package data, for readers of the repository
    assert (REPO / "configs" / "quickstart.yaml").read_text() == quickstart_text() == (REPO / "pfp" / "quickstart.yaml").read_text()
    assert (REPO / "configs" / "pipeline_quickstart.yaml").read_text() == pipeline_quickstart_text()
    assert load_run_config(None) == load_config(REPO / "configs" / "quickstart.yaml")
    assert load_pipeline_config(None) == load_pipeline_config(REPO / "configs" / "pipeline_quickstart.yaml")
    # `--show-default` prints exactly the shipped file
    assert runner.invoke(app, ["local", "validate", "--show-default"]).output == quickstart_text()
    assert runner.invoke(app, ["validate", "--show-default"]).output == pipeline_quickstart_text()


def test_pipeline_quickstart_is_the_quickstart_cascade():
    from flows.config import pipeline_quickstart_text

    local, pipeline = yaml.safe_load(quickstart_text()), yaml.safe_load(pipeline_quickstart_text())
    # one deliberate difference: the cascade accepts a round within the gate's 1 point
    assert pipeline["prune"].pop("tolerance") == pipeline["gate"]["max_acc_drop"] != local["prune"].pop("tolerance")
    assert {k: pipeline[k] for k in local} == local


def test_installed_package_ships_the_quickstart_yaml():
    from importlib.resources import files

    assert files("pfp").joinpath("quickstart.yaml").is_file()
    assert files("flows").joinpath("pipeline_quickstart.yaml").is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'pfp = ["quickstart.yaml"]' in pyproject and 'flows = ["pipeline_quickstart.yaml"]' in pyproject


def test_published_schedules():
    cifar = load_config(REPO / "configs" / "cifar10_resnet56.yaml")
    for tc in (cifar.train, cifar.retrain):
        assert (tc.epochs, tc.lr, tc.momentum, tc.weight_decay, tc.schedule, tc.milestones) == (
            182, 0.1, 0.9, 1e-4, "step", [91, 136]
        )
    imagenet = load_config(REPO / "configs" / "imagenet_resnet50.yaml")
    assert imagenet.model.name == "tv:resnet50" and imagenet.prune.round_to == 8
    assert (imagenet.train.amp, imagenet.train.channels_last, imagenet.data.batch_size) == ("on", "on", 256)


# --------------------------------------------------------------------------- --set parsing


def test_parse_sets_uses_yaml_types():
    assert parse_sets(["train.epochs=1", "prune.keep_ratios=[0.5, 0.3]", "name=x", "data.root=", "a.b=1.5e-3"]) == {
        "train.epochs": 1, "prune.keep_ratios": [0.5, 0.3], "name": "x", "data.root": None, "a.b": 1.5e-3,
    }  # fmt: skip
    # YAML 1.1 reads 1e-3 as a string; the config's float fields still take it
    assert load_run_config(None, parse_sets(["train.lr=1e-3"])).train.lr == 1e-3
    with pytest.raises(ConfigError, match="key=value"):
        parse_sets(["train.epochs"])


def test_defaults_with_overrides():
    cfg = load_run_config(None, {"train.epochs": 1, "prune.keep_ratios": [0.4]})
    assert cfg.name == "quickstart" and cfg.train.epochs == 1 and cfg.prune.keep_ratios == [0.4]
    assert cfg.retrain.epochs == yaml.safe_load(quickstart_text())["retrain"]["epochs"]
    with pytest.raises(ConfigError, match="<quickstart defaults>: field 'train.bogus': unknown key"):
        load_run_config(None, {"train.bogus": 1})


# --------------------------------------------------------------------------- validate / models


def test_validate_bad_config_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  epochs: 1\n  learning_rate: 0.1\n")
    result = runner.invoke(app, ["local", "validate", str(bad)])
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "train.learning_rate" in lines[0] and "unknown key" in lines[0]
    assert "Traceback" not in result.output


def test_validate_bad_value_and_bad_model(tmp_path):
    result = runner.invoke(app, ["local", "validate", str(tiny_yaml(tmp_path)), "--set", "prune.keep_ratios=[0.3, 0.5]"])
    assert result.exit_code == 2 and "prune.keep_ratios" in result.output and "decreasing" in result.output
    result = runner.invoke(app, ["local", "validate", str(tiny_yaml(tmp_path, model={"name": "resnet21"}))])
    assert result.exit_code == 2
    assert len(error_lines(result.output)) == 1 and "unknown model 'resnet21'" in result.output
    assert "resnet20" in result.output  # the closest names are suggested
    result = runner.invoke(app, ["local", "validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output


def test_validate_ok(tmp_path):
    result = runner.invoke(app, ["local", "validate", str(tiny_yaml(tmp_path))])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: ")


def test_models_lists_ours_and_torchvision():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "resnet20" in result.output and "lenet5" in result.output and "tv:resnet50" in result.output


# --------------------------------------------------------------------------- run / compare errors


def test_run_without_data_exits_2_with_the_data_message(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(D, "FASHION_MNIST_SEARCH_PATHS", [tmp_path / "nowhere"])
    result = runner.invoke(
        app, ["local", "run", "--set", f"data.root={empty}", "--set", f"output_dir={tmp_path / 'runs'}", "--no-progress"]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in error_lines(result.output) if line.startswith("error:")]
    assert len(errors) == 1 and "Fashion-MNIST not found" in errors[0] and str(empty) in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "quickstart" / "base.pt").exists()


def test_run_bad_set_value_exits_2(tmp_path):
    result = runner.invoke(app, ["local", "run", str(tiny_yaml(tmp_path)), "--set", "train.epochs=many"])
    assert result.exit_code == 2
    assert len(error_lines(result.output)) == 1 and "train.epochs" in result.output
    result = runner.invoke(app, ["local", "run", str(tiny_yaml(tmp_path)), "--set", "train.epochs"])
    assert result.exit_code == 2 and "key=value" in result.output


def test_compare_unknown_method_exits_2(tmp_path):
    result = runner.invoke(app, ["local", "compare", str(tiny_yaml(tmp_path)), "--methods", "pfp,magic"])
    assert result.exit_code == 2 and "unknown method 'magic'" in result.output
    result = runner.invoke(app, ["local", "compare", str(tiny_yaml(tmp_path)), "--reductions", "0.5,lots"])
    assert result.exit_code == 2 and "--reductions" in result.output


def test_pretrained_checkpoint_error_names_the_file(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 10)
    result = runner.invoke(app, ["local", "run", str(tiny_yaml(tmp_path, model={"name": "lenet5", "pretrained_checkpoint": str(junk)}))])
    assert result.exit_code == 2
    errors = [line for line in error_lines(result.output) if line.startswith("error:")]
    assert len(errors) == 1 and "junk.pt" in errors[0]


# --------------------------------------------------------------------------- train + prune end to end


def test_train_then_prune_a_checkpoint(tmp_path):
    cfg = tiny_yaml(tmp_path)
    result = runner.invoke(app, ["local", "train", str(cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    base = tmp_path / "runs" / "cli" / "base.pt"
    assert base.exists()
    assert not list((tmp_path / "runs" / "cli").glob("round_*"))

    out = tmp_path / "pruned.pt"
    result = runner.invoke(app, ["local", "prune", str(base), "--config", str(cfg), "--keep", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, info = load_model(out, build_model)
    base_model, _ = load_model(base, build_model)
    x = torch.zeros(1, 1, 16, 16)
    ratio = count_flops(model, x) / count_flops(base_model, x)
    assert 0.45 <= ratio <= 0.5001
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["method"] == "pfp" and report["flops"] == count_flops(model, x)
    assert info["meta"]["keep_ratio"] == 0.5 and "per-layer" in result.output
    # the measured error comes first: its table is printed, and the JSON carries it per consumer
    assert "measured on held-out points" in result.output and report["guarantee"]
    assert {"rel_p50", "rel_p95", "rel_max", "eps95", "eps99"} <= set(report["guarantee"][0])
    # the library's log records (pfp.reconstruct) are rendered at INFO, debug lines only with -v
    assert "layers refit" in result.output and "DEBUG" not in result.output

    # prune the pruned model further, relative to the original network
    out2 = tmp_path / "pruned2.pt"
    result = runner.invoke(
        app, ["local", "prune", str(out), "-c", str(cfg), "--keep", "0.3", "--out", str(out2), "--of-original", "--no-eval",
              "--method", "ft"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    again, _ = load_model(out2, build_model)
    assert count_flops(again, x) <= 0.3 * count_flops(base_model, x) * 1.001

    result = runner.invoke(app, ["local", "prune", str(base), "-c", str(cfg), "--keep", "0.001", "--out", str(tmp_path / "no.pt")])
    assert result.exit_code == 2
    errors = [line for line in error_lines(result.output) if line.startswith("error:")]
    assert len(errors) == 1 and "below the smallest reachable" in errors[0]
    assert not (tmp_path / "no.pt").exists()

    result = runner.invoke(app, ["-q", "local", "prune", str(base), "-c", str(cfg), "--keep", "0.5", "--no-eval",
                                 "--out", str(tmp_path / "quiet.pt")])
    assert result.exit_code == 0, result.output
    assert "layers refit" not in result.output and "INFO" not in result.output


def test_torchrun_train_two_processes(tmp_path):
    cfg = tiny_yaml(tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd += ["--standalone", "--nproc_per_node=2", "-m", "flows.cli", "local", "train", str(cfg), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("saved ") == 1, "only rank 0 reports and saves"
    base = tmp_path / "runs" / "cli" / "base.pt"
    _, info = load_model(base, build_model)
    assert info["meta"]["world_size"] == 2
    # a single-process run of the same config reuses what torchrun trained
    result = runner.invoke(app, ["local", "train", str(cfg), "--no-progress"])
    assert result.exit_code == 0 and "reusing" in result.output


# --------------------------------------------------------------------------- errors and logging

# `pfp local validate` whose config loading raises `exc`: the real program in its own process,
# so what a user sees (stderr, exit status) is what is checked.
FAILING = """
import sys
import pfp.cli
from pfp.errors import CoreError


def fail(*args, **kwargs):
    raise {exc}


pfp.cli.load_run_config = fail
from flows.cli import app

app(sys.argv[1:], prog_name="pfp")
"""


def _pfp_failing_with(exc: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PFP_DEBUG"}
    return subprocess.run([sys.executable, "-c", FAILING.format(exc=exc), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_pfp_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    cfg = str(tiny_yaml(tmp_path))
    user = _pfp_failing_with("CoreError('model.name: a mistake\\nof the user')", "local", "validate", cfg)
    assert user.returncode == 2, user.stderr
    assert user.stderr.strip() == "error: model.name: a mistake of the user" and not user.stdout
    for bug, shown in [("KeyError('a bug')", "KeyError: 'a bug'"), ("ValueError('not a PfpError')", "ValueError: not a PfpError")]:
        proc = _pfp_failing_with(bug, "local", "validate", cfg)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback (most recent call last)" in proc.stderr and shown in proc.stderr
        assert "error:" not in proc.stderr
    # typer's own usage errors stay what they are (exit status 2, a usage hint)
    usage = _pfp_failing_with("KeyError('unused')", "local", "validate", cfg, "--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr and "Traceback" not in usage.stderr


def test_every_project_exception_derives_from_pfp_error():
    import ast

    names: dict[str, set[str]] = {}
    for package in ("pfp", "export", "deploy", "flows"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases
                ):
                    names.setdefault(f"{package}.{path.relative_to(REPO / package).with_suffix('')}".replace("/", "."),
                                     set()).add(node.name)
    assert len(names) > 10  # the scan found the error classes
    import importlib

    from pfp.errors import PfpError

    not_pfp = [f"{mod}.{cls}" for mod, classes in names.items() for cls in classes
               if not issubclass(getattr(importlib.import_module(mod), cls), PfpError)]
    # pfp.reconstruct._Stop ends a forward pass early: control flow, never shown to a user
    assert not_pfp == ["pfp.reconstruct._Stop"]


def test_project_logs_reach_the_prefect_flow_run_logs():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    from prefect.testing.utilities import prefect_test_harness

    @flow
    def logs_from_the_library() -> None:
        logging.getLogger("pfp.some_module").info("a line from pfp inside a flow")
        logging.getLogger("deploy.other").debug("a debug line stays out")

    with prefect_test_harness(server_startup_timeout=120):
        state = logs_from_the_library(return_state=True)
        api = [h for h in logging.getLogger("pfp").handlers if isinstance(h, APILogHandler)]
        assert len(api) == 1, "the pfp logger sends to the flow run's logs"
        api[0].flush()
        run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    messages = {(log.name, log.message) for log in logs}
    assert ("pfp.some_module", "a line from pfp inside a flow") in messages
    assert not any("debug line" in m for _, m in messages)


def test_a_gate_timed_otherwise_than_the_latency_target_is_named():
    from flows.config import load_pipeline_config

    assert load_pipeline_config(None).latency_target_mismatches() == []  # the quickstart gates what it pruned for
    cfg = load_pipeline_config(None, {"backends": [{"name": "local-cpu", "backend": "ort-cpu", "batch_sizes": [1, 32]}]})
    lines = cfg.latency_target_mismatches()
    assert len(lines) == 1 and lines[0].startswith("gate.latency.0: backend 'local-cpu'") and "threads=None" in lines[0]
