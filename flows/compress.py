"""The compress flow: calibrate -> (prune -> retrain -> evaluate -> log) per keep ratio ->
export -> benchmark on the targets -> gate -> register.

    pfp run [CONFIG]            (no CONFIG: the CPU quickstart)

Each task is a few lines over flows.steps (which wraps pfp/ and export/); tasks pass file
paths, not modules. MLflow gets one parent run per flow run and one nested run per
iteration; a failure leaves every run it opened FAILED. Re-running after a crash resumes
at the first unfinished iteration: finished rounds are found on disk (round_<i>/done.json,
keyed by a hash of their inputs) and reused.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from rich.console import Console

from deploy.gate import evaluate_gate
from flows import steps
from flows.errors import FlowError
from flows.config import PipelineConfig, config_from_json, load_pipeline_config
from flows.tracking import (
    check_tracking_server, flatten_params, log_metrics_at, resolve_tracking_uri, run_tags, setup_mlflow, sigterm_raises,
    tracked_run,
)
from pfp.files import write_text_atomic
from pfp.cascade import choose
from pfp.files import stable_hash as _hash
from pfp.plots import plot_accuracy_vs_flops, plot_layer_budget

ITERATION_METRICS = (
    "acc", "loss", "acc_before_retrain", "acc_change", "params", "flops", "keep_ratio", "achieved_keep",
    "flops_removed_pct", "params_removed_pct", "preact_err_p95_max", "preact_eps99_max", "eps", "coverage_min",
    "coverage_mean", "seconds",
)


# --------------------------------------------------------------------------- tasks


@task(name="calibrate")
def calibrate_task(config: dict) -> dict:
    return steps.calibrate(config_from_json(config), progress=False)


@task(name="prune-retrain-evaluate")
def iterate_task(config: dict, index: int, parent: str | None) -> dict:
    return steps.iterate(config_from_json(config), index, parent, progress=False)


@task(name="export")
def export_task(config: dict, model_path: str, out_dir: str) -> dict:
    return steps.export_model(config_from_json(config), model_path, out_dir)


@task(name="benchmark")
def benchmark_task(config: dict, target: str, bundles: dict[str, str], baseline: str) -> dict:
    cfg = config_from_json(config)
    return steps.benchmark(cfg, next(t for t in cfg.targets if t.name == target), bundles, baseline)


@task(name="gate")
def gate_task(config: dict, base_acc: float, acc: float, latency: dict, baseline: dict, errors: dict) -> dict:
    cfg = config_from_json(config)
    return evaluate_gate(cfg.gate, base_acc=base_acc, acc=acc, latency=latency, baseline_latency=baseline,
                         errors=errors).to_dict()


# --------------------------------------------------------------------------- work pools
# A heavy step runs here, or as a deployment on a work pool (dispatch.iteration,
# dispatch.export, targets[].deployment). The worker writes its result into the shared
# output_dir; the flow then reads it from there (a finished round or bundle is found by
# hash and only loaded), so nothing depends on Prefect's result storage.


@flow(name="pfp-iteration")
def iteration_flow(config: dict, index: int, parent: str | None = None) -> dict:
    """One cascade round as its own flow, for a deployment on a (GPU) work pool."""
    return iterate_task(config, index, parent)


@flow(name="pfp-export")
def export_flow(config: dict, model_path: str, out_dir: str) -> dict:
    """ONNX export and parity as its own flow, for a deployment on a work pool."""
    return export_task(config, model_path, out_dir)


@flow(name="pfp-benchmark")
def benchmark_flow(config: dict, target: str, bundles: dict[str, str], baseline: str, out: str) -> dict:
    """One target's benchmark as its own flow, for a deployment on the device's work pool."""
    result = benchmark_task(config, target, bundles, baseline)
    write_text_atomic(out, json.dumps(result))
    return result


def _dispatch(deployment: str, parameters: dict, what: str) -> None:
    from prefect.deployments import run_deployment

    fr = run_deployment(deployment, parameters=parameters, timeout=None)
    if not fr.state or not fr.state.is_completed():
        raise FlowError(f"deployment {deployment}: {what} ended {fr.state.name if fr.state else 'without a state'}")


def _run_iteration(cfg: PipelineConfig, config: dict, index: int, parent: str | None) -> dict:
    if not cfg.dispatch.iteration:
        return iterate_task(config, index, parent)
    _dispatch(cfg.dispatch.iteration, {"config": config, "index": index, "parent": parent}, f"round {index + 1}")
    row = steps.iterate(cfg, index, parent, progress=False)
    return row | {"task_seconds": row["seconds"], "dispatched_to": cfg.dispatch.iteration}  # the worker's time


def _run_export(cfg: PipelineConfig, config: dict, model_path: str, out_dir: str) -> dict:
    if not cfg.dispatch.export:
        return export_task(config, model_path, out_dir)
    start = time.perf_counter()
    _dispatch(cfg.dispatch.export, {"config": config, "model_path": model_path, "out_dir": out_dir}, f"export of {model_path}")
    return steps.export_model(cfg, model_path, out_dir) | {"seconds": time.perf_counter() - start}


def _run_benchmark(cfg: PipelineConfig, config: dict, target: str, bundles: dict[str, str], out: Path) -> dict:
    deployment = next(t for t in cfg.targets if t.name == target).deployment
    if not deployment:
        return benchmark_task(config, target, bundles, "unpruned")
    out.unlink(missing_ok=True)
    try:
        _dispatch(deployment, {"config": config, "target": target, "bundles": bundles, "baseline": "unpruned",
                               "out": str(out)}, f"benchmark on {target}")
        return json.loads(out.read_text())
    except Exception as e:  # noqa: BLE001 - a target that is down fails its gate checks, it does not end the flow
        return {"target": target, "results": [], "efficiency": [], "error": f"{deployment}: {e}", "seconds": 0.0}


# --------------------------------------------------------------------------- MLflow logging


def _log_iteration(client, parent_id: str, row: dict, tags: dict, plots: Path) -> str:
    """A nested run for one iteration, plus the parent's step series. Returns the run id."""
    import mlflow

    step = row["round"]
    with tracked_run(f"round {step}: keep {row['keep_ratio']:.0%}", nested=True,
                     tags={**tags, "mlflow.parentRunId": parent_id, "pfp.round": str(step)}) as run:
        metrics = {k: row.get(k) for k in ITERATION_METRICS}
        log_metrics_at(metrics)
        mlflow.log_artifact(row["model_path"], "model")
        mlflow.log_artifact(row["report_path"], "report")
        report = json.loads(Path(row["report_path"]).read_text())
        mlflow.log_artifact(str(plot_layer_budget(report, plots / f"layer_budget_round{step}.png",
                                                  title=f"round {step}: kept vs total channels")), "plots")
        run_id = run.info.run_id
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            client.log_metric(parent_id, f"iter.{key}", float(value), step=step)
    return run_id


