"""Edge rollout figures on a local fleet: a real Prefect server, one real process worker per
device (each its own process, folder and queue), a real sqlite MLflow registry.

    .venv/bin/python benchmarks/edge_rollout.py --devices 8 --out edge.json

Three parts, each printed as a table (and all of it as JSON with --out):
1. rollout: the registry's champion to every device, canaries then fleet; wall time, and
   the device-seconds spent in transfer, build, reference check, benchmark, install and
   orchestration (everything else between dispatch and the orchestrator seeing the end:
   worker pickup, the job's process start, Prefect and MLflow calls);
2. faults: each fault of the issue tried in turn, with the version every device serves after it;
3. disturbance: one device benchmarks the model (through its device flow) with the fleet idle,
   and again while a rollout to the other devices runs; the device's worker is pinned to the
   last core and everything else to the others, as separate machines would be.
"""
from __future__ import annotations

import argparse
import contextvars
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = "edge-bench"


def make_version(folder: Path, seed: int, arch: str) -> str:
    from devtools.local_fleet import register_demo_version

    return register_demo_version(folder, MODEL, seed, arch=arch, input_size=28)


def write_targets(path: Path, devices: list[tuple[str, str, str]], batch_sizes: list[int]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"targets": [
        {"name": d, "work_pool": pool, "role": role, "backend_preference": ["tensorrt", "ort-cuda", "ort-cpu"],
         "batch_sizes": batch_sizes} for d, pool, role in devices]}))
    return path


def states(fleet, names: list[str]) -> dict[str, str | None]:
    from deploy.on_device import active_registry_version

    return {d: active_registry_version(fleet.device_root(d), MODEL)[1] for d in names}


