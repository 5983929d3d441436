"""The compress flow: calibrate -> (prune -> retrain -> evaluate -> log) per keep ratio ->
export -> benchmark on the backends -> gate -> register. With prune.target latency the rounds
are wrapped in pulling and pushing the device class's latency tables (flows.latency_tables).

    pfp run [CONFIG]            (no CONFIG: the CPU quickstart)

Each task is a few lines over flows.steps (which wraps pfp/ and export/); tasks pass file
paths and typed results (pfp.results, export.results), not modules. The flow takes a
validated PipelineConfig (Prefect validates a dict into one, once, on the way in).

Resume: rounds, exports and benchmarks are cached Prefect tasks whose results persist under
`<output_dir>/<name>/prefect-results`, keyed by a hash of their inputs; a re-run after a
crash gets the finished ones back from there and computes only the rest (a round still
reuses its own finished model file and its mid-retrain checkpoint, pfp.rounds).

MLflow gets one parent run per flow run and one child run per round. A failure or a
cancellation leaves none of them RUNNING: tracked_run ends them FAILED on any exception
(SIGTERM included, turned into KeyboardInterrupt by tracking.sigterm_raises), the flow's
on_crashed/on_cancellation hooks end what a killed process could not, and the next run
ends runs whose process died (SIGKILL, power loss).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import psutil
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import LocalFileSystem
from prefect.states import Completed
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
from pfp.results import BaseInfo, RoundResult, change_of, score_of
from flows.run_story import (
    LatencyPoint, gate_value, base_metrics, latency_metrics, round_metrics, round_params, summary_markdown,
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


def _task_name(fmt: str) -> Callable[[], str]:
    """A task run name from the task's parameters (`fmt` formats them; `cfg` is the config)."""
    def name() -> str:
        from prefect.runtime import task_run

        p = dict(task_run.parameters)
        try:
            return fmt.format(**p)
        except Exception:  # noqa: BLE001 - a name must never fail the task
            return fmt.split("{")[0].strip() or "task"
    return name


def _round_task_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    cfg, i = p["cfg"], p["index"]
    return f"round {i + 1}: {cfg.prune.method} keep {cfg.prune.keep_ratios[i]:.0%} of {cfg.prune.target}"


def _log_bundle_task_name() -> str:
    from prefect.runtime import task_run

    return f"log bundle {Path(task_run.parameters['bundle'].bundle).name}"


def _export_task_name() -> str:
    from prefect.runtime import task_run

    return f"export {Path(task_run.parameters['out_dir']).name}"


# --------------------------------------------------------------------------- tasks


@task(name="calibrate", task_run_name=_task_name("calibrate {cfg.name}: {cfg.model.name}"), cache_policy=NO_CACHE)
def calibrate_task(cfg: PipelineConfig) -> BaseInfo:
    # Not cached: it loads the data set into this process, which the rounds run here use
    # (the trained base model itself is reused from disk by pfp.setup).
    return steps.calibrate(cfg, progress=False)


@task(name="prune-retrain-evaluate", task_run_name=_round_task_name, cache_key_fn=_round_key, persist_result=True)
def iterate_task(cfg: PipelineConfig, index: int, parent: str | None) -> RoundResult:
    return steps.iterate(cfg, index, parent, progress=False)


@task(name="export", task_run_name=_export_task_name, cache_key_fn=_export_key,
      persist_result=True)
def export_task(cfg: PipelineConfig, model_path: str, out_dir: str) -> BundleInfo:
    return steps.export_model(cfg, model_path, out_dir)


@task(name="benchmark", task_run_name=_task_name("benchmark on {backend}"), cache_key_fn=_bench_key,
      persist_result=True)
def benchmark_task(cfg: PipelineConfig, backend: str, bundles: dict[str, str], baseline: str) -> BenchmarkResult:
    result = steps.benchmark(cfg, cfg.backend(backend), bundles, baseline)
    if result.error:
        raise BenchmarkDown(result)
    return result


@task(name="gate", task_run_name=_task_name("gate"), cache_policy=NO_CACHE)
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