def _log_latency(client, run_id: str, bench: dict, label: str, step: int | None, parent_id: str | None) -> None:
    """Latency of `label` on one target as metrics (and as the parent's step series)."""
    t = bench["target"]
    for r in bench["results"]:
        if r["model"] != label:
            continue
        for name in ("p50_ms", "p90_ms", "p99_ms", "throughput_per_s"):
            key = f"latency.{t}.b{r['batch']}.{name}"
            client.log_metric(run_id, key, float(r[name]))
            if parent_id and step is not None:
                client.log_metric(parent_id, f"iter.{key}", float(r[name]), step=step)
    for e in bench["efficiency"]:
        if e["model"] == label:
            client.log_metric(run_id, f"speedup.{t}.b{e['batch']}", float(e["speedup"]))
            client.log_metric(run_id, f"efficiency.{t}.b{e['batch']}", float(e["efficiency"]))


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
        try:
            os.kill(pid, 0)
            continue  # still alive: a concurrent run, not an orphan
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        for child in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'"):
            client.set_tag(child.info.run_id, "pfp.end_reason", "its process died")
            client.set_terminated(child.info.run_id, "FAILED")
        client.set_tag(run.info.run_id, "pfp.end_reason", f"process {pid} on {host} died without ending the run")
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
    return ended


