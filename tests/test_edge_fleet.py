"""Edge deployment for real: a Prefect server on 127.0.0.1, one process worker per device
started as its own process with its own device folder, a real sqlite MLflow store with the
registry, real ONNX bundles built, checked, timed and installed by the workers.

The faults are real too: an artifact changed in the store, a version that is not
registered, device names with paths in them, two deploys to one device at once, a worker
(and the job it runs) killed mid-download, a device with no worker. After each, every
device must still serve what it served before, and the rollout must say why it stopped.
"""
from __future__ import annotations

import contextvars
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DEVICES = [("c1", "orin"), ("f1", "orin"), ("f2", "nano")]
MODEL = "edge-tiny"
# Windows that a live worker must beat grow with the machine's load, measured when the tests start,
# so a busy machine slows the suite down instead of failing it. (busy_timeout_s is not scaled: the
# busy test needs the first job to still hold the device when the second one gives up.)
LOAD = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def scaled(seconds: float) -> int:
    return int(round(seconds * LOAD))


# Workers here poll every second (LocalFleet), so a queue quiet for 15 s has lost its worker.
FAST = {"max_time_s": 0.3, "pickup_timeout_s": scaled(20), "run_timeout_s": scaled(120), "busy_timeout_s": 5,
        "lost_after_s": scaled(15)}


def targets_file(folder: Path, extra: list[dict] | None = None, name: str = "targets.yaml") -> Path:
    rows = [
        {"name": "c1", "work_pool": "orin", "role": "canary", "backend_preference": ["tensorrt", "ort-cpu"]},
        {"name": "f1", "work_pool": "orin", "role": "fleet", "backend_preference": ["ort-cpu"]},
        {"name": "f2", "work_pool": "nano", "role": "fleet", "backend_preference": ["ort-cpu"], "batch_sizes": [1, 4]},
        *(extra or []),
    ]
    path = folder / name
    path.write_text(yaml.safe_dump({"targets": rows}))
    return path


def make_version(folder: Path, seed: int) -> str:
    """A real LeNet5 bundle (weights from `seed`), registered as MODEL's champion."""
    from devtools.local_fleet import register_demo_version

    return register_demo_version(folder, MODEL, seed)


def served(fleet, device: str) -> str | None:
    from deploy.on_device import active_registry_version

    return active_registry_version(fleet.device_root(device), MODEL)[1]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from devtools.local_fleet import LocalFleet, drain_prefect_clients
    from flows.tracking import setup_mlflow

    home = tmp_path_factory.mktemp("fleet")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    setup_mlflow(uri, "bundles")
    with LocalFleet(home, DEVICES, mlflow_uri=uri) as f:
        f.register_deployments()
        with temporary_settings(updates={PREFECT_API_URL: f.api_url}):
            f.uri = uri
            try:
                yield f
            finally:
                drain_prefect_clients()   # while the server is still up
    import mlflow

    mlflow.set_tracking_uri(None)


def rollout(fleet, targets: Path, **kw):
    from flows.deploy_flow import deploy_flow

    settings = {**FAST, **kw.pop("settings", {})}
    return deploy_flow(str(targets), MODEL, settings=settings, tracking_uri=fleet.uri, **kw)


def stopped(fleet, targets: Path, **kw) -> dict:
    from flows.deploy_flow import RolloutStopped

    with pytest.raises(RolloutStopped) as e:
        rollout(fleet, targets, **kw)
    return e.value.report


