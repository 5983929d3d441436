"""The Python API as a user calls it: pfp.prune on a FLOPs target and on a measured latency target."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import pfp
from pfp.models import build_model


def _setup():
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 16).eval()
    data = DataLoader(TensorDataset(torch.randn(128, 1, 16, 16), torch.zeros(128, dtype=torch.long)), batch_size=64)
    return model, data, torch.randn(1, 1, 16, 16)


def test_prune_is_callable_and_the_module_still_works():
    import pfp.prune as module

    model, data, x = _setup()
    small, report = pfp.prune(model, data, target="flops", keep=0.5, method="tp_magnitude", example_input=x,
                              calib_split=0.25)
    assert report.flops <= 0.5 * report.original_flops * 1.02 and small(x).shape == (1, 10)
    assert callable(module.prune) and module is pfp.prune  # pfp.prune.prune keeps working


def test_prune_to_a_measured_latency_target(tmp_path):
    import flows  # noqa: F401  - registers the measuring pruner (pfp itself never imports export)

    model, data, x = _setup()
    # keep 0.8: far above the floor of this tiny net's fixed per-operator costs, however noisy the timings
    small, report = pfp.prune(model, data, target="latency", keep=0.8, method="tp_magnitude", example_input=x,
                              calib_split=0.25, latency={"backend": "ort-cpu", "batch": 8, "tries": 1,
                                                         "cache_dir": str(tmp_path), "flops_fallback": None})
    assert report.target == "latency" and report.reference_latency_ms > 0 and report.measured_latency_ratio > 0
    assert report.latency_ms < report.reference_latency_ms  # the table's prediction for the kept widths
    assert report.flops < report.original_flops and small(x).shape == (1, 10)
    assert any(tmp_path.glob("*.json"))  # the table's blocks were cached