# --------------------------------------------------------------------------- the flow's stages


def _prune_rounds(cfg: PipelineConfig, config: dict, client, parent_id: str, tags: dict, plots: Path,
                  work: dict) -> tuple[list[dict], dict[int, str]]:
    """Every keep ratio in turn: prune the previous round's model, retrain, evaluate, log."""
    logger = get_run_logger()
    rows, run_ids, parent_model = [], {}, None
    for i, ratio in enumerate(cfg.prune.keep_ratios):
        row = _run_iteration(cfg, config, i, parent_model)
        work[f"round_{i + 1}"] = row.get("task_seconds", 0.0)
        rows.append(row)
        if row.get("error"):
            logger.warning(f"round {i + 1}: cannot prune to {ratio:.0%}: {row['error']}; stopping the cascade")
            client.set_tag(parent_id, f"pfp.round_{i + 1}.error", row["error"][:5000])
            break
        run_ids[row["round"]] = _log_iteration(client, parent_id, row, tags, plots)
        logger.info(f"round {i + 1}: keep {ratio:.0%} -> test acc {row['acc']:.2f}% ({row['acc_change']:+.2f}), "
                    f"FLOPs -{row['flops_removed_pct']:.1f}%")
        parent_model = row["model_path"]
    return rows, run_ids


def _export_all(cfg: PipelineConfig, config: dict, base: dict, rows: list[dict], run_dir: Path, client,
                run_ids: dict[int, str], work: dict) -> dict[str, dict]:
    """Bundles of the unpruned model (the targets' baseline) and of every round (ONNX per iteration)."""
    sources = {"unpruned": base["base_path"]} | {f"round_{r['round']}": r["model_path"] for r in rows}
    bundles = {label: _run_export(cfg, config, path, str(run_dir / "bundles" / label)) for label, path in sources.items()}
    for label, b in bundles.items():
        work[f"export {label}"] = b["seconds"]
    for row in rows:
        b = bundles[f"round_{row['round']}"]
        client.log_artifact(run_ids[row["round"]], str(Path(b["bundle"]) / "model.onnx"), "onnx")
        client.log_metric(run_ids[row["round"]], "parity.max_rel_diff", b["meta"]["parity"][0]["max_rel_diff"])
    return bundles


def _benchmark_all(cfg: PipelineConfig, config: dict, bundles: dict[str, dict], rows: list[dict], run_dir: Path,
                   client, parent_id: str, run_ids: dict[int, str], work: dict) -> dict[str, dict]:
    """Every target times all bundles side by side; latency goes to each round's run."""
    benches = {}
    for target in cfg.targets:
        bench = _run_benchmark(cfg, config, target.name, {k: v["bundle"] for k, v in bundles.items()},
                               run_dir / "bench" / f"{target.name}.json")
        benches[target.name] = bench
        work[f"benchmark {target.name}"] = bench["seconds"]
        if bench["error"]:
            get_run_logger().warning(f"target {target.name}: not measured: {bench['error']}")
            continue
        _log_latency(client, parent_id, bench, "unpruned", 0, parent_id)
        for row in rows:
            _log_latency(client, run_ids[row["round"]], bench, f"round_{row['round']}", row["round"], parent_id)
    return benches


