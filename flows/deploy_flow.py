"""`pfp deploy`: the registry's champion to the edge, canaries first, then the fleet.

    resolve the version (alias `champion` by default) -> per stage (canary, fleet), per wave:
    run the device flow on each device's own queue -> wait (offline? timed out?) -> read the
    device's MLflow run -> record on the model version -> any failure: roll that device back,
    stop the rollout

The device flows (flows.device_flows) run on the devices' workers; this flow only dispatches and
waits (run_deployment with the target's `work_queue_name`, so a job reaches exactly one
device). A job no worker takes within `pickup_timeout_s` is cancelled, so a device that
comes back later never runs a stale deploy; one still running after `run_timeout_s` is
cancelled and counted as lost. Results travel through MLflow, not shared files: each device
job is an MLflow run (nested under the rollout's run) tagged with the rollout id, and every
device's outcome is written onto the model version as a tag `deploy.<device>`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from deploy.plots import plot_rollout
from deploy.rollout_plan import DeviceOutcome, DeviceResult, RolloutReport, RolloutSettings, job_for, plan_stages
from deploy.targets import Target, load_targets
from flows.device_flows import (
    NETWORK_RETRIES, NETWORK_RETRY_DELAYS_S, RESULT_ARTIFACT, deployment_name, ensure_device_limits,
    retry_on_network_error,
)
from flows.errors import FlowError

POLL_S = 1.0
_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class RolloutStopped(FlowError, RuntimeError):
    """A device failed; the rollout stopped there. The message is the report's summary;
    `report` the whole report (RolloutReport.to_dict)."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class VersionNotFound(FlowError, ValueError):
    """The model version (or alias) asked for is not in the registry."""


# --------------------------------------------------------------------------- registry side


@task(name="resolve-version", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_RETRY_DELAYS_S,
      retry_condition_fn=retry_on_network_error, cache_policy=NO_CACHE)
