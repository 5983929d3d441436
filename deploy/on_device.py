"""What an edge device does with one model version, on its own files: no Prefect, no MLflow.

    dev = device_from_env("orin-fleet-01")         # the worker's environment says who and where
    built = build_on_device(bundle_dir, ["tensorrt", "ort-cuda", "ort-cpu"], batch_sizes=[1, 8],
                            workdir=dev.work / "build")
    check_budget(built, 4.0)                       # LatencyOverBudget names the device and figure
    version = install_built(dev.root, "fmnist-lenet5", built, registry=("fmnist-lenet5", "7"))
    activate_checked(dev.root, "fmnist-lenet5", version, reference=bundle_dir / "reference.npz")

The ONNX file travels; the engine is built here (a TensorRT plan is bound to the GPU and
TensorRT version that built it), with the first backend of the target's preference that
this device can run. Before anything is installed, the built runner must reproduce the
bundle's reference logits (PyTorch's, recorded at export) within the precision's tolerance
and is timed at the requested batch sizes. Installing writes a new immutable version folder
(deploy.repository); activating switches config.pbtxt to it, then loads the served file
back from the repository and checks it against the references once more: if that fails,
the previous version is re-activated before the error is raised, so a device never keeps
serving a model that did not answer correctly.

Where a device is: its name and repository root come from the worker's environment
(PFP_DEVICE_NAME, PFP_DEVICE_ROOT, read by DeviceSettings), never from a flow parameter; a run whose device
parameter is not this worker's name is refused, so a run routed to the wrong queue cannot
touch another device's models.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deploy.errors import DeployError
from deploy.repository import (
    RepositoryError, activate, deactivate, install, is_alive, model_dir, read_state, read_version_meta, rollback,
    safe_join, served_version, validate_name,
)

ENV_PREFIX = "PFP_DEVICE_"
ENV_NAME = f"{ENV_PREFIX}NAME"
ENV_ROOT = f"{ENV_PREFIX}ROOT"
WORK_DIR = ".pfp-work"   # downloads and builds; not a model name (names start with a letter or digit)


class DeviceError(DeployError, RuntimeError):
    """This device cannot do what was asked; one line saying why."""


class DeviceMismatch(DeviceError):
    """The run names another device than the worker that took it."""


class ReferenceMismatch(DeviceError):
    """The built engine does not reproduce the bundle's reference outputs."""


class LatencyOverBudget(DeviceError):
    """Measured latency on the device is over the target's budget."""


@dataclass(frozen=True)
class Device:
    """This worker's device: its name and its Triton model repository."""

    name: str
    root: Path

    @property
    def work(self) -> Path:
        return self.root / WORK_DIR


class DeviceSettings(BaseSettings):
    """The worker's device environment: PFP_DEVICE_NAME (who it is) and PFP_DEVICE_ROOT (its
    Triton model repository, an absolute path). An empty variable counts as not set."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore")

    name: str = Field(min_length=1)
    root: Path

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError("must be an absolute path")
        return v


def device_settings() -> DeviceSettings:
    """This worker's DeviceSettings from its environment; DeviceError (one line naming the variable) otherwise."""
    try:
        return DeviceSettings()
    except ValidationError as e:
        err = e.errors()[0]
        var = f"{ENV_PREFIX}{str(err['loc'][0]).upper()}" if err["loc"] else ENV_PREFIX + "*"
        if err["type"] == "missing":
            raise DeviceError(f"this worker is not a device: {var} is not set; set {ENV_NAME} and {ENV_ROOT} "
                              "in the worker's environment") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise DeviceError(f"{var}={str(err['input'])!r} {msg}") from None


def device_from_env(requested: str) -> Device:
    """The device this process runs on, if it is `requested`; DeviceMismatch otherwise.

    `requested` is checked as a folder name before anything else (a flow parameter never
    becomes a path unchecked); the root comes from PFP_DEVICE_ROOT and must be absolute.
    """
    try:
        validate_name(requested, "device name")
    except ValueError as e:
        raise DeviceError(str(e)) from None
    env = device_settings()
    if env.name != requested:
        raise DeviceMismatch(f"this worker is device {env.name!r}, the run is for {requested!r}; "
                             "check the target's work_queue (one queue per device)")
    env.root.mkdir(parents=True, exist_ok=True)
    return Device(env.name, env.root.resolve())


