"""The compress flow: calibrate -> (prune -> retrain -> evaluate -> log) per keep ratio ->
export -> benchmark on the backends -> gate -> register.

    pfp run [CONFIG]            (no CONFIG: the CPU quickstart)

Each task is a few lines over flows.steps (which wraps pfp/ and export/); tasks pass file
paths and typed results (pfp.results, export.results), not modules. The flow takes a
validated PipelineConfig (Prefect validates a dict into one, once, on the way in).

Resume: rounds, exports and benchmarks are cached Prefect tasks whose results persist under
`<output_dir>/<name>/prefect-results`, keyed by a hash of their inputs; a re-run after a
crash gets the finished ones back from there and computes only the rest (a round still
reuses its own finished model file and its mid-retrain checkpoint, pfp.pipeline).

MLflow gets one parent run per flow run and one child run per round. A failure or a
cancellation leaves none of them RUNNING: tracked_run ends them FAILED on any exception
(SIGTERM included, turned into KeyboardInterrupt by tracking.sigterm_raises), the flow's
on_crashed/on_cancellation hooks end what a killed process could not, and the next run
ends runs whose process died (SIGKILL, power loss).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import psutil
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import LocalFileSystem
from pydantic import BaseModel, ConfigDict

from deploy.gate import GateConfig, GateDecision, LatencyCheck, evaluate_gate
from export.results import BenchmarkResult, BundleInfo
from flows import steps
from flows.config import PipelineConfig, load_pipeline_config, stable_hash
from flows.errors import FlowError
from flows.tracking import (
    check_tracking_server, end_running_runs, flatten_params, is_transient, log_metrics_at, resolve_tracking_uri,
    run_tags, setup_mlflow, sigterm_raises, tracked_run,
)
from pfp.cascade import choose
from pfp.files import sha256_file
from pfp.plots import plot_accuracy_vs_flops, plot_layer_budget
from pfp.results import BaseInfo, RoundResult

ITERATION_METRICS = (
    "acc", "loss", "acc_before_retrain", "acc_change", "params", "flops", "keep_ratio", "achieved_keep",
    "flops_removed_pct", "params_removed_pct", "preact_err_p95_max", "preact_eps99_max", "eps", "coverage_min",
    "coverage_mean", "seconds",
)
BASELINE = "unpruned"
RESULTS_DIR = "prefect-results"
# Network steps (MLflow, the registry, run_deployment) retry a transient failure this often.
RETRIES, RETRY_DELAYS = 3, [2, 10, 30]

R = TypeVar("R", bound=BaseModel)


def typed(model: type[R], value: R | dict) -> R:
    """`value` as `model`: a dispatched flow's result comes back as the model, or as the
    plain mapping of its fields when the result storage serialised it as JSON."""
    return value if isinstance(value, model) else model(**value)


def _retry_transient(task_, task_run, state) -> bool:  # noqa: ARG001 - Prefect's retry_condition_fn signature
    return is_transient(state.result(raise_on_failure=False))


class BenchmarkDown(FlowError):
    """A backend that could not time the bundles here; `.result` says why. Raised so that
    its task fails instead of caching the failure: a resumed run tries the backend again."""

    def __init__(self, result: BenchmarkResult) -> None:
        super().__init__(f"backend {result.backend}: {result.error}")
        self.result = result

    def __reduce__(self):  # a persisted failed state pickles the exception
        return (type(self), (self.result,))


class CompressResult(BaseModel):
    """What one compress flow run did: the base model, every round, what was chosen, the
    bundles' timings per backend, the gate's decision and the registered version."""

    model_config = ConfigDict(extra="forbid")

    base: BaseInfo
    rounds: list[RoundResult]
    chosen: int | None
    parent_run_id: str
    benchmarks: dict[str, BenchmarkResult]
    decision: dict[str, Any] | None = None  # deploy.gate.GateDecision.to_dict()
    version: str | None = None
    promoted: bool = False
    cached: list[str] = []
    seconds: float = 0.0
    work_seconds: dict[str, float] = {}
    orchestration_overhead: float = 0.0


# --------------------------------------------------------------------------- cache keys


def _round_key(context, parameters: dict) -> str:  # noqa: ARG001 - Prefect's cache_key_fn signature
    cfg: PipelineConfig = parameters["cfg"]
    return "round-" + stable_hash([cfg.run_config_hash(), parameters["index"], parameters["parent"]])


def _export_key(context, parameters: dict) -> str:  # noqa: ARG001
    cfg: PipelineConfig = parameters["cfg"]
    return "export-" + stable_hash([cfg.run_config_hash(), cfg.export.model_dump(mode="json"),
                                    sha256_file(parameters["model_path"]), parameters["out_dir"]])


def _bench_key(context, parameters: dict) -> str:  # noqa: ARG001
    cfg: PipelineConfig = parameters["cfg"]
    onnx = {label: sha256_file(Path(path) / "model.onnx") for label, path in parameters["bundles"].items()}
    return "bench-" + stable_hash([cfg.backend(parameters["backend"]).model_dump(mode="json"), onnx,
                                   parameters["baseline"]])


# --------------------------------------------------------------------------- tasks


@task(name="calibrate", cache_policy=NO_CACHE)
def calibrate_task(cfg: PipelineConfig) -> BaseInfo:
    # Not cached: it loads the data set into this process, which the rounds run here use
    # (the trained base model itself is reused from disk by pfp.pipeline).
    return steps.calibrate(cfg, progress=False)


@task(name="prune-retrain-evaluate", cache_key_fn=_round_key, persist_result=True)
def iterate_task(cfg: PipelineConfig, index: int, parent: str | None) -> RoundResult:
    return steps.iterate(cfg, index, parent, progress=False)


@task(name="export", cache_key_fn=_export_key, persist_result=True)
def export_task(cfg: PipelineConfig, model_path: str, out_dir: str) -> BundleInfo:
    return steps.export_model(cfg, model_path, out_dir)


@task(name="benchmark", cache_key_fn=_bench_key, persist_result=True)
def benchmark_task(cfg: PipelineConfig, backend: str, bundles: dict[str, str], baseline: str) -> BenchmarkResult:
    result = steps.benchmark(cfg, cfg.backend(backend), bundles, baseline)
    if result.error:
        raise BenchmarkDown(result)
    return result


@task(name="gate", cache_policy=NO_CACHE)
def gate_task(gate: GateConfig, base_acc: float, acc: float, latency: dict[str, list[dict]],
              baseline: dict[str, list[dict]], errors: dict[str, str]) -> GateDecision:
    return evaluate_gate(gate, base_acc=base_acc, acc=acc, latency=latency, baseline_latency=baseline, errors=errors)


def _with_storage(t, run_dir: Path):
    """The task with its results persisted under the run folder, which dispatched workers
    share (output_dir), so a resumed run finds what any of them finished."""
    folder = (run_dir / RESULTS_DIR).resolve()
    name = "pfp-results-" + stable_hash(str(folder))
    from prefect.settings import PREFECT_API_URL

    key = (name, str(PREFECT_API_URL.value()))  # saved once per Prefect server
    if key not in _STORAGE:
        # Prefect wants result storage saved server-side (a block), so that any process
        # that reads the result record finds where it lives.
        block = LocalFileSystem(basepath=str(folder))
        block.save(name, overwrite=True)
        _STORAGE[key] = block
    return t.with_options(result_storage=_STORAGE[key])


_STORAGE: dict[tuple[str, str], LocalFileSystem] = {}


def _timed(fn: Callable[..., Any], *args: Any, cached: list[str] | None = None, label: str = "",
           work: dict[str, float] | None = None) -> Any:
    """Call a task, record its wall time in `work` and whether its result came from the cache."""
    start = time.perf_counter()
    state = fn(*args, return_state=True)
    if work is not None:
        work[label] = time.perf_counter() - start
    if cached is not None and state.name == "Cached":
        cached.append(label)
    return state.result()


# --------------------------------------------------------------------------- work pools
# A heavy step runs here, or as a deployment on a work pool (dispatch.iteration,
# dispatch.export, backends[].deployment). The deployment's flow persists its result, and
# this flow reads it with flow_run.state.result(): workers and this process must share the
# result storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH on shared storage, or a default
# result storage block, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK). Files move through output_dir.


@flow(name="pfp-iteration", persist_result=True)
def iteration_flow(cfg: PipelineConfig, index: int, parent: str | None = None) -> RoundResult:
    """One cascade round as its own flow, for a deployment on a (GPU) work pool."""
    return _with_storage(iterate_task, Path(cfg.output_dir) / cfg.name)(cfg, index, parent)


@flow(name="pfp-export", persist_result=True)
def export_flow(cfg: PipelineConfig, model_path: str, out_dir: str) -> BundleInfo:
    """ONNX export and parity as its own flow, for a deployment on a work pool."""
    return _with_storage(export_task, Path(cfg.output_dir) / cfg.name)(cfg, model_path, out_dir)


@flow(name="pfp-benchmark", persist_result=True)
def benchmark_flow(cfg: PipelineConfig, backend: str, bundles: dict[str, str], baseline: str = BASELINE) -> BenchmarkResult:
    """One backend's benchmark as its own flow, for a deployment on the device's work pool."""
    try:
        return _with_storage(benchmark_task, Path(cfg.output_dir) / cfg.name)(cfg, backend, bundles, baseline)
    except BenchmarkDown as down:
        return down.result


@task(name="dispatch", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=_retry_transient)
def dispatch_task(deployment: str, parameters: dict[str, Any], what: str) -> Any:
    """Run `deployment` with `parameters`, wait, and return its flow's (persisted) result."""
    from prefect.deployments import run_deployment

    fr = run_deployment(deployment, parameters=parameters, timeout=None)
    if not fr.state or not fr.state.is_completed():
        raise FlowError(f"deployment {deployment}: {what} ended {fr.state.name if fr.state else 'without a state'}")
    return fr.state.result()