@task(name="log-round", task_run_name=_task_name("log round {row.round}"), cache_policy=NO_CACHE,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_transient)
def log_round_task(run_id: str, row: RoundResult, plots: Path, original: dict[str, int] | None) -> None:
    """A round's metrics, retraining curves, model, report and layer-budget plot, into its
    own child run (opened when the round started, so its duration is the round's work)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    log_metrics_at(round_metrics(row), run_id=run_id)
    for e in row.history:  # step series: the retraining curves
        curves = {"train.loss": e.train_loss, "train.acc_pct": e.train_acc, "test.loss": e.test_loss,
                  "test.acc_pct": e.test_acc, "train.lr": e.lr} | {f"test.{k}": v for k, v in e.test_metrics.items() if k not in ("acc", "loss")}
        log_metrics_at(curves, step=e.epoch + 1, run_id=run_id)  # NaN (another task's accuracy) is skipped
    client.log_artifact(run_id, row.model_path, "model")
    client.log_artifact(run_id, row.report_path, "report")
    report = json.loads(Path(row.report_path).read_text())
    # the same artifact name in every round, so MLflow's compare view shows them side by side
    folder = plots / f"round_{row.round}"
    folder.mkdir(parents=True, exist_ok=True)
    client.log_artifact(run_id, str(plot_layer_budget(report, folder / "layer_budget.png", original=original,
                                                      title=f"round {row.round}: channels kept per layer")))


@task(name="log-bundle", task_run_name=_log_bundle_task_name, cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_transient)
def log_bundle_task(run_id: str, bundle: BundleInfo) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    client.log_artifact(run_id, str(Path(bundle.bundle) / "model.onnx"), "onnx")
    client.log_metric(run_id, "parity.max_rel_diff", bundle.parity_max_rel_diff)


@task(name="pull-latency-tables", task_run_name="pull latency tables", cache_policy=NO_CACHE,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_transient)
def pull_tables_task(cache_dir: str) -> int:
    """Block timings this device class already measured, from MLflow into the table cache."""
    from flows.latency_tables import pull_tables

    return pull_tables(cache_dir)


@task(name="push-latency-tables", task_run_name="push latency tables", cache_policy=NO_CACHE,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_transient)
def push_tables_task(cache_dir: str) -> int:
    """Block timings measured here, from the table cache to MLflow for the device class's other hosts."""
    from flows.latency_tables import push_tables

    return push_tables(cache_dir)


def latency_points(bench: BenchmarkResult, label: str) -> list[LatencyPoint]:
    """`label`'s timings on one backend, each with its side-by-side speed-up over the unpruned model."""
    speedup = {e.batch: e.speedup for e in bench.efficiency_for(label)}
    return [LatencyPoint(target=bench.backend, batch=r.batch, p50_ms=r.p50_ms, p99_ms=r.p99_ms,
                         throughput_per_s=r.throughput_per_s, converged=r.converged,
                         speedup=1.0 if label == BASELINE else speedup.get(r.batch))
            for r in bench.rows_for(label)]


@task(name="log-latency", task_run_name=_task_name("log latency {label} on {bench.backend}"), cache_policy=NO_CACHE,
      retries=RETRIES, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_transient)
def log_latency_task(run_id: str, bench: BenchmarkResult, label: str) -> None:
    """Latency and speed-up of `label` on one backend, into its round's run."""
    log_metrics_at(latency_metrics(latency_points(bench, label)), run_id=run_id)


@task(name="register", task_run_name=_task_name("register {model_name}"), cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=_retry_transient)
def register_task(model_name: str, run_id: str, bundle: BundleInfo, row: RoundResult, config_hash: str) -> str:
    """Log the chosen bundle to the parent run and register it as `candidate`; its version."""
    import mlflow

    from flows.registry import register_candidate

    mlflow.MlflowClient().log_artifacts(run_id, bundle.bundle, "bundle")
    version = register_candidate(model_name, run_id, "bundle", {
        "onnx_sha256": bundle.onnx_sha256, "flops": str(row.flops), row.metric or "acc": f"{score_of(row):.4f}",
        "round": str(row.round), "config_hash": config_hash,
    })
    return str(version.version)