def new_workdir(device: Device, label: str) -> Path:
    """A fresh folder for one job's downloads and builds under the device's work folder."""
    validate_name(label, "work label")
    path = safe_join(device.root, WORK_DIR, f"{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    path.mkdir(parents=True)
    return path


def clean_work(device: Device, *, older_than_s: float = 0.0) -> list[str]:
    """Remove work folders whose process is gone (a job killed mid-download or mid-build)."""
    removed = []
    base = device.work
    if not base.is_dir():
        return removed
    for p in base.iterdir():
        pid = _pid_of(p.name)
        if pid is not None and pid != os.getpid() and is_alive(pid):
            continue
        if time.time() - p.stat().st_mtime < older_than_s:
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def _pid_of(name: str) -> int | None:
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


# --------------------------------------------------------------------------- references


def load_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, PyTorch's outputs) from a bundle's reference.npz; DeviceError naming the file."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return np.ascontiguousarray(data["inputs"], dtype=np.float32), np.asarray(data["outputs"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as e:
        raise DeviceError(f"{path}: not a reference file with inputs and outputs ({e})") from None


def check_reference(run: Any, reference: str | Path | tuple[np.ndarray, np.ndarray], precision: str, *,
                    backend: str) -> dict:
    """Run the reference inputs (a reference.npz, or its loaded (inputs, outputs)) through
    `run` (numpy -> numpy) and compare with PyTorch's logits at the precision's tolerance;
    the report as a dict, ReferenceMismatch if over."""
    from export.parity import batch_differences, tolerances

    x, want = load_reference(reference) if isinstance(reference, (str, Path)) else reference
    got = np.asarray(run(x), dtype=np.float32)
    if got.shape != want.shape:
        raise ReferenceMismatch(f"{backend} {precision}: output shape {list(got.shape)} differs from the "
                                f"reference {list(want.shape)}")
    max_rel, min_top1 = tolerances(precision)
    max_abs, rel, _, agree = batch_differences(got, want)
    top1 = agree / len(x)
    report = {"backend": backend, "precision": precision, "samples": len(x), "max_abs_diff": max_abs,
              "max_rel_diff": rel, "top1_agreement": top1, "max_rel_tolerance": max_rel,
              "min_top1_agreement": min_top1}
    problems = []
    if max_rel is not None and rel > max_rel:
        problems.append(f"max relative |diff| {rel:.3g} > {max_rel:g}")
    if top1 < min_top1:
        problems.append(f"top-1 agreement {100 * top1:.1f}% < {100 * min_top1:.1f}%")
    report["passed"] = not problems
    if problems:
        raise ReferenceMismatch(f"{backend} {precision} on {len(x)} reference samples: {'; '.join(problems)}")
    return report


# --------------------------------------------------------------------------- build, check, time


@dataclass
class Built:
    """An engine built on this device from a bundle, checked and timed."""

    backend: str
    precision: str
    artifact: Path                 # model.onnx (ONNX Runtime) or model.<precision>.plan (TensorRT)
    artifact_sha256: str
    source_onnx_sha256: str
    input_name: str
    output_name: str
    input_shape: list[int]
    output_shape: list[int]
    parity: dict
    latency: list[dict]
    skipped_backends: dict[str, str] = field(default_factory=dict)
    engine: dict | None = None     # the TensorRT engine record
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["artifact"] = str(self.artifact)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Built":
        """Inverse of to_dict (a Built crosses Prefect task boundaries as plain data)."""
        return cls(**{**d, "artifact": Path(d["artifact"])})

    def p(self, metric: str, batch: int) -> float | None:
        """The measured `metric` (p50, p99) in ms at `batch`, if measured."""
        row = next((r for r in self.latency if r["batch"] == batch), None)
        return float(row[f"{metric}_ms"]) if row else None


def choose_backend(preference: Sequence[str]) -> tuple[str, dict[str, str]]:
    """The first backend in `preference` this device can run, and why the ones before it cannot."""
    from export.backends import get_backend

    skipped: dict[str, str] = {}
    for name in preference:
        reason = get_backend(name).unavailable_reason()
        if reason is None:
            return name, skipped
        skipped[name] = reason
    raise DeviceError("none of the target's backends runs on this device: "
                      + "; ".join(f"{k}: {v}" for k, v in skipped.items()))


def build_on_device(
    bundle_dir: str | Path,
    backend_preference: Sequence[str],
    *,
    batch_sizes: Sequence[int] = (1,),
    precision: str = "fp32",
    workdir: str | Path,
    max_time_s: float = 5.0,
    threads: int | None = None,
) -> Built:
    """Build the bundle's model on the first usable backend, check it against the bundle's
    reference outputs, and time it at `batch_sizes`. The bundle's files must match the
    hashes in its export.json (checked on load)."""
    from export.backends import get_backend
    from export.backends.base import BuildSpec
    from export.bundle import REFERENCE_FILE, load_bundle
    from export.latency import LatencySettings, bench_runner
    from pfp.files import sha256_file

    t0 = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    name, skipped = choose_backend(backend_preference)
    spec = BuildSpec(precision=precision, batch_sizes=tuple(batch_sizes), threads=threads, workdir=Path(workdir))
    runner = get_backend(name).load(bundle, spec)
    t1 = time.perf_counter()
    reference = load_reference(Path(bundle_dir) / REFERENCE_FILE)
    try:
        parity = check_reference(runner.run, reference, precision, backend=name)
        t2 = time.perf_counter()
        settings = LatencySettings(threads=threads, max_time_s=max_time_s, min_time_s=min(1.0, max_time_s),
                                   warmup_s=min(0.5, max_time_s / 4))
        results = bench_runner(runner, list(batch_sizes), input_shape=bundle.input_shape, settings=settings)
        t3 = time.perf_counter()
        artifact = Path(runner.artifact) if runner.artifact else Path(bundle.onnx)
        engine = getattr(runner, "record", None)
    finally:
        runner.close()
    return Built(
        backend=name, precision=precision, artifact=artifact, artifact_sha256=sha256_file(artifact),
        source_onnx_sha256=bundle.onnx_sha256 or sha256_file(bundle.onnx), input_name=bundle.input_name,
        output_name=bundle.output_name, input_shape=list(bundle.input_shape),
        output_shape=list(reference[1].shape[1:]), parity=parity,
        latency=[dataclasses.asdict(r) for r in results], skipped_backends=skipped,
        engine=engine.to_dict() if engine is not None else None,
        seconds={"build": t1 - t0, "verify": t2 - t1, "benchmark": t3 - t2},
    )


def check_budget(built: Built, budget_ms: float | None, *, metric: str = "p50", device: str = "") -> None:
    """LatencyOverBudget if `metric` at the smallest measured batch is over `budget_ms`."""
    if budget_ms is None:
        return
    if not built.latency:
        raise DeviceError(f"device {device}: nothing was timed, so the budget {budget_ms:g} ms cannot be checked")
    batch = min(r["batch"] for r in built.latency)
    value = built.p(metric, batch)
    if value is None or value > budget_ms:
        raise LatencyOverBudget(f"device {device}: {built.backend} {metric} {value:.3g} ms at batch {batch} "
                                f"is over the budget {budget_ms:g} ms")


# --------------------------------------------------------------------------- repository


def install_built(root: str | Path, model_name: str, built: Built, *, registry: tuple[str, str],
                  lock_wait_s: float = 2.0) -> int:
    """Install the built engine as a new (inactive) version of `model_name`; its number."""
    dims = [-1, *built.input_shape]
    meta = {
        "registry_name": registry[0], "registry_version": registry[1], "backend": built.backend,
        "precision": built.precision, "source_onnx_sha256": built.source_onnx_sha256,
        "latency": built.latency, "max_batch_size": 0, "engine": built.engine,
        "inputs": [{"name": built.input_name, "dims": dims}],
        "outputs": [{"name": built.output_name, "dims": [-1, *built.output_shape]}],
        "reference_check": built.parity,
    }
    return install(root, model_name, built.artifact, meta=meta, expected_sha256=built.artifact_sha256,
                   lock_wait_s=lock_wait_s)


def run_installed(root: str | Path, model_name: str, version: int, reference: str | Path) -> dict:
    """Load version `version` from the repository as the server would (its file, its
    recorded backend) and check it against the references; the report."""
    from export.backends import get_backend
    from export.backends.base import BuildSpec, ModelBundle

    mdir = model_dir(root, model_name)
    meta = read_version_meta(mdir, version)
    path = mdir / str(version) / meta["file"]
    x, _ = load_reference(reference)
    name_in = meta["inputs"][0]["name"] if meta.get("inputs") else "input"
    name_out = meta["outputs"][0]["name"] if meta.get("outputs") else "logits"
    if meta["backend"] == "tensorrt":
        from export.backends.tensorrt import TensorRTRunner
        from export.engine_record import EngineRecord

        if not meta.get("engine"):
            raise DeviceError(f"{mdir / str(version)}: a TensorRT version without its engine record")
        runner = TensorRTRunner(path, EngineRecord.from_dict(meta["engine"], source=str(path)))
    else:
        bundle = ModelBundle(onnx=path, checkpoint=None, input_shape=tuple(x.shape[1:]), input_name=name_in,
                             output_name=name_out)
        runner = get_backend(meta["backend"]).load(bundle, BuildSpec(precision="fp32", batch_sizes=(len(x),)))
    try:
        return check_reference(runner.run, reference, meta.get("precision", "fp32"), backend=meta["backend"])
    finally:
        runner.close()


def activate_checked(root: str | Path, model_name: str, version: int, *, reference: str | Path,
                     lock_wait_s: float = 2.0) -> dict:
    """Check the installed `version` from the repository, activate it, and check what is
    served once more; if that fails, re-activate what was active before (or serve nothing
    when nothing was) and raise. The new state."""
    try:
        run_installed(root, model_name, version, reference)
    except Exception as e:
        raise DeviceError(f"version {version} failed its check before activation ({e}); not activated") from e
    state = activate(root, model_name, version, lock_wait_s=lock_wait_s)
    try:
        run_installed(root, model_name, version, reference)
    except Exception as e:
        if state.get("previous") is not None:
            rollback(root, model_name, lock_wait_s=lock_wait_s)
            raise DeviceError(f"version {version} failed its check after activation ({e}); "
                              f"rolled back to version {state['previous']}") from e
        deactivate(root, model_name, lock_wait_s=lock_wait_s)
        raise DeviceError(f"version {version} failed its check after activation ({e}); "
                          "nothing was active before, so nothing is served now") from e
    return state


def active_registry_version(root: str | Path, model_name: str) -> tuple[int | None, str | None]:
    """(repository version, registry version) of what the device serves now."""
    mdir = model_dir(root, model_name)
    if not mdir.is_dir():
        return None, None
    served = served_version(mdir)
    if served is None:
        return None, None
    try:
        return served, str(read_version_meta(mdir, served).get("registry_version"))
    except RepositoryError:
        return served, None


def previous_version(root: str | Path, model_name: str) -> int | None:
    """The version a rollback would restore."""
    mdir = model_dir(root, model_name)
    return read_state(mdir).get("previous") if mdir.is_dir() else None


__all__ = [
    "ENV_NAME", "ENV_PREFIX", "ENV_ROOT", "Built", "Device", "DeviceError", "DeviceMismatch", "DeviceSettings",
    "LatencyOverBudget",
    "ReferenceMismatch", "activate_checked", "active_registry_version", "build_on_device", "check_budget",
    "check_reference", "choose_backend", "clean_work", "device_from_env", "device_settings", "install_built",
    "load_reference",
    "new_workdir", "previous_version", "run_installed",
]