def rollout(fleet, targets: Path, settings: dict, **kw) -> dict:
    from flows.deploy_flow import RolloutStopped, deploy_flow

    try:
        return deploy_flow(str(targets), MODEL, settings=settings, tracking_uri=fleet.uri, **kw)
    except RolloutStopped as e:
        return e.report


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    box: dict = {}
    ctx = contextvars.copy_context()   # Prefect's settings (the server's URL) are context-local

    def run():
        try:
            box["value"] = ctx.run(fn, *args, **kw)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            box["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, box


# --------------------------------------------------------------------------- 1. rollout


def part_rollout(fleet, targets: Path, settings: dict) -> dict:
    start = time.perf_counter()
    report = rollout(fleet, targets, settings)
    wall = time.perf_counter() - start
    keys = ("slot_wait", "transfer", "build", "verify", "benchmark", "install")
    totals = dict.fromkeys(keys, 0.0)
    seen = 0.0
    print(f"\nrollout of {MODEL} v{report['version']} to {len(report['outcomes'])} devices: {wall:.1f} s wall, "
          f"{report['summary']}")
    print(f"{'device':8} {'stage':7} {'status':8} {'seen s':>7} " + " ".join(f"{k:>9}" for k in keys))
    for o in report["outcomes"]:
        sec = (o.get("result") or {}).get("seconds", {})
        seen += o["seconds"]
        for k in keys:
            totals[k] += sec.get(k, 0.0)
        print(f"{o['device']:8} {o['stage']:7} {o['status']:8} {o['seconds']:7.1f} "
              + " ".join(f"{sec.get(k, 0.0):9.3f}" for k in keys))
    work = sum(totals.values())
    flow = sum(((o.get("result") or {}).get("seconds", {}).get("flow", 0.0)) for o in report["outcomes"])
    # Orchestration, split: before the device flow ran (queue pickup, the job's process start
    # and imports) and inside it around the steps (Prefect tasks, MLflow runs and logging).
    shares = {k: v / seen for k, v in totals.items()} | {
        "orchestration": (seen - work) / seen, "  of which pickup+process start": (seen - flow) / seen,
        "  of which in-flow (tasks, MLflow)": (flow - work) / seen}
    print("share of device-seconds (dispatch to seen done, summed over devices = "
          f"{seen:.1f} s): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()))
    return {"wall_s": wall, "device_seconds": seen, "seconds": totals, "shares": shares, "report": report}


# --------------------------------------------------------------------------- 2. faults


def part_faults(fleet, tmp: Path, targets: Path, names: list[str], settings: dict, arch: str) -> list[dict]:
    from mlflow import MlflowClient

    from deploy.targets import load_targets
    from flows.device_flows import deployment_name
    from flows.deploy_flow import VersionNotFound, wait_for_run
    from prefect.deployments import run_deployment

    rows = []

    def record(fault: str, outcome: str) -> None:
        st = states(fleet, names)
        rows.append({"fault": fault, "outcome": outcome, "serving": st})
        print(f"\n[{fault}] {outcome}\n  serving after: " + ", ".join(f"{d}=v{v}" for d, v in st.items()))

    # Tampered artifact: one byte appended to model.onnx in the artifact store.
    v = make_version(tmp, 11, arch)
    mv = MlflowClient().get_model_version(MODEL, v)
    onnx = Path(unquote(urlparse(MlflowClient().get_run(mv.run_id).info.artifact_uri).path)) / "bundle" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    r = rollout(fleet, targets, settings)
    record("tampered artifact", r["summary"])

    try:
        rollout(fleet, targets, settings, version="999")
        record("version that does not exist", "NOT refused")
    except VersionNotFound as e:
        record("version that does not exist", f"refused before any dispatch: {e}")

    bad = tmp / "bad-targets.yaml"
    bad.write_text(targets.read_text().replace(f"name: {names[-1]}", "name: ../evil", 1))
    try:
        load_targets(bad)
        outcome = "NOT refused"
    except Exception as e:  # noqa: BLE001
        outcome = f"targets file refused: {e}"
    job = {"device": f"../{names[0]}", "model_name": MODEL, "version": "1", "rollout_id": "drill"}
    pool = load_targets(targets)[0].work_pool
    fr = run_deployment(deployment_name("deploy", pool), parameters={"job": job, "experiment": "drills"}, timeout=0,
                        work_queue_name=names[0], as_subflow=False)
    status, reason = wait_for_run(fr.id, 60, 180)
    record("device name with a path", f"{outcome}; sent straight to {names[0]}'s queue: {status}: {reason}")

    # Two deploys to one device at once: the first pauses after its download.
    v = make_version(tmp, 12, arch)
    dev = names[-1]
    dpool = next(t.work_pool for t in load_targets(targets) if t.name == dev)
    job = {"device": dev, "model_name": MODEL, "version": v, "rollout_id": "twice", "max_time_s": 0.5,
           "busy_timeout_s": 3}
    first = run_deployment(deployment_name("deploy", dpool), parameters={"job": job, "experiment": "drills"},
                           timeout=0, work_queue_name=dev, as_subflow=False,
                           job_variables={"env": {"PFP_FAULT_PAUSE": "download:15"}})
    time.sleep(8)
    second = run_deployment(deployment_name("deploy", dpool), parameters={"job": job, "experiment": "drills"},
                            timeout=0, work_queue_name=dev, as_subflow=False)
    s2 = wait_for_run(second.id, 60, 180)
    s1 = wait_for_run(first.id, 60, 180)
    record("two deploys to one device at once", f"first: {s1[0]}; second: {s2[0]}: {s2[1]}")

    # Worker killed during download (one device) and during build (another), mid-rollout.
    v = make_version(tmp, 13, arch)
    victims = {names[2]: "download", names[3]: "build"}
    for d, stage in victims.items():
        fleet.kill_worker(d)
        fleet.start_worker(d, extra_env={"PFP_FAULT_PAUSE": f"{stage}:300"})
    t, box = in_thread(rollout, fleet, targets, settings | {"pickup_timeout_s": 20})
    deadline = time.monotonic() + 300
    pending = dict(victims)
    while pending and time.monotonic() < deadline:
        for d, stage in list(pending.items()):
            log = (fleet.home / "logs" / f"worker-{d}.log").read_text(errors="replace")
            if f"fault drill: pausing 300 s after {stage}" in log:
                fleet.kill_worker(d)
                del pending[d]
        time.sleep(0.5)
    t.join()
    r = box.get("value") or {"summary": repr(box.get("error"))}
    record("worker killed during download and during build", r["summary"])
    for d in victims:
        fleet.start_worker(d)
    r = rollout(fleet, targets, settings | {"busy_timeout_s": 120, "run_timeout_s": 400}, only=list(victims))
    record("the two killed devices back online, deployed again", r["summary"])

    ghost = tmp / "with-ghost.yaml"
    ghost.write_text(targets.read_text().replace("targets:\n", f"targets:\n- name: ghost\n  role: canary\n  "
                                                  f"work_pool: {pool}\n", 1))
    v = make_version(tmp, 14, arch)
    r = rollout(fleet, ghost, settings | {"pickup_timeout_s": 15})
    record("a device that is offline (no worker on its queue)", r["summary"])
    return rows


# --------------------------------------------------------------------------- 3. disturbance


def part_disturbance(fleet, tmp: Path, targets: Path, names: list[str], settings: dict, repeats: int,
                     arch: str) -> dict:
    import yaml

    probe = names[-1]
    rows = [r for r in yaml.safe_load(targets.read_text())["targets"]]
    solo = tmp / "probe.yaml"
    solo.write_text(yaml.safe_dump({"targets": [{**r, "role": "gate"} for r in rows if r["name"] == probe]}))
    others = tmp / "others.yaml"
    others.write_text(yaml.safe_dump({"targets": [r for r in rows if r["name"] != probe]}))
    bench = settings | {"roles": ["gate"], "max_time_s": 3.0, "threads": 1}

    def measure() -> dict:
        r = rollout(fleet, solo, bench, mode="benchmark")
        return (r["outcomes"][0].get("result") or {}).get("latency", {})

    quiet, busy = [], []
    for i in range(repeats):
        quiet.append(measure())
        make_version(tmp, 30 + i, arch)
        t, box = in_thread(rollout, fleet, others, settings | {"max_parallel": 8})
        time.sleep(3)                        # the rollout's jobs are being picked up and started
        busy.append(measure())
        t.join()
    out = {}
    print(f"\ndisturbance on {probe} (its worker pinned to its own core; {repeats} runs each, through its device flow)")
    for b in quiet[0]:
        q = [m[b]["p50_ms"] for m in quiet if b in m]
        z = [m[b]["p50_ms"] for m in busy if b in m]
        q99 = [m[b]["p99_ms"] for m in quiet if b in m]
        z99 = [m[b]["p99_ms"] for m in busy if b in m]
        out[b] = {"quiet_p50": q, "busy_p50": z, "quiet_p99": q99, "busy_p99": z99}
        print(f"  {b}: p50 quiet {statistics.median(q):.4f} ms, during rollout {statistics.median(z):.4f} ms "
              f"({statistics.median(z) / statistics.median(q):.3f}x); p99 quiet {statistics.median(q99):.4f}, "
              f"during rollout {statistics.median(z99):.4f} ({statistics.median(z99) / statistics.median(q99):.3f}x)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--arch", default="resnet20", help="model of the bundle (pfp.models)")
    ap.add_argument("--batch", default="1,8", help="batch sizes timed on the devices")
    ap.add_argument("--max-parallel", type=int, default=4)
    ap.add_argument("--parts", default="rollout,faults,disturbance")
    ap.add_argument("--repeats", type=int, default=3, help="disturbance: runs each way")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-pin", action="store_true", help="do not pin the last device to its own core")
    args = ap.parse_args()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from devtools.local_fleet import LocalFleet, drain_prefect_clients
    from flows.tracking import setup_mlflow

    tmp = Path(tempfile.mkdtemp(prefix="pfp-edge-bench-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    setup_mlflow(uri, "bundles")
    names = [f"dev{i + 1:02d}" for i in range(args.devices)]
    pools = ["orin" if i < args.devices // 2 else "nano" for i in range(args.devices)]
    roles = ["canary" if i < 2 else "fleet" for i in range(args.devices)]
    cores = sorted(os.sched_getaffinity(0))
    cpus = {}
    if "disturbance" in args.parts and len(cores) > 1 and not args.no_pin:
        cpus = {d: set(cores[:-1]) for d in names[:-1]} | {names[-1]: {cores[-1]}, "server": set(cores[:-1])}
        os.sched_setaffinity(0, set(cores[:-1]))   # this process (the orchestrator) too
    targets = write_targets(tmp / "targets.yaml", list(zip(names, pools, roles)),
                            [int(b) for b in args.batch.split(",")])
    settings = {"max_parallel": args.max_parallel, "max_time_s": 1.0, "pickup_timeout_s": 60, "run_timeout_s": 600,
                "busy_timeout_s": 30, "lost_after_s": 20}
    results: dict = {"devices": args.devices, "arch": args.arch, "cores": cores}
    t0 = time.perf_counter()
    with LocalFleet(tmp / "fleet", list(zip(names, pools)), mlflow_uri=uri, cpus=cpus) as fleet:
        fleet.uri = uri
        results["fleet_start_s"] = time.perf_counter() - t0
        fleet.register_deployments()
        print(f"fleet of {args.devices} workers up in {results['fleet_start_s']:.1f} s (server on {fleet.api_url}); "
              f"state in {tmp}")
        with temporary_settings(updates={PREFECT_API_URL: fleet.api_url}):
            make_version(tmp, 1, args.arch)
            if "rollout" in args.parts:
                results["rollout"] = part_rollout(fleet, targets, settings)
            if "faults" in args.parts:
                results["faults"] = part_faults(fleet, tmp, targets, names, settings, args.arch)
            if "disturbance" in args.parts:
                results["disturbance"] = part_disturbance(fleet, tmp, targets, names, settings, args.repeats, args.arch)
            drain_prefect_clients()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