@task(name="promote", task_run_name=_task_name("promote {model_name} v{version}"), cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
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
    """Every keep ratio in turn: prune the previous round's model, retrain, evaluate, log.

    Each round's MLflow run opens when the round starts and ends when it is logged, so its
    duration is the round's real work (a few seconds for a round reused from the cache)."""
    logger = get_run_logger()
    rows: list[RoundResult] = []
    run_ids: dict[int, str] = {}
    parent_model = None
    original: dict[str, int] | None = None  # unpruned widths, from round 1's report
    for i, ratio in enumerate(cfg.prune.keep_ratios):
        with tracked_run(f"round {i + 1}: {cfg.prune.method} keep {ratio:.0%}", parent_run_id=parent_id,
                         tags={**tags, "pfp.round": str(i + 1)}, params=round_params(cfg.prune.model_dump(), ratio)) as run:
            row = _run_iteration(cfg, i, parent_model, run_dir, cached, work)
            rows.append(row)
            if row.error:
                mlflow_set_tag(run.info.run_id, "pfp.error", row.error)
                mlflow_set_tag(parent_id, f"pfp.round_{i + 1}.error", row.error)
                logger.warning(f"round {i + 1}: cannot prune to {ratio:.0%}: {row.error}; stopping the cascade")
                break
            if original is None:
                original = {layer["name"]: layer["size"] for layer in json.loads(Path(row.report_path).read_text())["layers"]}
            log_round_task(run.info.run_id, row, plots, original if row.round > 1 else None)
            run_ids[row.round] = run.info.run_id
        logger.info(f"round {i + 1}: keep {ratio:.0%} -> test {row.metric or 'acc'} {score_of(row):.4g} "
                    f"({change_of(row):+.4g}, positive is better), "
                    f"FLOPs -{row.flops_removed_pct:.1f}%")
        parent_model = row.model_path
    return rows, run_ids


def mlflow_set_tag(run_id: str, key: str, value: str) -> None:
    """A tag of at most MLflow's 5000 characters."""
    from mlflow import MlflowClient

    MlflowClient().set_tag(run_id, key, value[:5000])


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
                   run_ids: dict[int, str], cached: list[str], work: dict) -> dict[str, BenchmarkResult]:
    """Every backend times all bundles side by side; latency goes to each round's run
    (round 0: the unpruned model)."""
    benches = {}
    for backend in cfg.backends:
        bench = _run_benchmark(cfg, backend.name, {k: v.bundle for k, v in bundles.items()}, run_dir, cached, work)
        benches[backend.name] = bench
        if bench.error:
            get_run_logger().warning(f"backend {backend.name}: not measured: {bench.error}")
            continue
        log_latency_task(run_ids[0], bench, BASELINE)
        for row in rows:
            log_latency_task(run_ids[row.round], bench, f"round_{row.round}")
    return benches


