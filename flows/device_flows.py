"""The flows a device's own Prefect worker runs: deploy (or only benchmark), roll back, status.

    PFP_DEVICE_NAME=orin-fleet-01 PFP_DEVICE_ROOT=/var/lib/pfp/models MLFLOW_TRACKING_URI=... \\
        prefect worker start --pool jetson-orin --work-queue orin-fleet-01

Each device runs a process worker on its device class's work pool, taking work only from
its own queue. `pfp deploy` (flows.deploy_flow) sends these flows there with run_deployment and
`work_queue_name`. Who the device is and where its Triton model repository lies come from
the worker's environment (deploy.on_device.device_from_env); the flow's `device` parameter
must name this device or the run is refused.

    download (MLflow, sha256 against the registry's tags) -> build (TensorRT if installed,
    ONNX Runtime otherwise) -> check against the reference outputs -> benchmark -> budget
    -> install -> activate -> check the served file again (roll back if it fails) -> record

One job at a time per device: every flow here holds a slot of the Prefect global
concurrency limit `pfp-device-<name>` (limit 1, created on first use), whose lease the
server takes back if the holder dies; the repository's own per-model file lock guards the
files underneath. Results go to MLflow (a run per device job, tagged with the rollout and
device, its figures as metrics, its DeviceResult as device/result.json and the device's
description as artifacts), which is how the rollout on the other side reads them: the
device and the orchestrator share no files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import requests
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deploy import repository
from deploy.on_device import (
    Built, Device, DeviceError, activate_checked, active_registry_version, build_on_device, check_budget,
    clean_work, device_from_env, install_built, new_workdir,
)
from deploy.rollout_plan import DeviceJob, DeviceResult, parse_job
from flows.tracking import sigterm_raises

LIMIT_PREFIX = "pfp-device-"
LEASE_S = 60.0          # a dead holder's slot comes back within this (Prefect renews live leases)
RESULT_TAG = "pfp.result"               # a short status line; the whole DeviceResult is RESULT_ARTIFACT
RESULT_ARTIFACT = "device/result.json"
NETWORK_RETRIES = 2
NETWORK_RETRY_DELAYS_S = [2.0, 10.0]
# MLflow wraps a failed HTTP request (after its own retries) as INTERNAL_ERROR; the server
# says TEMPORARILY_UNAVAILABLE or REQUEST_LIMIT_EXCEEDED when it is overloaded.
_TRANSIENT_MLFLOW_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
# Fault drills: PFP_FAULT_PAUSE=download:30 sleeps 30 s after that stage, so an operator (or
# a test) can kill the worker at a known point and watch the device survive it.
FAULT_ENV = "PFP_FAULT_PAUSE"


def limit_name(device: str) -> str:
    """The Prefect global concurrency limit that serializes jobs on `device`."""
    return f"{LIMIT_PREFIX}{device}"


def ensure_device_limits(devices: list[str]) -> None:
    """Create the per-device concurrency limits (limit 1) that do not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for d in devices:
            try:
                client.upsert_global_concurrency_limit_by_name(limit_name(d), 1)
            except ObjectAlreadyExists:
                pass  # another process created it between the look-up and the create


@contextmanager
def device_slot(device: str, timeout_s: float) -> Iterator[None]:
    """Hold `device`'s one concurrency slot; DeviceError("device busy") after `timeout_s`."""
    from prefect.concurrency.sync import concurrency

    ensure_device_limits([device])
    try:
        ctx = concurrency(limit_name(device), occupy=1, timeout_seconds=timeout_s, strict=True,
                          lease_duration=LEASE_S)
        ctx.__enter__()
    except TimeoutError:
        raise DeviceError(f"device busy: {device} is running another deploy or benchmark "
                          f"(waited {timeout_s:g} s for {limit_name(device)})") from None
    try:
        yield
    except BaseException as e:
        if not ctx.__exit__(type(e), e, e.__traceback__):
            raise
    else:
        ctx.__exit__(None, None, None)


def retry_on_network_error(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry a network failure, never a refusal (a bad sha256, a
    missing version), which a second try would only repeat."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_MLFLOW_CODES
    return isinstance(exc, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))


