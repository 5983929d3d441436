"""Per-layer latency tables as data: predicted latency of a pruning plan, and staircase counts.

A table holds, for each channel group, the latency of its block (producer, norm, activation
and the consumers whose width changes) measured at some channel counts on one backend, plus
the whole model's latency at full width. The prediction for kept counts k_g is

    full_ms + realized * sum_g (block_g(k_g) - block_g(size_g))

so whatever a block's measurement adds around the group (its input, the layers shared with
other groups) cancels. A block timed on its own is a graph of its own: a runtime lays it out
and fuses it unlike the same layers inside the model (ONNX Runtime's blocked layouts, for one),
so the blocks' savings are not all realized by the whole model. Two measurements of the whole
model correct them when the table is built (export.latency_calibration): each group's
staircase tops timed in the model (`BlockLatency.in_context` raises a level the model runs
slower), and `realized`, the share of the savings the model realizes when pruned uniformly
(`CalibrationPoint`), which scales every saving alike: it moves the predicted total, not the
ranking of the cuts. A layer whose input belongs to one group and whose output to another
(in a chain of convolutions, every layer but the first) is in both groups' blocks: each block
saw it shrink along one side only, and a convolution's work is the product of its two widths,
so the sum counts its saving twice where both shrink. Each such `LayerPair` adds back the
product term s_in * s_out / layer_ms, with s_in and s_out the layer's share of each block's
saving (its share of the block's FLOPs) and layer_ms its estimated full latency: the layer at
(a, b) costs layer_ms * (1 + s_in/layer_ms) * (1 + s_out/layer_ms), not layer_ms + s_in + s_out. Between measured counts the block latency is interpolated on its
non-decreasing envelope, and counts whose latencies differ by less than `step_tol` form one
level: a staircase. Within a level the latency is flat, so keeping the largest count of the
level costs nothing: `staircase_counts` are the candidate counts, and `round_up` moves a count
to the largest one at the same predicted latency.

Measuring (export, backends, the harness) lives in export.latency_table; this module is pure
data so that `pfp.prune` can allocate on a table without importing `export`.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

TABLE_FORMAT = "pfp-latency-table/1"


class BlockLatency(BaseModel):
    """One group's block: measured channel counts (ascending) and their latency in ms."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=1, description="the group's full channel count")
    counts: list[int] = Field(min_length=1)
    ms: list[float] = Field(min_length=1)
    step_tol: float = Field(0.03, ge=0, lt=1, description="relative latency difference that starts a new level")

    @model_validator(mode="after")
    def _consistent(self) -> "BlockLatency":
        if len(self.counts) != len(self.ms):
            raise ValueError(f"{len(self.counts)} counts but {len(self.ms)} latencies")
        if any(b <= a for a, b in zip(self.counts, self.counts[1:])):
            raise ValueError("counts must be strictly increasing")
        if self.counts[0] < 1 or self.counts[-1] != self.size:
            raise ValueError(f"counts must lie in 1..{self.size} and end at the full size {self.size}")
        if any(not np.isfinite(v) or v < 0 for v in self.ms):
            raise ValueError("latencies must be finite and non-negative")
        return self

    @cached_property
    def levels(self) -> list[int]:
        """Level index of each measured count (0 the fastest)."""
        env = self.envelope_raw
        levels, base = [0], env[0]
        for v in env[1:]:
            if v > base * (1 + self.step_tol) + 1e-12:
                levels.append(levels[-1] + 1)
                base = v
            else:
                levels.append(levels[-1])
        return levels

    @cached_property
    def envelope_raw(self) -> np.ndarray:
        # a count slower than a larger one could run as that larger one (zero-padded), so
        # latency is taken non-decreasing in the count
        a = np.asarray(self.ms, dtype=np.float64)
        return np.minimum.accumulate(a[::-1])[::-1]

    @cached_property
    def envelope(self) -> np.ndarray:
        """Measured latencies made non-decreasing and flat within each level (the level's median)."""
        env = self.envelope_raw.copy()
        lv = np.asarray(self.levels)
        for level in set(self.levels):
            env[lv == level] = float(np.median(env[lv == level]))
        return np.maximum.accumulate(env)

    @cached_property
    def _dense(self) -> np.ndarray:
        """Predicted ms for every count 0..size (index = count); 0 channels extrapolates the first step."""
        ks = np.arange(self.size + 1, dtype=np.float64)
        return np.interp(ks, np.asarray(self.counts, dtype=np.float64), self.envelope)

    def at(self, k: int) -> float:
        """Predicted latency with k channels kept (clamped to 0..size)."""
        return float(self._dense[max(0, min(int(k), self.size))])

    def scaled(self, factor: float) -> "BlockLatency":
        """The same block with every latency multiplied by `factor` (levels are relative, so they stay)."""
        # a new instance, not model_copy: that would carry the cached envelope along
        return BlockLatency(**{**self.model_dump(), "ms": [v * factor for v in self.ms]})

    def in_context(self, deltas_ms: dict[int, float]) -> "BlockLatency":
        """The block with each level raised to what the whole model measured at its top, never lowered.

        deltas_ms holds, for some level tops c, what the whole model gained (negative: saved)
        with this group at c and every other group whole. Where the model saves less than the
        block alone says (a layout break the lone block does not pay), the level's counts rise
        with their top; a level the model runs no faster than a wider one then merges into it
        (the envelope) and stops being a candidate. A measurement that promises more than the
        block is not taken: one noisy low reading among dozens would be the allocator's pick.
        """
        top_of: dict[int, int] = {}
        lv = self.levels
        for i in reversed(range(len(self.counts))):
            top_of[i] = self.counts[i] if i + 1 == len(lv) or lv[i + 1] != lv[i] else top_of[i + 1]
        full = self.ms[-1]
        shift = {c: max(0.0, full + d - self.envelope_raw[self.counts.index(c)]) for c, d in deltas_ms.items()
                 if c in self.counts and c < self.size}
        ms = [v + shift.get(top_of[i], 0.0) for i, v in enumerate(self.ms)]
        return BlockLatency(size=self.size, counts=list(self.counts), ms=ms, step_tol=self.step_tol)

    def staircase_counts(self) -> list[int]:
        """For each latency level, the largest count at that level (ascending)."""
        lv = self.levels
        return [c for i, c in enumerate(self.counts) if i + 1 == len(lv) or lv[i + 1] != lv[i]]

    def round_up(self, k: int) -> int:
        """The largest count whose predicted latency is no more than that of k."""
        k = max(0, min(int(k), self.size))
        limit = self._dense[k] * (1 + 1e-9) + 1e-12
        above = np.nonzero(self._dense[k:] <= limit)[0]
        return int(k + above[-1]) if above.size else k