def _gate_and_register(cfg: PipelineConfig, base: BaseInfo, rows: list[RoundResult], chosen: int | None,
                       bundles: dict[str, BundleInfo], benches: dict[str, BenchmarkResult], parent_id: str,
                       round_run_id: str | None, config_hash: str) -> dict[str, Any]:
    """Gate the chosen round, register it as `candidate`, promote it to `champion` if it passed."""
    import mlflow
    from mlflow import MlflowClient

    logger = get_run_logger()
    if chosen is None:
        msg = (f"no pruned model stays within {cfg.prune.tolerance:g} of the unpruned {base.metric} {score_of(base):.4g}; "
               "nothing registered")
        logger.warning(msg)
        MlflowClient().set_tag(parent_id, "pfp.outcome", msg)
        return {}
    row = rows[chosen]
    label = f"round_{row.round}"
    latency = {name: [dataclasses.asdict(r) for r in b.rows_for(label)] for name, b in benches.items()}
    baseline = {name: [dataclasses.asdict(r) for r in b.rows_for(BASELINE)] for name, b in benches.items()}
    errors = {name: b.error for name, b in benches.items() if b.error}
    # Registered before the gate: edge gate devices download the candidate from the registry.
    # The chosen round's run is the version's source: the registry links back to it.
    number = register_task(cfg.model_name, round_run_id, bundles[label], row, config_hash)
    mlflow_set_tag(round_run_id, "pfp.registered_version", number)
    gate = cfg.gate
    gate_devices = cfg.edge.gate_targets()
    if gate_devices:
        edge_latency, edge_errors, extra_checks = _edge_gate_bench(cfg, gate_devices, number, parent_id)
        latency |= edge_latency
        errors |= edge_errors
        gate = gate.model_copy(update={"latency": [*gate.latency, *extra_checks]})
    decision = gate_task(gate, gate_value(base), gate_value(row, base), latency, baseline, errors)
    again = _remeasure_inconclusive(cfg, decision, label, bundles)
    if again:  # a check that did not converge is timed again, longer, before the gate decides
        for name, bench in again.items():
            latency[name] += [dataclasses.asdict(r) for r in bench.rows_for(label)]
            baseline[name] += [dataclasses.asdict(r) for r in bench.rows_for(BASELINE)]
        decision = gate_task(gate, gate_value(base), gate_value(row, base), latency, baseline, errors)
    promoted = promote_task(cfg.model_name, number, decision)
    markdown = f"# {cfg.model_name} v{number}: {'promoted to champion' if promoted else 'not promoted'}\n\n"
    markdown += decision.to_markdown()
    create_markdown_artifact(markdown, key=_artifact_key(cfg.name), description="promotion gate decision")
    mlflow.log_text(markdown, "gate/decision.md")
    logger.info(f"registered {cfg.model_name} v{number} as candidate; "
                + ("promoted to champion" if promoted else "NOT promoted: " + decision.summary()))
    return {"decision": decision.to_dict(), "version": number, "promoted": promoted}


def _remeasure_inconclusive(cfg: PipelineConfig, decision: GateDecision, label: str,
                            bundles: dict[str, BundleInfo]) -> dict[str, BenchmarkResult]:
    """Re-time, with a longer budget (export.latency.longer_settings), the backends and batch
    sizes of the checks that were inconclusive because their measurement did not converge.
    Backends on other workers (a deployment) and edge devices are not re-timed from here."""
    from export.latency import longer_settings

    out = {}
    for name, batches in decision.to_remeasure().items():
        backend = next((b for b in cfg.backends if b.name == name and not b.deployment), None)
        if backend is None:
            continue
        longer = longer_settings(steps.bench_settings(backend))
        get_run_logger().info(f"{name}: batch {batches} did not converge; timing again for up to {longer.max_time_s:g} s")
        bench = steps.benchmark(cfg, backend, {label: bundles[label].bundle, BASELINE: bundles[BASELINE].bundle},
                                BASELINE, settings=longer, batch_sizes=batches, attempt=2)
        if not bench.error:
            out[name] = bench
    return out


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


# --------------------------------------------------------------------------- the story in the UIs


def _params_in_use(cfg: PipelineConfig) -> dict[str, str]:
    """The parent run's params: the config sections this run uses, with resolved values
    (the full config is the run's config.yaml artifact)."""
    data = cfg.model_dump(mode="json", exclude={"compare", "tracking"})
    if not cfg.edge.targets_file:
        data.pop("edge", None)
    else:
        data["edge"].pop("devices", None)  # the devices are in the targets file, logged as its path
    if not any(cfg.dispatch.model_dump().values()):
        data.pop("dispatch", None)
    if not cfg.schedule.cron:
        data.pop("schedule", None)
    data["tracking"] = {"experiment": cfg.experiment_name, "model_name": cfg.model_name}
    return flatten_params(data)


