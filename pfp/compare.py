"""`pfp compare`: several pruning methods side by side (spec section 7).

Same trained base model, same data, same calibration set, same retraining budget, same
FLOP target: each method prunes the base one-shot to (1 - reduction) of its FLOPs, is
evaluated before and after retraining with cfg.retrain, and lands in one table. Each method
runs plain (as published: no BN recalibration, no reconstruction) and with the shared
post-processing (both on, for every method alike), so a win is attributed to its cause:
the method's scores and budgets, or the post-processing any method can have.

`compare_points` is the one comparison loop: `run_compare` runs each point here, the
compare flow (flows/compare.py) runs each as a Prefect task. A point is one
`pfp.rounds.run_round` from the base model.

Writes output_dir/<name>/compare/compare.json, compare.csv and compare.png, plus one
folder per point (<method>[+pp]_r<reduction>/ with model.pt and report.json) so an
interrupted comparison continues where it stopped. A method that cannot reach a point
(PruneError) or fails there is recorded with its error, and the comparison goes on.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

from pydantic import BaseModel, ValidationError
from rich.table import Table
from rich.text import Text

from pfp.config import CompareConfig, ConfigError, RunConfig, format_validation_error
from pfp.files import atomic_path, write_json
from pfp.plots import new_axes, save_figure
from pfp.resources import format_count
from pfp.results import BaseInfo, RoundResult, change_of, score_before_retrain, score_of
from pfp.rounds import RoundSpec, run_round
from pfp.setup import Setup, prepare, refuse_distributed

__all__ = [
    "CSV_FIELDS", "CompareResult", "ComparePoint", "compare_config", "compare_points", "plan_points", "run_compare",
    "run_point", "save_compare", "summary_table",
]  # fmt: skip

log = logging.getLogger(__name__)

VARIANTS = {"plain": [False], "shared": [True], "both": [False, True]}
CSV_FIELDS = [
    "method", "postprocess", "target", "reduction", "keep_ratio", "achieved_keep", "target_flops_removed_pct", "flops_removed_pct",
    "params_removed_pct", "params", "flops", "acc_before_retrain", "acc", "acc_change", "metric",
    "score_before_retrain", "score", "score_change", "eps",
    "prune_seconds", "retrain_seconds", "seconds", "error",
]  # fmt: skip


class ComparePoint(BaseModel):
    """One comparison point: `method` removes `reduction` of the base's `target` resource."""

    method: str
    reduction: float
    shared: bool  # with the shared post-processing (BN recalibration and reconstruction)
    target: str = "flops"
    label: str = ""  # e.g. "[3/8]", for the log

    @property
    def postprocess(self) -> str:
        return "shared" if self.shared else "plain"

    @property
    def title(self) -> str:
        """How tables, plots and MLflow runs name the point's method."""
        return self.method + (" + BN/refit" if self.shared else "")


class CompareResult(BaseModel):
    """A finished comparison: the base model, one row per point, where it was written."""

    name: str
    base: BaseInfo
    rows: list[RoundResult]
    seconds: float
    retrain_epochs: int
    tolerance: float
    out: Path
    config: dict = {}

    def to_dict(self) -> dict:
        """Plain data, as compare.json holds it."""
        return self.model_dump(mode="json", include={"name", "base", "rows", "seconds", "config"})


def compare_config(cfg: RunConfig, methods: list[str] | None = None, reductions: list[float] | None = None) -> CompareConfig:
    """cfg.compare with `methods` / `reductions` replaced (None: the config's); a bad name or
    value is one ConfigError naming the field, before any work."""
    try:
        return CompareConfig(
            methods=methods if methods is not None else cfg.compare.methods,
            reductions=reductions if reductions is not None else cfg.compare.reductions,
            postprocess=cfg.compare.postprocess, target=cfg.compare.target,
        )
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "compare")) from None


def plan_points(cc: CompareConfig) -> list[ComparePoint]:
    """Every point, in order: per method, its plain variant first, then each reduction."""
    variants = VARIANTS[cc.postprocess]
    keys = [(m, v, r) for m in cc.methods for v in variants for r in cc.reductions]
    return [ComparePoint(method=m, reduction=r, shared=v, target=cc.target, label=f"[{i}/{len(keys)}]")
            for i, (m, v, r) in enumerate(keys, 1)]


def compare_points(cc: CompareConfig, run: Callable[[ComparePoint], RoundResult]) -> Iterator[tuple[ComparePoint, RoundResult]]:
    """The comparison loop: each point of `cc` through `run` (here, or as a task), with its row."""
    for point in plan_points(cc):
        yield point, run(point)


def _point_dir(out: Path, point: ComparePoint) -> Path:
    sub = out if point.target == "flops" else out / point.target
    return sub / f"{point.method}{'+pp' if point.shared else ''}_r{point.reduction:g}"