def _run_iteration(cfg: PipelineConfig, index: int, parent: str | None, run_dir: Path, cached: list[str],
                   work: dict[str, float]) -> RoundResult:
    label = f"round_{index + 1}"
    if not cfg.dispatch.iteration:
        return _timed(_with_storage(iterate_task, run_dir), cfg, index, parent, cached=cached, label=label, work=work)
    return typed(RoundResult, _timed(dispatch_task, cfg.dispatch.iteration,
                                     {"cfg": cfg, "index": index, "parent": parent}, f"round {index + 1}",
                                     label=label, work=work))


def _run_export(cfg: PipelineConfig, label: str, model_path: str, out_dir: str, run_dir: Path, cached: list[str],
                work: dict[str, float]) -> BundleInfo:
    what = f"export {label}"
    if not cfg.dispatch.export:
        return _timed(_with_storage(export_task, run_dir), cfg, model_path, out_dir, cached=cached, label=what,
                      work=work)
    return typed(BundleInfo, _timed(dispatch_task, cfg.dispatch.export,
                                    {"cfg": cfg, "model_path": model_path, "out_dir": out_dir},
                                    f"export of {model_path}", label=what, work=work))


def _run_benchmark(cfg: PipelineConfig, backend: str, bundles: dict[str, str], run_dir: Path, cached: list[str],
                   work: dict[str, float]) -> BenchmarkResult:
    deployment = cfg.backend(backend).deployment
    label = f"benchmark {backend}"
    try:
        if not deployment:
            return _timed(_with_storage(benchmark_task, run_dir), cfg, backend, bundles, BASELINE, cached=cached,
                          label=label, work=work)
        return typed(BenchmarkResult, _timed(dispatch_task, deployment,
                                             {"cfg": cfg, "backend": backend, "bundles": bundles,
                                              "baseline": BASELINE}, f"benchmark on {backend}",
                                             label=label, work=work))
    except BenchmarkDown as down:
        return down.result
    except Exception as e:  # noqa: BLE001 - a backend that is down fails its gate checks, it does not end the flow
        return BenchmarkResult(backend=backend, error=f"{deployment}: {e}")


