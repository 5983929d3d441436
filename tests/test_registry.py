"""flows.registry against a real MLflow sqlite store and a small real bundle folder."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from deploy.gate import GateConfig, LatencyCheck, evaluate_gate
from flows.registry import download_version, get_by_alias, promote, register_candidate
from flows.tracking import setup_mlflow, tracked_run

pytestmark = [
    # Known-harmless: MLflow's sqlalchemy store itself uses the deprecated `noload` strategy.
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """model.onnx (a real nn.Linear), model.pt and export.json, as export.bundle lays them out."""
    out = tmp_path_factory.mktemp("bundle")
    model = torch.nn.Linear(4, 2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 4),), str(out / "model.onnx"), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    torch.save(model.state_dict(), out / "model.pt")
    (out / "export.json").write_text(json.dumps({
        "format": "pfp-bundle/1",
        "onnx": {"file": "model.onnx", "sha256": sha256(out / "model.onnx")},
        "model": {"file": "model.pt", "sha256": sha256(out / "model.pt")},
    }))
    return out


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tqdm bars on every download
    setup_mlflow(uri, "registry")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def logged_run(bundle: Path) -> str:
    with tracked_run("candidate") as run:
        mlflow.log_artifacts(str(bundle), "bundle")
    return run.info.run_id


def decision(passed: bool):
    g = GateConfig(max_acc_drop=1.0, latency=[LatencyCheck(target="cpu", batch=8, max_ms=5.0)])
    rows = [{"batch": 8, "p50_ms": 4.0 if passed else 9.0, "p99_ms": 10.0}]
    return evaluate_gate(g, base_acc=92.0, acc=91.8, latency={"cpu": rows}, baseline_latency={"cpu": rows})


def test_register_promote_and_keep_the_champion(store, bundle):
    sha = sha256(bundle / "model.onnx")
    v1 = register_candidate("tiny", logged_run(bundle), "bundle", {"onnx_sha256": sha, "flops": 8, "acc": "91.8"})
    v2 = register_candidate("tiny", logged_run(bundle), "bundle", {"flops": 8})  # sha computed from the run
    assert (v1.version, v2.version) == ("1", "2")
    assert v2.tags["onnx_sha256"] == sha and v1.tags["flops"] == "8"
    assert v2.source == f"runs:/{v2.run_id}/bundle" and "candidate" in v2.aliases
    assert get_by_alias("tiny", "candidate").version == "2"
    assert get_by_alias("tiny", "champion") is None and get_by_alias("nope", "champion") is None

    assert promote("tiny", v1.version, decision(True)) is True
    assert get_by_alias("tiny", "champion").version == "1"
    assert not promote("tiny", v2.version, decision(False))
    assert get_by_alias("tiny", "champion").version == "1"  # the old champion stays
    assert get_by_alias("tiny", "candidate").version == "2"

    tags = MlflowClient().get_model_version("tiny", "2").tags
    assert tags["gate.passed"] == "false" and tags["gate.summary"].startswith("failed 1 of 2 checks: cpu.b8.p50_ms")
    assert tags["gate.check.cpu.b8.p50_ms"].startswith("FAIL: value 9, limit 5")
    assert tags["gate.check.accuracy_drop"].startswith("pass: value 0.2")
    assert MlflowClient().get_model_version("tiny", "1").tags["gate.passed"] == "true"


def test_register_refuses_a_run_without_the_bundle(store, bundle):
    with tracked_run("partial") as run:
        mlflow.log_artifact(str(bundle / "model.onnx"), "bundle")
    with pytest.raises(ValueError, match=r"has no model\.pt, export\.json under artifact path 'bundle'"):
        register_candidate("tiny", run.info.run_id, "bundle", {})
    assert get_by_alias("tiny", "candidate") is None


def test_download_verifies_sha256(store, bundle):
    v = register_candidate("tiny", logged_run(bundle), "bundle", {"onnx_sha256": sha256(bundle / "model.onnx")})
    out = download_version("tiny", v.version, store / "deployed")
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "model.pt"]
    assert sha256(out / "model.onnx") == sha256(bundle / "model.onnx")
    import onnx

    onnx.checker.check_model(str(out / "model.onnx"))

    MlflowClient().set_model_version_tag("tiny", v.version, "onnx_sha256", "0" * 64)
    with pytest.raises(ValueError, match=r"model\.onnx sha256 .* does not match .*onnx_sha256 tag 0{64}"):
        download_version("tiny", v.version, store / "tampered")
    assert not (store / "tampered").exists()  # nothing usable-looking left behind
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []  # nor staging folders