def _gate_and_register(cfg: PipelineConfig, config: dict, base: dict, rows: list[dict], chosen: int | None,
                       bundles: dict[str, dict], benches: dict[str, dict], client, parent_id: str,
                       config_hash: str) -> dict:
    """Gate the chosen round, register it as `candidate`, promote it to `champion` if it passed."""
    import mlflow

    from flows.registry import promote, register_candidate

    logger = get_run_logger()
    if chosen is None:
        msg = (f"no pruned model stays within {cfg.prune.tolerance:g} points of the unpruned {base['acc']:.2f}%; "
               "nothing registered")
        logger.warning(msg)
        client.set_tag(parent_id, "pfp.outcome", msg)
        return {}
    label, row = f"round_{rows[chosen]['round']}", rows[chosen]
    latency = {t: [r for r in b["results"] if r["model"] == label] for t, b in benches.items()}
    baseline = {t: [r for r in b["results"] if r["model"] == "unpruned"] for t, b in benches.items()}
    errors = {t: b["error"] for t, b in benches.items() if b["error"]}
    # Registered before the gate: edge gate devices download the candidate from the registry.
    mlflow.log_artifacts(bundles[label]["bundle"], "bundle")
    version = register_candidate(cfg.model_name, parent_id, "bundle", {
        "onnx_sha256": bundles[label]["meta"]["onnx"]["sha256"], "flops": str(row["flops"]),
        "acc": f"{row['acc']:.4f}", "round": str(row["round"]), "config_hash": config_hash,
    })
    number = str(version.version)
    gate_cfg = config
    gate_devices = cfg.edge.gate_targets()
    if gate_devices:
        edge_latency, edge_errors, extra_checks = _edge_gate_bench(cfg, gate_devices, number, client, parent_id)
        latency |= edge_latency
        errors |= edge_errors
        gate_cfg = {**config, "gate": {**config["gate"], "latency": [*config["gate"]["latency"], *extra_checks]}}
    decision = gate_task(gate_cfg, base["acc"], row["acc"], latency, baseline, errors)
    promoted = promote(cfg.model_name, number, _decision_object(decision))
    markdown = _decision_markdown(cfg, number, decision, promoted)
    create_markdown_artifact(markdown, key=_artifact_key(cfg.name), description="promotion gate decision")
    mlflow.log_text(markdown, "gate/decision.md")
    logger.info(f"registered {cfg.model_name} v{number} as candidate; "
                + ("promoted to champion" if promoted else "NOT promoted: " + decision["summary"]))
    return {"decision": decision, "version": number, "promoted": promoted}


def _edge_gate_bench(cfg: PipelineConfig, devices: list, version: str, client, parent_id: str) -> tuple[dict, dict, list]:
    """Build, check and time the registered candidate on the gate devices (on their own
    workers); their latency rows, why a device was not measured, and one budget check per
    device that has a latency budget."""
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
    latency, errors = {}, {}
    for o in report.get("outcomes", []):
        res = o.get("result") or {}
        if o["status"] != "benchmarked" or not res.get("latency"):
            errors[o["device"]] = f"{o['status']}: {o.get('reason') or 'not measured'}"
            continue
        latency[o["device"]] = [{"batch": int(b[1:]), "p50_ms": v["p50_ms"], "p99_ms": v["p99_ms"],
                                 "backend": res.get("backend")} for b, v in res["latency"].items()]
        for b, v in res["latency"].items():
            client.log_metric(parent_id, f"edge.{o['device']}.{b}.p50_ms", float(v["p50_ms"]))
    checks = [{"target": t.name, "batch": min(t.batch_sizes), "metric": "p50", "max_ms": t.latency_budget_ms}
              for t in devices if t.latency_budget_ms is not None]
    return latency, errors, checks


# --------------------------------------------------------------------------- the flow