# --------------------------------------------------------------------------- MLflow logging
# Tasks with retries: a tracking server that drops a request is retried, not fatal. A
# retried round log starts a fresh child run; the failed attempt's run ends FAILED.


@task(name="log-round", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=_retry_transient)
def log_round_task(parent_id: str, row: RoundResult, tags: dict[str, str], plots: Path) -> str:
    """A child run for one round, plus the parent's step series. Returns the child's id."""
    import mlflow
    from mlflow import MlflowClient

    step = row.round
    metrics = {k: getattr(row, k) for k in ITERATION_METRICS}
    with tracked_run(f"round {step}: keep {row.keep_ratio:.0%}", parent_run_id=parent_id,
                     tags={**tags, "pfp.round": str(step)}) as run:
        log_metrics_at(metrics)
        mlflow.log_artifact(row.model_path, "model")
        mlflow.log_artifact(row.report_path, "report")
        report = json.loads(Path(row.report_path).read_text())
        mlflow.log_artifact(str(plot_layer_budget(report, plots / f"layer_budget_round{step}.png",
                                                  title=f"round {step}: kept vs total channels")), "plots")
        run_id = run.info.run_id
    client = MlflowClient()
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            client.log_metric(parent_id, f"iter.{key}", float(value), step=step)
    return run_id


