"""export.machine: the machine description and CPU thread pinning."""
from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from export import machine
from export.machine import describe_machine, machine_summary, pin_cpu_threads

has_affinity = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")


@pytest.fixture(scope="module")
def desc() -> dict:
    return describe_machine()


def _fake_tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_describe_machine_is_strict_json_with_cpu_and_versions(desc):
    text = json.dumps(desc, allow_nan=False)
    assert json.loads(text) == desc
    cpu = desc["cpu"]
    assert cpu["logical_cores"] == os.cpu_count()
    if os.path.exists("/proc/cpuinfo"):
        assert isinstance(cpu["model"], str) and cpu["model"].strip()
    if hasattr(os, "sched_getaffinity"):
        assert cpu["affinity"] == sorted(os.sched_getaffinity(0))
        assert cpu["affinity_cores"] == len(os.sched_getaffinity(0))
    libs = desc["libraries"]
    assert libs["torch"] == torch.__version__  # keeps the +cuXXX build tag
    assert libs["numpy"] == np.__version__
    assert desc["python"].count(".") == 2
    assert desc["memory_bytes"] is None or desc["memory_bytes"] > 2**27


def test_describe_machine_reports_onnxruntime_providers_when_installed(desc):
    if desc["libraries"]["onnxruntime"] is None:
        assert desc["onnxruntime_providers"] is None
    else:
        assert "CPUExecutionProvider" in desc["onnxruntime_providers"]


def test_describe_machine_gpus_match_torch(desc):
    if not torch.cuda.is_available():
        assert desc["gpus"] == []
        return
    assert len(desc["gpus"]) == torch.cuda.device_count()
    gpu = desc["gpus"][0]
    assert gpu["name"] == torch.cuda.get_device_name(0)
    assert re.fullmatch(r"\d+\.\d+", gpu["compute_capability"])
    assert gpu["memory_bytes"] > 2**30
    assert desc["cuda"]["torch_cuda"] == torch.version.cuda