@flow(name="pfp-compress", log_prints=False)
def compress_flow(config: dict | None = None, config_path: str | None = None, overrides: dict | None = None,
                  progress: bool = False) -> dict:
    """The pipeline on one config: a plain dict (as `pfp run` passes it), or a YAML file
    (`config_path`, as deployments pass it) with dotted `overrides`; neither: the quickstart."""
    import mlflow
    from mlflow import MlflowClient

    start = time.perf_counter()
    if config is None:
        cfg = load_pipeline_config(config_path, overrides)
        config = cfg.model_dump(mode="json")
    else:
        cfg = config_from_json(config)
    logger = get_run_logger()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir)
    check_tracking_server(uri)
    experiment_id = setup_mlflow(uri, cfg.experiment_name)
    client = MlflowClient()
    config_hash = _hash(config)
    work: dict[str, float] = {}
    sigterm_raises()
    for run_id in _fail_orphaned_runs(client, experiment_id, config_hash):
        logger.warning(f"MLflow run {run_id} was left RUNNING by a process that died; marked FAILED")

    with tracked_run(f"{cfg.name}", params=flatten_params(config),
                     tags={"pfp.config_hash": config_hash, "pfp.flow": "compress", "pfp.host": socket.gethostname(),
                           "pfp.pid": str(os.getpid())}) as parent:
        parent_id = parent.info.run_id
        run_dir = Path(cfg.output_dir) / cfg.name
        plots = run_dir / "plots"
        plots.mkdir(parents=True, exist_ok=True)

        base = calibrate_task(config)
        work["calibrate"] = base["seconds"]
        tags = run_tags(config_hash, base["data_hash"]) | {"pfp.calib_hash": str(base["calib_hash"])}
        for k, v in tags.items():
            client.set_tag(parent_id, k, v)
        log_metrics_at({"iter.acc": base["acc"], "iter.flops": base["flops"], "iter.params": base["params"]}, step=0)
        logger.info(f"base model {base['base_path']}: test acc {base['acc']:.2f}%, |S| = {base['calib_size']}")

        rows, run_ids = _prune_rounds(cfg, config, client, parent_id, tags, plots, work)
        chosen = choose(base["acc"], rows, cfg.prune.tolerance, cfg.prune.target)
        mlflow.log_artifact(str(plot_accuracy_vs_flops(cfg.name, base["acc"], rows, cfg.prune.tolerance, chosen,
                                                       plots / "accuracy_vs_flops.png")), "plots")
        done = [r for r in rows if not r.get("error")]
        bundles = _export_all(cfg, config, base, done, run_dir, client, run_ids, work)
        benches = _benchmark_all(cfg, config, bundles, done, run_dir, client, parent_id, run_ids, work)
        result: dict[str, Any] = {"base": base, "rounds": rows, "chosen": chosen, "parent_run_id": parent_id,
                                  "benchmarks": benches, "decision": None, "version": None, "promoted": False}
        result |= _gate_and_register(cfg, config, base, rows, chosen, bundles, benches, client, parent_id, config_hash)

        total = time.perf_counter() - start
        inside = sum(work.values())
        result.update(seconds=total, work_seconds=work, orchestration_overhead=(total - inside) / total if total else 0)
        log_metrics_at({"flow_seconds": total, "task_work_seconds": inside,
                        "orchestration_overhead_pct": 100 * result["orchestration_overhead"]})
        (run_dir / "flow_result.json").write_text(json.dumps(result, indent=2, default=str))
        mlflow.log_artifact(str(run_dir / "flow_result.json"))
    return result


def _decision_object(decision: dict):
    """The GateDecision back from its dict (it crossed a task boundary as plain data)."""
    from deploy.gate import GateDecision

    return GateDecision.from_dict(decision)


def _artifact_key(name: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    return "gate-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _decision_markdown(cfg: PipelineConfig, version: str, decision: dict, promoted: bool) -> str:
    from deploy.gate import GateDecision

    head = f"# {cfg.model_name} v{version}: {'promoted to champion' if promoted else 'not promoted'}\n\n"
    return head + GateDecision.from_dict(decision).to_markdown()


def run_compress(cfg: PipelineConfig, *, progress: bool = False, console: Console | None = None) -> dict:
    """Run the compress flow on a validated config (ephemeral Prefect unless PREFECT_API_URL)."""
    return compress_flow(cfg.model_dump(mode="json"), progress=progress)


__all__ = ["benchmark_flow", "compress_flow", "export_flow", "iteration_flow", "run_compress"]