def _run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """A link to the run in the MLflow UI: the server itself, or `mlflow ui` on its default port."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    # workflowType: MLflow 3 shows its GenAI view otherwise, where rounds and models do not appear
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _tell_the_story(cfg: PipelineConfig, result: CompressResult, run_ids: dict[int, str], experiment_id: str,
                    uri: str) -> None:
    """The parent run's description, tags and headline metrics (the chosen round's), the
    registered version's description, and the Prefect per-round table."""
    from mlflow import MlflowClient
    from prefect.artifacts import create_table_artifact

    client = MlflowClient()
    decision = GateDecision.from_dict(result.decision) if result.decision else None
    latency = {0: [p for b in result.benchmarks.values() for p in latency_points(b, BASELINE)]}
    for r in result.rounds:
        if r.ok:
            latency[r.round] = [p for b in result.benchmarks.values() for p in latency_points(b, f"round_{r.round}")]
    md = summary_markdown(f"{cfg.name}: {cfg.model.name}, {cfg.prune.method} cascade on {cfg.prune.target}",
                          result.base, result.rounds, latency, result.chosen, decision, result.version,
                          result.promoted, cfg.prune.tolerance)
    parent = result.parent_run_id
    chosen = result.rounds[result.chosen] if result.chosen is not None else None
    for key, value in {"mlflow.note.content": md,
                       "pfp.chosen_round": str(chosen.round) if chosen else "none",
                       "pfp.gate": decision.verdict if decision else "not run",
                       "pfp.registered_version": result.version or "none",
                       "pfp.promoted": str(result.promoted).lower()}.items():
        client.set_tag(parent, key, value)
    if chosen is not None:  # the headline: the chosen round, not the last one
        log_metrics_at(round_metrics(chosen) | latency_metrics(latency.get(chosen.round, [])), run_id=parent)
        client.set_tag(run_ids[chosen.round], "pfp.chosen", "true")
    if result.version is not None:
        client.update_model_version(cfg.model_name, result.version, description=md)
    m = result.base.metric
    table = [{"round": 0, "keep": "100%", m: round(score_of(result.base), 4), "FLOPs removed %": 0.0,
              **{f"speed-up {p.target} b{p.batch}": 1.0 for p in latency[0]},
              "MLflow run": _run_link(uri, experiment_id, run_ids[0])}]
    for r in result.rounds:
        if not r.ok:
            table.append({"round": r.round, "keep": f"{r.keep_ratio:.0%}", m: None, "error": r.error})
            continue
        table.append({"round": r.round, "keep": f"{r.keep_ratio:.0%}", m: round(score_of(r), 4),
                      "FLOPs removed %": round(r.flops_removed_pct, 1),
                      **{f"speed-up {p.target} b{p.batch}": p.speedup and round(p.speedup, 2)
                         for p in latency.get(r.round, [])},
                      "chosen": "yes" if chosen is not None and r.round == chosen.round else "",
                      "MLflow run": _run_link(uri, experiment_id, run_ids[r.round])})
    create_table_artifact(table, key="rounds-" + _artifact_key(cfg.name)[len("gate-"):],
                          description=f"{cfg.name}: every round, with its MLflow run")
    create_markdown_artifact(md, key="summary-" + _artifact_key(cfg.name)[len("gate-"):],
                             description=f"{cfg.name}: the run's summary (as in MLflow)")


# --------------------------------------------------------------------------- the flow


def _flow_run_name() -> str:
    """`<config name>-<model>-<date time>`, instead of Prefect's random two words."""
    from datetime import datetime

    from prefect.runtime import flow_run

    p = flow_run.parameters
    when = datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = p.get("config")
    if cfg is not None:
        name, model = (cfg.name, cfg.model.name) if isinstance(cfg, PipelineConfig) else (
            cfg.get("name", "pipeline"), (cfg.get("model") or {}).get("name", "model"))
        return f"{name}-{model.split(':')[-1]}-{when}"  # "pkg.nets:MyNet" -> MyNet
    path = p.get("config_path")
    return f"{Path(path).stem if path else 'quickstart'}-{when}"


