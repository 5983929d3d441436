"""What a TensorRT engine file is bound to, kept beside it as ``X.plan.json``.

A TensorRT engine (plan) only runs on the GPU model and TensorRT version that built it,
and only for the batch sizes its optimisation profiles cover. Each ``X.plan`` gets a JSON
record saying so (TensorRT version, GPU, compute capability, profiles, precision and how
it was applied, the sha256 of the source ONNX and of the engine itself, the build options).
Before an engine is deserialised, `check_engine` compares the record with this machine and
with the file's bytes, and `check_batch` with the batch asked for, so a mismatch is refused
with one line that says what differs instead of a TensorRT crash or a silent wrong answer.

Pure Python: `current_binding` asks tensorrt and torch.cuda when they are there and
reports None for what it cannot know.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from export.backends.base import BackendError
from pfp.files import sha256_file, write_bytes_atomic

__all__ = [
    "RECORD_FORMAT",
    "EngineRecord",
    "EngineMismatch",
    "record_path",
    "save_record",
    "load_record",
    "sha256_file",
    "write_bytes_atomic",
    "current_binding",
    "check_engine",
    "check_batch",
    "format_profiles",
    "stale_fields",
]

RECORD_FORMAT = "pfp-tensorrt-engine/1"
# The fields of the machine an engine is bound to, in the order messages name them.
BINDING_FIELDS = ("gpu_name", "compute_capability", "tensorrt_version")


class EngineMismatch(BackendError):
    """An engine file that must not be used here: built for another GPU or TensorRT,
    or its bytes no longer match its record. One line naming the file and what differs."""


@dataclass
class EngineRecord:
    """Everything an engine file is bound to. ``input_shape`` is one sample's shape;
    ``profiles`` holds one ``{"min", "opt", "max"}`` batch-size triple per optimisation
    profile, in the engine's profile order."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    input_name: str
    input_shape: list[int]
    profiles: list[dict[str, int]]
    batch_sizes: list[int]
    precision: str
    precision_mode: str  # "builder_flags" (TensorRT 10) or "graph" (Q/DQ or FP16 ONNX)
    onnx_sha256: str  # the exported FP32 ONNX the engine stands for
    engine_sha256: str
    output_name: str = "logits"
    parsed_onnx_sha256: str | None = None  # the ONNX TensorRT parsed, when precision made a new one
    cuda_runtime: str | None = None
    timing_cache: str | None = None
    build_seconds: float | None = None
    built_at: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    format: str = RECORD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "record") -> "EngineRecord":
        """Build a record from parsed JSON; BackendError naming `source` when fields are
        missing, unknown or of the wrong kind."""
        if not isinstance(data, dict):
            raise BackendError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != RECORD_FORMAT:
            raise BackendError(f"{source}: format is {data.get('format')!r}, expected {RECORD_FORMAT!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - data.keys())
        if missing:
            raise BackendError(f"{source}: missing field(s) {', '.join(missing)}")
        unknown = sorted(data.keys() - names)
        if unknown:
            raise BackendError(f"{source}: unknown field(s) {', '.join(unknown)}")
        try:
            profiles = [{k: int(p[k]) for k in ("min", "opt", "max")} for p in data["profiles"]]
            record = cls(**{
                **data,
                "input_shape": [int(d) for d in data["input_shape"]],
                "batch_sizes": [int(b) for b in data["batch_sizes"]],
                "profiles": profiles,
            })
        except (TypeError, KeyError, ValueError) as e:
            raise BackendError(f"{source}: malformed field ({type(e).__name__}: {e})") from None
        if not record.profiles:
            raise BackendError(f"{source}: the record lists no optimisation profiles")
        return record


def record_path(engine_path: str | Path) -> Path:
    """The record file of an engine: ``model.plan`` -> ``model.plan.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def save_record(engine_path: str | Path, record: EngineRecord) -> Path:
    """Write the record of `engine_path` (atomically) and return where it went."""
    # default=str: build options may hold paths and the like; they are kept as text.
    text = json.dumps(record.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
    return write_bytes_atomic(record_path(engine_path), text.encode())


def load_record(engine_path: str | Path) -> EngineRecord:
    """Read the record of `engine_path`; BackendError naming the record file when it is
    missing, not JSON, or not a record."""
    rp = record_path(engine_path)
    try:
        text = rp.read_text()
    except FileNotFoundError:
        raise BackendError(
            f"{rp.name}: no engine record beside {Path(engine_path).name}; rebuild the engine"
        ) from None
    except OSError as e:
        raise BackendError(f"{rp.name}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BackendError(f"{rp.name}: not valid JSON ({e.msg} at line {e.lineno}); rebuild the engine") from None
    return EngineRecord.from_dict(data, source=rp.name)


def current_binding() -> dict[str, str | None]:
    """What an engine built here would be bound to: TensorRT version, GPU name, compute
    capability ("9.0") and torch's CUDA runtime version. Unknown values are None (no
    TensorRT installed, no CUDA GPU), so this works on any machine."""
    binding: dict[str, str | None] = {
        "tensorrt_version": None, "gpu_name": None, "compute_capability": None, "cuda_runtime": None,
    }
    try:
        import tensorrt  # noqa: PLC0415 - optional, heavy, GPU-only dependency

        binding["tensorrt_version"] = str(tensorrt.__version__)
    except Exception:  # ImportError, or OSError when its CUDA libraries are missing
        pass
    try:
        import torch  # noqa: PLC0415

        binding["cuda_runtime"] = torch.version.cuda
        if torch.cuda.is_available():
            dev = torch.cuda.current_device()
            binding["gpu_name"] = torch.cuda.get_device_name(dev)
            major, minor = torch.cuda.get_device_capability(dev)
            binding["compute_capability"] = f"{major}.{minor}"
    except Exception:
        pass
    return binding


def _describe(gpu: str | None, cc: str | None, trt: str | None) -> str:
    gpu_part = f"{gpu or 'no CUDA GPU'}" + (f" (compute {cc})" if cc else "")
    trt_part = f"TensorRT {trt}" if trt else "no TensorRT"
    return f"{gpu_part} with {trt_part}"


def check_engine(engine_path: str | Path, record: EngineRecord, binding: dict[str, Any]) -> None:
    """Refuse an engine that was built for another machine or whose bytes changed.

    Raises EngineMismatch with one line naming the file and every mismatched field, e.g.
    "model.plan: built for NVIDIA H100 80GB HBM3 (compute 9.0) with TensorRT 10.9.0.34;
    this machine has NVIDIA A10 (compute 8.6) with TensorRT 10.9.0.34: rebuild the engine
    here (mismatched: gpu_name, compute_capability)".
    """
    path = Path(engine_path)
    wrong = [k for k in BINDING_FIELDS if getattr(record, k) != binding.get(k)]
    if wrong:
        built = _describe(record.gpu_name, record.compute_capability, record.tensorrt_version)
        here = _describe(binding.get("gpu_name"), binding.get("compute_capability"), binding.get("tensorrt_version"))
        raise EngineMismatch(
            f"{path.name}: built for {built}; this machine has {here}: rebuild the engine here "
            f"(mismatched: {', '.join(wrong)})"
        )
    if not path.is_file():
        raise EngineMismatch(f"{path.name}: the engine file is missing (its record is there); rebuild the engine")
    actual = sha256_file(path)
    if actual != record.engine_sha256:
        raise EngineMismatch(
            f"{path.name}: engine_sha256 {actual[:12]}... does not match its record's "
            f"{record.engine_sha256[:12]}...: the file is corrupt or was replaced; rebuild the engine"
        )


def format_profiles(profiles: Sequence[dict[str, int]]) -> str:
    """"(1, 8, 32)" for fixed-batch profiles; a range profile reads "1..32 (opt 16)"."""
    parts = []
    for p in profiles:
        if p["min"] == p["max"]:
            parts.append(str(p["min"]))
        else:
            parts.append(f"{p['min']}..{p['max']} (opt {p['opt']})")
    return "(" + ", ".join(parts) + ")"


def check_batch(engine_path: str | Path, record: EngineRecord, batch: int) -> int:
    """Index of the optimisation profile that serves `batch`: the first with min = batch
    = max, else the narrowest range that holds it. BackendError when none does."""
    batch = int(batch)
    covering = [
        (p["max"] - p["min"], i) for i, p in enumerate(record.profiles) if p["min"] <= batch <= p["max"]
    ]
    if not covering:
        raise BackendError(
            f"{Path(engine_path).name}: batch {batch} is outside the engine's optimisation profiles "
            f"{format_profiles(record.profiles)}"
        )
    return min(covering)[1]


def stale_fields(
    record: EngineRecord,
    *,
    onnx_sha256: str,
    precision: str,
    batch_sizes: Sequence[int],
    profiles: Sequence[dict[str, int]],
    precision_mode: str,
    binding: dict[str, Any],
) -> list[str]:
    """The fields that stop an existing engine from standing for this request (empty when
    it can be reused as is)."""
    wanted = {
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "batch_sizes": sorted(int(b) for b in batch_sizes),
        "profiles": [dict(p) for p in profiles],
        "precision_mode": precision_mode,
        **{k: binding.get(k) for k in BINDING_FIELDS},
    }
    have = record.to_dict()
    have["batch_sizes"] = sorted(have["batch_sizes"])
    return [k for k, v in wanted.items() if have[k] != v]
