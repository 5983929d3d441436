"""A model bundle: what `pfp export` writes and every backend reads.

    <out>/model.onnx     dynamic batch, checked by onnx.checker
    <out>/model.pt       the PyTorch model file (pfp-model/1, loads with weights_only=True)
    <out>/reference.npz  64 test inputs and PyTorch's logits for them (devices check against it)
    <out>/export.json    input shape, sha256 of the files, FLOPs/params, parity reports

The folder is assembled under a temporary name and renamed into place only after the
parity check passed, so a failed export never leaves a bundle that looks usable, and a
previous bundle at the same place survives a failed re-export.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from export.backends.base import BuildSpec, ModelBundle
from export.onnx_export import ExportError, check_onnx, export_onnx, sha256_file
from export.parity import ParityReport, compare_outputs, require_parity
from pfp.files import write_text_atomic
from pfp.models import build_model
from pfp.resources import count_flops, count_params
from pfp.serialization import load_model

FORMAT = "pfp-bundle/1"
ONNX_FILE = "model.onnx"
MODEL_FILE = "model.pt"
META_FILE = "export.json"
REFERENCE_FILE = "reference.npz"
REFERENCE_SAMPLES = 64


def input_shape_of(spec: dict, meta: dict | None = None) -> tuple[int, ...]:
    """One sample's shape for a pfp model file: the shape it recorded (any model, also a
    user's by import path), else (C, H, W) of the zoo architecture it was built from."""
    if isinstance(meta, dict) and meta.get("input_shape"):
        return tuple(int(d) for d in meta["input_shape"])
    size = int(spec.get("input_size", 32))
    return int(spec.get("in_channels", 3)), size, size


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    parity_batches: Iterable[torch.Tensor],
    *,
    parity_samples: int = 1000,
    opset: int = 18,
    exporter: str = "dynamo",
    simplify: bool = False,
    max_rel: float | None = None,
    min_top1: float | None = None,
) -> tuple[ModelBundle, dict]:
    """Export the pfp model file `checkpoint` to a bundle folder `out_dir`.

    The ONNX file is checked with onnx.checker and run in ONNX Runtime (CPU) against
    PyTorch on up to `parity_samples` samples from `parity_batches`; a mismatch over
    tolerance raises ParityError and leaves `out_dir` as it was.
    """
    from export.backends.ort import OrtBackend

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    model, info = load_model(checkpoint, build_model)
    model.eval()
    shape = input_shape_of(info["spec"], info.get("meta"))
    example = torch.zeros(1, *shape)
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:  # noqa: BLE001 - the file's spec and weights disagree with its input
        raise ExportError(f"{checkpoint}: the model does not run on a 1x{'x'.join(map(str, shape))} input ({e})") from None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    try:
        start = time.perf_counter()
        onnx_info = export_onnx(model, staging / ONNX_FILE, shape, opset=opset, exporter=exporter, simplify=simplify)
        export_s = time.perf_counter() - start
        shutil.copyfile(checkpoint, staging / MODEL_FILE)
        bundle = ModelBundle(
            onnx=staging / ONNX_FILE, checkpoint=staging / MODEL_FILE, input_shape=shape,
            input_name=onnx_info.input_name, output_name=onnx_info.output_name, onnx_sha256=onnx_info.sha256,
        )
        runner = OrtBackend("cpu").load(bundle, BuildSpec(precision="fp32", batch_sizes=(1,)))
        kept: list[torch.Tensor] = []
        report = compare_outputs(
            model, runner.run, _recording(parity_batches, kept, REFERENCE_SAMPLES), backend=runner.backend,
            precision="fp32", max_rel=max_rel, min_top1=min_top1, limit=parity_samples,
        )
        require_parity(report, checkpoint)
        reference = _save_reference(model, kept, staging / REFERENCE_FILE)
        meta = {
            "format": FORMAT,
            "source": str(checkpoint),
            "spec": info["spec"],
            "input_name": onnx_info.input_name,
            "input_shape": list(shape),
            "output_name": onnx_info.output_name,
            "onnx": {"file": ONNX_FILE, "sha256": onnx_info.sha256, "opset": onnx_info.opset,
                     "nodes": onnx_info.nodes, "exporter": exporter, "simplified": simplify,
                     "export_s": round(export_s, 3)},
            "model": {"file": MODEL_FILE, "sha256": sha256_file(staging / MODEL_FILE)},
            "reference": reference,
            "flops": count_flops(model, example),
            "params": count_params(model),
            "model_meta": _summary(info["meta"]),
            "parity": [report.to_dict()],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        _swap_into_place(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return load_bundle(out_dir), meta


def _recording(batches: Iterable[torch.Tensor], kept: list[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
    """Pass `batches` through, keeping their first `n` samples in `kept`."""
    have = 0
    for x in batches:
        if have < n:
            kept.append(x[: n - have].detach().cpu().float())
            have += len(kept[-1])
        yield x


def _save_reference(model: torch.nn.Module, inputs: list[torch.Tensor], path: Path) -> dict:
    """Test inputs and PyTorch's logits for them: what a device checks its engine against."""
    x = torch.cat(inputs)
    with torch.no_grad():
        y = model(x)
    with open(path, "xb") as f:
        np.savez(f, inputs=x.numpy(), outputs=y.numpy())
    return {"file": path.name, "sha256": sha256_file(path), "samples": len(x)}


def _summary(meta: dict) -> dict:
    """The scalar facts of a model file's meta worth carrying (accuracy, FLOPs, ...)."""
    row = meta.get("row") if isinstance(meta.get("row"), dict) else meta
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`; an existing bundle is replaced only at the last step."""
    if out_dir.exists():
        if not (out_dir / META_FILE).is_file() and any(out_dir.iterdir()):
            raise ExportError(f"{out_dir}: exists and is not an export bundle; choose another --out")
        old = out_dir.with_name(f".{out_dir.name}.old.{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def read_meta(bundle_dir: str | Path) -> dict:
    """export.json of a bundle folder; ExportError naming the file if missing or corrupt."""
    path = Path(bundle_dir) / META_FILE
    if not path.is_file():
        raise ExportError(f"{path}: not found; is {bundle_dir} a folder written by `pfp export`?")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{path}: format is not {FORMAT!r}")
    return meta


def load_bundle(bundle_dir: str | Path, *, verify: bool = True) -> ModelBundle:
    """The ModelBundle in `bundle_dir`; with `verify`, both files must match their sha256."""
    bundle_dir = Path(bundle_dir)
    meta = read_meta(bundle_dir)
    onnx_path = bundle_dir / meta["onnx"]["file"]
    model_path = bundle_dir / meta["model"]["file"]
    if verify:
        checks = [(onnx_path, meta["onnx"]["sha256"]), (model_path, meta["model"]["sha256"])]
        if meta.get("reference"):
            checks.append((bundle_dir / meta["reference"]["file"], meta["reference"]["sha256"]))
        for path, want in checks:
            if not path.is_file():
                raise ExportError(f"{path}: missing from the bundle")
            got = sha256_file(path)
            if got != want:
                raise ExportError(f"{path}: sha256 {got[:12]}… does not match export.json ({want[:12]}…); the file was changed")
        check_onnx(onnx_path)
    return ModelBundle(
        onnx=onnx_path,
        checkpoint=model_path if model_path.is_file() else None,
        input_shape=tuple(meta["input_shape"]),
        input_name=meta["input_name"],
        output_name=meta["output_name"],
        onnx_sha256=meta["onnx"]["sha256"],
    )


def add_parity(bundle_dir: str | Path, reports: list[ParityReport]) -> None:
    """Record further parity reports (other backends or precisions) in export.json."""
    path = Path(bundle_dir) / META_FILE
    meta = read_meta(bundle_dir)
    meta["parity"] = [*meta.get("parity", []), *(r.to_dict() for r in reports)]
    write_text_atomic(path, json.dumps(meta, indent=2))