def run_point(setup: Setup, point: ComparePoint, *, progress: bool = True) -> RoundResult:
    """One comparison point: prune the base model, retrain, evaluate (a finished point is reused).

    The model starts from the base weights (the same for every method). A failure comes
    back as a row with its `error`, not raised.
    """
    cfg = setup.cfg
    pc = cfg.prune.model_copy(update={"method": point.method, "target": point.target,
                                      "bn_recalibration": point.shared, "reconstruct": point.shared})
    keep = round(1.0 - point.reduction, 10)
    spec = RoundSpec(prune=pc, keep_ratio=keep, chain=(keep,), seed=cfg.seed,
                     out=_point_dir(setup.run_dir / "compare", point), label=point.label)
    try:
        row = run_round(setup, spec, progress=progress)
    except Exception as e:  # noqa: BLE001 - one failing point must not end the comparison
        row = RoundResult.failed(point.method, point.target, keep, e)
        log.error("%s at -%.0f%% %s failed: %s", point.title, 100 * point.reduction, point.target, row.error)
    return row.model_copy(update={"reduction": point.reduction, "postprocess": point.postprocess})


def _title(r: RoundResult) -> str:
    return r.method + (" + BN/refit" if r.postprocess == "shared" else "")


def summary_table(result: CompareResult) -> Table:
    """The comparison as a rich table: one row per point, the unpruned model first."""
    t = Table(title=f"compare {result.name}: one-shot FLOP reduction, then {result.retrain_epochs} epochs of retraining")
    m = result.base.metric
    for col in ("method", "FLOPs removed (target)", "params removed", f"{m} before retrain", f"{m} after", "change",
                "time"):
        t.add_column(col, justify="left" if col == "method" else "right")
    fmt = (lambda v: f"{v:.2f}%") if m == "acc" else (lambda v: f"{v:.4g}")  # noqa: E731
    t.add_row("unpruned", "0%", "0%", "", fmt(score_of(result.base)), "", "", style="dim")
    for r in result.rows:
        goal = f"({100 * (r.reduction or 0):.0f}%)"
        if not r.ok:
            t.add_row(_title(r), goal, "", "", Text("failed", style="red"), "", "")
            continue
        t.add_row(
            _title(r),
            f"{r.flops_removed_pct:.1f}%" + (f" {goal}" if r.target == "flops" else ""),
            f"{r.params_removed_pct:.1f}%" + (f" {goal}" if r.target == "params" else ""),
            fmt(score_before_retrain(r)),
            fmt(score_of(r)),
            Text(f"{change_of(r):+.4g}", style="green" if change_of(r) >= -result.tolerance else "red"),
            f"{r.seconds:.0f}s",
        )
    return t


def _plot(rows: list[RoundResult], base_acc: float, name: str, path: Path, metric: str = "acc") -> Path:
    fig, ax = new_axes()
    markers = "osD^v<>PX*"
    methods = list(dict.fromkeys(_title(r) for r in rows))
    for i, m in enumerate(methods):
        pts = sorted((r.flops_removed_pct, score_of(r)) for r in rows if _title(r) == m and r.ok)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=m,
                    ls="--" if "BN/refit" in m else "-")
    ax.axhline(base_acc, color="black", ls="--", lw=1, label=f"unpruned {base_acc:.4g}")
    ax.set_xlabel("FLOPs removed (%)")
    ax.set_ylabel("test accuracy after retraining (%)" if metric == "acc" else f"test {metric} after retraining")
    ax.set_title(f"{name}: methods compared")
    return save_figure(fig, ax, path)


def _csv_row(r: RoundResult) -> dict:
    d = r.model_dump()
    d["target_flops_removed_pct"] = 100.0 * r.reduction if r.target == "flops" and r.reduction is not None else None
    return {k: d.get(k) for k in CSV_FIELDS}


def save_compare(result: CompareResult) -> dict[str, Path]:
    """compare.json, compare.csv and compare.png in result.out; returns their paths."""
    out = result.out
    paths = {"json": out / "compare.json", "csv": out / "compare.csv", "png": out / "compare.png"}
    write_json(paths["json"], result.to_dict())
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(_csv_row(r) for r in result.rows)
    _plot(result.rows, score_of(result.base), result.name, paths["png"], result.base.metric)
    return paths


def run_compare(
    cfg: RunConfig,
    methods: list[str] | None = None,
    reductions: list[float] | None = None,
    *,
    progress: bool = True,
) -> CompareResult:
    """Prune the same base model with each method to each FLOP reduction, retrain, tabulate.

    methods / reductions default to cfg.compare's. One row per (method, variant, reduction),
    failed points included with their `error`. `progress`: retraining progress bars.
    """
    refuse_distributed("pfp compare")
    cc = compare_config(cfg, methods, reductions)
    start = time.perf_counter()
    setup = prepare(cfg, progress=progress)
    result = CompareResult(
        name=cfg.name, base=setup.base_info(), rows=[], seconds=0.0, retrain_epochs=cfg.retrain.epochs,  # type: ignore[union-attr]
        tolerance=cfg.prune.tolerance, out=setup.run_dir / "compare", config=cfg.model_dump(),
    )  # fmt: skip
    result.out.mkdir(parents=True, exist_ok=True)
    for _, row in compare_points(cc, lambda p: run_point(setup, p, progress=progress)):
        result.rows.append(row)
        result.seconds = time.perf_counter() - start
        save_compare(result)  # partial results survive a crash

    paths = save_compare(result)
    failed = sum(1 for r in result.rows if not r.ok)
    log.info("%d/%d points done%s; unpruned %s %.4g, %s FLOPs. Wrote %s, %s, %s (%.0fs in all)",
             len(result.rows) - failed, len(result.rows), f", {failed} failed (see the error column)" if failed else "",
             setup.metric, setup.score, format_count(setup.flops), paths["json"], paths["csv"], paths["png"], result.seconds)
    return result
