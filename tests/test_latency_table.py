"""Latency targets: tables as data (interpolation, staircases), the builder on real ONNX Runtime
(cache hit, miss, another machine), pruning to a latency target, closing the loop, bad input.

Timings on a busy machine are noise; no test bounds an absolute time or a measured ratio."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn as nn

from export.latency import LatencySettings
from export.latency_table import (
    GridSettings,
    LatencyTableError,
    block_shapes,
    blocks_and_pairs,
    build_latency_table,
    check_target,
    machine_key,
    measure_block,
)
from export.latency_target import LatencyTry, next_ask, prune_to_latency
from pfp.config import LatencyTargetConfig, PruneConfig
from pfp.latency_model import BlockLatency, LatencyModel, LayerPair
from pfp.prune import PruneError, prune

pytest.importorskip("onnxruntime")

FAST = LatencySettings(warmup=1, warmup_s=0.0, min_iters=3, max_iters=20, min_time_s=0.0, max_time_s=0.05)
GRID = GridSettings(dense_upto=4, coarse_points=4, max_points=6, negligible=0.0)  # few exports; every block timed


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _x(n: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def _calib():
    x = _x(64)
    return [(x, torch.zeros(len(x), dtype=torch.long))]


def _staircase_table(model: nn.Module, step: int = 4, per_step_ms: float = 1.0, rest_ms: float = 2.0) -> LatencyModel:
    """A synthetic table: each block costs per_step_ms for every started `step` channels."""
    blocks = {}
    for name, shape in block_shapes(model, _x()).items():
        counts = list(range(1, shape.size + 1))
        blocks[name] = BlockLatency(size=shape.size, counts=counts, ms=[per_step_ms * math.ceil(k / step) for k in counts])
    full = rest_ms + sum(b.ms[-1] for b in blocks.values())
    return LatencyModel(backend="ort-cpu", full_ms=full, blocks=blocks)


# ----------------------------------------------------------------------------- tables as data

def test_interpolation_and_staircases_on_a_synthetic_table():
    # levels: 1-2 at ~1 ms (2% noise stays inside a level), 4-6 at 2 ms, 8 at 3 ms; 3 and 7 are not measured
    b = BlockLatency(size=8, counts=[1, 2, 4, 6, 8], ms=[1.0, 1.02, 2.0, 2.02, 3.0], step_tol=0.03)
    assert b.levels == [0, 0, 1, 1, 2]
    assert b.staircase_counts() == [2, 6, 8]
    assert b.at(1) == b.at(2)                     # flat within a level
    assert b.at(2) < b.at(3) < b.at(4)            # interpolated across a step
    assert b.at(4) == b.at(6) < b.at(7) < b.at(8)
    assert [b.round_up(k) for k in (1, 2, 3, 4, 5, 6, 7, 8)] == [2, 2, 3, 6, 6, 6, 7, 8]


def test_envelope_ignores_a_count_slower_than_a_larger_one():
    b = BlockLatency(size=4, counts=[1, 2, 3, 4], ms=[1.0, 5.0, 2.0, 2.0])
    assert b.at(2) <= b.at(3)  # 2 channels can run as 3: never predicted slower
    assert b.staircase_counts() == [1, 4]


def test_table_prediction_is_full_latency_plus_block_deltas():
    b = BlockLatency(size=4, counts=[1, 2, 3, 4], ms=[1.0, 1.0, 3.0, 3.0])
    t = LatencyModel(backend="ort-cpu", full_ms=10.0, blocks={"a": b, "b": b})
    assert t.predict({"a": 4, "b": 4}) == pytest.approx(10.0)
    assert t.predict({"a": 2}) == pytest.approx(8.0)
    assert t.predict({"a": 2, "b": 1}) == pytest.approx(6.0)
    with pytest.raises(KeyError, match="'c'"):
        t.predict({"c": 1})
    assert LatencyModel.model_validate_json(t.model_dump_json()).predict({"a": 2}) == pytest.approx(8.0)


def test_a_layer_in_two_blocks_is_not_saved_twice():
    # A chain P -> C -> F: C's input is group a's, its output group b's. Latencies are linear
    # in each width (p, c, f ms at full), so C at (a, b) costs c * a/A * b/B.
    p, c, f, size = 2.0, 6.0, 1.0, 8
    counts = list(range(1, size + 1))
    block_a = BlockLatency(size=size, counts=counts, ms=[(p + c) * k / size for k in counts])
    block_b = BlockLatency(size=size, counts=counts, ms=[(c + f) * k / size for k in counts])
    pair = LayerPair(layer="c", in_group="a", in_share=c / (p + c), out_group="b", out_share=c / (c + f))
    full = 10.0
    t = LatencyModel(backend="ort-cpu", full_ms=full, blocks={"a": block_a, "b": block_b}, pairs=[pair])
    for ka, kb in ((8, 8), (4, 8), (8, 2), (4, 4), (2, 6), (1, 1)):
        truth = full - p - c - f + p * ka / size + c * ka / size * kb / size + f * kb / size
        assert t.predict({"a": ka, "b": kb}) == pytest.approx(truth)
    additive = t.model_copy(update={"pairs": []})
    assert additive.predict({"a": 4, "b": 4}) < t.predict({"a": 4, "b": 4})  # the sum saves C twice
    assert LatencyModel.model_validate_json(t.model_dump_json()) == t


def test_the_builder_finds_the_layers_shared_by_two_blocks():
    shapes, pairs = blocks_and_pairs(TinyNet(), _x())
    assert set(shapes) == {"conv1", "conv2"}
    assert [(q.layer, q.in_group, q.out_group) for q in pairs] == [("conv2", "conv1", "conv2")]
    # conv2 is most of conv1's block (conv1 has 3 inputs, conv2 8) and most of conv2's (the fc is small)
    assert 0.5 < pairs[0].in_share < 1 and 0.5 < pairs[0].out_share < 1


def _try(asked: float, measured: float) -> LatencyTry:
    return LatencyTry(keep_ratio=asked, predicted_ratio=asked, measured_ratio=measured, pruned_ms=measured,
                      unpruned_ms=1.0, flops_ratio=asked)


def test_the_next_ask_scales_first_then_follows_the_secant():
    assert next_ask([_try(0.5, 0.8)], 0.5) == pytest.approx(0.5 * 0.5 / 0.8)
    # measured = 0.4 + 0.6 * asked (fixed costs the table missed): the secant lands on the target
    tries = [_try(0.5, 0.7), _try(0.5 * 0.5 / 0.7, 0.4 + 0.6 * 0.5 * 0.5 / 0.7)]
    assert 0.4 + 0.6 * next_ask(tries, 0.55) == pytest.approx(0.55)
    # a measurement that did not move with the ask: the proportional step, not a leap
    flat = [_try(0.5, 0.7), _try(0.4, 0.7)]
    assert next_ask(flat, 0.5) == pytest.approx(0.4 * 0.5 / 0.7)


def test_the_next_ask_bisects_when_a_staircase_makes_it_overshoot():
    # asked 0.5 came out too slow, 0.35 and 0.42 both too fast on one stair; the proportional step
    # from 0.42 (0.42 * 0.3 / 0.25 = 0.504) would leave that bracket, so it asks the middle
    tries = [_try(0.5, 0.45), _try(0.35, 0.25), _try(0.42, 0.25)]
    assert next_ask(tries, 0.3) == pytest.approx(0.46)
    # a step inside the bracket is kept
    inside = [_try(0.4, 0.33), _try(0.3, 0.27)]
    assert 0.3 < next_ask(inside, 0.3) < 0.4
    assert next_ask(inside, 0.3) == pytest.approx(0.3 + (0.3 - 0.27) / 0.6)


def test_block_table_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match="full size"):
        BlockLatency(size=8, counts=[1, 4], ms=[1.0, 2.0])
    with pytest.raises(ValueError, match="increasing"):
        BlockLatency(size=4, counts=[2, 1, 4], ms=[1.0, 1.0, 2.0])


def test_wide_blocks_refine_between_counts_across_a_step_within_the_budget():
    calls = []

    def time_at(k: int) -> float:
        calls.append(k)
        return 1.0 if k <= 37 else 2.0  # one step, between 37 and 38

    shape = block_shapes(TinyNet(), _x())["conv1"].model_copy(update={"size": 100})
    b = measure_block(shape, time_at, GridSettings(dense_upto=8, coarse_points=5, max_points=20))
    assert len(calls) == len(set(calls)) <= 20
    assert 37 in b.counts and 38 in b.counts  # the step is located to the channel
    assert b.staircase_counts() == [37, 100]


# ----------------------------------------------------------------------------- the builder

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("latency_cache")
    # the blocks alone: the calibration on the whole model is tested in test_latency_calibration.py
    spec = LatencyTargetConfig(backend="ort-cpu", batch=2, threads=1, context_s=0, calibration=[])
    table = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=cache, grid=GRID,
                                block_settings=FAST, model_settings=FAST)
    return table, cache, spec


def test_table_build_on_a_small_conv_net(built):
    table, cache, _ = built
    assert set(table.blocks) == {"conv1", "conv2"}
    for name, size in (("conv1", 8), ("conv2", 12)):
        counts = table.blocks[name].counts
        assert counts[0] == 1 and counts[-1] == size and 4 <= len(counts) <= GRID.max_points
    assert table.full_ms > 0 and all(v > 0 for b in table.blocks.values() for v in b.ms)
    assert table.cached_blocks == 0 and table.build_seconds > 0
    files = sorted(cache.glob("*.json"))
    assert len(files) == 2
    d = json.loads(files[0].read_text())
    assert d["machine"] == machine_key() and d["key"]["backend"] == "ort-cpu" and d["key"]["batch"] == 2


def test_cache_hit_miss_and_another_machine(built, caplog):
    table, cache, spec = built
    again = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=cache, grid=GRID,
                                block_settings=FAST, model_settings=FAST)
    assert again.cached_blocks == 2  # a hit: read, not re-measured, then put in this build's units
    for name, b in again.blocks.items():
        assert b.counts == table.blocks[name].counts
        assert b.ms == pytest.approx([v * again.load_factor for v in table.blocks[name].ms])

    other_batch = build_latency_table(TinyNet().eval(), _x(), spec.model_copy(update={"batch": 1}), cache_dir=cache,
                                      grid=GRID, block_settings=FAST, model_settings=FAST)
    assert other_batch.cached_blocks == 0  # a miss: another batch is another table

    other = _describe_other()
    with caplog.at_level(logging.INFO, logger="export.latency_table"):
        elsewhere = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=cache, grid=GRID,
                                        block_settings=FAST, model_settings=FAST, machine=other)
    assert elsewhere.cached_blocks == 0
    why = [r.getMessage() for r in caplog.records if "another machine" in r.getMessage()]
    assert why and "Other CPU" in why[0] and "not used" in why[0]


def test_cached_blocks_follow_the_machine_load_of_this_build(built, tmp_path, caplog):
    # the cache says the blocks took half their time: measured on a quieter moment of this
    # machine. Against a model timed now, they would be in other units; the build rescales them.
    table, cache, spec = built
    for f in cache.glob("*.json"):
        d = json.loads(f.read_text())
        if d["key"]["batch"] == spec.batch and d["machine"] == machine_key():
            d["block"]["ms"] = [v * 0.5 for v in d["block"]["ms"]]
            (tmp_path / f.name).write_text(json.dumps(d))
    with caplog.at_level(logging.INFO, logger="export.latency_table"):
        t = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=tmp_path, grid=GRID,
                                block_settings=FAST, model_settings=FAST)
    assert t.cached_blocks == 2
    assert t.load_factor > 1.2, t.load_factor  # about 2; the load of a shared machine moves it either way
    assert any("rescaled" in r.getMessage() and "slower" in r.getMessage() for r in caplog.records)
    for name, b in t.blocks.items():
        assert b.ms == pytest.approx([v * 0.5 * t.load_factor for v in table.blocks[name].ms])
        assert b.levels == table.blocks[name].levels  # staircases are relative: scaling keeps them


def test_the_load_factor_is_the_ratio_of_now_to_then(tmp_path, monkeypatch):
    # timings made deterministic (work = parameters, times a load) to check the arithmetic exactly
    import export.latency_table as lt

    load = {"now": 1.0}

    def fake_time(backend, module, input_shape, spec, settings, workdir, tag):
        return load["now"] * (1e-3 + 1e-5 * sum(p.numel() for p in module.parameters()))

    monkeypatch.setattr(lt, "time_module", fake_time)
    spec = LatencyTargetConfig(backend="ort-cpu", batch=2, threads=1, context_s=0, calibration=[])
    quiet = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=tmp_path, grid=GRID)
    assert quiet.cached_blocks == 0 and quiet.load_factor == 1.0
    load["now"] = 2.0  # the same machine, twice as busy
    busy = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=tmp_path, grid=GRID)
    fresh = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=tmp_path / "empty", grid=GRID)
    assert busy.cached_blocks == 2 and busy.load_factor == pytest.approx(2.0)
    assert busy.full_ms == pytest.approx(fresh.full_ms)
    for name, b in busy.blocks.items():  # the cache in this moment's units: what a fresh build measures
        assert b.ms == pytest.approx(fresh.blocks[name].ms)
    counts = {name: 1 for name in busy.blocks}
    assert busy.predict(counts) / busy.full_ms == pytest.approx(quiet.predict(counts) / quiet.full_ms)


def test_a_scaled_block_recomputes_its_envelope():
    b = BlockLatency(size=4, counts=[1, 2, 3, 4], ms=[1.0, 1.0, 2.0, 2.0])
    assert b.at(4) == 2.0  # fills the cached envelope
    assert b.scaled(3.0).at(4) == pytest.approx(6.0) and b.scaled(3.0).staircase_counts() == [2, 4]


def _describe_other() -> dict:
    from export.machine import describe_machine

    desc = describe_machine()
    return {**desc, "cpu": {**(desc.get("cpu") or {}), "model": "Other CPU"}}


def test_a_copied_cache_file_from_another_machine_is_not_used(built, tmp_path, caplog):
    table, cache, spec = built
    for f in cache.glob("*.json"):  # a file whose name matches this machine, content from another
        d = json.loads(f.read_text())
        if d["machine"] == machine_key():
            d["machine"] = {**d["machine"], "cpu": "Other CPU"}
            (tmp_path / f.name).write_text(json.dumps(d))
    with caplog.at_level(logging.INFO, logger="export.latency_table"):
        t = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=tmp_path, grid=GRID,
                                block_settings=FAST, model_settings=FAST)
    assert t.cached_blocks == 0
    assert any("another machine" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- pruning on a table

def test_prune_with_target_latency_reaches_the_predicted_target_on_staircases():
    model = TinyNet().eval()
    table = _staircase_table(model, step=4)
    cfg = PruneConfig(method="pfp", target="latency", calib_size=64, round_to=8)
    pruned, report, _ = prune(model, _calib(), cfg, 0.6, example_input=_x(), latency_model=table)
    assert report.target == "latency" and report.reference_latency_ms == pytest.approx(table.full_ms)
    assert report.latency_ms <= 0.6 * table.full_ms * (1 + 1e-9)
    assert report.latency_ms < table.full_ms
    kept = {row["name"]: row["kept"] for row in report.layers}
    # every count is the largest of its latency level (a multiple of 4 or the full width), not a multiple of 8
    for name, k in kept.items():
        assert table.round_up(name, k) == k
        assert k % 4 == 0 or k == table.blocks[name].size
    assert report.latency_ms == pytest.approx(table.predict(kept))
    assert pruned.conv1.out_channels == kept["conv1"] and pruned.conv2.out_channels == kept["conv2"]
    assert report.to_dict()["budget_error"] <= 1e-9


def test_prune_with_a_measured_table(built):
    table, _, _ = built
    cfg = PruneConfig(method="tp_magnitude", target="latency", calib_size=64)
    _, report, _ = prune(TinyNet().eval(), _calib(), cfg, 0.8, example_input=_x(), latency_model=table)
    assert report.latency_ms <= 0.8 * table.full_ms * (1 + 1e-9)


def test_target_latency_without_a_table_is_one_line():
    cfg = PruneConfig(target="latency", calib_size=64)
    with pytest.raises(PruneError, match="latency table") as e:
        prune(TinyNet().eval(), _calib(), cfg, 0.5, example_input=_x())
    assert "\n" not in str(e.value)


def test_target_below_the_floor_names_the_floor():
    model = TinyNet().eval()
    table = _staircase_table(model, rest_ms=5.0)
    cfg = PruneConfig(target="latency", calib_size=64)
    with pytest.raises(PruneError, match="below the smallest reachable") as e:
        prune(model, _calib(), cfg, 0.05, example_input=_x(), latency_model=table)
    msg = str(e.value)
    assert "\n" not in msg and "floor" in msg and " ms" in msg


def test_a_table_of_another_model_is_one_line():
    model = TinyNet().eval()
    table = _staircase_table(model)
    table = table.model_copy(update={"blocks": {"conv1": table.blocks["conv1"]}})
    with pytest.raises(PruneError, match="no block for group 'conv2'"):
        prune(model, _calib(), PruneConfig(target="latency", calib_size=64), 0.5, example_input=_x(),
              latency_model=table)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["ort-cuda", "tensorrt", "torch-cuda"])
def test_a_backend_not_installed_is_one_line_naming_it(backend):
    from export.backends import get_backend

    if get_backend(backend).unavailable_reason() is None:
        pytest.skip(f"{backend} runs here")
    with pytest.raises(LatencyTableError) as e:
        check_target(LatencyTargetConfig(backend=backend))
    assert backend in str(e.value) and "\n" not in str(e.value) and "not installed" in str(e.value)


def test_an_unknown_backend_and_a_batch_the_backend_cannot_run_are_one_line():
    with pytest.raises(LatencyTableError, match="prune.latency.backend.*'ort-gpu'"):
        check_target(LatencyTargetConfig(backend="ort-gpu"))
    with pytest.raises(LatencyTableError, match="batch 5000") as e:
        build_latency_table(TinyNet().eval(), _x(), LatencyTargetConfig(batch=5000))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="batch"):
        PruneConfig(target="latency", latency={"batch": 0})


# ----------------------------------------------------------------------------- closing the loop

def test_prune_to_latency_measures_and_corrects(built):
    table, _, spec = built
    cfg = PruneConfig(method="pfp", target="latency", calib_size=64,  # the table's own chase only
                      latency=spec.model_copy(update={"tries": 3, "tolerance": 0.05, "flops_fallback": None}))
    pruned, prep, report = prune_to_latency(TinyNet().eval(), _calib(), cfg, 0.7, example_input=_x(), table=table,
                                            settings=FAST, rounds=2)
    assert 1 <= len(report.tries) <= 3
    first = report.tries[0]
    assert first.keep_ratio == 0.7 and first.measured_ratio > 0 and first.unpruned_ms > 0
    for j in range(1, len(report.tries)):  # each retry asks what next_ask makes of the tries before
        assert report.tries[j].keep_ratio == pytest.approx(next_ask(report.tries[:j], 0.7)) \
            or report.tries[j].keep_ratio > next_ask(report.tries[:j], 0.7)  # or the table's floor
    if len(report.tries) > 1:
        assert report.tries[1].keep_ratio == pytest.approx(0.7 * 0.7 / first.measured_ratio) \
            or report.tries[1].keep_ratio > 0.7 * 0.7 / first.measured_ratio
    assert report.met == (abs(report.tries[report.best_try].measured_ratio / 0.7 - 1) <= 0.05)
    assert report.best_ratio == report.tries[report.best_try].measured_ratio
    assert "\n" not in report.message and ("met on ort-cpu" in report.message or "best measured" in report.message)
    assert report.met or len(report.tries) == 3 or "cannot" in report.message or "no pruning" in report.message
    assert prep.latency_ms == pytest.approx(report.tries[report.best_try].predicted_ratio * table.full_ms)
    assert isinstance(pruned, nn.Module)


def test_a_first_target_below_the_tables_floor_is_pruned_to_the_floor_and_reported_not_met(built):
    _, _, spec = built
    model = TinyNet().eval()
    table = _staircase_table(model)  # floor 4 of 7 ms: 0.571
    cfg = PruneConfig(method="pfp", target="latency", calib_size=64,
                      latency=spec.model_copy(update={"tries": 2, "flops_fallback": None}))
    pruned, prep, report = prune_to_latency(model, _calib(), cfg, 0.3, example_input=_x(), table=table,
                                            settings=FAST, rounds=2)
    assert report.tries[0].keep_ratio == pytest.approx(4 / 7 * 1.001)
    assert prep.latency_ms == pytest.approx(4.0, rel=0.01) and pruned(_x()).shape == (1, 4)
    assert not report.met and "not met" in report.message and "\n" not in report.message


def test_a_correction_below_the_tables_floor_tries_the_floor_once(built):
    _, _, spec = built
    model = TinyNet().eval()
    table = _staircase_table(model)  # floor 4 of 7 ms: 0.571
    with pytest.raises(PruneError) as floor:
        prune(model, _calib(), PruneConfig(target="latency", calib_size=64), 0.3, example_input=_x(),
              latency_model=table)
    assert floor.value.floor == pytest.approx(4 / 7)
    cfg = PruneConfig(method="pfp", target="latency", calib_size=64,
                      latency=spec.model_copy(update={"tries": 3, "tolerance": 0.01, "flops_fallback": None}))
    _, _, report = prune_to_latency(model, _calib(), cfg, 0.6, example_input=_x(), table=table, settings=FAST,
                                    rounds=2)
    first = report.tries[0]
    if report.met or next_ask([first], 0.6) >= 4 / 7:
        pytest.skip("the first try measured close enough that no correction fell below the floor")
    # the correction fell below the floor: the next try is the floor itself, and only once
    assert report.tries[1].keep_ratio == pytest.approx(4 / 7 * 1.001)
    assert sum(t.keep_ratio == pytest.approx(4 / 7 * 1.001) for t in report.tries) == 1
    assert len(report.tries) == 2 or report.tries[2].keep_ratio > 4 / 7
    assert "\n" not in report.message


def test_a_table_that_misses_is_chased_with_flops_budgets_too(built):
    # a tolerance so wide that every try meets the target (a model this small times mostly overhead,
    # its pruned copy can measure slower): then the closest outputs decide
    table, _, spec = built
    cfg = PruneConfig(method="pfp", target="latency", calib_size=64,
                      latency=spec.model_copy(update={"tries": 2, "tolerance": 0.9, "flops_fallback": 1e-9}))
    pruned, prep, report = prune_to_latency(TinyNet().eval(), _calib(), cfg, 0.9, example_input=_x(), table=table,
                                            settings=FAST, rounds=2)
    kinds = [t.cost_model for t in report.tries]
    assert kinds[0] == "table" and len(kinds) >= 2 and set(kinds[1:]) == {"flops"}, report.tries
    table_try, flops_try = report.tries[0], report.tries[1]
    assert table_try.predicted_ratio is not None and flops_try.predicted_ratio is None
    assert flops_try.keep_ratio == 0.9 and flops_try.flops_ratio == pytest.approx(0.9, abs=0.09)
    met = [i for i, t in enumerate(report.tries) if abs(t.measured_ratio / 0.9 - 1) <= 0.9]
    assert met and all(report.tries[i].divergence is not None and report.tries[i].divergence >= 0 for i in met)
    assert report.best_try == min(met, key=lambda i: report.tries[i].divergence)
    assert report.met and "\n" not in report.message
    chose_flops = report.tries[report.best_try].cost_model == "flops"
    assert ("FLOPs budgets" in report.message) == chose_flops
    assert prep.target == ("flops" if chose_flops else "latency")
    assert prep.flops / prep.original_flops == pytest.approx(report.tries[report.best_try].flops_ratio)
    assert prep.measured_latency_ratio == report.best_ratio
    assert any("budgets on FLOPs" in n for n in prep.allocation_notes) == chose_flops

    cfg_off = cfg.model_copy(update={"latency": cfg.latency.model_copy(update={"flops_fallback": None})})
    _, _, only = prune_to_latency(TinyNet().eval(), _calib(), cfg_off, 0.6, example_input=_x(), table=table,
                                  settings=FAST, rounds=2)
    assert {t.cost_model for t in only.tries} == {"table"}  # a tiny model's try may measure slow: tried again


def test_the_pick_prefers_met_tries_by_divergence_then_the_nearest_ratio():
    from export.latency_target import _Pick

    def t(measured: float, div: float | None = None) -> LatencyTry:
        return LatencyTry(keep_ratio=0.5, predicted_ratio=None, cost_model="flops", measured_ratio=measured,
                          pruned_ms=measured, unpruned_ms=1.0, flops_ratio=0.5, divergence=div)

    pick = _Pick(0.5, 0.05)
    pick.offer(0, t(0.60), "a")
    pick.offer(1, t(0.56), "b")
    assert pick.index == 1  # none met: the nearest
    pick.offer(2, t(0.51, div=0.3), "c")
    pick.offer(3, t(0.49, div=0.1), "d")
    pick.offer(4, t(0.50, div=0.2), "e")
    assert (pick.index, pick.model) == (3, "d")  # met: the closest outputs, not the nearest ratio
    pick.offer(5, t(0.502), "f")  # met, outputs not measured: ranks after every measured one
    pick.offer(6, t(0.40), "g")
    assert (pick.index, pick.model) == (3, "d")


def test_prune_to_latency_needs_target_latency():
    with pytest.raises(LatencyTableError, match="prune.target"):
        prune_to_latency(TinyNet().eval(), _calib(), PruneConfig(), 0.5, example_input=_x())


def test_a_negligible_block_is_timed_at_its_ends_only():
    calls = []

    def time_at(k: int) -> float:
        calls.append(k)
        return 1.0 + 0.001 * k

    shape = block_shapes(TinyNet(), _x())["conv1"].model_copy(update={"size": 100})
    b = measure_block(shape, time_at, GridSettings(dense_upto=8, coarse_points=5, max_points=20), negligible_ms=0.5)
    assert sorted(calls) == [1, 100] and b.counts == [1, 100]
    calls.clear()
    b = measure_block(shape, time_at, GridSettings(dense_upto=8, coarse_points=5, max_points=20), negligible_ms=0.01)
    assert len(b.counts) >= 5 and len(calls) == len(set(calls))  # it matters here: the grid, no count twice


def test_a_block_whose_ends_invert_on_noise_gets_the_whole_grid():
    noisy = {1: 1.01, 100: 1.0}  # 1 channel measured slower than all: noise, not a negligible range
    b = measure_block(block_shapes(TinyNet(), _x())["conv1"].model_copy(update={"size": 100}),
                      lambda k: noisy.get(k, 1.0), GridSettings(dense_upto=8, coarse_points=5, max_points=20),
                      negligible_ms=0.5)
    assert len(b.counts) >= 5
