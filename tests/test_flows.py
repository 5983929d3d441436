"""The compress and compare flows for real: Prefect's test harness (a real, temporary API
server), a real sqlite MLflow store, real training, export, onnxruntime timing and the
gate; plus crash-and-resume in a separate process killed mid-run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
cli = CliRunner()


def tiny(tmp: Path, **extra) -> dict:
    cfg = {
        "name": "tiny",
        "device": "cpu",
        "output_dir": str(tmp / "runs"),
        "data": {"name": "synthetic", "synthetic_channels": 1, "synthetic_size": 16, "synthetic_train": 256,
                 "synthetic_test": 128, "batch_size": 64, "eval_batch_size": 128},
        "model": {"name": "lenet5"},
        "train": {"epochs": 2, "lr": 0.05, "amp": "off"},
        "retrain": {"epochs": 1, "lr": 0.02, "amp": "off"},
        "prune": {"keep_ratios": [0.6, 0.4], "round_to": 1, "calib_size": 32, "holdout_size": 16,
                  "tolerance": 100.0, "calib_split": 0.25},
        "export": {"exporter": "torchscript", "parity_samples": 64},
        "backends": [{"name": "cpu", "backend": "ort-cpu", "batch_sizes": [1, 8], "max_time_s": 0.3, "threads": 1}],
        "gate": {"max_acc_drop": 100.0, "latency": [{"target": "cpu", "batch": 8, "metric": "p50", "max_ms": 1000.0}]},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
    }
    for key, value in extra.items():
        cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _client(tmp: Path):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    return MlflowClient()


def test_compress_flow_tracks_gates_and_registers(harness, tmp_path):
    from flows.compress import compress_flow

    result = compress_flow(config=tiny(tmp_path))
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["chosen"] == 1 and result["version"] == "1" and result["promoted"]
    assert 0 <= result["orchestration_overhead"] < 1

    client = _client(tmp_path)
    exp = client.get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    for tag in ("git.commit", "pfp.config_hash", "pfp.data_hash", "pfp.calib_hash", "machine"):
        assert parent.data.tags.get(tag), tag
    # the story: chosen round, gate, version, and a description with every round
    tags = parent.data.tags
    assert (tags["pfp.chosen_round"], tags["pfp.gate"], tags["pfp.registered_version"]) == ("2", "passed", "1")
    note = tags["mlflow.note.content"]
    assert "| 0 (unpruned) | 100% |" in note and "| **2** ✓ | 40% |" in note and "**Gate: passed**" in note
    # only the sections in use, resolved values; the whole config as an artifact
    params = parent.data.params
    assert params["prune.keep_ratios"] == "[0.6,0.4]" and params["tracking.experiment"] == "tiny"
    assert not any(k.startswith(("compare.", "edge.", "dispatch.", "schedule.")) for k in params)
    # headline metrics: the chosen round's, with units in their names
    rounds = {r["round"]: r for r in result["rounds"]}
    assert parent.data.metrics["acc_pct"] == round(rounds[2]["acc"], 2)  # round 2 is chosen (index 1)
    assert "speedup.cpu.b8" in parent.data.metrics and not any(k.startswith("iter.") for k in parent.data.metrics)

    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_round = {int(c.data.tags["pfp.round"]): c for c in children}
    assert sorted(by_round) == [0, 1, 2]  # round 0 is the unpruned model
    assert by_round[0].data.metrics["speedup.cpu.b8"] == 1.0 and by_round[0].data.metrics["flops_removed_pct"] == 0
    for n, child in by_round.items():
        assert child.info.status == "FINISHED"
        m = child.data.metrics
        for key in ("acc_pct", "flops_removed_pct", "latency_p50_ms.cpu.b1", "latency_p99_ms.cpu.b8", "speedup.cpu.b8"):
            assert key in m, (n, key)
        assert child.data.params["prune.target"] == "flops"
        if n == 0:
            continue
        assert child.data.params["prune.method"] == "pfp" and child.data.params["prune.keep_ratio"] == str(
            [0.6, 0.4][n - 1])
        assert [x.step for x in client.get_metric_history(child.info.run_id, "train.loss")] == [1]
        assert "parity.max_rel_diff" in m
        arts = {a.path for folder in ("", "model", "onnx", "report") for a in client.list_artifacts(child.info.run_id, folder)}
        assert {"layer_budget.png", "model/model.pt", "onnx/model.onnx", "report/report.json"} <= arts
        # the run lasts as long as the round's work, not the logging after it
        assert (child.info.end_time - child.info.start_time) / 1000 >= rounds[n]["seconds"] * 0.9
    assert by_round[2].data.tags["pfp.registered_version"] == "1" and by_round[2].data.tags["pfp.chosen"] == "true"
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"plots", "gate", "flow_result.json", "config.yaml"} <= top

    version = client.get_model_version_by_alias("tiny", "champion")
    assert str(version.version) == "1" and version.tags["gate.passed"] == "true"
    assert version.run_id == by_round[2].info.run_id  # the registry links back to the chosen round
    assert version.description == note
    assert str(client.get_model_version_by_alias("tiny", "candidate").version) == "1"

    # What the UI shows, through a real server's REST API
    from tests.mlflow_server import mlflow_server

    with mlflow_server(tmp_path / "mlflow.db") as rest:
        exp_id = rest.get("experiments/get-by-name", experiment_name="tiny")["experiment"]["experiment_id"]
        runs = rest.post("runs/search", {"experiment_ids": [exp_id], "max_results": 50})["runs"]
        tags_of = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        top = tags_of[parent.info.run_id]
        assert top["mlflow.note.content"] == note and top["pfp.gate"] == "passed"
        assert {t["pfp.round"] for rid, t in tags_of.items() if rid != parent.info.run_id} == {"0", "1", "2"}
        shown = next(r for r in runs if r["info"]["run_id"] == by_round[1].info.run_id)
        assert {p["key"] for p in shown["data"]["params"]} >= {"prune.method", "prune.keep_ratio", "prune.target"}
        curve = rest.get("metrics/get-history", run_id=by_round[1].info.run_id, metric_key="test.acc_pct")["metrics"]
        assert [m["step"] for m in curve] == [1]
        mv = rest.get("model-versions/get", name="tiny", version="1")["model_version"]
        assert mv["run_id"] == by_round[2].info.run_id and mv["description"] == note


def test_gate_that_rejects_keeps_the_champion(harness, tmp_path):
    from flows.compress import compress_flow

    first = compress_flow(config=tiny(tmp_path))
    assert first["promoted"]
    rounds = sorted((tmp_path / "runs" / "tiny").glob("round_*/model.pt"))
    written = {p: p.stat().st_mtime_ns for p in rounds}
    assert len(written) == 2
    # Second run: impossible speed-up, and a gate backend that cannot run here.
    cfg = tiny(tmp_path, backends=[
        {"name": "cpu", "backend": "ort-cpu", "batch_sizes": [1, 8], "max_time_s": 0.3, "threads": 1},
        {"name": "gpu", "backend": "torch-cuda", "batch_sizes": [8], "max_time_s": 0.3},
        {"name": "edge", "backend": "ort-cpu", "batch_sizes": [1], "deployment": "pfp-benchmark/offline-device"},
    ], gate={"max_acc_drop": 100.0, "latency": [
        {"target": "cpu", "batch": 8, "metric": "p50", "min_speedup": 100.0},
        {"target": "gpu", "batch": 8, "metric": "p99", "max_ms": 50.0},
        {"target": "edge", "batch": 1, "metric": "p50", "max_ms": 100.0},
    ]})
    state = compress_flow(config=cfg, return_state=True)
    assert state.is_completed() and state.name == "Not promoted"  # not a plain green "Completed"
    second = state.result()
    assert second["version"] == "2" and not second["promoted"]
    checks = {c["name"]: c for c in second["decision"]["checks"]}
    assert any(not c["passed"] for c in checks.values())
    reasons = " ".join(str(c.get("reason")) for c in checks.values())
    if not torch.cuda.is_available():  # the gpu target is down here: not passed, with the reason
        assert "no CUDA GPU" in reasons, reasons
    # A backend whose device deployment does not exist (device offline, never deployed).
    assert not checks["edge.b1.p50_ms"]["passed"] and "pfp-benchmark/offline-device" in checks["edge.b1.p50_ms"]["reason"]

    client = _client(tmp_path)
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("tiny", "candidate").version) == "2"
    assert client.get_model_version("tiny", "2").tags["gate.passed"] == "false"
    tags = client.get_run(second["parent_run_id"]).data.tags
    assert tags["pfp.gate"] == "failed" and tags["pfp.registered_version"] == "2" and tags["pfp.promoted"] == "false"
    assert "**Gate: failed** – not promoted" in tags["mlflow.note.content"]
    # Nothing was recomputed: the second run got both rounds and the exports from the task cache.
    assert {p: p.stat().st_mtime_ns for p in rounds} == written
    assert {"round_1", "round_2", "export unpruned", "export round_1"} <= set(second["cached"])
    assert "benchmark gpu" not in second["cached"]  # a backend that was down is not cached as down


def test_invalid_config_fails_before_any_work(tmp_path):
    from flows.cli import app

    raw = tiny(tmp_path)
    raw["gate"]["latency"][0]["target"] = "nowhere"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = cli.invoke(app, ["run", str(path)])
    assert res.exit_code == 2
    assert "bad.yaml: field 'gate.latency.0.target'" in res.output or "gate.latency.0.target" in res.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_unreachable_tracking_server_fails_early(tmp_path):
    from flows.cli import app

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path)))
    start = time.perf_counter()
    res = cli.invoke(app, ["run", str(path), "--set", "tracking.tracking_uri=http://127.0.0.1:9"])
    assert res.exit_code == 2 and "http://127.0.0.1:9" in res.output
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "runs").exists()


def test_serve_builds_scheduled_deployments(tmp_path):
    from flows.config import load_pipeline_config
    from flows.serve import deployments_for

    raw = tiny(tmp_path, schedule={"cron": "0 3 * * *"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    (dep,) = deployments_for([load_pipeline_config(path)], sources=[path])
    assert dep.name == "tiny" and dep.parameters == {"config_path": str(path.resolve())}
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]


def test_compare_flow_logs_one_run_per_point(harness, tmp_path):
    from flows.compare import compare_flow
    from flows.config import PipelineConfig, load_pipeline_config

    cfg = PipelineConfig.model_validate(tiny(tmp_path))
    rows = compare_flow(cfg, methods=["pfp", "ft"], reductions=[0.5])
    assert len(rows) == 4 and all(r.error is None for r in rows)  # each method plain and post-processed
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("tiny-compare")
    runs = client.search_runs([exp.experiment_id])
    assert sorted((r.data.tags["pfp.method"], r.data.tags["pfp.postprocess"]) for r in runs) == [
        ("ft", "plain"), ("ft", "shared"), ("pfp", "plain"), ("pfp", "shared")]
    assert all("acc" in r.data.metrics and "flops_removed_pct" in r.data.metrics for r in runs)
    assert load_pipeline_config  # imported for readers: the same config loader as `pfp compare`


@pytest.mark.slow
def test_crash_and_resume(tmp_path):
    """Kill the flow (SIGTERM, as a cancelled worker does) in round 2; the MLflow runs end
    FAILED (flows.tracking.sigterm_raises turns SIGTERM into KeyboardInterrupt), and
    the re-run gets round 1 from the task cache the killed run persisted."""
    raw = tiny(tmp_path, prune={"keep_ratios": [0.6, 0.4], "round_to": 1, "calib_size": 32, "holdout_size": 16,
                                "tolerance": 100.0, "calib_split": 0.25},
               retrain={"epochs": 40, "lr": 0.02, "amp": "off"})  # round 2 takes long enough to be killed in
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    code = ("from flows.compress import compress_flow; import sys; "
            f"compress_flow(config_path={str(cfg_path)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done1 = tmp_path / "runs" / "tiny" / "round_1" / "model.pt"  # written last: the round is finished
    ckpt2 = tmp_path / "runs" / "tiny" / "round_2" / "retrain.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not (done1.exists() and ckpt2.exists()) and proc.poll() is None:
        time.sleep(0.2)
    assert done1.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    first_round = done1.stat().st_mtime_ns

    client = _client(tmp_path)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    status = {r.info.run_name: r.info.status for r in runs}
    # nothing left RUNNING: the parent and the round it was in are FAILED, finished rounds FINISHED
    assert status == {"tiny: lenet5 pfp cascade": "FAILED", "round 0: unpruned": "FINISHED",
                      "round 1: pfp keep 60%": "FINISHED", "round 2: pfp keep 40%": "FAILED"}, status

    from prefect.testing.utilities import prefect_test_harness

    from flows.compress import compress_flow

    with prefect_test_harness(server_startup_timeout=120):
        result = compress_flow(config_path=str(cfg_path))
    assert done1.stat().st_mtime_ns == first_round  # round 1 reused, not recomputed
    assert "round_1" in result["cached"] and "round_2" not in result["cached"]  # persisted by the killed run
    assert result["work_seconds"]["round_1"] < result["work_seconds"]["round_2"]


def test_validate_checks_a_whole_pipeline_config(tmp_path):
    from flows.cli import app

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path)))
    res = cli.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and "backends cpu (ort-cpu)" in res.output
    raw = tiny(tmp_path)
    raw["backends"][0]["name"] = "../etc"
    path.write_text(yaml.safe_dump(raw))
    res = cli.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "field 'backends.0.name'" in res.output


def test_old_targets_key_points_to_backends(tmp_path):
    from flows.config import PipelineConfig, load_pipeline_config
    from pfp.config import ConfigError

    raw = tiny(tmp_path)
    raw["targets"] = raw.pop("backends")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: field 'targets': 'targets' is now 'backends'") and "\n" not in msg
    with pytest.raises(ValueError, match="'targets' is now 'backends'"):
        PipelineConfig.model_validate(raw)  # a dict passed as a flow parameter


def test_targets_file_is_read_once_and_carried(tmp_path):
    from flows.config import PipelineConfig, load_pipeline_config

    devices = tmp_path / "devices.yaml"
    devices.write_text(yaml.safe_dump({"targets": [{"name": "orin", "work_pool": "p", "role": "gate"}]}))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path, edge={"targets_file": str(devices)})))
    cfg = load_pipeline_config(path)
    assert [t.name for t in cfg.edge.gate_targets()] == ["orin"]
    devices.unlink()  # what crosses a task or process boundary carries the devices: no second read
    again = PipelineConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.edge.devices == cfg.edge.devices and again.config_hash() == cfg.config_hash()


def test_unreachable_target_stops_the_cascade_and_keeps_earlier_rounds(harness, tmp_path):
    from flows.compress import compress_flow

    cfg = tiny(tmp_path)
    cfg["prune"] = {**cfg["prune"], "keep_ratios": [0.8, 0.01]}  # 1% of FLOPs: below what layers allow
    result = compress_flow(config=cfg)
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["rounds"][0]["error"] is None and "PruneError" in result["rounds"][1]["error"]
    assert result["chosen"] == 0 and result["version"] == "1"  # round 1 still exported, gated, registered
    client = _client(tmp_path)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and "PruneError" in parent.data.tags["pfp.round_2.error"]