@task(name="log-bundle", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=_retry_transient)
def log_bundle_task(run_id: str, bundle: BundleInfo) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    client.log_artifact(run_id, str(Path(bundle.bundle) / "model.onnx"), "onnx")
    client.log_metric(run_id, "parity.max_rel_diff", bundle.parity_max_rel_diff)


@task(name="log-latency", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=_retry_transient)
def log_latency_task(run_id: str, bench: BenchmarkResult, label: str, step: int | None, parent_id: str | None) -> None:
    """Latency of `label` on one backend as metrics (and as the parent's step series)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    b = bench.backend
    for r in bench.rows_for(label):
        for name in ("p50_ms", "p90_ms", "p99_ms", "throughput_per_s"):
            key = f"latency.{b}.b{r.batch}.{name}"
            client.log_metric(run_id, key, float(getattr(r, name)))
            if parent_id and step is not None:
                client.log_metric(parent_id, f"iter.{key}", float(getattr(r, name)), step=step)
    for e in bench.efficiency_for(label):
        client.log_metric(run_id, f"speedup.{b}.b{e.batch}", e.speedup)
        client.log_metric(run_id, f"efficiency.{b}.b{e.batch}", e.efficiency)


@task(name="register", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=_retry_transient)
def register_task(model_name: str, run_id: str, bundle: BundleInfo, row: RoundResult, config_hash: str) -> str:
    """Log the chosen bundle to the parent run and register it as `candidate`; its version."""
    import mlflow

    from flows.registry import register_candidate

    mlflow.MlflowClient().log_artifacts(run_id, bundle.bundle, "bundle")
    version = register_candidate(model_name, run_id, "bundle", {
        "onnx_sha256": bundle.onnx_sha256, "flops": str(row.flops), "acc": f"{row.acc:.4f}",
        "round": str(row.round), "config_hash": config_hash,
    })
    return str(version.version)


@task(name="promote", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=_retry_transient)
def promote_task(model_name: str, version: str, decision: GateDecision) -> bool:
    from flows.registry import promote

    return promote(model_name, version, decision)


# --------------------------------------------------------------------------- crashes


def _fail_orphaned_runs(client, experiment_id: str, config_hash: str) -> list[str]:
    """Runs of this config left RUNNING by a process on this host that no longer exists
    (killed with SIGKILL, power loss) are ended FAILED. Returns their ids."""
    host = socket.gethostname()
    ended = []
    for run in client.search_runs([experiment_id], f"tags.`pfp.config_hash` = '{config_hash}' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("pfp.host") != host or not tags.get("pfp.pid", "").isdigit():
            continue
        pid = int(tags["pfp.pid"])
        if psutil.pid_exists(pid):
            continue  # still alive: a concurrent run, not an orphan
        ended += end_running_runs(client, experiment_id, f"attributes.run_id = '{run.info.run_id}'", "FAILED",
                                  f"process {pid} on {host} died without ending the run")
    return ended


def _config_of(parameters: dict[str, Any]) -> PipelineConfig:
    """The config of a flow run from its parameters (as the API stores them)."""
    if parameters.get("config") is not None:
        raw = parameters["config"]
        return raw if isinstance(raw, PipelineConfig) else PipelineConfig.model_validate(raw)
    return load_pipeline_config(parameters.get("config_path"), parameters.get("overrides"))


def _end_mlflow_runs(status: str, reason: str) -> Callable:
    """A flow state hook that ends the MLflow runs of the flow run still RUNNING with `status`.

    Cancellation by a worker can end the flow's process before its own `finally` blocks
    run; the hook then runs in the worker (runner) process and ends the runs from outside.
    """
    def hook(flow_, flow_run, state) -> None:  # noqa: ARG001 - Prefect's hook signature
        from mlflow import MlflowClient

        try:
            cfg = _config_of(flow_run.parameters)
            client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir))
            exp = client.get_experiment_by_name(cfg.experiment_name)
            if exp is not None:
                end_running_runs(client, exp.experiment_id, f"tags.`pfp.flow_run_id` = '{flow_run.id}'", status,
                                 f"{reason} ({state.name})")
        except Exception as e:  # noqa: BLE001 - a hook must not hide the flow's own failure
            logging.getLogger(__name__).warning(f"could not end the MLflow runs of flow run {flow_run.id}: {e}")
    return hook


# --------------------------------------------------------------------------- the flow's stages


def _prune_rounds(cfg: PipelineConfig, parent_id: str, tags: dict, run_dir: Path, plots: Path,
                  cached: list[str], work: dict) -> tuple[list[RoundResult], dict[int, str]]:
    """Every keep ratio in turn: prune the previous round's model, retrain, evaluate, log."""
    from mlflow import MlflowClient

    logger = get_run_logger()
    rows: list[RoundResult] = []
    run_ids: dict[int, str] = {}
    parent_model = None
    for i, ratio in enumerate(cfg.prune.keep_ratios):
        row = _run_iteration(cfg, i, parent_model, run_dir, cached, work)
        rows.append(row)
        if row.error:
            logger.warning(f"round {i + 1}: cannot prune to {ratio:.0%}: {row.error}; stopping the cascade")
            MlflowClient().set_tag(parent_id, f"pfp.round_{i + 1}.error", row.error[:5000])
            break
        run_ids[row.round] = log_round_task(parent_id, row, tags, plots)
        logger.info(f"round {i + 1}: keep {ratio:.0%} -> test acc {row.acc:.2f}% ({row.acc_change:+.2f}), "
                    f"FLOPs -{row.flops_removed_pct:.1f}%")
        parent_model = row.model_path
    return rows, run_ids


