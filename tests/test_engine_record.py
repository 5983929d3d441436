"""Engine records (export.engine_record): real JSON files and real sha256s of real bytes.

No TensorRT is needed: the machine an engine is checked against is passed in as a dict.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from export.backends.base import BackendError
from export.engine_record import (
    RECORD_FORMAT,
    EngineMismatch,
    EngineRecord,
    check_batch,
    check_engine,
    current_binding,
    format_profiles,
    load_record,
    record_path,
    save_record,
    sha256_file,
    stale_fields,
    write_bytes_atomic,
)

H100 = {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
        "cuda_runtime": "12.8"}
A10 = {**H100, "gpu_name": "NVIDIA A10", "compute_capability": "8.6"}
PROFILES = [{"min": b, "opt": b, "max": b} for b in (1, 8, 32)]


@pytest.fixture
def engine(tmp_path):
    """A plan file with arbitrary bytes and a record of it, as written by a build on H100."""
    plan = tmp_path / "model.plan"
    plan.write_bytes(os.urandom(4096))
    record = EngineRecord(
        tensorrt_version=H100["tensorrt_version"], gpu_name=H100["gpu_name"],
        compute_capability=H100["compute_capability"], input_name="input", input_shape=[1, 28, 28],
        profiles=[dict(p) for p in PROFILES], batch_sizes=[1, 8, 32], precision="fp16",
        precision_mode="builder_flags", onnx_sha256="ab" * 32, engine_sha256=sha256_file(plan),
        cuda_runtime="12.8", timing_cache="timing.cache", build_seconds=12.5,
        built_at="2026-01-01T00:00:00+00:00", options={"workspace_mib": 1024},
    )
    save_record(plan, record)
    return plan, record


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 7)  # more than one read chunk
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_round_trip(engine):
    plan, record = engine
    rp = record_path(plan)
    assert rp.name == "model.plan.json" and rp.is_file()
    on_disk = json.loads(rp.read_text())
    assert on_disk["format"] == RECORD_FORMAT
    assert on_disk["engine_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert on_disk["profiles"] == PROFILES
    assert load_record(plan) == record


def test_missing_record_names_the_file(tmp_path):
    with pytest.raises(BackendError, match=r"^model\.plan\.json: no engine record beside model\.plan"):
        load_record(tmp_path / "model.plan")


@pytest.mark.parametrize("text, expected", [
    ("{not json", r"model\.plan\.json: not valid JSON"),
    ("[1, 2]", r"model\.plan\.json: expected a JSON object, got list"),
    (json.dumps({"format": "other/1"}), r"model\.plan\.json: format is 'other/1'"),
    (json.dumps({"format": RECORD_FORMAT, "precision": "fp16"}), r"model\.plan\.json: missing field\(s\) .*gpu_name"),
])
def test_corrupt_record_names_the_file(engine, text, expected):
    plan, _ = engine
    record_path(plan).write_text(text)
    with pytest.raises(BackendError, match=expected) as ei:
        load_record(plan)
    assert "\n" not in str(ei.value)


def test_record_with_unknown_or_malformed_fields(engine):
    plan, record = engine
    data = record.to_dict()
    record_path(plan).write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(BackendError, match=r"unknown field\(s\) surprise"):
        load_record(plan)
    record_path(plan).write_text(json.dumps({**data, "profiles": [{"min": 1}]}))
    with pytest.raises(BackendError, match=r"model\.plan\.json: malformed field"):
        load_record(plan)
    record_path(plan).write_text(json.dumps({**data, "profiles": []}))
    with pytest.raises(BackendError, match="no optimisation profiles"):
        load_record(plan)


def test_check_engine_accepts_the_machine_it_was_built_on(engine):
    plan, record = engine
    check_engine(plan, load_record(plan), H100)


def test_other_gpu_is_refused_in_one_line(engine):
    plan, record = engine
    with pytest.raises(EngineMismatch) as ei:
        check_engine(plan, record, A10)
    msg = str(ei.value)
    assert msg == (
        "model.plan: built for NVIDIA H100 80GB HBM3 (compute 9.0) with TensorRT 10.9.0.34; "
        "this machine has NVIDIA A10 (compute 8.6) with TensorRT 10.9.0.34: rebuild the engine here "
        "(mismatched: gpu_name, compute_capability)"
    )
    assert isinstance(ei.value, BackendError) and isinstance(ei.value, ValueError)


@pytest.mark.parametrize("field, value, shown", [
    ("tensorrt_version", "10.13.3.9", "TensorRT 10.13.3.9"),
    ("tensorrt_version", "11.4.0.1", "TensorRT 11.4.0.1"),
    ("tensorrt_version", None, "no TensorRT"),
    ("compute_capability", "9.0a", "(compute 9.0a)"),
    ("gpu_name", "NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("gpu_name", None, "no CUDA GPU"),
])
def test_each_mismatched_field_is_named(engine, field, value, shown):
    plan, record = engine
    with pytest.raises(EngineMismatch) as ei:
        check_engine(plan, record, {**H100, field: value})
    msg = str(ei.value)
    assert msg.startswith("model.plan: built for NVIDIA H100 80GB HBM3 (compute 9.0) with TensorRT 10.9.0.34;")
    assert f"(mismatched: {field})" in msg and shown in msg and "\n" not in msg


def test_cuda_runtime_alone_does_not_refuse(engine):
    plan, record = engine
    check_engine(plan, record, {**H100, "cuda_runtime": "13.0"})


def test_tampered_engine_bytes_are_refused(engine):
    plan, record = engine
    data = bytearray(plan.read_bytes())
    data[100] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(EngineMismatch) as ei:
        check_engine(plan, record, H100)
    msg = str(ei.value)
    assert msg.startswith("model.plan: engine_sha256 ") and "corrupt or was replaced" in msg
    assert record.engine_sha256[:12] in msg and sha256_file(plan)[:12] in msg


def test_truncated_and_missing_engine(engine):
    plan, record = engine
    plan.write_bytes(plan.read_bytes()[:-1])
    with pytest.raises(EngineMismatch, match=r"^model\.plan: engine_sha256"):
        check_engine(plan, record, H100)
    plan.unlink()
    with pytest.raises(EngineMismatch, match=r"^model\.plan: the engine file is missing"):
        check_engine(plan, record, H100)


def test_check_batch_picks_the_profile(engine):
    plan, record = engine
    assert [check_batch(plan, record, b) for b in (1, 8, 32)] == [0, 1, 2]


@pytest.mark.parametrize("batch", [64, 2, 0])
def test_batch_outside_profiles(engine, batch):
    plan, record = engine
    with pytest.raises(BackendError) as ei:
        check_batch(plan, record, batch)
    assert str(ei.value) == f"model.plan: batch {batch} is outside the engine's optimisation profiles (1, 8, 32)"


def test_range_profiles(engine):
    plan, record = engine
    record.profiles = [{"min": 1, "opt": 16, "max": 32}, {"min": 8, "opt": 8, "max": 8}]
    assert check_batch(plan, record, 8) == 1  # the exact profile beats the range
    assert check_batch(plan, record, 20) == 0
    assert format_profiles(record.profiles) == "(1..32 (opt 16), 8)"
    with pytest.raises(BackendError, match=r"batch 33 is outside the engine's optimisation profiles \(1\.\.32"):
        check_batch(plan, record, 33)


def test_stale_fields(engine):
    plan, record = engine
    same = dict(onnx_sha256=record.onnx_sha256, precision="fp16", batch_sizes=[32, 8, 1], profiles=PROFILES,
                precision_mode="builder_flags", binding=H100)
    assert stale_fields(record, **same) == []
    assert stale_fields(record, **{**same, "precision": "int8"}) == ["precision"]
    assert stale_fields(record, **{**same, "onnx_sha256": "cd" * 32}) == ["onnx_sha256"]
    assert stale_fields(record, **{**same, "batch_sizes": [1, 8], "profiles": PROFILES[:2]}) == [
        "batch_sizes", "profiles"]
    assert stale_fields(record, **{**same, "binding": A10}) == ["gpu_name", "compute_capability"]
    assert stale_fields(record, **{**same, "precision_mode": "graph"}) == ["precision_mode"]


def test_current_binding_without_tensorrt_or_gpu():
    b = current_binding()
    assert set(b) == {"tensorrt_version", "gpu_name", "compute_capability", "cuda_runtime"}
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert b["tensorrt_version"] is None
    import torch

    if not torch.cuda.is_available():
        assert b["gpu_name"] is None and b["compute_capability"] is None
    else:
        major, minor = torch.cuda.get_device_capability()
        assert b["compute_capability"] == f"{major}.{minor}"


def test_write_bytes_atomic_replaces_whole_files(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    write_bytes_atomic(target, b"first")
    write_bytes_atomic(target, memoryview(b"second"))
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["x.bin"]


def test_write_bytes_atomic_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    class Boom:  # fails while being written (not a bytes-like object)
        pass

    with pytest.raises(TypeError):
        write_bytes_atomic(target, Boom())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
