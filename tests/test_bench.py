"""`pfp export` / `pfp bench` end to end on real bundles, side-by-side timing and the
speed-up efficiency arithmetic."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from export.cli import app
from export.efficiency import Candidate, bench_side_by_side, efficiency_rows, plot_efficiency
from export.bundle import export_bundle
from export.latency import LatencyResult, LatencySettings
from pfp.config import PruneConfig
from pfp.models import build_model
from pfp.prune import prune
from pfp.serialization import save_model

pytestmark = pytest.mark.usefixtures("one_thread")
cli = CliRunner()
SPEC = {"name": "lenet5", "num_classes": 10, "in_channels": 1, "input_size": 16}
FAST = LatencySettings(warmup=2, warmup_s=0.0, min_iters=5, max_iters=40, min_time_s=0.0, max_time_s=0.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    base = build_model(**SPEC).eval()
    save_model(folder / "base.pt", base, SPEC)
    x = torch.rand(32, 1, 16, 16)
    pruned, _, _ = prune(base, [(x, torch.zeros(32, dtype=torch.long))], PruneConfig(method="pfp", round_to=1), 0.4,
                         example_input=x[:1])
    save_model(folder / "pruned.pt", pruned, SPEC)
    cfg = {
        "name": "bench", "device": "cpu", "output_dir": str(folder / "runs"),
        "data": {"name": "synthetic", "synthetic_channels": 1, "synthetic_size": 16, "synthetic_train": 256,
                 "synthetic_test": 128},
        "model": {"name": "lenet5"},
    }
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def _result(model: str, batch: int, p50: float) -> LatencyResult:
    return LatencyResult.from_times([p50] * 5, backend="ort-cpu", device="cpu", precision="fp32", batch=batch,
                                    warmup=0, timer="wall", threads=1, converged=True, ci_rel=0.0)


def test_efficiency_arithmetic():
    results = [_result("base", 1, 4.0), _result("half", 1, 2.5), _result("base", 32, 40.0), _result("half", 32, 20.0)]
    for r, m in zip(results, ["base", "half", "base", "half"]):
        r.model = m
    rows = efficiency_rows(results, {"base": 1000, "half": 500}, "base")
    assert [(r["batch"], r["speedup"], r["ideal_speedup"], r["efficiency"]) for r in rows] == [
        (1, 1.6, 2.0, 0.8), (32, 2.0, 2.0, 1.0)]
    assert rows[0]["flops_removed"] == 0.5


def test_side_by_side_times_every_model_at_every_batch(files, tmp_path):
    x = [torch.rand(16, 1, 16, 16)]
    cands = []
    for name in ("base", "pruned"):
        bundle, meta = export_bundle(files / f"{name}.pt", tmp_path / name, x, parity_samples=16,
                                     exporter="torchscript")
        cands.append(Candidate(name, bundle, meta["flops"]))
    assert cands[1].flops < cands[0].flops
    results = bench_side_by_side(cands, ["ort-cpu", "torch-cpu"], batch_sizes=(1, 4), settings=FAST, rounds=2)
    keys = sorted((r.model, r.backend, r.batch) for r in results)
    assert keys == sorted((m, b, n) for m in ("base", "pruned") for b in ("ort-cpu", "torch-cpu") for n in (1, 4))
    assert all(r.iterations >= 2 * 5 and 0 < r.p50_ms <= r.p99_ms for r in results)
    rows = efficiency_rows(results, {c.label: c.flops for c in cands}, "base")
    assert len(rows) == 4 and all(r["efficiency"] > 0 for r in rows)
    png = plot_efficiency(rows, tmp_path / "eff.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_export_and_bench_commands(files, tmp_path):
    out = tmp_path / "bundle"
    res = cli.invoke(app, ["export", str(files / "pruned.pt"), "--out", str(out), "--config", str(files / "cfg.yaml"),
                           "--exporter", "torchscript", "--parity-samples", "64", "--precisions", "fp32,int8"])
    # An untrained LeNet's logits are close together, so INT8 rounding flips many top-1
    # decisions: that must stop the command with one line, and be on record.
    assert res.exit_code == 2, res.output
    assert "model.int8.onnx: ort-cpu int8 output differs from PyTorch on 64 samples: top-1 agreement" in res.output
    meta = json.loads((out / "export.json").read_text())
    parity = {(p["backend"], p["precision"]): p for p in meta["parity"]}
    assert parity[("ort-cpu", "fp32")]["passed"] and parity[("ort-cpu", "fp32")]["samples"] == 64
    assert parity[("ort-cpu", "int8")]["passed"] is False
    base = tmp_path / "base"
    assert cli.invoke(app, ["export", str(files / "base.pt"), "--out", str(base), "--config", str(files / "cfg.yaml"),
                            "--exporter", "torchscript", "--parity-samples", "32"]).exit_code == 0
    report = tmp_path / "bench.json"
    res = cli.invoke(app, ["bench", str(base), str(out), "--batch", "1,2", "--threads", "1", "--max-time", "0.3",
                           "--rounds", "1", "--json", str(report)])
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    assert data["machine"]["cpu"]["model"] and data["extra"]["baseline"] == "base"
    assert {(r["model"], r["batch"]) for r in data["results"]} == {("base", 1), ("base", 2), ("bundle", 1), ("bundle", 2)}
    assert {r["threads"] for r in data["results"]} == {1}
    assert len(data["extra"]["efficiency"]) == 2


def test_bench_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    res = cli.invoke(app, ["bench", str(tmp_path)])
    assert res.exit_code == 2
    assert "export.json: not found" in res.output and len([ln for ln in res.output.splitlines() if ln.strip()]) <= 2


def test_export_refuses_data_that_does_not_fit(files, tmp_path):
    cfg = yaml.safe_load((files / "cfg.yaml").read_text())
    cfg["data"]["synthetic_channels"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    res = cli.invoke(app, ["export", str(files / "base.pt"), "--out", str(tmp_path / "b"), "--config", str(tmp_path / "c.yaml")])
    assert res.exit_code == 2 and "base.pt: the model has in_channels=1 but data set synthetic has 3" in res.output
    assert not (tmp_path / "b").exists()


def test_unavailable_backend_is_one_clear_line(files, tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    res = cli.invoke(app, ["export", str(files / "base.pt"), "--out", str(tmp_path / "b"), "--config",
                           str(files / "cfg.yaml"), "--exporter", "torchscript", "--parity-samples", "16",
                           "--backends", "tensorrt"])
    assert res.exit_code == 2
    assert "backend tensorrt: TensorRT is not installed" in res.output
