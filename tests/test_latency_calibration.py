"""A latency table calibrated on the whole model: staircase tops timed in context, and the share
of the blocks' savings it realizes (export.latency_calibration, pfp.latency_model).

Timings of the builder are made deterministic here (the work of a module, plus a penalty the
blocks alone do not see) so that the arithmetic can be checked exactly; real ONNX Runtime
timings of the same path run in tests/test_api.py and tests/test_latency_tables_mlflow.py."""
from __future__ import annotations

import logging

import pytest
import torch.nn as nn

import export.latency_table as lt
from export.latency_calibration import pruned_copy, uniform_counts
from export.latency_table import GridSettings, build_latency_table
from pfp.config import LatencyTargetConfig
from pfp.latency_model import BlockLatency, CalibrationPoint, LatencyModel, realized_share
from tests.test_latency_table import TinyNet, _x

GRID = GridSettings(dense_upto=12, coarse_points=4, max_points=12, negligible=0.0)


# ----------------------------------------------------------------------------- tables as data

def test_a_level_the_model_runs_slower_rises_and_a_slow_top_merges_upward():
    b = BlockLatency(size=16, counts=list(range(1, 17)), ms=[1.0] * 8 + [2.0] * 4 + [3.0] * 4)
    assert b.staircase_counts() == [8, 12, 16]
    # in the model: 8 channels save 1.5 ms (the block says 2: less, so the level rises), and 12
    # make the model 0.5 ms slower than all 16 (a layout break the lone block does not pay)
    c = b.in_context({8: -1.5, 12: 0.5})
    assert c.at(8) - c.at(16) == pytest.approx(-1.5) and c.at(3) == pytest.approx(c.at(8))  # the level moved whole
    assert c.staircase_counts() == [8, 16] and c.round_up(10) == 16  # 12 costs what 16 costs: keep 16
    # a reading that promises more than the block is not taken: one lucky timing would be the pick
    assert b.in_context({8: -2.5}).ms == b.ms
    assert b.in_context({}).ms == b.ms


def test_the_realized_share_is_a_least_squares_fit_clamped_and_blind_to_tiny_savings():
    pts = [CalibrationPoint(width=0.6, predicted_ratio=0.6, measured_ratio=0.7),
           CalibrationPoint(width=0.35, predicted_ratio=0.2, measured_ratio=0.4)]
    # savings predicted 0.4 and 0.8, measured 0.3 and 0.6: 0.75 of each
    assert realized_share(pts) == pytest.approx(0.75)
    assert realized_share([]) == 1.0
    assert realized_share([CalibrationPoint(width=0.9, predicted_ratio=0.99, measured_ratio=0.5)]) == 1.0
    assert realized_share([CalibrationPoint(width=0.5, predicted_ratio=0.5, measured_ratio=1.3)]) == 0.2  # clamped


def test_the_realized_share_scales_every_predicted_saving():
    block = BlockLatency(size=4, counts=[1, 2, 3, 4], ms=[1.0, 2.0, 3.0, 4.0])
    table = LatencyModel(backend="ort-cpu", full_ms=10.0, blocks={"g": block})
    assert table.predict({"g": 2}) == pytest.approx(8.0)
    assert table.model_copy(update={"realized": 0.5}).predict({"g": 2}) == pytest.approx(9.0)


def test_a_pruned_copy_keeps_the_counts_asked_and_leaves_the_model_whole():
    model = TinyNet().eval()
    small = pruned_copy(model, _x(), {"conv1": 3})
    assert small.conv1.out_channels == 3 and small.conv2.in_channels == 3 and small.conv2.out_channels == 12
    assert model.conv1.out_channels == 8
    assert small(_x()).shape == (1, 4)


# ----------------------------------------------------------------------------- the builder

def _work(m: nn.Module) -> float:
    """Deterministic 'latency': weights, plus 5 units whenever conv1 keeps an odd width in the model."""
    params = sum(p.numel() for p in m.parameters())
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    in_model = len(convs) == 2 and isinstance(getattr(m, "fc", None), nn.Linear)
    odd = in_model and m.conv1.out_channels % 2 == 1
    return 1e-3 * params + (5.0 if odd else 0.0)


class _FakeRunner:
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def close(self) -> None:
        pass


@pytest.fixture
def deterministic(monkeypatch):
    calls = {"side_by_side": 0}

    def fake_time_module(backend, module, input_shape, spec, settings, workdir, tag):
        return 1.0 + _work(module)  # a block alone: no penalty for odd widths

    def fake_load_runner(backend, module, input_shape, spec, workdir, name="block"):
        return _FakeRunner(module)

    def fake_side_by_side(runners, batch, threads, settings, rounds):
        calls["side_by_side"] += 1
        return [1.0 + _work(r.module) for r in runners]

    monkeypatch.setattr(lt, "time_module", fake_time_module)
    monkeypatch.setattr(lt, "load_runner", fake_load_runner)
    monkeypatch.setattr(lt, "time_side_by_side", fake_side_by_side)
    return calls


