"""deploy.on_device on real files: a real exported bundle, ONNX Runtime on the CPU, a real
model repository; no mocks. TensorRT is not installed here, so a preference that starts
with it must fall through to ort-cpu and say why."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.on_device import (
    ENV_NAME,
    ENV_ROOT,
    Built,
    Device,
    DeviceError,
    DeviceMismatch,
    LatencyOverBudget,
    ReferenceMismatch,
    activate_checked,
    active_registry_version,
    build_on_device,
    check_budget,
    check_reference,
    choose_backend,
    clean_work,
    device_from_env,
    install_built,
    load_reference,
    new_workdir,
    previous_version,
    run_installed,
)
from deploy.errors import DeployError
from deploy.repository import CONFIG_FILE, STATE_FILE, RepositoryError, served_version
from export.onnx_export import ExportError

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
no_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="these check the fallback when TensorRT is missing")
MODEL = "fmnist-lenet5"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(folder: Path, name: str, seed: int) -> Path:
    """A real bundle of a LeNet-5 on 1x16x16 inputs whose weights come from `seed`."""
    import torch

    from export.bundle import export_bundle
    from pfp.models import build_model
    from pfp.serialization import save_model

    spec = {"name": "lenet5", "num_classes": 10, "in_channels": 1, "input_size": 16}
    torch.manual_seed(seed)
    m = build_model(**spec).eval()
    save_model(folder / f"{name}.pt", m, spec)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 1, 16, 16, generator=g) for _ in range(4)]
    export_bundle(folder / f"{name}.pt", folder / name, batches, parity_samples=128, exporter="torchscript")
    return folder / name


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, one_thread) -> tuple[Path, Path]:
    """Two bundles of the same architecture with different weights (seeds 0 and 1)."""
    folder = tmp_path_factory.mktemp("bundles")
    return export(folder, "bundle", 0), export(folder, "other", 1)


@pytest.fixture(scope="module")
def bundle(bundles) -> Path:
    return bundles[0]


@pytest.fixture(scope="module")
def built(bundle: Path, tmp_path_factory) -> Built:
    # TensorRT first, as a target would ask; where it is installed, ort-cpu alone (the
    # checks below are about ONNX Runtime's artifact).
    preference = ["ort-cpu"] if HAS_TENSORRT else ["tensorrt", "ort-cpu"]
    return build_on_device(bundle, preference, batch_sizes=[1, 8],
                           workdir=tmp_path_factory.mktemp("work"), max_time_s=0.2, threads=1)


@pytest.fixture(scope="module")
def built_other(bundles, tmp_path_factory) -> Built:
    return build_on_device(bundles[1], ["ort-cpu"], batch_sizes=[1],
                           workdir=tmp_path_factory.mktemp("work-other"), max_time_s=0.2, threads=1)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "devices" / "orin-canary-01"
    path.mkdir(parents=True)
    return path


def worker_env(monkeypatch, env: dict[str, str]) -> None:
    """The worker's environment holds exactly `env`'s device variables."""
    for var in (ENV_NAME, ENV_ROOT):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- device_from_env


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "..", "/etc", "a\\b"])
def test_device_name_with_a_path_refused_before_anything_is_created(tmp_path: Path, bad: str, monkeypatch):
    root = tmp_path / "root"
    # Even when the worker's own name is that same string: the name is checked first.
    for env in ({ENV_NAME: bad, ENV_ROOT: str(root)}, {ENV_NAME: "orin-01", ENV_ROOT: str(root)}, {}):
        worker_env(monkeypatch, env)
        with pytest.raises(DeviceError) as e:
            device_from_env(bad)
        assert type(e.value) is DeviceError
        msg = one_line(e)
        assert "device name" in msg and repr(bad) in msg
    assert list(tmp_path.iterdir()) == []


def test_device_from_env(tmp_path: Path, monkeypatch):
    worker_env(monkeypatch, {ENV_NAME: "orin-01", ENV_ROOT: str(tmp_path / "repo" / "orin-01")})
    dev = device_from_env("orin-01")
    assert dev == Device("orin-01", (tmp_path / "repo" / "orin-01").resolve())
    assert dev.root.is_dir() and dev.work == dev.root / ".pfp-work"
    assert not dev.work.exists()  # only the root is made


def test_device_from_env_refusals(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "repo"
    # Another device's run.
    worker_env(monkeypatch, {ENV_NAME: "orin-01", ENV_ROOT: str(root)})
    with pytest.raises(DeviceMismatch) as e:
        device_from_env("orin-02")
    msg = one_line(e)
    assert "'orin-01'" in msg and "'orin-02'" in msg and "work_queue" in msg
    assert isinstance(e.value, DeployError) and isinstance(e.value, RuntimeError)
    # Not a device at all.
    for env, missing in (({}, ENV_NAME), ({ENV_NAME: "orin-01"}, ENV_ROOT), ({ENV_ROOT: str(root)}, ENV_NAME),
                         ({ENV_NAME: "", ENV_ROOT: str(root)}, ENV_NAME), ({ENV_NAME: "orin-01", ENV_ROOT: ""}, ENV_ROOT)):
        worker_env(monkeypatch, env)
        with pytest.raises(DeviceError) as e:
            device_from_env("orin-01")
        assert type(e.value) is DeviceError
        assert ENV_NAME in one_line(e) and ENV_ROOT in str(e.value)
        assert str(e.value).startswith(f"this worker is not a device: {missing} is not set;"), (env, str(e.value))
    # A relative root.
    worker_env(monkeypatch, {ENV_NAME: "orin-01", ENV_ROOT: "rel/repo"})
    with pytest.raises(DeviceError) as e:
        device_from_env("orin-01")
    assert one_line(e) == f"{ENV_ROOT}='rel/repo' must be an absolute path"
    assert list(tmp_path.iterdir()) == []  # nothing created by any refusal


# --------------------------------------------------------------------------- backends


@no_tensorrt
def test_choose_backend_falls_through_to_ort_cpu():
    name, skipped = choose_backend(["tensorrt", "ort-cpu"])
    assert name == "ort-cpu"
    assert list(skipped) == ["tensorrt"] and skipped["tensorrt"].startswith("TensorRT is not installed")
    assert choose_backend(["ort-cpu", "tensorrt"]) == ("ort-cpu", {})


@no_tensorrt
def test_choose_backend_none_usable():
    with pytest.raises(DeviceError) as e:
        choose_backend(["tensorrt"])
    msg = one_line(e)
    assert msg.startswith("none of the target's backends runs on this device: tensorrt: TensorRT is not installed")


# --------------------------------------------------------------------------- build_on_device


@no_tensorrt
def test_build_on_device_ort_cpu(built: Built, bundle: Path):
    meta = json.loads((bundle / "export.json").read_text())
    assert built.backend == "ort-cpu" and built.precision == "fp32" and built.engine is None
    assert built.artifact.resolve() == (bundle / "model.onnx").resolve()
    assert built.artifact_sha256 == sha256(bundle / "model.onnx") == meta["onnx"]["sha256"]
    assert built.source_onnx_sha256 == built.artifact_sha256
    assert (built.input_name, built.output_name) == (meta["input_name"], meta["output_name"]) == ("input", "logits")
    assert (built.input_shape, built.output_shape) == ([1, 16, 16], [10])
    assert list(built.skipped_backends) == ["tensorrt"]

    assert built.parity["passed"] is True and built.parity["backend"] == "ort-cpu"
    assert built.parity["samples"] == 64 and built.parity["top1_agreement"] == 1.0
    assert built.parity["max_rel_diff"] <= built.parity["max_rel_tolerance"] == 1e-4

    assert [r["batch"] for r in built.latency] == [1, 8]
    for r in built.latency:
        assert r["backend"] == "ort-cpu" and r["iterations"] >= 1 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["threads"] == 1
    assert built.p("p50", 8) == built.latency[1]["p50_ms"] and built.p("p99", 1) == built.latency[0]["p99_ms"]
    assert built.p("p50", 4) is None

    assert set(built.seconds) == {"build", "verify", "benchmark"}
    assert all(s >= 0 for s in built.seconds.values())
    d = built.to_dict()
    assert json.loads(json.dumps(d)) == d and d["artifact"] == str(built.artifact)


def test_build_on_device_refuses_a_changed_bundle(bundle: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    x, y = load_reference(copy / "reference.npz")
    with open(copy / "reference.npz", "wb") as f:
        np.savez(f, inputs=x, outputs=y + 1)  # a reference that no longer matches export.json
    with pytest.raises(ExportError, match="reference.npz: sha256 .* does not match export.json"):
        build_on_device(copy, ["ort-cpu"], workdir=tmp_path / "w", max_time_s=0.2)


@no_tensorrt
def test_build_on_device_without_a_usable_backend(bundle: Path, tmp_path: Path):
    with pytest.raises(DeviceError, match="none of the target's backends runs on this device: tensorrt"):
        build_on_device(bundle, ["tensorrt"], workdir=tmp_path / "w", max_time_s=0.2)


# --------------------------------------------------------------------------- check_reference


def test_check_reference_exact_passes(bundle: Path):
    ref = bundle / "reference.npz"
    _, want = load_reference(ref)
    report = check_reference(lambda x: want.copy(), ref, "fp32", backend="ort-cpu")
    assert report["passed"] is True and report["samples"] == 64
    assert (report["max_abs_diff"], report["max_rel_diff"], report["top1_agreement"]) == (0.0, 0.0, 1.0)
    assert (report["max_rel_tolerance"], report["min_top1_agreement"]) == (1e-4, 0.999)


def test_check_reference_wrong_outputs(bundle: Path):
    ref = bundle / "reference.npz"
    _, want = load_reference(ref)

    # Shifted: every logit off by 1, the argmax unchanged -> over the relative tolerance only.
    with pytest.raises(ReferenceMismatch) as e:
        check_reference(lambda x: want + 1.0, ref, "fp32", backend="ort-cpu")
    msg = one_line(e)
    assert msg.startswith("ort-cpu fp32 on 64 reference samples: max relative |diff|")
    assert "top-1" not in msg

    # Scaled by 3: again the argmax is kept, the values are not.
    with pytest.raises(ReferenceMismatch, match=r"max relative \|diff\|"):
        check_reference(lambda x: want * 3.0, ref, "fp32", backend="ort-cpu")

    # Rows in another order: the answers belong to other inputs.
    flipped = want[::-1].copy()
    agree = float((flipped.argmax(1) == want.argmax(1)).mean())
    assert agree < 0.999
    with pytest.raises(ReferenceMismatch) as e:
        check_reference(lambda x: flipped, ref, "fp32", backend="ort-cpu")
    assert f"top-1 agreement {100 * agree:.1f}% < 99.9%" in one_line(e)

    # int8 has no relative tolerance: the shift passes, the permutation still fails on top-1.
    report = check_reference(lambda x: want + 1.0, ref, "int8", backend="tensorrt")
    assert report["passed"] is True and report["max_rel_tolerance"] is None
    with pytest.raises(ReferenceMismatch) as e:
        check_reference(lambda x: flipped, ref, "int8", backend="tensorrt")
    assert one_line(e).startswith("tensorrt int8 on 64 reference samples: top-1 agreement")
    assert "relative" not in str(e.value)


def test_check_reference_wrong_shape(bundle: Path):
    ref = bundle / "reference.npz"
    _, want = load_reference(ref)
    with pytest.raises(ReferenceMismatch) as e:
        check_reference(lambda x: want[:, :5], ref, "fp32", backend="ort-cpu")
    assert one_line(e) == "ort-cpu fp32: output shape [64, 5] differs from the reference [64, 10]"
    with pytest.raises(ReferenceMismatch, match=r"output shape \[32, 10\]"):
        check_reference(lambda x: want[:32], ref, "fp32", backend="ort-cpu")


def test_load_reference_bad_files(tmp_path: Path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a numpy file at all")
    missing_key = tmp_path / "inputs-only.npz"
    np.savez(missing_key, inputs=np.zeros((2, 1, 4, 4), np.float32))
    for path in (garbage, missing_key, tmp_path / "absent.npz"):
        with pytest.raises(DeviceError) as e:
            load_reference(path)
        assert one_line(e).startswith(f"{path}: not a reference file with inputs and outputs")


# --------------------------------------------------------------------------- check_budget


def test_check_budget(built: Built):
    p50 = built.p("p50", 1)
    p99 = built.p("p99", 1)
    assert p50 is not None and p99 is not None
    check_budget(built, None)
    check_budget(built, p50 * 2 + 1)
    check_budget(built, p99 * 2 + 1, metric="p99")
    with pytest.raises(LatencyOverBudget) as e:
        check_budget(built, p50 / 2, device="orin-canary-01")
    msg = one_line(e)
    assert msg.startswith("device orin-canary-01: ort-cpu p50 ") and "ms at batch 1 is over the budget" in msg
    with pytest.raises(LatencyOverBudget, match="p99 .* at batch 1"):
        check_budget(built, p99 / 2, metric="p99")


def test_check_budget_uses_the_smallest_batch(built: Built):
    rows = [{"batch": 8, "p50_ms": 40.0, "p99_ms": 50.0}, {"batch": 2, "p50_ms": 3.0, "p99_ms": 9.0}]
    b = dataclasses.replace(built, latency=rows)
    check_budget(b, 4.0)  # batch 2's 3 ms, not batch 8's 40 ms
    with pytest.raises(LatencyOverBudget, match=r"p99 9 ms at batch 2 is over the budget 4 ms"):
        check_budget(b, 4.0, metric="p99")
    check_budget(b, 3.0)  # equal is within the budget


# --------------------------------------------------------------------------- install and activate


def test_install_built_and_activate_checked(built: Built, bundle: Path, root: Path):
    ref = bundle / "reference.npz"
    assert active_registry_version(root, MODEL) == (None, None)
    assert previous_version(root, MODEL) is None

    v1 = install_built(root, MODEL, built, registry=("fmnist-lenet5-pfp", "7"))
    assert v1 == 1
    assert not (root / MODEL / CONFIG_FILE).exists()  # installed, not active
    assert active_registry_version(root, MODEL) == (None, None)
    info = json.loads((root / MODEL / "1" / "pfp.json").read_text())
    assert (info["registry_name"], info["registry_version"], info["backend"]) == ("fmnist-lenet5-pfp", "7", "ort-cpu")
    assert info["sha256"] == built.artifact_sha256 == sha256(root / MODEL / "1" / "model.onnx")
    assert info["inputs"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 1, 16, 16]}]
    assert info["outputs"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [-1, 10]}]
    assert info["reference_check"]["passed"] is True and info["latency"] == built.latency

    state = activate_checked(root, MODEL, v1, reference=ref)
    assert (state["active"], state["previous"]) == (1, None)
    config = (root / MODEL / CONFIG_FILE).read_text()
    assert "version_policy: { specific: { versions: [ 1 ] } }" in config
    assert 'platform: "onnxruntime_onnx"' in config and "dims: [ -1, 1, 16, 16 ]" in config
    assert served_version(root / MODEL) == 1
    assert active_registry_version(root, MODEL) == (1, "7")
    assert previous_version(root, MODEL) is None

    v2 = install_built(root, MODEL, built, registry=("fmnist-lenet5-pfp", "8"))
    assert v2 == 2
    state = activate_checked(root, MODEL, v2, reference=ref)
    assert (state["active"], state["previous"]) == (2, 1)
    assert served_version(root / MODEL) == 2
    assert active_registry_version(root, MODEL) == (2, "8")
    assert previous_version(root, MODEL) == 1


def test_activate_checked_never_activates_a_version_that_fails_its_check(
        built: Built, built_other: Built, bundles, root: Path):
    first_ref = bundles[0] / "reference.npz"
    assert built_other.artifact_sha256 != built.artifact_sha256  # really another model
    assert built_other.parity["passed"]  # ... which is right about its own references

    v1 = install_built(root, MODEL, built, registry=("fmnist-lenet5-pfp", "7"))
    activate_checked(root, MODEL, v1, reference=first_ref)
    v2 = install_built(root, MODEL, built_other, registry=("fmnist-lenet5-pfp", "8"))
    assert v2 == 2
    config_before = (root / MODEL / CONFIG_FILE).read_bytes()

    with pytest.raises(DeviceError) as e:
        activate_checked(root, MODEL, v2, reference=first_ref)
    msg = one_line(e)
    assert msg.startswith("version 2 failed its check before activation (ort-cpu fp32 on 64 reference samples")
    assert msg.endswith("not activated")
    assert isinstance(e.value.__cause__, ReferenceMismatch)

    # The device still serves the first version, untouched; the failed one stays installed, inactive.
    assert (root / MODEL / CONFIG_FILE).read_bytes() == config_before
    assert active_registry_version(root, MODEL) == (1, "7")
    assert previous_version(root, MODEL) is None
    state = json.loads((root / MODEL / STATE_FILE).read_text())
    assert [h["action"] for h in state["history"]] == ["install", "activate", "install"]
    assert (root / MODEL / "2" / "model.onnx").is_file()


def test_activate_checked_failure_without_previous_serves_nothing(built_other: Built, bundles, root: Path):
    v1 = install_built(root, MODEL, built_other, registry=("fmnist-lenet5-pfp", "8"))
    with pytest.raises(DeviceError) as e:
        activate_checked(root, MODEL, v1, reference=bundles[0] / "reference.npz")
    msg = one_line(e)
    assert msg.startswith("version 1 failed its check before activation (") and msg.endswith("not activated")
    assert isinstance(e.value.__cause__, ReferenceMismatch)
    assert not (root / MODEL / CONFIG_FILE).exists() and active_registry_version(root, MODEL) == (None, None)


def test_run_installed(built: Built, built_other: Built, bundles, root: Path):
    v1 = install_built(root, MODEL, built, registry=("fmnist-lenet5-pfp", "7"))
    v2 = install_built(root, MODEL, built_other, registry=("fmnist-lenet5-pfp", "8"))
    ref1, ref2 = (b / "reference.npz" for b in bundles)
    report = run_installed(root, MODEL, v1, ref1)  # not active: run_installed does not need it to be
    assert report["passed"] is True and report["backend"] == "ort-cpu" and report["samples"] == 64
    assert report["top1_agreement"] == 1.0 and report["max_rel_diff"] <= 1e-4
    assert run_installed(root, MODEL, v2, ref2)["passed"] is True
    with pytest.raises(ReferenceMismatch, match="ort-cpu fp32 on 64 reference samples"):
        run_installed(root, MODEL, v2, ref1)
    with pytest.raises(RepositoryError, match="version 3 of fmnist-lenet5 is not installed"):
        run_installed(root, MODEL, 3, ref1)
    assert not (root / MODEL / CONFIG_FILE).exists()  # running is not activating


# --------------------------------------------------------------------------- work folders


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    pid = int(proc.communicate(timeout=30)[0])  # communicate waits: the child is reaped
    assert pid == proc.pid and proc.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # finished and reaped
    return pid


def test_clean_work_removes_dead_jobs_folders_only(tmp_path: Path, monkeypatch):
    worker_env(monkeypatch, {ENV_NAME: "orin-01", ENV_ROOT: str(tmp_path / "repo")})
    dev = device_from_env("orin-01")
    assert clean_work(dev) == []  # no work folder yet

    mine = new_workdir(dev, "build")
    label, pid, tag = mine.name.rsplit("-", 2)
    assert mine.parent == dev.work and (label, pid) == ("build", str(os.getpid())) and len(tag) == 8
    with pytest.raises(ValueError, match="work label"):
        new_workdir(dev, "../x")

    dead = dev.work / f"download-v7-{dead_pid()}-0123abcd"
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"half a download")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = dev.work / f"build-{holder.pid}-89abcdef"
        live.mkdir()
        (live / "engine.plan").write_bytes(b"being built")

        # A fresh leftover survives a minimum age; an old enough one does not.
        assert clean_work(dev, older_than_s=3600) == []
        assert dead.is_dir()
        removed = clean_work(dev)
        # This process's own folder goes too: the flow calls clean_work holding the device's
        # slot, before its own new_workdir, so one with this pid was left by an earlier job.
        assert sorted(removed) == sorted([dead.name, mine.name])
        assert not dead.exists() and not mine.exists()
        assert live.is_dir() and (live / "engine.plan").read_bytes() == b"being built"
    finally:
        holder.communicate(b"", timeout=30)
    # Now that its process is gone, the other one goes too.
    assert clean_work(dev) == [live.name] and not live.exists()
    assert list(dev.work.iterdir()) == []