def _drill(stage: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.partition(":")[0] == stage:
        seconds = float(spec.partition(":")[2] or 30)
        get_run_logger().warning(f"fault drill: pausing {seconds:g} s after {stage} ({FAULT_ENV})")
        time.sleep(seconds)


# --------------------------------------------------------------------------- tasks


@task(name="download", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_RETRY_DELAYS_S,
      retry_condition_fn=retry_on_network_error, cache_policy=NO_CACHE)
def download_task(job: dict, workdir: str) -> dict:
    """Fetch the version's bundle from MLflow; model.onnx and reference.npz must match the
    sha256 tags the registry recorded (flows.registry.download_version)."""
    from flows.registry import download_version

    j = DeviceJob.model_validate(job)
    start = time.perf_counter()
    folder = download_version(j.model_name, j.version, Path(workdir) / "bundle", require_reference=True)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {"bundle": str(folder), "bytes": size, "seconds": time.perf_counter() - start}


@task(name="build-verify-benchmark")
def build_task(job: dict, bundle: str, workdir: str) -> dict:
    j = DeviceJob.model_validate(job)
    built = build_on_device(bundle, j.backend_preference, batch_sizes=j.batch_sizes, precision=j.precision,
                            workdir=Path(workdir) / "build", max_time_s=j.max_time_s, threads=j.threads)
    return built.to_dict()


@task(name="install-activate")
def install_task(job: dict, device_root: str, built: dict, reference: str) -> dict:
    j = DeviceJob.model_validate(job)
    b = Built.from_dict(built)
    start = time.perf_counter()
    version = install_built(device_root, j.model_name, b, registry=(j.model_name, j.version))
    state = activate_checked(device_root, j.model_name, version, reference=reference)
    return {"repository_version": version, "previous": state.get("previous"), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- MLflow record


@contextmanager
def _device_run(j: DeviceJob, dev: Device, experiment: str, parent_run_id: str | None, kind: str):
    """An MLflow run for this job, ended FAILED with the error tagged if the job fails."""
    import mlflow

    from flows.tracking import check_tracking_server, setup_mlflow, tracked_run

    # The device's tracking server comes from its worker's environment, like its folder.
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise DeviceError(f"device {dev.name}: MLFLOW_TRACKING_URI is not set in the worker's environment")
    check_tracking_server(uri)
    setup_mlflow(uri, experiment)
    tags = {"pfp.flow": f"device-{kind}", "pfp.device": dev.name, "pfp.rollout_id": j.rollout_id,
            "pfp.model": j.model_name, "pfp.model_version": j.version, "pfp.mode": j.mode}
    if parent_run_id:
        if not re.fullmatch(r"[0-9a-f]{32}", parent_run_id):
            raise DeviceError(f"parent_run_id {parent_run_id!r} is not an MLflow run id")
        tags["mlflow.parentRunId"] = parent_run_id
    with tracked_run(f"{dev.name}: {j.mode} {j.model_name} v{j.version}", tags=tags) as run:
        try:
            yield run
        except BaseException as e:
            mlflow.set_tag("pfp.outcome", "failed")
            mlflow.set_tag("pfp.error", (" ".join(str(e).split()) or type(e).__name__)[:5000])
            raise


def _record(result: DeviceResult, built: dict, machine: dict, budget_ms: float | None) -> None:
    import mlflow

    from export.machine import machine_summary
    from flows.tracking import log_metrics_at

    metrics = {f"seconds.{k}": v for k, v in result.seconds.items()}
    for r in built["latency"]:
        for m in ("p50_ms", "p90_ms", "p99_ms", "throughput_per_s"):
            metrics[f"latency.b{r['batch']}.{m}"] = r[m]
    metrics["parity.max_rel_diff"] = built["parity"]["max_rel_diff"]
    metrics["parity.top1_agreement"] = built["parity"]["top1_agreement"]
    metrics["latency_budget_ms"] = budget_ms
    log_metrics_at(metrics)
    mlflow.set_tags({"pfp.backend": built["backend"], "pfp.artifact_sha256": built["artifact_sha256"],
                     "pfp.outcome": "ok", RESULT_TAG: result.status_line()[:5000],
                     "pfp.machine": machine_summary(machine)[:5000]})
    mlflow.log_dict(result.model_dump(mode="json"), RESULT_ARTIFACT)
    mlflow.log_dict(machine, "device/machine.json")
    mlflow.log_dict(built, "device/build.json")


def _summary(j: DeviceJob, dev: Device, built: dict, installed: dict | None, seconds: dict) -> DeviceResult:
    return DeviceResult(
        device=dev.name, mode=j.mode, model=j.model_name, version=j.version, rollout_id=j.rollout_id,
        backend=built["backend"], precision=built["precision"], artifact_sha256=built["artifact_sha256"],
        skipped_backends=built["skipped_backends"],
        latency={f"b{r['batch']}": {"p50_ms": round(r["p50_ms"], 4), "p99_ms": round(r["p99_ms"], 4)}
                 for r in built["latency"]},
        parity={"max_rel_diff": built["parity"]["max_rel_diff"], "top1": built["parity"]["top1_agreement"]},
        repository_version=installed["repository_version"] if installed else None,
        previous_repository_version=installed["previous"] if installed else None,
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )


# --------------------------------------------------------------------------- flows


@flow(name="pfp-device-deploy")
def device_deploy_flow(job: dict, experiment: str, parent_run_id: str | None = None) -> DeviceResult:
    """On the device: download, build, check, benchmark, then (mode "deploy") install and
    activate the version. Returns the DeviceResult that is also the MLflow run's device/result.json."""
    from export.machine import describe_machine

    logger = get_run_logger()
    start = time.perf_counter()
    sigterm_raises()                         # a cancelled job ends its MLflow run FAILED, not RUNNING
    j = parse_job(job)                       # every parameter checked before any path is made
    dev = device_from_env(j.device)
    with device_slot(dev.name, j.busy_timeout_s):
        waited = time.perf_counter() - start
        for name in clean_work(dev):
            logger.warning(f"removed {name}: left by a job that died")
        if repository.model_dir(dev.root, j.model_name).is_dir():
            left = repository.cleanup(dev.root, j.model_name, keep=j.keep_versions)
            if left["removed_temp"]:
                logger.warning(f"removed leftovers of a job that died: {left['removed_temp']}")
        with _device_run(j, dev, experiment, parent_run_id, "deploy"):
            work = new_workdir(dev, j.mode)
            try:
                fetched = download_task(job, str(work))
                logger.info(f"downloaded {j.model_name} v{j.version} ({fetched['bytes']} bytes) in {fetched['seconds']:.2f} s")
                _drill("download")
                built = build_task(job, fetched["bundle"], str(work))
                logger.info(f"built on {built['backend']}: reference check max rel diff "
                            f"{built['parity']['max_rel_diff']:.2e}; p50 {built['latency'][0]['p50_ms']:.3f} ms "
                            f"at batch {built['latency'][0]['batch']}")
                _drill("build")
                installed = None
                if j.mode == "deploy":
                    # A benchmark for the promotion gate reports its figures; the gate judges them.
                    check_budget(Built.from_dict(built), j.latency_budget_ms,
                                 metric=j.budget_metric, device=dev.name)
                    installed = install_task(job, str(dev.root), built, str(Path(fetched["bundle"]) / "reference.npz"))
                    logger.info(f"active: repository version {installed['repository_version']} "
                                f"(previous {installed['previous']})")
                seconds = {"slot_wait": waited, "transfer": fetched["seconds"], **built["seconds"],
                           "install": installed["seconds"] if installed else 0.0}
                seconds["flow"] = time.perf_counter() - start
                result = _summary(j, dev, built, installed, seconds)
                _record(result, built, describe_machine(), j.latency_budget_ms)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return result


@flow(name="pfp-device-rollback")
def device_rollback_flow(device: str, model_name: str, only_if_version: str | None = None,
                         busy_timeout_s: float = 60.0) -> dict:
    """Re-activate the previous version of `model_name` on this device. With
    `only_if_version`, only when the active version is that registry version (so a rollout
    that failed can undo its own change, and never someone else's)."""
    dev = device_from_env(device)
    model_name = repository.validate_name(model_name, "model name")
    if only_if_version is not None and not str(only_if_version).isdigit():
        raise DeviceError(f"only_if_version {only_if_version!r} is not a registry version number")
    with device_slot(dev.name, busy_timeout_s):
        served, registry_version = active_registry_version(dev.root, model_name)
        if only_if_version is not None and registry_version != str(only_if_version):
            return {"device": dev.name, "rolled_back": False, "active": served, "registry_version": registry_version,
                    "reason": f"active is registry version {registry_version}, not {only_if_version}"}
        state = repository.rollback(dev.root, model_name)
        served, registry_version = active_registry_version(dev.root, model_name)
    get_run_logger().info(f"{dev.name}: {model_name} rolled back to repository version {state['active']}")
    _publish_status(dev)
    return {"device": dev.name, "rolled_back": True, "active": served, "registry_version": registry_version}


def device_state(dev: Device) -> dict[str, Any]:
    """The repository's status per model, plus what registry version each serves."""
    out = {}
    for model, st in repository.status(dev.root).items():
        served = next((v for v in st["versions"] if v.get("version") == st["serving"]), {})
        out[model] = {k: st[k] for k in ("active", "previous", "serving", "in_sync", "platform", "leftovers",
                                           "in_progress", "problems")} | {
            "registry_version": served.get("registry_version"), "backend": served.get("backend"),
            "sha256": served.get("sha256"), "installed": [v.get("version") for v in st["versions"]]}
    return out


def status_key(device: str) -> str:
    """The Prefect artifact key of a device's status table (keys: lowercase letters, digits, '-')."""
    return "device-" + "".join(c if c.isalnum() else "-" for c in device.lower())


def _publish_status(dev: Device) -> dict:
    from prefect.artifacts import create_table_artifact

    state = device_state(dev)
    rows = [{"model": m, **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in s.items()}}
            for m, s in state.items()]
    create_table_artifact(rows or [{"model": "(none)"}], key=status_key(dev.name),
                          description=f"model repository of {dev.name}")
    return state


@flow(name="pfp-device-status")
def device_status_flow(device: str) -> dict:
    """What this device serves: per model, the active and previous versions, what
    config.pbtxt serves, leftovers and problems (also as a Prefect table artifact)."""
    dev = device_from_env(device)
    return {"device": dev.name, "models": _publish_status(dev)}


DEVICE_FLOWS = {"deploy": device_deploy_flow, "rollback": device_rollback_flow, "status": device_status_flow}
ENTRYPOINTS = {"deploy": "flows/device_flows.py:device_deploy_flow", "rollback": "flows/device_flows.py:device_rollback_flow",
               "status": "flows/device_flows.py:device_status_flow"}


def deployment_name(kind: str, pool: str) -> str:
    """FLOW/DEPLOYMENT of a device flow for one work pool: one deployment per device class."""
    return f"{DEVICE_FLOWS[kind].name}/{pool}"


def register_device_deployments(pools: list[str], source: str | Path) -> list[str]:
    """Create (or update) the deploy, rollback and status deployments on each work pool,
    running the flows from `source` (this repository, as the workers see it)."""
    from prefect import flow as prefect_flow

    names = []
    for pool in pools:
        for kind, entry in ENTRYPOINTS.items():
            f = prefect_flow.from_source(source=str(source), entrypoint=entry)
            f.deploy(name=pool, work_pool_name=pool, print_next_steps=False, ignore_warnings=True, tags=["pfp", "device"])
            names.append(deployment_name(kind, pool))
    return names


__all__ = [
    "DEVICE_FLOWS", "RESULT_ARTIFACT", "RESULT_TAG", "device_deploy_flow", "device_rollback_flow", "device_state", "device_status_flow",
    "deployment_name", "ensure_device_limits", "limit_name", "register_device_deployments", "retry_on_network_error",
]