def no_run_left_running(fleet) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(fleet.uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(exps, "attributes.status = 'RUNNING'") == []


def test_rollout_canary_then_fleet_records_every_device(fleet, tmp_path):
    from mlflow import MlflowClient

    v1 = make_version(tmp_path, seed=1)
    report = rollout(fleet, targets_file(tmp_path))
    assert report["passed"] and [o["status"] for o in report["outcomes"]] == ["active"] * 3
    assert [o["stage"] for o in report["outcomes"]] == ["canary", "fleet", "fleet"]
    for o in report["outcomes"]:
        assert served(fleet, o["device"]) == v1
        assert o["result"]["backend"] == "ort-cpu" and o["result"]["repository_version"] == 1
    c1 = report["outcomes"][0]["result"]
    assert "tensorrt" in c1["skipped_backends"]          # preferred, not installed here: said why
    assert set(report["outcomes"][2]["result"]["latency"]) == {"b1", "b4"}

    client = MlflowClient(fleet.uri)
    tags = client.get_model_version(MODEL, v1).tags
    for d in ("c1", "f1", "f2"):
        rec = json.loads(tags[f"deploy.{d}"])
        assert rec["status"] == "active" and rec["artifact_sha256"] == tags["onnx_sha256"]
        assert rec["latency"]["b1"]["p50_ms"] > 0
    # The canary finished before any fleet device started.
    exp = client.get_experiment_by_name(f"{MODEL}-deploy")
    runs = {r.data.tags["pfp.device"]: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`pfp.rollout_id` = '{report['rollout_id']}' and tags.`pfp.flow` = 'device-deploy'")}
    assert set(runs) == {"c1", "f1", "f2"} and all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["c1"].info.end_time <= min(runs["f1"].info.start_time, runs["f2"].info.start_time)
    assert runs["f2"].data.metrics["latency.b4.p50_ms"] > 0
    assert runs["c1"].data.tags["mlflow.parentRunId"]
    assert "device/machine.json" in [a.path for a in client.list_artifacts(runs["c1"].info.run_id, "device")]
    no_run_left_running(fleet)


def test_tampered_artifact_stops_the_rollout_at_the_canary(fleet, tmp_path):
    from mlflow import MlflowClient

    before = {d: served(fleet, d) for d, _ in DEVICES}
    assert None not in before.values()
    v = make_version(tmp_path, seed=2)
    mv = MlflowClient(fleet.uri).get_model_version(MODEL, v)
    artifact_dir = Path(unquote(urlparse(MlflowClient(fleet.uri).get_run(mv.run_id).info.artifact_uri).path))
    onnx = artifact_dir / "bundle" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")              # one byte appended in the artifact store

    report = stopped(fleet, targets_file(tmp_path))
    c1, f1, f2 = report["outcomes"]
    assert c1["status"] == "failed" and "sha256" in c1["reason"] and "onnx_sha256" in c1["reason"]
    assert (f1["status"], f2["status"]) == ("skipped", "skipped")
    assert report["stopped_by"].startswith("c1 (canary): failed")
    assert {d: served(fleet, d) for d, _ in DEVICES} == before   # nothing replaced anywhere
    assert not any((fleet.device_root("c1") / ".pfp-work").iterdir())  # the download was removed
    tag = json.loads(MlflowClient(fleet.uri).get_model_version(MODEL, v).tags["deploy.c1"])
    assert tag["status"] == "failed" and "sha256" in tag["reason"]
    no_run_left_running(fleet)


def device_runs() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return len([r for r in c.read_flow_runs(limit=200) if r.name.split(":")[0] in {d for d, _ in DEVICES}])


def test_missing_version_is_refused_before_any_dispatch(fleet, tmp_path):
    from flows.deploy_flow import VersionNotFound

    before = device_runs()
    with pytest.raises(VersionNotFound, match=rf"model '{MODEL}' has no version '99' in the registry"):
        rollout(fleet, targets_file(tmp_path), version="99")
    with pytest.raises(VersionNotFound, match=rf"model '{MODEL}' has no version with alias 'stable'"):
        rollout(fleet, targets_file(tmp_path), alias="stable")
    assert device_runs() == before


def test_device_names_with_paths_are_refused(fleet, tmp_path):
    from deploy.targets import load_targets
    from flows.device_flows import deployment_name
    from flows.deploy_flow import wait_for_run
    from pfp.config import ConfigError
    from prefect.deployments import run_deployment

    bad = targets_file(tmp_path, [{"name": "../etc", "work_pool": "orin", "role": "fleet"}], "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: .*targets\.3\.name.*'\.\./etc' is not allowed"):
        load_targets(bad)
    # Straight to a device's queue, around the rollout's checks: the device flow refuses it.
    before = sorted(p.name for p in fleet.home.rglob("*"))
    job = {"device": "../c1", "model_name": MODEL, "version": "1", "rollout_id": "drill"}
    fr = run_deployment(deployment_name("deploy", "orin"), parameters={"job": job, "experiment": "x"}, timeout=0,
                        work_queue_name="c1", as_subflow=False)
    status, reason = wait_for_run(fr.id, 60, 120)
    assert status == "failed" and "device name '../c1' is not allowed" in reason
    job["device"], job["model_name"] = "c1", "../../escape"
    fr = run_deployment(deployment_name("deploy", "orin"), parameters={"job": job, "experiment": "x"}, timeout=0,
                        work_queue_name="c1", as_subflow=False)
    status, reason = wait_for_run(fr.id, 60, 120)
    assert status == "failed" and "model name '../../escape' is not allowed" in reason
    after = sorted(p.name for p in fleet.home.rglob("*") if "logs" not in p.parts and "prefect" not in p.parts)
    assert "escape" not in after and set(after) <= set(before) | {".pfp-lock"}


def test_two_deploys_to_one_device_at_once(fleet, tmp_path):
    from flows.device_flows import deployment_name
    from flows.deploy_flow import wait_for_run
    from prefect.deployments import run_deployment

    v = make_version(tmp_path, seed=3)
    before = served(fleet, "f2")
    job = {"device": "f2", "model_name": MODEL, "version": v, "rollout_id": "twice", "max_time_s": 0.3,
           "busy_timeout_s": 2}
    # The first holds the device (a drill pause after its download) while the second asks.
    first = run_deployment(deployment_name("deploy", "nano"), parameters={"job": job, "experiment": "drills"},
                           timeout=0, work_queue_name="f2", as_subflow=False,
                           job_variables={"env": {"PFP_FAULT_PAUSE": "download:12"}})
    time.sleep(6)
    second = run_deployment(deployment_name("deploy", "nano"), parameters={"job": job, "experiment": "drills"},
                            timeout=0, work_queue_name="f2", as_subflow=False)
    s2, r2 = wait_for_run(second.id, 60, 120)
    assert served(fleet, "f2") == before                    # the busy one changed nothing
    s1, r1 = wait_for_run(first.id, 60, 120)
    assert (s1, s2) == ("ok", "failed"), (r1, r2)
    assert "device busy" in r2
    assert served(fleet, "f2") == v


def test_worker_killed_mid_download_leaves_the_device_as_it_was(fleet, tmp_path):
    from deploy.repository import status

    v = make_version(tmp_path, seed=4)
    before = {d: served(fleet, d) for d, _ in DEVICES}
    fleet.kill_worker("f1")
    fleet.start_worker("f1", extra_env={"PFP_FAULT_PAUSE": "download:120"})
    result: dict = {}

    def run():
        result["report"] = stopped(fleet, targets_file(tmp_path), settings={"pickup_timeout_s": scaled(15)})

    t = threading.Thread(target=contextvars.copy_context().run, args=(run,))  # Prefect's settings are context-local
    t.start()
    work = fleet.device_root("f1") / ".pfp-work"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not any(work.glob("*/bundle/model.onnx")):
        time.sleep(0.5)
    assert any(work.glob("*/bundle/model.onnx")), "f1 never downloaded"
    fleet.kill_worker("f1")                                  # power loss: worker and job, mid-job
    t.join(timeout=300)
    report = result["report"]
    by = {o["device"]: o for o in report["outcomes"]}
    assert by["c1"]["status"] == "active" and by["f1"]["status"] == "lost"
    assert "queue 'f1' last polled" in by["f1"]["reason"]   # seen from its queue, not a long timeout
    assert by["f1"]["seconds"] < FAST["run_timeout_s"]
    assert "rollback offline" in by["f1"]["reason"]         # asked, but nobody answers on f1's queue
    assert served(fleet, "f1") == before["f1"] and served(fleet, "c1") == v
    st = status(fleet.device_root("f1"))[MODEL]
    assert st["in_sync"] and st["problems"] == []
    assert any(work.iterdir())                               # the dead job's download is still there

    fleet.start_worker("f1")                                 # back online; the next deploy cleans up
    # The dead job's slot on f1 comes back when its lease runs out (60 s, then the server's
    # 15 s sweep); the new job waits for it.
    again = rollout(fleet, targets_file(tmp_path), only=["f1"], settings={"busy_timeout_s": scaled(120), "run_timeout_s": scaled(300)})
    assert again["passed"] and served(fleet, "f1") == v
    assert not any(work.iterdir())
    no_run_left_running(fleet)


def test_offline_device_is_cancelled_and_stops_the_rollout(fleet, tmp_path):
    from prefect.client.orchestration import get_client

    before = {d: served(fleet, d) for d, _ in DEVICES}
    v = make_version(tmp_path, seed=5)
    targets = targets_file(tmp_path, [{"name": "ghost", "work_pool": "orin", "role": "canary"}])
    report = stopped(fleet, targets, settings={"pickup_timeout_s": scaled(8)})
    by = {o["device"]: o for o in report["outcomes"]}
    assert by["ghost"]["status"] == "offline" and f"within {scaled(8)} s" in by["ghost"]["reason"]
    assert by["c1"]["status"] == "active"                   # the other canary, same wave
    assert by["f1"]["status"] == by["f2"]["status"] == "skipped"
    assert served(fleet, "f1") == before["f1"] and served(fleet, "f2") == before["f2"]
    with get_client(sync_client=True) as c:
        ghost_run = c.read_flow_run(by["ghost"]["flow_run_id"])
    assert ghost_run.state.type.value == "CANCELLED"        # a device coming back never runs it
    assert served(fleet, "c1") == v


def test_rollback_and_status_flows(fleet, tmp_path):
    from flows.device_flows import deployment_name
    from flows.deploy_flow import wait_for_run
    from prefect.artifacts import Artifact
    from prefect.deployments import run_deployment

    now = served(fleet, "c1")
    fr = run_deployment(deployment_name("rollback", "orin"), parameters={"device": "c1", "model_name": MODEL},
                        timeout=0, work_queue_name="c1", as_subflow=False)
    assert wait_for_run(fr.id, 60, 120)[0] == "ok"
    back = served(fleet, "c1")
    assert back != now
    # Guarded rollback: only when the device serves the named version; here it does not.
    fr = run_deployment(deployment_name("rollback", "orin"), timeout=0, work_queue_name="c1", as_subflow=False,
                        parameters={"device": "c1", "model_name": MODEL, "only_if_version": now})
    assert wait_for_run(fr.id, 60, 120)[0] == "ok"
    assert served(fleet, "c1") == back
    fr = run_deployment(deployment_name("status", "orin"), parameters={"device": "c1"}, timeout=0,
                        work_queue_name="c1", as_subflow=False)
    assert wait_for_run(fr.id, 60, 120)[0] == "ok"
    rows = json.loads(Artifact.get("device-c1").data)
    assert rows[0]["model"] == MODEL and str(rows[0]["registry_version"]) == back and rows[0]["in_sync"] is True


def test_gate_devices_feed_the_promotion_gate(fleet, tmp_path):
    """The compress flow has its registered candidate built, checked and timed on a gate
    device by the device's own worker; the figures join the gate, the device installs nothing."""
    from flows.compress import compress_flow
    from tests.test_flows import tiny

    def run(budget_ms: float) -> dict:
        gate = targets_file(tmp_path, name="gate.yaml")
        rows = yaml.safe_load(gate.read_text())["targets"]
        rows = [{**r, "role": "gate", "latency_budget_ms": budget_ms} for r in rows if r["name"] == "f2"]
        gate.write_text(yaml.safe_dump({"targets": rows}))
        cfg = tiny(tmp_path, tracking={"tracking_uri": fleet.uri},
                   edge={"targets_file": str(gate), "pickup_timeout_s": scaled(30), "max_time_s": 0.3},
                   gate={"max_acc_drop": 100.0, "latency": [{"target": "f2", "batch": 4, "metric": "p99",
                                                             "max_ms": 1000.0}]})
        return compress_flow(config=cfg)

    first = run(budget_ms=1000.0)
    checks = {c["name"]: c for c in first["decision"]["checks"]}
    assert first["promoted"], first["decision"]["summary"]
    assert checks["f2.b4.p99_ms"]["passed"] and 0 < checks["f2.b4.p99_ms"]["value"] < 1000
    assert checks["f2.b1.p50_ms"]["passed"]                  # the device's budget, as a check of its own
    assert not (fleet.device_root("f2") / "tiny").exists()   # measured only, nothing installed

    second = run(budget_ms=1e-6)
    checks = {c["name"]: c for c in second["decision"]["checks"]}
    assert not second["promoted"] and not checks["f2.b1.p50_ms"]["passed"]
    from flows.registry import get_by_alias

    assert get_by_alias("tiny", "champion").version == first["version"]   # the champion stays
    no_run_left_running(fleet)


def test_cli_deploy_status_and_rollback(fleet, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("PREFECT_API_URL", fleet.api_url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fleet.uri)
    monkeypatch.setenv("COLUMNS", "250")
    cli = CliRunner()
    targets = str(targets_file(tmp_path))
    v = make_version(tmp_path, seed=6)
    r = cli.invoke(app, ["deploy", targets, "--model", MODEL, "--only", "c1", "--max-time", "0.3",
                         "--pickup-timeout", str(scaled(30))])
    assert r.exit_code == 0, r.output
    assert f"{MODEL} v{v}: 1 of 1 devices ok" in r.output and served(fleet, "c1") == v
    r = cli.invoke(app, ["device", "status", "c1", targets])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if MODEL in line)
    assert f"│ {v} " in row.replace("  ", " ") and "True" in row
    r = cli.invoke(app, ["device", "rollback", "c1", targets, "--model", MODEL])
    assert r.exit_code == 0, r.output
    assert served(fleet, "c1") != v
    r = cli.invoke(app, ["deploy", targets, "--model", MODEL, "--version", "98"])
    assert r.exit_code == 2 and f"model '{MODEL}' has no version '98' in the registry" in r.output