def _export_all(cfg: PipelineConfig, base: BaseInfo, rows: list[RoundResult], run_dir: Path,
                run_ids: dict[int, str], cached: list[str], work: dict) -> dict[str, BundleInfo]:
    """Bundles of the unpruned model (the backends' baseline) and of every round (ONNX per round)."""
    sources = {BASELINE: base.base_path} | {f"round_{r.round}": r.model_path for r in rows}
    bundles = {label: _run_export(cfg, label, path, str(run_dir / "bundles" / label), run_dir, cached, work)
               for label, path in sources.items()}
    for row in rows:
        log_bundle_task(run_ids[row.round], bundles[f"round_{row.round}"])
    return bundles


def _benchmark_all(cfg: PipelineConfig, bundles: dict[str, BundleInfo], rows: list[RoundResult], run_dir: Path,
                   parent_id: str, run_ids: dict[int, str], cached: list[str], work: dict) -> dict[str, BenchmarkResult]:
    """Every backend times all bundles side by side; latency goes to each round's run."""
    benches = {}
    for backend in cfg.backends:
        bench = _run_benchmark(cfg, backend.name, {k: v.bundle for k, v in bundles.items()}, run_dir, cached, work)
        benches[backend.name] = bench
        if bench.error:
            get_run_logger().warning(f"backend {backend.name}: not measured: {bench.error}")
            continue
        log_latency_task(parent_id, bench, BASELINE, 0, parent_id)
        for row in rows:
            log_latency_task(run_ids[row.round], bench, f"round_{row.round}", row.round, parent_id)
    return benches


