"""Calibrate a latency table on the whole model: staircase tops in context, and the share realized.

A block timed on its own is a graph of its own. A runtime lays it out and fuses it unlike the
same layers inside the model: ONNX Runtime on x86 runs a chain of convolutions in a blocked
layout (NCHWc) and pays a reorder wherever a width breaks the chain, so a width that is cheap
alone can make the model slower than at full width (ResNet20 at batch 32 with every group one
channel short ran 2.2x slower). Two measurements of the whole model correct the blocks:

- **In context** (`time_in_context`): the model with one group at each of its staircase tops
  and every other group whole. A level the model runs slower than its block says is raised
  (`BlockLatency.in_context`), so a top that breaks the layout stops being a candidate. Groups
  go widest latency range first, within a time budget.
- **Uniform** (`calibrate`): the model pruned uniformly at a few widths, predicted by the table
  and measured; `pfp.latency_model.realized_share` turns the points into the share of the
  summed block savings the model realizes, which scales every prediction.

Timing is the caller's: `time_ratio(pruned_model, tag)` returns pruned / unpruned latency timed
side by side on the target backend.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn

from pfp.groups import PruningGraph
from pfp.latency_model import BlockLatency, CalibrationPoint, LatencyModel
from pfp.errors import first_line

log = logging.getLogger(__name__)

TimeRatio = Callable[[nn.Module, str], float]


def pruned_copy(model: nn.Module, example_input: torch.Tensor, counts: dict[str, int],
                ignore_layers: Sequence[str] = ()) -> nn.Module:
    """A copy of `model` with the first counts[group] channels of each named group kept (the
    others whole): weights do not change the work, so which channels stay does not matter."""
    pruned = copy.deepcopy(model).cpu().eval()
    graph = PruningGraph(pruned, example_input[:1].cpu(), list(ignore_layers))
    graph.prune({g.gid: torch.arange(counts[g.name]) for g in graph.groups if counts.get(g.name, g.size) < g.size})
    return pruned


def uniform_counts(table: LatencyModel, width: float) -> dict[str, int]:
    """Every group of `table` kept at `width` of its channels, moved up its staircase as allocations are."""
    return {n: table.round_up(n, max(1, round(width * b.size))) for n, b in table.blocks.items()}


def context_counts(block: BlockLatency) -> list[int]:
    """The counts worth timing in context: the block's staircase tops below its full size."""
    return [c for c in block.staircase_counts() if c < block.size]


def time_in_context(table: LatencyModel, model: nn.Module, example_input: torch.Tensor, time_ratio: TimeRatio,
                    budget_s: float, ignore_layers: Sequence[str] = (), known: dict[str, dict[int, float]] | None = None,
                    progress: Callable[[str], None] | None = None) -> dict[str, dict[int, float]]:
    """For each group (widest latency range first) and each of its staircase tops, the measured
    ratio of the model with that group at the top to the unpruned model.

    Groups in `known` (read from a cache) are not timed again. After the first group timed here,
    no group starts once `budget_s` seconds have passed; the groups left keep their blocks as
    measured alone. A group the model cannot run pruned alone is skipped with a warning.
    """
    ratios = dict(known or {})
    order = sorted(table.blocks, key=lambda n: table.blocks[n].at(table.blocks[n].size) - table.blocks[n].at(1),
                   reverse=True)
    start, timed, left = time.perf_counter(), 0, []
    for name in order:
        if name in ratios:
            continue
        if timed and time.perf_counter() - start > budget_s:
            left.append(name)
            continue
        timed += 1
        try:
            ratios[name] = {c: time_ratio(pruned_copy(model, example_input, {name: c}, ignore_layers), f"ctx_{c}")
                            for c in context_counts(table.blocks[name])}
        except Exception as e:  # noqa: BLE001 - a group the model cannot run without (a hard-coded width)
            first = first_line(e)
            log.warning("latency table: group %s not timed in context (%s); it keeps its block as measured alone",
                        name, first)
            continue
        if progress:
            progress(f"in context: {name} at " + ", ".join(f"{c}: {r:.3f}" for c, r in ratios[name].items()))
    if left:
        log.info("latency table: %d of %d groups not timed in context within %.0f s (%s...); they keep their "
                 "blocks as measured alone", len(left), len(order), budget_s, left[0])
    return ratios


def apply_context(table: LatencyModel, ratios: dict[str, dict[int, float]]) -> LatencyModel:
    """`table` with each group timed in context raised where the model measured it slower."""
    blocks = dict(table.blocks)
    for name, measured in ratios.items():
        if name in blocks and measured:
            blocks[name] = blocks[name].in_context({c: (r - 1) * table.full_ms for c, r in measured.items()})
    return table.model_copy(update={"blocks": blocks, "in_context": sorted(n for n in ratios if n in blocks)})


def calibrate(table: LatencyModel, model: nn.Module, example_input: torch.Tensor, widths: Sequence[float],
              time_ratio: TimeRatio, ignore_layers: Sequence[str] = (),
              progress: Callable[[str], None] | None = None) -> list[CalibrationPoint]:
    """`model` pruned uniformly at each width, predicted by `table` (realized 1) and measured."""
    raw = table.model_copy(update={"realized": 1.0, "calibration": []})
    points = []
    for i, width in enumerate(widths):
        counts = uniform_counts(raw, width)
        ratio = time_ratio(pruned_copy(model, example_input, counts, ignore_layers), f"calibration_{i}")
        points.append(CalibrationPoint(width=width, predicted_ratio=raw.predict(counts) / raw.full_ms,
                                       measured_ratio=ratio))
        if progress:
            progress(f"calibration: every group at {width:.0%}: predicted {points[-1].predicted_ratio:.3g} of the "
                     f"latency, measured {ratio:.3g}")
    return points