def test_describe_machine_turns_failures_into_none(monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("unreadable")

    monkeypatch.setattr(machine, "_cpu_model", broken)
    monkeypatch.setattr(machine, "_nvidia_driver", broken)
    monkeypatch.setattr(machine, "_memory_bytes", broken)
    monkeypatch.setattr(machine, "_libraries", broken)
    d = describe_machine()
    assert d["cpu"]["model"] is None
    assert d["cuda"]["driver"] is None
    assert d["memory_bytes"] is None
    assert d["libraries"] == {} and d["onnxruntime_providers"] is None
    json.dumps(d, allow_nan=False)
    machine_summary(d)


def test_command_times_out_and_reads_driver(tmp_path, monkeypatch):
    _fake_tool(tmp_path, "hangs", "sleep 30")
    _fake_tool(tmp_path, "nvidia-smi", 'echo "550.54.15"; echo "550.54.15"')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    t0 = time.perf_counter()
    assert machine._command(["hangs"], timeout=0.3) is None
    assert time.perf_counter() - t0 < 5
    assert machine._command(["no-such-tool-here"]) is None
    assert machine._nvidia_driver() == "550.54.15"


def test_jetson_release_and_power_mode(tmp_path, monkeypatch):
    assert machine._l4t_release("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic") == "36.3.0"
    assert machine._l4t_release("# R32 (release)") == "32"
    assert machine._l4t_release("garbage") is None
    assert machine._power_mode("NV Power Mode: MAXN\n0\n") == "MAXN (0)"
    assert machine._power_mode("NV Power Mode: 15W") == "15W"
    assert machine._power_mode("nothing") is None

    _fake_tool(tmp_path, "nvpmodel", 'echo "NV Power Mode: 30W"; echo 2')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    jet = machine._jetson("NVIDIA Jetson AGX Orin Developer Kit")
    assert jet is not None and jet["power_mode"] == "30W (2)"
    assert jet["model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    if not os.path.exists("/etc/nv_tegra_release"):
        assert machine._jetson("Raspberry Pi 4 Model B") is None


def test_machine_summary_lines(desc):
    line = machine_summary(desc)
    assert "\n" not in line
    assert f"torch {torch.__version__}" in line
    if desc["cpu"]["model"]:
        assert desc["cpu"]["model"] in line
    if not desc["gpus"]:
        assert "no GPU" in line

    gpu_desc = {
        "cpu": {"model": "AMD EPYC 9454", "logical_cores": 16, "affinity_cores": 8},
        "gpus": [{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_bytes": 80 * 2**30}],
        "cuda": {"driver": "550.54.15"},
        "libraries": {"torch": "2.14.1", "tensorrt": "10.9.0"},
        "jetson": {"model": "Jetson", "l4t": "36.3.0", "power_mode": "MAXN (0)"},
    }
    line = machine_summary(gpu_desc)
    for part in ("AMD EPYC 9454, 16 cores (8 allowed)", "NVIDIA H100 80GB HBM3 (sm 9.0, 80 GiB)",
                 "driver 550.54.15", "tensorrt 10.9.0", "MAXN (0)", "L4T 36.3.0"):
        assert part in line
    assert "unknown CPU" in machine_summary({})


def test_physical_cores_come_before_smt_siblings(monkeypatch):
    # cpus 0 and 2 share core 0, cpus 1 and 3 share core 1
    topology = {0: ("0", "0"), 1: ("0", "1"), 2: ("0", "0"), 3: ("0", "1")}

    def fake_read(path):
        p = Path(path)
        cpu = int(p.parent.parent.name.removeprefix("cpu"))
        return topology[cpu][0 if p.name == "physical_package_id" else 1]

    monkeypatch.setattr(machine, "_read_text", fake_read)
    assert machine._physical_first([0, 1, 2, 3]) == [0, 1, 2, 3]
    assert machine._physical_first([0, 2, 1, 3]) == [0, 1, 2, 3]
    assert machine._physical_first([2, 3]) == [2, 3]


@has_affinity
def test_pin_cpu_threads_sets_and_restores_threads_and_affinity_of_all_threads():
    threads0, cores0 = torch.get_num_threads(), os.sched_getaffinity(0)
    release = threading.Event()
    started = threading.Event()
    ids: dict[str, int] = {}

    def background():
        ids["tid"] = threading.get_native_id()
        started.set()
        release.wait(10)

    worker = threading.Thread(target=background, daemon=True)
    worker.start()
    started.wait(5)
    try:
        with pin_cpu_threads(1) as pinned:
            assert torch.get_num_threads() == 1
            assert pinned["threads"] == 1
            assert len(pinned["cores"]) == 1 and set(pinned["cores"]) <= cores0
            assert os.sched_getaffinity(0) == set(pinned["cores"])
            # a thread that existed before the block (like a BLAS pool) is pinned too
            assert os.sched_getaffinity(ids["tid"]) == set(pinned["cores"])
        assert torch.get_num_threads() == threads0
        assert os.sched_getaffinity(0) == cores0
        assert os.sched_getaffinity(ids["tid"]) == cores0
    finally:
        release.set()
        worker.join(5)


@has_affinity
def test_pin_cpu_threads_restores_on_error_and_widens_threads_started_inside():
    threads0, cores0 = torch.get_num_threads(), os.sched_getaffinity(0)
    release = threading.Event()
    started = threading.Event()
    ids: dict[str, int] = {}

    def background():
        ids["tid"] = threading.get_native_id()
        started.set()
        release.wait(10)

    worker = threading.Thread(target=background, daemon=True)
    with pytest.raises(KeyError):
        with pin_cpu_threads(1):
            worker.start()
            started.wait(5)
            assert len(os.sched_getaffinity(ids["tid"])) == 1  # inherited the narrow mask
            raise KeyError("boom")
    try:
        assert torch.get_num_threads() == threads0
        assert os.sched_getaffinity(0) == cores0
        assert os.sched_getaffinity(ids["tid"]) == cores0
    finally:
        release.set()
        worker.join(5)


def test_pin_cpu_threads_more_than_cores_sets_threads_only_and_none_changes_nothing():
    threads0 = torch.get_num_threads()
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    n = (len(allowed) if allowed else os.cpu_count()) + 1
    with pin_cpu_threads(n) as pinned:
        assert torch.get_num_threads() == n == pinned["threads"]
        if allowed is not None:
            assert os.sched_getaffinity(0) == allowed
            assert pinned["cores"] == sorted(allowed)
    assert torch.get_num_threads() == threads0
    with pin_cpu_threads(None) as pinned:
        assert pinned["threads"] == threads0
        if allowed is not None:
            assert pinned["cores"] == sorted(allowed)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_pin_cpu_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="positive integer"):
        with pin_cpu_threads(bad):
            pass