def _gate_and_register(cfg: PipelineConfig, base: BaseInfo, rows: list[RoundResult], chosen: int | None,
                       bundles: dict[str, BundleInfo], benches: dict[str, BenchmarkResult], parent_id: str,
                       config_hash: str) -> dict[str, Any]:
    """Gate the chosen round, register it as `candidate`, promote it to `champion` if it passed."""
    import mlflow
    from mlflow import MlflowClient

    logger = get_run_logger()
    if chosen is None:
        msg = (f"no pruned model stays within {cfg.prune.tolerance:g} points of the unpruned {base.acc:.2f}%; "
               "nothing registered")
        logger.warning(msg)
        MlflowClient().set_tag(parent_id, "pfp.outcome", msg)
        return {}
    row = rows[chosen]
    label = f"round_{row.round}"
    latency = {name: [r.model_dump() for r in b.rows_for(label)] for name, b in benches.items()}
    baseline = {name: [r.model_dump() for r in b.rows_for(BASELINE)] for name, b in benches.items()}
    errors = {name: b.error for name, b in benches.items() if b.error}
    # Registered before the gate: edge gate devices download the candidate from the registry.
    number = register_task(cfg.model_name, parent_id, bundles[label], row, config_hash)
    gate = cfg.gate
    gate_devices = cfg.edge.gate_targets()
    if gate_devices:
        edge_latency, edge_errors, extra_checks = _edge_gate_bench(cfg, gate_devices, number, parent_id)
        latency |= edge_latency
        errors |= edge_errors
        gate = gate.model_copy(update={"latency": [*gate.latency, *extra_checks]})
    decision = gate_task(gate, base.acc, row.acc, latency, baseline, errors)
    promoted = promote_task(cfg.model_name, number, decision)
    markdown = f"# {cfg.model_name} v{number}: {'promoted to champion' if promoted else 'not promoted'}\n\n"
    markdown += decision.to_markdown()
    create_markdown_artifact(markdown, key=_artifact_key(cfg.name), description="promotion gate decision")
    mlflow.log_text(markdown, "gate/decision.md")
    logger.info(f"registered {cfg.model_name} v{number} as candidate; "
                + ("promoted to champion" if promoted else "NOT promoted: " + decision.summary()))
    return {"decision": decision.to_dict(), "version": number, "promoted": promoted}


def _edge_gate_bench(cfg: PipelineConfig, devices: list, version: str,
                     parent_id: str) -> tuple[dict, dict, list[LatencyCheck]]:
    """Build, check and time the registered candidate on the gate devices (on their own
    workers); their latency rows, why a device was not measured, and one budget check per
    device that has a latency budget."""
    from mlflow import MlflowClient

    from flows.deploy_flow import RolloutStopped, deploy_flow
    from flows.tracking import resolve_tracking_uri

    e = cfg.edge
    try:
        report = deploy_flow(str(Path(e.targets_file).resolve()), cfg.model_name, version=version, mode="benchmark",
                             settings={"roles": ["gate"], "pickup_timeout_s": e.pickup_timeout_s,
                                       "run_timeout_s": e.run_timeout_s, "max_time_s": e.max_time_s},
                             tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir),
                             experiment=cfg.experiment_name)
    except RolloutStopped as stop:
        report = stop.report
    except Exception as ex:  # noqa: BLE001 - no device measured: every edge check fails with this reason
        report = {"outcomes": [{"device": t.name, "status": "failed", "reason": f"{type(ex).__name__}: {ex}",
                                "result": None} for t in devices]}
    client = MlflowClient()
    latency, errors = {}, {}
    # deploy_flow's report is flows.rollout's (plain data, its own module's format).
    for o in report.get("outcomes", []):
        res = o.get("result") or {}
        if o["status"] != "benchmarked" or not res.get("latency"):
            errors[o["device"]] = f"{o['status']}: {o.get('reason') or 'not measured'}"
            continue
        latency[o["device"]] = [{"batch": int(b[1:]), "p50_ms": v["p50_ms"], "p99_ms": v["p99_ms"],
                                 "backend": res.get("backend")} for b, v in res["latency"].items()]
        for b, v in res["latency"].items():
            client.log_metric(parent_id, f"edge.{o['device']}.{b}.p50_ms", float(v["p50_ms"]))
    checks = [LatencyCheck(target=t.name, batch=min(t.batch_sizes), metric="p50", max_ms=t.latency_budget_ms)
              for t in devices if t.latency_budget_ms is not None]
    return latency, errors, checks


# --------------------------------------------------------------------------- the flow


@flow(name="pfp-compress", log_prints=False,
      on_crashed=[_end_mlflow_runs("FAILED", "the flow run crashed")],
      on_cancellation=[_end_mlflow_runs("KILLED", "the flow run was cancelled")])