class LayerPair(BaseModel):
    """A layer timed in two blocks: its input width is `in_group`'s, its output width `out_group`'s."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: str
    in_group: str
    in_share: float = Field(ge=0, le=1, description="the layer's share of in_group's block FLOPs")
    out_group: str
    out_share: float = Field(ge=0, le=1, description="the layer's share of out_group's block FLOPs")


class CalibrationPoint(BaseModel):
    """The whole model pruned uniformly, predicted by the blocks alone and measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: float = Field(gt=0, le=1, description="share of every group's channels kept")
    predicted_ratio: float = Field(gt=0, description="the blocks' prediction (realized 1) / full_ms")
    measured_ratio: float = Field(gt=0, description="pruned p50 / unpruned p50, timed side by side")


def realized_share(points: list[CalibrationPoint], lo: float = 0.2, hi: float = 1.5) -> float:
    """Least-squares share of the predicted savings that the measurements realized, clamped to [lo, hi].

    Points whose predicted saving is under 2% say nothing about a share (noise would decide it).
    """
    useful = [(1 - p.predicted_ratio, 1 - p.measured_ratio) for p in points if p.predicted_ratio < 0.98]
    if not useful:
        return 1.0
    share = sum(s * m for s, m in useful) / sum(s * s for s, _ in useful)
    return float(min(max(share, lo), hi))


class LatencyModel(BaseModel):
    """A model's latency table on one backend: blocks by group name, and the full-width total."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = TABLE_FORMAT
    backend: str
    precision: str = "fp32"
    batch: int = Field(1, ge=1)
    threads: int | None = None
    machine: dict = Field(default_factory=dict, description="the machine key the table was measured on")
    full_ms: float = Field(gt=0, description="the whole unpruned model, measured")
    blocks: dict[str, BlockLatency] = Field(default_factory=dict)
    pairs: list[LayerPair] = Field(default_factory=list, description="layers shared by two blocks")
    build_seconds: float = 0.0
    cached_blocks: int = Field(0, ge=0, description="blocks read from the cache instead of measured")
    load_factor: float = Field(1.0, gt=0, description="cached blocks were multiplied by this to match the "
                                                      "machine's speed when full_ms was measured")
    realized: float = Field(1.0, gt=0, description="share of the blocks' summed savings the whole model realizes "
                                                   "(from `calibration`; 1: the blocks' sum as it is)")
    calibration: list[CalibrationPoint] = Field(default_factory=list, description="uniform prunes of the whole "
                                                "model timed to set `realized`")
    in_context: list[str] = Field(default_factory=list, description="groups whose staircase tops were timed in the "
                                  "whole model (export.latency_calibration)")

    def block_delta(self, name: str, k: int) -> float:
        """ms the model gains (negative: saves) with k channels kept in group `name`."""
        b = self.blocks[name]
        return b.at(k) - b.at(b.size)

    def predict(self, counts: dict[str, int]) -> float:
        """Predicted latency in ms with counts[name] channels kept; groups not named stay whole."""
        unknown = [n for n in counts if n not in self.blocks]
        if unknown:
            raise KeyError(f"latency table has no block for group {unknown[0]!r}")
        deltas = {n: self.block_delta(n, k) for n, k in counts.items()}
        saving = sum(deltas.values()) + sum(self._interaction(p, deltas) for p in self.pairs)
        return self.full_ms + self.realized * saving

    def _interaction(self, pair: LayerPair, deltas: dict[str, float]) -> float:
        """ms to add back for `pair`'s layer, counted as saved in both of its blocks."""
        d_in, d_out = deltas.get(pair.in_group, 0.0), deltas.get(pair.out_group, 0.0)
        if d_in >= 0 or d_out >= 0:
            return 0.0
        a, b = self.blocks[pair.in_group], self.blocks[pair.out_group]
        # the layer's full latency, estimated from each block by its FLOPs share
        layer_ms = 0.5 * (a.at(a.size) * pair.in_share + b.at(b.size) * pair.out_share)
        if layer_ms <= 0:
            return 0.0
        s_in = max(d_in * pair.in_share, -layer_ms)
        s_out = max(d_out * pair.out_share, -layer_ms)
        return s_in * s_out / layer_ms

    def staircase_counts(self, name: str) -> list[int]:
        """Candidate counts of group `name`: the largest count at each latency level."""
        return self.blocks[name].staircase_counts()

    def round_up(self, name: str, k: int) -> int:
        """The largest count of group `name` at no more predicted latency than k."""
        return self.blocks[name].round_up(k)

    def missing(self, names: list[str]) -> list[str]:
        """Which of `names` the table has no block for."""
        return [n for n in names if n not in self.blocks]
