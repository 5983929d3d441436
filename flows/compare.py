"""Method comparison as a flow: the same trained model pruned by several methods at several
FLOP reductions, each point an MLflow run in one experiment, so the MLflow UI compares them
(select the runs, "Compare": accuracy against flops_removed_pct per method).

    pfp compare [CONFIG] [--methods pfp,ft,fpgm] [--reductions 0.5,0.7]
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from rich.console import Console

from flows.config import config_from_json, load_pipeline_config
from flows.tracking import flatten_params, log_metrics_at, resolve_tracking_uri, run_tags, setup_mlflow, tracked_run
from pfp.compare import VARIANTS, compare_point, save_compare
from pfp.config import CompareConfig
from pfp.pipeline import _hash, cached_setup, calibration_fingerprint

POINT_METRICS = ("acc", "loss", "acc_before_retrain", "acc_change", "params", "flops", "flops_removed_pct",
                 "params_removed_pct", "achieved_keep", "reduction", "seconds")


@task(name="compare-point")
def point_task(config: dict, method: str, reduction: float, label: str, shared: bool = True) -> dict:
    cfg = config_from_json(config)
    return compare_point(cached_setup(cfg, progress=False), cfg, method, reduction, console=Console(),
                         progress=False, label=label, shared=shared)


@flow(name="pfp-compare", log_prints=False)
def compare_flow(config: dict | None = None, config_path: str | None = None, methods: list[str] | None = None,
                 reductions: list[float] | None = None) -> list[dict]:
    """Every (method, reduction) point as a task and an MLflow run in the config's experiment.

    The config is a plain dict, or a YAML file (`config_path`, as deployments pass it).
    """
    import mlflow

    if config is None:
        cfg = load_pipeline_config(config_path)
        config = cfg.model_dump(mode="json")
    else:
        cfg = config_from_json(config)
    cc = CompareConfig(methods=methods or cfg.compare.methods, reductions=reductions or cfg.compare.reductions,
                       postprocess=cfg.compare.postprocess)
    logger = get_run_logger()
    setup_mlflow(resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir), f"{cfg.experiment_name}-compare")
    start = time.perf_counter()
    setup = cached_setup(cfg, progress=False)
    fp = calibration_fingerprint(setup)
    tags = run_tags(_hash(config), fp["data_hash"]) | {"pfp.flow": "compare"}
    rows = []
    variants = VARIANTS[cc.postprocess]
    total = len(cc.methods) * len(cc.reductions) * len(variants)
    for method, shared, red in ((m, v, r) for m in cc.methods for v in variants for r in cc.reductions):
        n = len(rows) + 1
        row = point_task(config, method, red, f"[{n}/{total}]", shared)
        rows.append(row)
        pp = "shared" if shared else "plain"
        with tracked_run(f"{method}{' + BN/refit' if shared else ''} -{red:.0%} FLOPs",
                         tags=tags | {"pfp.method": method, "pfp.postprocess": pp},
                         params=flatten_params({"method": method, "reduction": red, "postprocess": pp, **config})):
            log_metrics_at({k: row.get(k) for k in POINT_METRICS} | {"base_acc": setup.acc})
            if row.get("error"):
                mlflow.set_tag("pfp.error", row["error"][:5000])
                logger.warning(f"{method} at -{red:.0%} FLOPs failed: {row['error']}")
            else:
                mlflow.log_artifact(row["report_path"], "report")
    out = setup.run_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)
    paths = save_compare(rows, setup, cfg, out, time.perf_counter() - start)
    logger.info(f"compared {len(rows)} points; wrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return rows
