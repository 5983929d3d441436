"""Which machine a latency number was measured on, and CPU thread pinning for measuring.

A latency result means little without the machine behind it: CPU model and the cores the
process may use, GPUs with compute capability and driver, CUDA/cuDNN, the versions of the
inference libraries, and on Jetson boards the L4T release and power mode.
`describe_machine` collects all of that into a plain JSON-serializable dict in which any
piece that cannot be read is None (it never raises); `machine_summary` makes one line of
it; `pin_cpu_threads` fixes torch's thread count and the process CPU affinity for the
duration of a measurement.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

_COMMAND_TIMEOUT_S = 5.0

# Distribution names a library may be installed under (first found wins).
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "onnx": ("onnx",),
    "onnxruntime": (
        "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
        "onnxruntime-training", "onnxruntime-silicon",
    ),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-libs"),
    "numpy": ("numpy",),
    "torch_pruning": ("torch-pruning", "torch_pruning"),
    "pydantic": ("pydantic",),
}

# Environment variables that change how many threads the libraries use, or which GPUs.
_ENV_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES", "CUDA_MODULE_LOADING",
)


def _safe(fn: Callable[[], T]) -> T | None:
    """fn(), or None if reading that piece of the machine failed in any way."""
    try:
        return fn()
    except Exception:
        return None


def _read_text(path: str | Path) -> str | None:
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _command(args: list[str], timeout: float = _COMMAND_TIMEOUT_S) -> str | None:
    """A tool's stdout, or None when it is missing, fails or hangs (nvidia-smi can)."""
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


# ----------------------------------------------------------------------------- CPU

def _cpu_model() -> str | None:
    """The CPU's marketing name; ARM boards spell it differently in /proc/cpuinfo."""
    info = _read_text("/proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        match = re.search(rf"^{re.escape(key)}\s*:\s*(.+)$", info, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return platform.processor() or platform.machine() or None


def _allowed_cores() -> list[int] | None:
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def _memory_bytes() -> int | None:
    meminfo = _read_text("/proc/meminfo") or ""
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.MULTILINE)
    if match:
        return int(match.group(1)) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _cpu() -> dict[str, Any]:
    allowed = _safe(_allowed_cores)
    governor = _read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    return {
        "model": _safe(_cpu_model),
        "architecture": platform.machine() or None,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(allowed) if allowed is not None else None,
        "affinity": allowed,
        # "powersave" can halve CPU latency numbers, so it belongs with them.
        "governor": governor.strip() if governor else None,
    }


# ----------------------------------------------------------------------------- libraries

def _distribution_version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _tensorrt_version() -> str | None:
    version = _distribution_version(_DISTRIBUTIONS["tensorrt"])
    if version is not None:
        return version
    # JetPack installs TensorRT's Python bindings from apt, without package metadata.
    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt  # noqa: PLC0415 - only when metadata cannot say

    return str(tensorrt.__version__)


def _imported_version(name: str) -> str | None:
    """An already imported module's own version: for torch it keeps the build tag
    (+cu130, +cpu) that package metadata drops."""
    module = sys.modules.get(name)
    version = getattr(module, "__version__", None) if module is not None else None
    return str(version) if version else None


def _libraries() -> dict[str, str | None]:
    versions = {
        name: _safe(lambda name=name, names=names: _imported_version(name) or _distribution_version(names))
        for name, names in _DISTRIBUTIONS.items()
        if name != "tensorrt"
    }
    versions["tensorrt"] = _safe(_tensorrt_version)
    return versions


def _onnxruntime_providers(installed: bool) -> list[str] | None:
    if not installed:
        return None  # importing it just to learn it is absent would cost time
    import onnxruntime  # noqa: PLC0415 - optional and slow to import

    return list(onnxruntime.get_available_providers())


# ----------------------------------------------------------------------------- GPU

def _torch() -> Any | None:
    """torch if it can be imported; it is a dependency, but describe must never raise."""
    if "torch" in sys.modules:
        return sys.modules["torch"]
    try:
        import torch  # noqa: PLC0415

        return torch
    except Exception:
        return None


def _nvidia_driver() -> str | None:
    out = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    lines = [line.strip() for line in (out or "").splitlines() if line.strip()]
    return lines[0] if lines else None


def _gpus(torch: Any) -> list[dict[str, Any]]:
    if torch is None or not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({
            "index": index,
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count),
        })
    return gpus