def test_the_whole_model_sets_the_share_of_the_savings_realized(deterministic, tmp_path):
    model = TinyNet().eval()
    spec = LatencyTargetConfig(backend="ort-cpu", batch=2, threads=1, context_s=0, calibration=[0.6, 0.35])
    alone = build_latency_table(model, _x(), spec.model_copy(update={"calibration": []}),
                                cache_dir=tmp_path / "alone", grid=GRID)
    assert alone.realized == 1.0 and alone.calibration == [] and deterministic["side_by_side"] == 0

    table = build_latency_table(model, _x(), spec, cache_dir=tmp_path, grid=GRID)
    full = 1.0 + _work(model)
    assert table.full_ms == pytest.approx(full)
    assert [p.width for p in table.calibration] == [0.6, 0.35] and deterministic["side_by_side"] == 2
    for p in table.calibration:  # the blocks' prediction and the whole model, pruned uniformly
        counts = uniform_counts(alone, p.width)
        assert p.predicted_ratio == pytest.approx(alone.predict(counts) / full)
        assert p.measured_ratio == pytest.approx((1.0 + _work(pruned_copy(model, _x(), counts))) / full)
    assert table.realized == pytest.approx(realized_share(table.calibration))
    # at 0.6 of 8 channels conv1 keeps 5, an odd width: the model pays what its blocks did not see
    assert table.calibration[0].measured_ratio > table.calibration[0].predicted_ratio
    counts = uniform_counts(alone, 0.5)
    saving = alone.full_ms - alone.predict(counts)
    assert table.full_ms - table.predict(counts) == pytest.approx(table.realized * saving)


def test_staircase_tops_timed_in_context_veto_the_widths_the_model_runs_slowly(deterministic, tmp_path):
    model = TinyNet().eval()
    spec = LatencyTargetConfig(backend="ort-cpu", batch=2, threads=1, calibration=[])
    alone = build_latency_table(model, _x(), spec.model_copy(update={"context_s": 0}), cache_dir=tmp_path / "alone",
                                grid=GRID)
    assert 3 in alone.staircase_counts("conv1") and alone.in_context == []  # alone, every width is a step

    table = build_latency_table(model, _x(), spec, cache_dir=tmp_path, grid=GRID)
    assert table.in_context == ["conv1", "conv2"]
    full = 1.0 + _work(model)
    for k in (2, 4, 6):  # even widths: the model saves what the block alone says, nothing moves
        assert table.blocks["conv1"].at(k) == pytest.approx(alone.blocks["conv1"].at(k))
    for k in (1, 3, 5, 7):  # odd widths: the model measured them 5 units slower; their levels rose
        measured = 1.0 + _work(pruned_copy(model, _x(), {"conv1": k}))
        raised = table.blocks["conv1"].ms[table.blocks["conv1"].counts.index(k)]
        assert raised - table.blocks["conv1"].ms[-1] == pytest.approx(measured - full)
    assert all(k % 2 == 0 for k in table.staircase_counts("conv1"))
    assert table.round_up("conv1", 3) >= 4 and table.blocks["conv2"].ms == pytest.approx(alone.blocks["conv2"].ms)

    # a second build reads the ratios from the cache, beside the block files: nothing is timed again
    before = deterministic["side_by_side"]
    again = build_latency_table(model, _x(), spec, cache_dir=tmp_path, grid=GRID)
    assert deterministic["side_by_side"] == before and again.in_context == table.in_context
    assert again.blocks["conv1"].ms == pytest.approx(table.blocks["conv1"].ms)
    assert len(list(tmp_path.glob("context-*.json"))) == 1


def test_a_group_the_model_cannot_run_pruned_alone_keeps_its_block(deterministic, tmp_path, monkeypatch, caplog):
    import export.latency_calibration as lc

    real = lc.pruned_copy

    def fragile(model, example_input, counts, ignore_layers=()):
        if set(counts) == {"conv2"}:
            raise RuntimeError("shape mismatch in a hard-coded reshape")
        return real(model, example_input, counts, ignore_layers)

    monkeypatch.setattr(lc, "pruned_copy", fragile)
    spec = LatencyTargetConfig(backend="ort-cpu", batch=2, threads=1, calibration=[])
    with caplog.at_level(logging.WARNING, logger="export.latency_calibration"):
        table = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=tmp_path, grid=GRID)
    assert table.in_context == ["conv1"]
    lines = [r.getMessage() for r in caplog.records]
    assert any("conv2 not timed in context" in m and "hard-coded reshape" in m for m in lines)


def test_the_context_budget_bounds_the_groups_timed(deterministic, tmp_path, caplog):
    spec = LatencyTargetConfig(backend="ort-cpu", batch=2, threads=1, calibration=[], context_s=1e-9)
    with caplog.at_level(logging.INFO, logger="export.latency_calibration"):
        table = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=tmp_path, grid=GRID)
    assert len(table.in_context) == 1  # the first group is always timed; the next starts past the budget
    assert any("not timed in context within" in r.getMessage() for r in caplog.records)


def test_a_model_that_cannot_be_pruned_uniformly_keeps_the_blocks_sum(deterministic, tmp_path, monkeypatch,
                                                                       caplog):
    import export.latency_calibration as lc

    def fragile(*args, **kwargs):
        raise RuntimeError("shape mismatch in a hard-coded reshape")

    monkeypatch.setattr(lc, "pruned_copy", fragile)
    spec = LatencyTargetConfig(backend="ort-cpu", batch=2, threads=1)
    with caplog.at_level(logging.WARNING, logger="export.latency_table"):
        table = build_latency_table(TinyNet().eval(), _x(), spec, cache_dir=tmp_path, grid=GRID)
    assert table.realized == 1.0 and table.calibration == []
    lines = [r.getMessage() for r in caplog.records]
    assert any("not calibrated on the whole model" in m and "hard-coded reshape" in m for m in lines)
