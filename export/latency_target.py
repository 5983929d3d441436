"""Prune to a measured latency target: allocate on the latency table, then measure and correct.

The table predicts; the backend decides. After each prune the pruned and the unpruned model
are timed side by side on the target backend (interleaved rounds, so drift of the machine
hits both alike). A measured ratio more than `tolerance` off the target corrects the keep
ratio given to the allocator by target / measured, and the model is pruned again from the
unpruned one, at most `tries` times. The report lists target, prediction and measurement
of every try and ends in one line: met, or not met with the best ratio reached.

Where the table's first prediction misses the measurement by more than `flops_fallback`, it
does not see this backend's costs (per-operator overheads, layout changes at batch 1), and
its budgets may cut where the time does not go: the target is chased again with the method's
FLOPs budgets, and of the tries that met it, the one whose outputs stay closest to the
unpruned model's on held-out points is kept.
"""
from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from export.latency import SIDE_BY_SIDE, LatencySettings, time_side_by_side
from export.latency_table import LatencyTableError, build_latency_table, check_target, load_runner
from pfp.config import PruneConfig
from pfp.latency_model import LatencyModel
from pfp.probe import divergence as default_divergence
from pfp.prune import PruneError, PruneReport, prune

log = logging.getLogger(__name__)

class LatencyTry(BaseModel):
    """One prune-export-measure round."""

    model_config = ConfigDict(extra="forbid")

    keep_ratio: float = Field(description="the fraction asked of the allocator this try (of latency, or of "
                              "FLOPs for cost_model flops)")
    cost_model: Literal["table", "flops"] = Field("table", description="what the budgets were allocated on")
    predicted_ratio: float | None = Field(description="the table's prediction for the pruned model / its full "
                                          "model; None for FLOPs budgets")
    measured_ratio: float = Field(description="pruned p50 / unpruned p50, timed side by side")
    pruned_ms: float
    unpruned_ms: float
    flops_ratio: float
    divergence: float | None = Field(None, description="outputs against the unpruned model's on held-out "
                                     "points (tries that met the target)")


