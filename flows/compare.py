"""Method comparison as a flow: the same trained model pruned by several methods at several
FLOP reductions, each point an MLflow run in one experiment, so the MLflow UI compares them
(select the runs, "Compare": accuracy against flops_removed_pct per method).

    pfp compare [CONFIG] [--methods pfp,ft,fpgm] [--reductions 0.5,0.7]

The loop is pfp.compare.compare_points, the same as the bare `pfp local compare`; here each
point runs as a Prefect task.
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger, task

from flows.config import PipelineConfig, load_pipeline_config
from flows.tracking import flatten_params, log_metrics_at, resolve_tracking_uri, run_tags, setup_mlflow, tracked_run
from pfp.compare import CompareResult, ComparePoint, compare_config, compare_points, run_point, save_compare
from pfp.results import RoundResult
from pfp.setup import cached_setup

POINT_METRICS = ("acc", "loss", "acc_before_retrain", "acc_change", "params", "flops", "flops_removed_pct",
                 "params_removed_pct", "achieved_keep", "reduction", "seconds")


@task(name="compare-point")
def point_task(cfg: PipelineConfig, point: ComparePoint) -> RoundResult:
    """One comparison point (pfp.compare.run_point) on this process's Setup of `cfg`."""
    return run_point(cached_setup(cfg, progress=False), point, progress=False)


@flow(name="pfp-compare", log_prints=False)
def compare_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                 methods: list[str] | None = None, reductions: list[float] | None = None) -> list[RoundResult]:
    """Every (method, reduction) point as a task and an MLflow run in the config's experiment.

    The config is a PipelineConfig (Prefect validates a mapping into one), or a YAML file
    (`config_path`, as deployments pass it).
    """
    import mlflow

    cfg = config if config is not None else load_pipeline_config(config_path)
    config = cfg.model_dump(mode="json")
    cc = compare_config(cfg, methods or None, reductions or None)
    logger = get_run_logger()
    setup_mlflow(resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir), f"{cfg.experiment_name}-compare")
    start = time.perf_counter()
    setup = cached_setup(cfg, progress=False)
    base = setup.base_info()
    result = CompareResult(name=cfg.name, base=base, rows=[], seconds=0.0, retrain_epochs=cfg.retrain.epochs,
                           tolerance=cfg.prune.tolerance, out=setup.run_dir / "compare", config=cfg.model_dump())
    tags = run_tags(cfg.config_hash(), base.data_hash) | {"pfp.flow": "compare"}
    for point, row in compare_points(cc, lambda p: point_task(cfg, p)):
        result.rows.append(row)
        with tracked_run(f"{point.title} -{point.reduction:.0%} FLOPs",
                         tags=tags | {"pfp.method": point.method, "pfp.postprocess": point.postprocess},
                         params=flatten_params({"method": point.method, "reduction": point.reduction,
                                                "postprocess": point.postprocess, **config})):
            log_metrics_at({k: getattr(row, k) for k in POINT_METRICS} | {"base_acc": base.acc})
            if not row.ok:
                mlflow.set_tag("pfp.error", row.error[:5000])
                logger.warning(f"{point.method} at -{point.reduction:.0%} FLOPs failed: {row.error}")
            else:
                mlflow.log_artifact(row.report_path, "report")
    result.out.mkdir(parents=True, exist_ok=True)
    result.seconds = time.perf_counter() - start
    paths = save_compare(result)
    logger.info(f"compared {len(result.rows)} points; wrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return result.rows