def _cuda(torch: Any) -> dict[str, Any]:
    cudnn = None
    if torch is not None:
        cudnn = _safe(lambda: torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    return {
        "torch_cuda": _safe(lambda: torch.version.cuda) if torch is not None else None,
        "cudnn": cudnn,
        "driver": _safe(_nvidia_driver),
    }


# ----------------------------------------------------------------------------- Jetson

def _l4t_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 3.0, ...' -> '36.3.0'."""
    major = re.search(r"R(\d+)", text)
    revision = re.search(r"REVISION:\s*([\d.]+)", text)
    if not major:
        return None
    return f"{major.group(1)}.{revision.group(1)}" if revision else major.group(1)


def _power_mode(text: str) -> str | None:
    """`nvpmodel -q` prints 'NV Power Mode: MAXN' and then the mode's number."""
    match = re.search(r"NV Power Mode:\s*(.+)", text)
    if not match:
        return None
    numbers = re.findall(r"^\s*(\d+)\s*$", text, re.MULTILINE)
    name = match.group(1).strip()
    return f"{name} ({numbers[0]})" if numbers else name


def _board_model() -> str | None:
    raw = _read_text("/proc/device-tree/model")
    return (raw.replace("\x00", "").strip() or None) if raw else None


def _jetson(board: str | None) -> dict[str, Any] | None:
    release = _read_text("/etc/nv_tegra_release")
    if release is None and not (board and ("jetson" in board.lower() or "nvidia" in board.lower())):
        return None
    mode = _command(["nvpmodel", "-q"])
    return {
        "model": board,
        "l4t": _l4t_release(release) if release else None,
        "power_mode": _power_mode(mode) if mode else None,
    }


# ----------------------------------------------------------------------------- public

def describe_machine() -> dict[str, Any]:
    """Everything about this machine that can change a latency number, as plain JSON.

    Pieces that cannot be read (no GPU, no nvidia-smi, not a Jetson, a library missing)
    are None or empty; this function does not raise.
    """
    torch = _torch()
    libraries = _safe(_libraries) or {}
    board = _safe(_board_model)
    return {
        "hostname": _safe(platform.node) or None,
        "os": _safe(platform.system),
        "platform": _safe(platform.platform),
        "kernel": _safe(platform.release),
        "python": platform.python_version(),
        "cpu": _safe(_cpu),
        "memory_bytes": _safe(_memory_bytes),
        "gpus": _safe(lambda: _gpus(torch)) or [],
        "cuda": _safe(lambda: _cuda(torch)),
        "libraries": libraries,
        "onnxruntime_providers": _safe(lambda: _onnxruntime_providers(libraries.get("onnxruntime") is not None)),
        "torch_threads": _safe(lambda: int(torch.get_num_threads())) if torch is not None else None,
        "env": {name: os.environ.get(name) for name in _ENV_VARS},
        "board": board,
        "jetson": _safe(lambda: _jetson(board)),
    }


def machine_summary(desc: dict[str, Any]) -> str:
    """One line: CPU and cores, GPUs (or 'no GPU'), the main library versions."""
    cpu = desc.get("cpu") or {}
    cores = cpu.get("logical_cores")
    allowed = cpu.get("affinity_cores")
    cpu_part = f"{cpu.get('model') or 'unknown CPU'}, {cores if cores is not None else '?'} cores"
    if allowed is not None and cores is not None and allowed != cores:
        cpu_part += f" ({allowed} allowed)"

    gpus = desc.get("gpus") or []
    if gpus:
        gpu_part = ", ".join(
            f"{g.get('name')} (sm {g.get('compute_capability')}, {(g.get('memory_bytes') or 0) / 2**30:.0f} GiB)"
            for g in gpus
        )
        driver = (desc.get("cuda") or {}).get("driver")
        if driver:
            gpu_part += f", driver {driver}"
    else:
        gpu_part = "no GPU"

    parts = [cpu_part, gpu_part]
    jetson = desc.get("jetson")
    if jetson:
        parts.insert(0, f"{jetson.get('model') or 'Jetson'} (L4T {jetson.get('l4t') or '?'}, "
                        f"power mode {jetson.get('power_mode') or '?'})")
    libs = desc.get("libraries") or {}
    versions = [f"{name} {libs[name]}" for name in ("torch", "onnxruntime", "tensorrt") if libs.get(name)]
    if versions:
        parts.append(", ".join(versions))
    return "; ".join(parts)


def _physical_first(cores: list[int]) -> list[int]:
    """`cores` reordered so one logical CPU per physical core comes before SMT siblings:
    two busy threads on the sibling pair of one core run far slower than on two cores."""
    seen: set[tuple[str, str]] = set()
    first, siblings = [], []
    for cpu in cores:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        key = ((_read_text(topo / "physical_package_id") or "").strip(), (_read_text(topo / "core_id") or "").strip())
        if key == ("", "") or key not in seen:
            seen.add(key)
            first.append(cpu)
        else:
            siblings.append(cpu)
    return first + siblings


def _task_ids() -> list[int]:
    """Ids of this process's threads: Linux affinity is per thread, and the thread pools
    of torch, OpenMP and onnxruntime already exist when a measurement starts."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


def _set_affinity_all(cores: set[int], per_task: dict[int, set[int]] | None = None) -> None:
    for tid in _task_ids():
        try:
            os.sched_setaffinity(tid, (per_task or {}).get(tid, cores))
        except (ProcessLookupError, PermissionError, OSError):
            continue  # the thread ended meanwhile, or is not ours to move


@contextlib.contextmanager
def pin_cpu_threads(n: int | None) -> Iterator[dict[str, Any]]:
    """Run the block with torch using `n` threads and the process on `n` of its allowed cores.

    The affinity is only narrowed when `n` is at most the number of allowed cores (more
    threads than cores cannot be pinned one per core); physical cores are preferred over
    SMT siblings. Both are restored on exit, also on an exception. `n=None` changes
    nothing. Yields {"threads": torch threads, "cores": the allowed cores or None}.
    """
    import torch  # noqa: PLC0415 - keep `import export.machine` light

    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"CPU threads must be a positive integer or None, got {n!r}")
    can_pin = hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")
    old_threads = torch.get_num_threads()
    old_cores = set(os.sched_getaffinity(0)) if can_pin else None
    if n is None:
        yield {"threads": old_threads, "cores": sorted(old_cores) if old_cores is not None else None}
        return

    old_per_task: dict[int, set[int]] = {}
    cores = old_cores
    if can_pin and old_cores is not None and n <= len(old_cores):
        for tid in _task_ids():
            with contextlib.suppress(OSError):
                old_per_task[tid] = set(os.sched_getaffinity(tid))
        cores = set(_physical_first(sorted(old_cores))[:n])
        _set_affinity_all(cores)
    torch.set_num_threads(n)
    try:
        yield {"threads": torch.get_num_threads(), "cores": sorted(cores) if cores is not None else None}
    finally:
        torch.set_num_threads(old_threads)
        if old_per_task:
            # Threads started inside the block inherited the narrow mask: widen them too.
            _set_affinity_all(old_cores, old_per_task)