class LatencyTargetReport(BaseModel):
    """Target against measured, per try, and the verdict in one line."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    batch: int
    precision: str
    threads: int | None
    target: float
    tolerance: float
    tries: list[LatencyTry] = Field(default_factory=list)
    met: bool = False
    best_try: int | None = None
    best_ratio: float | None = None
    table_seconds: float = 0.0
    table_cached_blocks: int = 0
    table_load_factor: float = 1.0  # cached blocks rescaled by this to the machine's speed at this build
    table_realized: float = 1.0  # share of the blocks' predicted savings the whole model realized (calibration)
    message: str = ""


def next_ask(tries: Sequence[LatencyTry], target: float) -> float:
    """The keep ratio to ask the allocator for next, from what the tries asked and measured.

    After one try: scaled by target / measured (the table was off by that factor). After
    two or more: the secant through the last two tries that asked different ratios, when
    the measured ratio rose with the asked one; a table that is off by more than a factor
    (fixed costs it does not see) is then corrected in one step instead of creeping.
    """
    last = tries[-1]
    proportional = last.keep_ratio * target / last.measured_ratio
    prev = next((t for t in reversed(tries[:-1]) if abs(t.keep_ratio - last.keep_ratio) > 1e-6), None)
    if prev is None:
        return proportional
    slope = (last.measured_ratio - prev.measured_ratio) / (last.keep_ratio - prev.keep_ratio)
    if slope <= 0.05:  # noise or a floor: the secant would leap; stay with the factor
        ask = proportional
    else:
        secant = last.keep_ratio + (target - last.measured_ratio) / slope
        # never further than a factor of 2 from the proportional step
        ask = float(min(max(secant, proportional / 2), proportional * 2))
    return _inside_bracket(tries, target, ask)


def _inside_bracket(tries: Sequence[LatencyTry], target: float, ask: float) -> float:
    """`ask`, or the middle of the bracket when it leaves the tries that measured too fast and too slow.

    Staircases make the measured ratio jump between asks; a step that overshoots a try known
    to be on the other side of the target would oscillate, so it bisects instead.
    """
    fast = [t.keep_ratio for t in tries if t.measured_ratio < target]  # asked this much, came out faster
    slow = [t.keep_ratio for t in tries if t.measured_ratio > target]
    lo, hi = (max(fast) if fast else None), (min(slow) if slow else None)
    if lo is not None and hi is not None and lo < hi and not lo < ask < hi:
        return (lo + hi) / 2
    return ask


def prune_to_latency(model: nn.Module, calib_loader, cfg: PruneConfig, keep_ratio: float, *,
                     example_input: torch.Tensor, table: LatencyModel | None = None,
                     postprocess_loader=None, holdout_loader=None, device: str = "cpu", seed: int = 0,
                     settings: LatencySettings | None = None, rounds: int = 3, cache_dir: str | Path | None = None,
                     progress: Callable[[str], None] | None = None, reference_model: nn.Module | None = None,
                     reference: tuple[int, int] | None = None, divergence=None,
                     ) -> tuple[nn.Module, PruneReport, LatencyTargetReport]:
    """Prune a copy of `model` to keep_ratio of its latency on cfg.latency's backend, measured.

    `table` is the model's latency table (built here when None, through the cache). Each try
    after the first asks for `next_ask` of the ones before. When the table's first prediction
    misses the measurement by more than cfg.latency.flops_fallback, the target is chased a
    second time with FLOPs budgets; of the tries that met the target, the one whose outputs
    on held-out points stay closest to the unpruned model's is returned, else the closest to
    the target. Returns that pruned model, its PruneReport and the report of every try. A
    target below the table's floor (what the protected layers and min_channels allow) is tried
    at the floor and reported not met; PruneError when not even the floor can be pruned to;
    LatencyTableError for a backend or batch that cannot run.
    """
    if cfg.target != "latency" or cfg.latency is None:
        raise LatencyTableError(f"prune.target is {cfg.target!r}: prune_to_latency needs target latency")
    spec = cfg.latency
    backend = check_target(spec)
    settings = settings or SIDE_BY_SIDE.model_copy(update={"threads": spec.threads})
    # A cascade prunes an already pruned model; the table and the timing stay those of the
    # unpruned network (reference_model), so keep_ratio is of its latency.
    reference_model = model if reference_model is None else reference_model
    if table is None:
        table = build_latency_table(reference_model, example_input, spec, ignore_layers=cfg.ignore_layers,
                                    cache_dir=cache_dir, progress=progress)
    report = LatencyTargetReport(backend=spec.backend, batch=spec.batch, precision=spec.precision,
                                 threads=spec.threads, target=keep_ratio, tolerance=spec.tolerance,
                                 table_seconds=table.build_seconds, table_cached_blocks=table.cached_blocks,
                                 table_load_factor=table.load_factor, table_realized=table.realized)
    input_shape = list(example_input.shape[1:])
    closeness = _OutputCloseness(reference_model, holdout_loader or calib_loader, device, divergence)
    picked = _Pick(keep_ratio, spec.tolerance)
    with tempfile.TemporaryDirectory(prefix="pfp-latency-target-") as tmp:
        workdir = Path(tmp)
        unpruned = load_runner(backend, copy.deepcopy(reference_model).cpu(), input_shape, spec, workdir, "unpruned")
        try:
            def attempt(cost_model: str, ratio: float) -> tuple[nn.Module, PruneReport]:
                run_cfg = cfg if cost_model == "table" else cfg.model_copy(update={"target": "flops"})
                pruned, prep, _ = prune(model, calib_loader, run_cfg, ratio, example_input=example_input,
                                        postprocess_loader=postprocess_loader, holdout_loader=holdout_loader,
                                        device=device, seed=seed, latency_model=table if cost_model == "table" else None,
                                        reference=reference, divergence=divergence)
                return pruned, prep

            def time_ratio(pruned: nn.Module, tag: str) -> tuple[float, float]:
                runner = load_runner(backend, copy.deepcopy(pruned).cpu(), input_shape, spec, workdir, tag)
                try:
                    p_ms, u_ms = time_side_by_side([runner, unpruned], spec.batch, spec.threads, settings, rounds)
                finally:
                    runner.close()
                return p_ms, u_ms

            chase = _Chase(attempt, time_ratio, report, picked, closeness, keep_ratio, spec.tries, progress, table)
            stop = chase.run("table")
            first = report.tries[0]
            miss = abs(first.measured_ratio / first.predicted_ratio - 1)
            if spec.flops_fallback is not None and miss > spec.flops_fallback:
                log.info("the latency table predicted %.3g and %.3g was measured (%.0f%% off): chasing the target "
                         "with FLOPs budgets too", first.predicted_ratio, first.measured_ratio, 100 * miss)
                stop = chase.run("flops") or stop
        finally:
            unpruned.close()
    pruned, prep = picked.model
    report.best_try = picked.index
    b = report.tries[report.best_try]
    prep.measured_latency_ratio = b.measured_ratio
    report.best_ratio = b.measured_ratio
    report.met = picked.met(b)
    if b.cost_model == "flops":
        why = "met the target with the outputs closest to the unpruned model's" if report.met \
            else "was measured closest to the target"
        prep.allocation_notes.append(f"budgets on FLOPs (keep {b.keep_ratio:.3g} of them): the latency table's first "
                                     f"prediction missed the measured ratio by {miss:.0%}; of the tries on both, this one {why}")
    where = f"{spec.backend} batch {spec.batch} {spec.precision}"
    how = "" if b.cost_model == "table" else " with FLOPs budgets (the table missed this backend's costs)"
    if report.met:
        predicted = f"predicted {b.predicted_ratio:.3g}, " if b.cost_model == "table" else ""
        report.message = (f"latency target {keep_ratio:.3g} met on {where}: measured {b.measured_ratio:.3g} "
                          f"of the unpruned model ({predicted}try {report.best_try + 1}){how}")
    else:
        report.message = (f"latency target {keep_ratio:.3g} not met on {where} within {spec.tolerance:.0%}: best "
                          f"measured ratio {b.measured_ratio:.3g} after {len(report.tries)} tries{stop}")
    log.info(report.message)
    return pruned, prep, report


class _OutputCloseness:
    """Divergence of a pruned model's outputs from the unpruned model's, on a few held-out batches."""

    def __init__(self, reference: nn.Module, loader, device: str, divergence=None, batches: int = 4) -> None:
        self.divergence = divergence or default_divergence
        self.device = device
        self.xs = [b[0] for _, b in zip(range(batches), loader)]  # (inputs, targets), as the probe reads them
        self._y: list[torch.Tensor] | None = None
        self.reference = reference

    @torch.no_grad()
    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        was = model.training
        model.eval()
        try:
            return [model(x.to(self.device)).float().cpu() for x in self.xs]
        finally:
            model.train(was)

    def __call__(self, pruned: nn.Module) -> float:
        if self._y is None:
            self._y = self._outputs(self.reference)
        # a KL of nearly equal outputs can round below zero
        return max(0.0, float(self.divergence(torch.cat(self._y), torch.cat(self._outputs(pruned)))))


class _Pick:
    """The try to return: the closest outputs among those that met the target, else the closest ratio."""

    def __init__(self, target: float, tolerance: float) -> None:
        self.target, self.tolerance = target, tolerance
        self.index: int | None = None
        self.model: tuple[nn.Module, PruneReport] | None = None
        self._key: tuple[int, float] | None = None

    def met(self, t: LatencyTry) -> bool:
        return abs(t.measured_ratio / self.target - 1) <= self.tolerance

    def offer(self, i: int, t: LatencyTry, model: tuple[nn.Module, PruneReport]) -> None:
        # met tries rank first (by divergence), then the others by their distance to the target
        key = (0, t.divergence if t.divergence is not None else float("inf")) if self.met(t) \
            else (1, abs(t.measured_ratio - self.target))
        if self._key is None or key < self._key:
            self.index, self.model, self._key = i, model, key


class _Chase:
    """Up to `tries` prune-export-measure rounds on one cost model, each correcting the ask."""

    def __init__(self, attempt, time_ratio, report: LatencyTargetReport, picked: _Pick, closeness: _OutputCloseness,
                 target: float, tries: int, progress, table: LatencyModel) -> None:
        self.attempt, self.time_ratio, self.report, self.picked = attempt, time_ratio, report, picked
        self.closeness, self.target, self.tries, self.progress, self.table = closeness, target, tries, progress, table

    def run(self, cost_model: str) -> str:
        """Chase the target on `cost_model` ("table" or "flops"); returns why it stopped early ("" if not)."""
        mine: list[LatencyTry] = []
        asked, floor_tried = self.target, False
        for _ in range(self.tries):
            try:
                pruned, prep = self.attempt(cost_model, asked)
            except PruneError as e:
                if e.floor is None or floor_tried or e.floor * 1.001 >= 1:
                    if not self.report.tries:
                        raise
                    return f" (the corrected target {asked:.3g} cannot be pruned to: {e})"
                # the floor is the cost model's prediction too: measure the most it can prune instead
                log.info("corrected target %.3g is below the %s floor %.3g: trying the floor", asked, cost_model, e.floor)
                asked, floor_tried = e.floor * 1.001, True
                try:
                    pruned, prep = self.attempt(cost_model, asked)
                except PruneError as again:
                    return f" (the {cost_model} floor {asked:.3g} cannot be pruned to: {again})"
            i = len(self.report.tries)
            p_ms, u_ms = self.time_ratio(pruned, f"pruned{i}")
            t = LatencyTry(keep_ratio=asked, cost_model=cost_model, measured_ratio=p_ms / u_ms, pruned_ms=p_ms,
                           unpruned_ms=u_ms, flops_ratio=prep.flops / prep.original_flops,
                           predicted_ratio=prep.latency_ms / self.table.full_ms if cost_model == "table" else None)
            if self.picked.met(t):
                t.divergence = self.closeness(pruned)
            self.report.tries.append(t)
            mine.append(t)
            self.picked.offer(i, t, (pruned, prep))
            if self.progress:
                predicted = f"predicted {t.predicted_ratio:.3g}, " if t.predicted_ratio is not None else ""
                self.progress(f"try {i + 1} ({cost_model}): asked {asked:.3g}, {predicted}"
                              f"measured {t.measured_ratio:.3g} (target {self.target:.3g})")
            if self.picked.met(t):
                return ""
            corrected = next_ask(mine, self.target)
            if corrected >= 1:
                return " (the correction asks for no pruning at all)"
            asked = corrected
        return ""


def prune_round(setup, model: nn.Module, cfg: PruneConfig, keep_ratio: float, *, seed: int,
                divergence=None) -> tuple[nn.Module, PruneReport, LatencyTargetReport]:
    """A cascade round to a latency target (pfp.extensions' "latency_pruner"): `model` pruned
    to keep_ratio of the unpruned base model's latency, measured on cfg.latency's backend."""
    return prune_to_latency(model, setup.calib_loader, cfg, keep_ratio, example_input=setup.example_input,
                            postprocess_loader=setup.postprocess_loader, holdout_loader=setup.holdout_loader,
                            device=str(setup.device), seed=seed, reference_model=setup.model,
                            reference=(setup.params, setup.flops), divergence=divergence,
                            progress=lambda line: log.info(line))