def compress_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline on one config: a PipelineConfig (a plain dict is validated into one, as
    `pfp run` and tests pass it), or a YAML file (`config_path`, as deployments pass it)
    with dotted `overrides`; neither: the quickstart.

    Returns CompressResult as JSON data (flows.cli and the tests read it as a mapping)."""
    import mlflow
    from mlflow import MlflowClient
    from prefect.runtime import flow_run

    start = time.perf_counter()
    cfg = config if config is not None else load_pipeline_config(config_path, overrides)
    logger = get_run_logger()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir)
    check_tracking_server(uri)
    experiment_id = setup_mlflow(uri, cfg.experiment_name)
    client = MlflowClient()
    config_hash = cfg.config_hash()
    work: dict[str, float] = {}
    cached: list[str] = []
    # Kept: tests/test_flows.py::test_crash_and_resume shows that a flow called in-process
    # does not end on SIGTERM with Prefect's own bridge alone (it hung); this turns SIGTERM
    # into KeyboardInterrupt, which tracked_run ends FAILED and Prefect reports as a crash.
    sigterm_raises()
    for run_id in _fail_orphaned_runs(client, experiment_id, config_hash):
        logger.warning(f"MLflow run {run_id} was left RUNNING by a process that died; marked FAILED")

    with tracked_run(f"{cfg.name}", params=flatten_params(cfg.model_dump(mode="json")),
                     tags={"pfp.config_hash": config_hash, "pfp.flow": "compress", "pfp.host": socket.gethostname(),
                           "pfp.pid": str(os.getpid()), "pfp.flow_run_id": str(flow_run.id)}) as parent:
        parent_id = parent.info.run_id
        run_dir = Path(cfg.output_dir) / cfg.name
        plots = run_dir / "plots"
        plots.mkdir(parents=True, exist_ok=True)

        base = _timed(calibrate_task, cfg, label="calibrate", work=work)
        tags = run_tags(config_hash, base.data_hash) | {"pfp.calib_hash": str(base.calib_hash)}
        for k, v in tags.items():
            client.set_tag(parent_id, k, v)
        log_metrics_at({"iter.acc": base.acc, "iter.flops": base.flops, "iter.params": base.params}, step=0)
        logger.info(f"base model {base.base_path}: test acc {base.acc:.2f}%, |S| = {base.calib_size}")

        rows, run_ids = _prune_rounds(cfg, parent_id, tags, run_dir, plots, cached, work)
        chosen = choose(base.acc, rows, cfg.prune.tolerance, cfg.prune.target)
        mlflow.log_artifact(str(plot_accuracy_vs_flops(cfg.name, base.acc, rows, cfg.prune.tolerance, chosen,
                                                       plots / "accuracy_vs_flops.png")), "plots")
        done = [r for r in rows if r.ok]
        bundles = _export_all(cfg, base, done, run_dir, run_ids, cached, work)
        benches = _benchmark_all(cfg, bundles, done, run_dir, parent_id, run_ids, cached, work)
        result = CompressResult(base=base, rounds=rows, chosen=chosen, parent_run_id=parent_id, benchmarks=benches,
                                cached=cached,
                                **_gate_and_register(cfg, base, rows, chosen, bundles, benches, parent_id, config_hash))
        if cached:
            logger.info(f"reused from earlier runs (task cache): {', '.join(cached)}")

        total = time.perf_counter() - start
        inside = sum(work.values())
        result.seconds, result.work_seconds = total, work
        result.orchestration_overhead = (total - inside) / total if total else 0.0
        log_metrics_at({"flow_seconds": total, "task_work_seconds": inside,
                        "orchestration_overhead_pct": 100 * result.orchestration_overhead})
        (run_dir / "flow_result.json").write_text(result.model_dump_json(indent=2))
        mlflow.log_artifact(str(run_dir / "flow_result.json"))
    return result.model_dump(mode="json")


def _artifact_key(name: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    return "gate-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_compress(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the compress flow on a validated config (ephemeral Prefect unless PREFECT_API_URL)."""
    return compress_flow(cfg)


__all__ = ["BenchmarkDown", "CompressResult", "benchmark_flow", "compress_flow", "export_flow", "iteration_flow",
           "run_compress", "typed"]