def resolve_version(model_name: str, version: str | None, alias: str) -> str:
    """`version` if registered, else the version `alias` points at; VersionNotFound otherwise."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flows.registry import REFERENCE_TAG, SHA_TAG, get_by_alias

    if version is None:
        mv = get_by_alias(model_name, alias)
        if mv is None:
            raise VersionNotFound(f"model {model_name!r} has no version with alias {alias!r} in the registry")
        version = str(mv.version)
    try:
        mv = MlflowClient().get_model_version(model_name, str(version))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise VersionNotFound(f"model {model_name!r} has no version {version!r} in the registry") from None
        raise
    missing = [t for t in (SHA_TAG, REFERENCE_TAG) if not mv.tags.get(t)]
    if missing:
        raise VersionNotFound(f"{model_name} v{version} has no {' and no '.join(missing)} tag; devices cannot "
                              "verify its files (register it again from a bundle with reference.npz)")
    return str(version)


@task(name="record-on-version", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_RETRY_DELAYS_S,
      retry_condition_fn=retry_on_network_error, cache_policy=NO_CACHE)
def record_on_version(model_name: str, version: str, outcome: DeviceOutcome) -> None:
    """Tag `deploy.<device>` on the model version: which engine the device runs (or why not)."""
    from mlflow import MlflowClient

    r = outcome.result.model_dump(mode="json") if outcome.result else {}
    value = {"status": outcome.status, "stage": outcome.stage, "rollout": r.get("rollout_id"),
             "backend": r.get("backend"), "artifact_sha256": r.get("artifact_sha256"),
             "repository_version": r.get("repository_version"), "latency": r.get("latency"),
             "rolled_back": outcome.rolled_back, "reason": outcome.reason[:1000],
             "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    MlflowClient().set_model_version_tag(model_name, str(version), f"deploy.{outcome.device}",
                                         json.dumps(value, separators=(",", ":"))[:5000])


@task(name="device-run-result", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_RETRY_DELAYS_S,
      retry_condition_fn=retry_on_network_error, cache_policy=NO_CACHE)
def device_run_result(experiment_id: str, rollout_id: str, device: str,
                      lost_reason: str | None = None) -> tuple[DeviceResult | None, str | None]:
    """(the device's DeviceResult, its `pfp.error`) from the device job's MLflow run. With
    `lost_reason` (the job was cut off), a run the device left RUNNING is ended FAILED here:
    a device that lost power cannot end its own run.

    Read from MLflow rather than with the flow run's state.result(): a Prefect result lives in
    the result storage of the worker that ran it, on the device, which the orchestrator cannot
    read; the MLflow run is where device and orchestrator meet anyway."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    runs = client.search_runs(
        [experiment_id], f"tags.`pfp.rollout_id` = '{rollout_id}' and tags.`pfp.device` = '{device}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None, None
    run = runs[0]
    if lost_reason and run.info.status == "RUNNING":
        client.set_tag(run.info.run_id, "pfp.outcome", "failed")
        client.set_tag(run.info.run_id, "pfp.error", lost_reason[:5000])
        client.set_terminated(run.info.run_id, "FAILED")
    folder, name = RESULT_ARTIFACT.rsplit("/", 1)
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, folder)}
    result = None
    if name in logged:
        result = DeviceResult.model_validate(mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{RESULT_ARTIFACT}"))
    return result, run.data.tags.get("pfp.error")


# --------------------------------------------------------------------------- one device


def _state_reason(state) -> str:
    return " ".join((state.message or state.name or "").split()) if state else "no state"


def queue_silence(client, pool: str, queue: str) -> float | None:
    """Seconds since a worker last polled the device's queue (None: never, or no such queue).
    A process worker polls its queues every few seconds while it runs jobs, so a queue that
    goes quiet means the device's worker is gone."""
    from datetime import datetime, timezone

    from prefect.exceptions import ObjectNotFound

    try:
        q = client.read_work_queue_by_name(queue, work_pool_name=pool)
    except ObjectNotFound:
        return None
    if q.last_polled is None:
        return None
    return (datetime.now(timezone.utc) - q.last_polled).total_seconds()


def wait_for_run(flow_run_id, pickup_timeout_s: float, run_timeout_s: float, *, pool: str | None = None,
                 queue: str | None = None, lost_after_s: float | None = None) -> tuple[str, str]:
    """Wait for a dispatched device job: (status, reason). A job not picked up in time is
    cancelled (status "offline"); one running too long, or whose device's queue nobody has
    polled for `lost_after_s` (the worker died), is cancelled ("timed_out" / "lost")."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    start = time.monotonic()
    watch = pool is not None and queue is not None and lost_after_s is not None
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(flow_run_id)
            kind = fr.state.type.value if fr.state else "SCHEDULED"
            elapsed = time.monotonic() - start
            if kind in _FINAL:
                return ("ok" if kind == "COMPLETED" else "failed"), _state_reason(fr.state)
            silent = queue_silence(client, pool, queue) if watch and elapsed > lost_after_s else None
            quiet = watch and elapsed > lost_after_s and (silent is None or silent > lost_after_s)
            if kind in ("SCHEDULED", "PENDING") and (elapsed > pickup_timeout_s or quiet):
                client.set_flow_run_state(flow_run_id, Cancelled(message="no worker took it: device offline"),
                                          force=True)
                why = (f"no worker has polled queue {queue!r} for {lost_after_s:g} s" if quiet and elapsed <= pickup_timeout_s
                       else f"no worker on its queue took the job within {pickup_timeout_s:g} s")
                return "offline", why
            if kind == "RUNNING" and quiet:
                client.set_flow_run_state(flow_run_id, Cancelling(message="device worker lost"), force=True)
                when = "never" if silent is None else f"{silent:.0f} s ago"
                return "lost", f"worker lost mid-job: queue {queue!r} last polled {when}; cancelled"
            if elapsed > run_timeout_s:
                # Cancelling asks a live worker to kill the job; a dead one never answers.
                client.set_flow_run_state(flow_run_id, Cancelling(message="rollout timeout"), force=True)
                return "timed_out", f"still {kind.lower()} after {run_timeout_s:g} s; cancelled"
            time.sleep(POLL_S)


def dispatch(kind: str, target: Target, parameters: dict, name: str):
    """Start a device flow on `target`'s own queue without waiting; the flow run."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    deployment = deployment_name(kind, target.work_pool)
    try:
        return run_deployment(deployment, parameters=parameters, timeout=0, work_queue_name=target.work_queue,
                              flow_run_name=name, as_subflow=False)
    except ObjectNotFound:
        raise FlowError(f"no deployment {deployment} on the Prefect server; register the device flows "
                        f"for pool {target.work_pool!r} (pfp device register)") from None


def _error_text(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if text and text != "None" else type(e).__name__


def deploy_one(target: Target, job: dict, experiment: str, experiment_id: str, parent_run_id: str,
               settings: RolloutSettings, stage: str) -> DeviceOutcome:
    """Run the device flow on one device and wait for it; never raises."""
    start = time.monotonic()
    out = DeviceOutcome(device=target.name, stage=stage, status="failed")
    try:
        fr = dispatch("deploy", target, {"job": job, "experiment": experiment, "parent_run_id": parent_run_id},
                      f"{target.name}: {job['mode']} {job['model_name']} v{job['version']}")
        out.flow_run_id = str(fr.id)
        status, reason = wait_for_run(fr.id, settings.pickup_timeout_s, settings.run_timeout_s,
                                      pool=target.work_pool, queue=target.work_queue, lost_after_s=settings.lost_after_s)
    except Exception as e:  # noqa: BLE001 - no deployment, API down: this device failed, say why
        out.reason = f"could not dispatch: {_error_text(e)}"
        out.seconds = time.monotonic() - start
        return out
    out.seconds = time.monotonic() - start
    result, error = device_run_result(experiment_id, job["rollout_id"], target.name,
                                      lost_reason=reason if status in ("lost", "timed_out") else None)
    out.result = result
    if status == "ok":
        out.status = "active" if job["mode"] == "deploy" else "benchmarked"
    elif status == "failed":
        out.reason = error or reason
        out.status = "busy" if "device busy" in out.reason else "failed"
    else:
        out.status, out.reason = status, reason
    return out


def rollback_one(target: Target, model_name: str, version: str, settings: RolloutSettings) -> tuple[bool | None, str]:
    """Ask the device to roll back if it serves `version`; (rolled back?, why not)."""
    try:
        fr = dispatch("rollback", target, {"device": target.name, "model_name": model_name,
                                           "only_if_version": version}, f"{target.name}: rollback {model_name}")
        status, reason = wait_for_run(fr.id, min(settings.pickup_timeout_s, 60.0), min(settings.run_timeout_s, 300.0),
                                      pool=target.work_pool, queue=target.work_queue, lost_after_s=settings.lost_after_s)
    except Exception as e:  # noqa: BLE001
        return None, f"rollback not dispatched: {_error_text(e)}"
    if status != "ok":
        return None, f"rollback {status}: {reason}"
    return True, ""


# No retries: a second dispatch could deploy twice to a device the first one reached; a
# failed device is rolled back and stops the rollout instead.
@task(name="deploy-device", retries=0)
def deploy_device_task(target: dict, job: dict, experiment: str, experiment_id: str, parent_run_id: str,
                       settings: dict, stage: str) -> dict:
    t = Target.model_validate(target)
    s = RolloutSettings.model_validate(settings)
    out = deploy_one(t, job, experiment, experiment_id, parent_run_id, s, stage)
    # A job cut off (timed out, crashed) may have switched the device; the device flow rolls
    # back its own failed checks, but only the device can say what it serves now.
    if out.status in ("timed_out", "lost", "failed") and job["mode"] == "deploy":  # not "busy": it changed nothing
        done, why = rollback_one(t, job["model_name"], job["version"], s)
        out.rolled_back = done
        if why:
            out.reason += f"; {why}"
    return out.to_dict()


# --------------------------------------------------------------------------- the flow


def _run_wave(wave: list[Target], jobs: dict[str, dict], experiment: str, experiment_id: str, parent_id: str,
              settings: RolloutSettings, stage: str) -> list[DeviceOutcome]:
    """Deploy to every device of the wave at once; their outcomes in the wave's order."""
    futures = [deploy_device_task.submit(t.model_dump(mode="json"), jobs[t.name], experiment, experiment_id,
                                         parent_id, settings.model_dump(mode="json"), stage) for t in wave]
    return [DeviceOutcome(**f.result()) for f in futures]


@flow(name="pfp-deploy")
def deploy_flow(targets_path: str, model_name: str, version: str | None = None, alias: str = "champion",
                settings: dict | None = None, only: list[str] | None = None, mode: str = "deploy",
                tracking_uri: str | None = None, experiment: str | None = None) -> dict:
    """Roll `model_name` (version, or the version `alias` names) out to the targets in
    `targets_path`, stage by stage; raises RolloutStopped after recording a failure."""
    import mlflow
    from mlflow import MlflowClient

    from flows.tracking import check_tracking_server, setup_mlflow, tracked_run

    logger = get_run_logger()
    s = RolloutSettings.model_validate(settings or {})
    targets = load_targets(targets_path)
    stages = plan_stages(targets, s, only)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise FlowError("no MLflow tracking server: set MLFLOW_TRACKING_URI (devices read the same registry)")
    check_tracking_server(uri)
    experiment = experiment or f"{model_name}-deploy"
    experiment_id = setup_mlflow(uri, experiment)
    version = resolve_version(model_name, version, alias)
    rollout_id = uuid.uuid4().hex[:12]
    report = RolloutReport(model_name, version, rollout_id)
    devices = [t for st in stages for w in st.waves for t in w]
    jobs = {t.name: job_for(t, model_name, version, rollout_id, mode=mode, busy_timeout_s=s.busy_timeout_s,
                            max_time_s=s.max_time_s, threads=s.threads).model_dump(mode="json") for t in devices}
    ensure_device_limits([t.name for t in devices])
    logger.info(f"rollout {rollout_id}: {model_name} v{version} to "
                + ", then ".join(f"{st.role} ({sum(len(w) for w in st.waves)})" for st in stages))

    start = time.perf_counter()
    # Inside the compress flow's run (gate devices), this run nests under it.
    with tracked_run(f"{mode} {model_name} v{version}", nested=mlflow.active_run() is not None, tags={
            "pfp.flow": "deploy", "pfp.rollout_id": rollout_id, "pfp.model": model_name,
            "pfp.model_version": version, "pfp.mode": mode}) as parent:
        for st in stages:
            for wave in st.waves:
                if report.stopped_by:
                    for t in wave:
                        report.add(DeviceOutcome(t.name, st.role, "skipped", f"rollout stopped: {report.stopped_by}"))
                    continue
                for o in _run_wave(wave, jobs, experiment, experiment_id, parent.info.run_id, s, st.role):
                    report.add(o)
                    if mode == "deploy":
                        record_on_version(model_name, version, o)
                    logger.info(f"{o.device} ({o.stage}): {o.status}" + (f": {o.reason}" if o.reason else ""))
        result = report.to_dict() | {"seconds": time.perf_counter() - start}
        mlflow.log_dict(result, "rollout.json")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(plot_rollout(result, Path(tmp) / "rollout.png")))
        mlflow.set_tag("pfp.outcome", report.summary()[:5000])
        if mode == "deploy":
            MlflowClient().set_model_version_tag(model_name, version, "deploy.last_rollout",
                                                 f"{rollout_id}: {report.summary()}"[:5000])
        create_markdown_artifact(report.to_markdown(), key=f"rollout-{rollout_id}",
                                 description=f"{mode} of {model_name} v{version}")
        if not report.passed:
            raise RolloutStopped(report.summary(), result)
    return result


__all__ = ["RolloutStopped", "VersionNotFound", "deploy_flow", "record_on_version", "resolve_version",
           "wait_for_run"]
