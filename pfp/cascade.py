"""The prune-and-retrain cascade (spec section 6): one round per keep ratio, then the choice.

Each round (`pfp.rounds.run_round`) prunes the previous round's retrained network to a
keep ratio of the *original* resource and retrains it; `choose` then picks the smallest
network whose test accuracy (or the task's metric, in its direction) stays within the
tolerance of the unpruned one.

Files, under output_dir/<name>/ (besides the base model's, see `pfp.setup`):

    round_<i>/          model.pt (pruned + retrained; meta: row, report, step key), report.json
    results.json        every round's row and the choice
    cascade.png         accuracy against FLOPs kept
    chosen.pt           copy of the chosen round's model (absent when no round qualifies)

A re-run with the same config reuses base.pt and every finished round; an interrupted
training or retraining resumes from its checkpoint.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel
from rich.table import Table
from rich.text import Text

from pfp.config import RunConfig
from pfp.files import write_json
from pfp.plots import plot_accuracy_vs_flops
from pfp.prune import PruneError
from pfp.resources import format_count
from pfp.results import BaseInfo, RoundResult, change_of, score_of
from pfp.rounds import RoundSpec, run_round
from pfp.setup import prepare, refuse_distributed

__all__ = ["CascadeResult", "choose", "plot_cascade", "run_cascade", "summary_table"]

log = logging.getLogger(__name__)


class CascadeResult(BaseModel):
    """A finished cascade: the base model, every round (a failed one last), the choice, the files."""

    name: str
    run_dir: Path
    base: BaseInfo
    rounds: list[RoundResult]
    chosen: int | None  # index into rounds, None when no pruned network is within tolerance
    tolerance: float
    target: str
    results_path: Path
    plot_path: Path | None = None
    chosen_path: Path | None = None
    seconds: float
    config: dict = {}

    @property
    def trained_base(self) -> bool:
        return self.base.trained_now

    @property
    def chosen_row(self) -> RoundResult | None:
        return self.rounds[self.chosen] if self.chosen is not None else None

    def to_dict(self) -> dict:
        """Plain data, as results.json holds it (with the chosen round's row repeated)."""
        d = self.model_dump(mode="json")
        d["trained_base"] = self.trained_base
        d["chosen_row"] = self.chosen_row.model_dump(mode="json") if self.chosen_row else None
        return d


def choose(base_score: float, rows: Sequence[RoundResult], tolerance: float, target: str = "flops", *,
           higher_is_better: bool = True) -> int | None:
    """Index of the smallest network (by the target resource) whose task metric (`score`, else
    `acc`) is within `tolerance` of the unpruned `base_score`, in the metric's direction."""
    sign = 1.0 if higher_is_better else -1.0
    ok = [i for i, r in enumerate(rows)
          if r.ok and score_of(r) is not None and sign * (score_of(r) - base_score) >= -tolerance - 1e-9]  # type: ignore[operator]
    if not ok:
        return None
    def size(r: RoundResult) -> float:  # latency: the measured share of the unpruned latency
        return r.achieved_keep if target == "latency" else getattr(r, target)

    return min(ok, key=lambda i: (size(rows[i]), -sign * score_of(rows[i])))  # type: ignore[operator]


def plot_cascade(result: CascadeResult, path: Path) -> Path | None:
    """Accuracy (or the task's metric) against FLOPs kept for every round, the tolerance line and the choice."""
    base = result.base.score if result.base.score is not None else result.base.acc
    # The plot reads acc fields: give it the task's metric in their place.
    rows = [r.model_copy(update={"acc": score_of(r), "acc_before_retrain": r.score_before_retrain
                                 if r.score_before_retrain is not None else r.acc_before_retrain})
            for r in result.rounds]
    sign = 1.0 if result.base.higher_is_better else -1.0
    return plot_accuracy_vs_flops(result.name, base, rows, sign * result.tolerance, result.chosen, path)  # type: ignore[arg-type]


def summary_table(result: CascadeResult) -> Table:
    """The cascade as a rich table: one row per round, the chosen one marked."""
    t = Table(title=f"cascade {result.name}: prune to a share of the original {result.target}, then retrain")
    b = result.base
    m = b.metric
    for col in ("round", "keep", "params", "FLOPs", f"{m} before retrain", f"{m} after", "change", "time"):
        t.add_column(col, justify="right")
    fmt = (lambda v: f"{v:.2f}%") if m == "acc" else (lambda v: f"{v:.4g}")  # noqa: E731
    t.add_row("base", "100%", format_count(b.params), format_count(b.flops), "", fmt(score_of(b)), "", "")
    for i, r in enumerate(result.rounds):
        mark = " *" if i == result.chosen else ""
        if not r.ok:
            t.add_row(f"{i + 1}", f"{r.keep_ratio:.0%}", "", "", "", Text("failed", style="red"), "", "")
            continue
        keep = f"{r.keep_ratio:.0%}"
        if r.latency_measured_ratio is not None:  # latency: asked, and measured on the backend
            keep += f" (measured {r.latency_measured_ratio:.0%}{'' if r.latency_met else ', missed'})"
        t.add_row(
            f"{i + 1}{mark}",
            keep,
            f"{format_count(r.params)} (-{r.params_removed_pct:.1f}%)",
            f"{format_count(r.flops)} (-{r.flops_removed_pct:.1f}%)",
            fmt(r.score_before_retrain if r.score_before_retrain is not None else r.acc_before_retrain),
            fmt(score_of(r)),
            Text(f"{change_of(r):+.4g}", style="green" if change_of(r) >= -result.tolerance else "red"),
            f"{r.seconds:.0f}s",
            style="bold" if mark else None,
        )
    return t


def run_cascade(cfg: RunConfig, *, progress: bool = True) -> CascadeResult:
    """Spec section 6: prune the last retrained network to each keep ratio, retrain, choose.

    A round pruning cannot reach (PruneError) is recorded with its error and ends the
    cascade. Writes results.json, cascade.png and chosen.pt; `progress`: training progress bars.
    """
    refuse_distributed("pfp run")
    start = time.perf_counter()
    setup = prepare(cfg, progress=progress)
    pc = cfg.prune
    rows: list[RoundResult] = []
    parent: str | None = None
    for i, ratio in enumerate(pc.keep_ratios):
        try:
            row = run_round(setup, RoundSpec.cascade(cfg, i, setup.run_dir), parent, progress=progress)
        except PruneError as e:
            log.error("cannot prune to %.0f%%: %s; stopping the cascade", 100 * ratio, e)
            rows.append(RoundResult.failed(pc.method, pc.target, ratio, e, round=i + 1))
            break
        rows.append(row)
        parent = row.model_path

    chosen = choose(setup.score, rows, pc.tolerance, pc.target, higher_is_better=setup.task.higher_is_better)
    out = setup.run_dir
    result = CascadeResult(
        name=cfg.name, run_dir=out, base=setup.base_info(), rounds=rows, chosen=chosen, tolerance=pc.tolerance,
        target=pc.target, results_path=out / "results.json", seconds=time.perf_counter() - start,
        config=cfg.model_dump(),
    )  # fmt: skip
    chosen_copy = out / "chosen.pt"
    if chosen is not None:
        shutil.copyfile(rows[chosen].model_path, chosen_copy)
        result.chosen_path = chosen_copy
    else:
        chosen_copy.unlink(missing_ok=True)
    result.plot_path = plot_cascade(result, out / "cascade.png")
    write_json(result.results_path, result.to_dict())

    for r in rows:
        if not r.ok:
            log.error("failed: round %d (keep %.0f%%): %s", r.round, 100 * r.keep_ratio, r.error)
    if chosen is not None:
        r = rows[chosen]
        log.info("chosen: round %d (keep %.0f%%): test %s %.4g (change %+.4g vs unpruned %.4g, positive is better), FLOPs -%.1f%%, "
                 "params -%.1f%% -> %s", chosen + 1, 100 * r.keep_ratio, setup.metric, score_of(r), change_of(r),
                 setup.score, r.flops_removed_pct, r.params_removed_pct, chosen_copy)
    else:
        log.warning("no pruned network stays within %g of the unpruned %s %.4g; keep the unpruned model (%s)",
                    pc.tolerance, setup.metric, setup.score, setup.base_path)
    log.info("results: %s, plot: %s (%.0fs in all)", result.results_path, result.plot_path, result.seconds)
    return result