@flow(name="pfp-compress", flow_run_name=_flow_run_name, log_prints=False,
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
    for line in cfg.latency_target_mismatches():
        logger.warning(line)

    with tracked_run(f"{cfg.name}: {cfg.model.name} {cfg.prune.method} cascade", params=_params_in_use(cfg),
                     tags={"pfp.config_hash": config_hash, "pfp.flow": "compress", "pfp.host": socket.gethostname(),
                           "pfp.pid": str(os.getpid()), "pfp.flow_run_id": str(flow_run.id)}) as parent:
        parent_id = parent.info.run_id
        mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        run_dir = Path(cfg.output_dir) / cfg.name
        plots = run_dir / "plots"
        plots.mkdir(parents=True, exist_ok=True)

        # Round 0, the unpruned model, is a child run too: every compare view has the baseline.
        with tracked_run("round 0: unpruned", parent_run_id=parent_id, tags={"pfp.round": "0"},
                         params={"prune.method": "none", "prune.keep_ratio": "1", "prune.target": cfg.prune.target}) as r0:
            base = _timed(calibrate_task, cfg, label="calibrate", work=work)
            log_metrics_at(base_metrics(base))
        run_ids = {0: r0.info.run_id}
        tags = run_tags(config_hash, base.data_hash) | {"pfp.calib_hash": str(base.calib_hash)}
        for run_id in (parent_id, run_ids[0]):
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
        logger.info(f"base model {base.base_path}: test {base.metric} {score_of(base):.4g}, |S| = {base.calib_size}")

        tables = steps.latency_cache_dir(cfg)  # target latency: the device class's tables, shared in MLflow
        if tables:
            pull_tables_task(tables)
        rows, round_runs = _prune_rounds(cfg, parent_id, tags, run_dir, plots, cached, work)
        if tables:
            push_tables_task(tables)
        run_ids |= round_runs
        chosen = choose(score_of(base), rows, cfg.prune.tolerance, cfg.prune.target,
                        higher_is_better=base.higher_is_better)
        mlflow.log_artifact(str(plot_accuracy_vs_flops(cfg.name, score_of(base), rows, cfg.prune.tolerance, chosen,
                                                       plots / "accuracy_vs_flops.png")), "plots")
        done = [r for r in rows if r.ok]
        bundles = _export_all(cfg, base, done, run_dir, run_ids, cached, work)
        benches = _benchmark_all(cfg, bundles, done, run_dir, run_ids, cached, work)
        chosen_run = run_ids.get(rows[chosen].round) if chosen is not None else None
        result = CompressResult(base=base, rounds=rows, chosen=chosen, parent_run_id=parent_id, benchmarks=benches,
                                cached=cached, **_gate_and_register(cfg, base, rows, chosen, bundles, benches,
                                                                    parent_id, chosen_run, config_hash))
        if cached:
            logger.info(f"reused from earlier runs (task cache): {', '.join(cached)}")
        _tell_the_story(cfg, result, run_ids, experiment_id, uri)

        total = time.perf_counter() - start
        inside = sum(work.values())
        result.seconds, result.work_seconds = total, work
        result.orchestration_overhead = (total - inside) / total if total else 0.0
        log_metrics_at({"flow_s": round(total, 1), "task_work_s": round(inside, 1),
                        "orchestration_overhead_pct": round(100 * result.orchestration_overhead, 1)})
        (run_dir / "flow_result.json").write_text(result.model_dump_json(indent=2))
        mlflow.log_artifact(str(run_dir / "flow_result.json"))
    data = result.model_dump(mode="json")
    if result.version is not None and not result.promoted:
        # Not a plain green "Completed": the run did its work, but nothing was promoted.
        return Completed(data=data, name="Not promoted", message=f"{cfg.model_name} v{result.version}: "
                         f"gate {GateDecision.from_dict(result.decision).verdict}, not promoted")
    if result.chosen is None:
        return Completed(data=data, name="Nothing chosen",
                         message=f"no round within {cfg.prune.tolerance:g} points; nothing registered")
    return data


def _artifact_key(name: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    return "gate-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run_compress(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the compress flow on a validated config (ephemeral Prefect unless PREFECT_API_URL)."""
    return compress_flow(cfg)


__all__ = ["BenchmarkDown", "CompressResult", "benchmark_flow", "compress_flow", "export_flow", "iteration_flow",
           "run_compress", "typed"]
