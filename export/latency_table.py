"""Build per-layer latency tables: time each prunable block at candidate channel counts.

A block is one channel group of the model (pfp.groups): its producers, each with a norm and
an activation, then the consumers whose input width changes with the group. The builder
captures every layer's real input shape with hooks, rebuilds the block as a small module
at k channels, times it on the target backend through the latency harness
(export.latency.measure) and returns a `pfp.latency_model.LatencyModel`.

Counts: every count for narrow groups; for wide ones a coarse grid, then refinement
between neighbouring counts whose latencies differ by more than a step, biggest jumps
first, within `max_points` measurements per block, so build time stays bounded.

A block timed on its own is not the block inside the model (a runtime lays out and fuses a
lone block unlike the model's chain of layers), so the whole model then corrects the table
(export.latency_calibration): each group's staircase tops are timed in the model, within
`prune.latency.context_s` (cached beside the blocks in context-<hash>-<machine>.json, keyed by
all of the model's block shapes), and the model pruned uniformly at the
`prune.latency.calibration` widths sets the share of the predicted savings it realizes (timed
at every build, as the full model is).

Each block's measurements are cached as JSON under the cache dir, in a file named by a hash
of (backend, precision, batch, threads, block shape, grid) and of the machine key (the parts
of export.machine.describe_machine that change latency, not the host name: one device class
builds a table once). A file measured on another machine is not used and the log says why.
Weights do not change the work a CNN does, so blocks carry random weights.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field

from export.backends import Backend, BackendError, BackendUnavailable, BuildSpec, ModelBundle, Runner, get_backend
from export.backends.base import random_input
from export.errors import ExportPackageError
from export.latency import SIDE_BY_SIDE, LatencySettings, measure, time_side_by_side
from export.latency_calibration import apply_context, calibrate, context_counts, time_in_context
from export.machine import describe_machine, machine_summary, pin_cpu_threads
from export.onnx_export import MAX_BATCH, ExportError, export_onnx
from pfp.config import LatencyTargetConfig
from pfp.files import write_text_atomic
from pfp.groups import PruningGraph, is_depthwise
from pfp.hooks import eval_mode
from pfp.latency_model import BlockLatency, CalibrationPoint, LatencyModel, LayerPair, realized_share
from pfp.errors import first_line

log = logging.getLogger(__name__)

CACHE_FORMAT = "pfp-latency-block/1"
CONTEXT_FORMAT = "pfp-latency-context/1"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pfp" / "latency_tables"

# Short: a block is timed dozens of times, and the staircases matter more than the last percent.
BLOCK_SETTINGS = LatencySettings(warmup=3, warmup_s=0.02, min_iters=10, max_iters=400, min_time_s=0.05,
                                 max_time_s=0.5, rel_ci=0.03)
REFERENCE_BLOCKS = 3  # cached blocks re-timed to put the cache in the units of this build's model timing
MODEL_SETTINGS = LatencySettings(warmup=5, warmup_s=0.1, min_iters=20, max_iters=1000, min_time_s=0.3,
                                 max_time_s=3.0, rel_ci=0.02)


class LatencyTableError(ExportPackageError, ValueError):
    """A latency table that cannot be built as asked (backend, batch, model); one line naming it."""


class GridSettings(BaseModel):
    """Which channel counts a block is timed at."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dense_upto: int = Field(32, ge=1, description="groups this narrow are timed at every count")
    coarse_points: int = Field(12, ge=2, description="wider groups: counts on an even grid first")
    max_points: int = Field(28, ge=2, description="measurements per block at most, refinement included")
    step_tol: float = Field(0.05, ge=0, lt=1, description="relative latency jump that marks a step to refine")
    # Off by default: on a tiny model every block is below any such share, and two noisy samples
    # then say less than a grid's minimum envelope (a 16 px LeNet5's floor rose to 91%).
    negligible: float = Field(0.0, ge=0, lt=1, description="a block whose whole range (1 channel to all) is "
                              "below this share of the model's latency is timed at those two counts only")


class LayerShape(BaseModel):
    """One layer of a block: geometry, input shape (no batch) and how many of a dim the group holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str  # conv, linear, depthwise
    in_dim: int
    out_dim: int
    kernel: list[int] = Field(default_factory=list)
    stride: list[int] = Field(default_factory=list)
    padding: list[int] = Field(default_factory=list)
    dilation: list[int] = Field(default_factory=list)
    bias: bool = False
    input_shape: list[int]
    in_group: int = 0  # input indices carried by the group
    out_group: int = 0  # output indices carried by the group
    norm: bool = False


class BlockShape(BaseModel):
    """What a block's latency depends on: the layers and the group's size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int
    producers: list[LayerShape]
    depthwise: list[LayerShape] = Field(default_factory=list)
    consumers: list[LayerShape]


# ----------------------------------------------------------------------------- machine and cache keys

def machine_key(desc: dict | None = None) -> dict:
    """The parts of a machine description that change latency: CPU, cores, GPUs, runtime versions."""
    desc = describe_machine() if desc is None else desc
    cpu = desc.get("cpu") or {}
    libs = desc.get("libraries") or {}
    jetson = desc.get("jetson") or {}
    return {
        "cpu": cpu.get("model"), "architecture": cpu.get("architecture"), "cores": cpu.get("logical_cores"),
        "gpus": [[g.get("name"), g.get("compute_capability")] for g in desc.get("gpus") or []],
        "libraries": {n: libs.get(n) for n in ("torch", "onnxruntime", "tensorrt")},
        "jetson": [jetson.get("model"), jetson.get("power_mode")] if jetson else None,
    }


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _key_fields(shape: BlockShape, spec: LatencyTargetConfig, grid: GridSettings) -> dict:
    return {"format": CACHE_FORMAT, "backend": spec.backend, "precision": spec.precision, "batch": spec.batch,
            "threads": spec.threads, "shape": shape.model_dump(), "grid": grid.model_dump()}


def cache_path(cache_dir: Path, shape: BlockShape, spec: LatencyTargetConfig, grid: GridSettings,
               machine: dict) -> Path:
    """Where a block's measurements live: <hash of block and backend>-<hash of machine>.json."""
    return Path(cache_dir) / f"{_hash(_key_fields(shape, spec, grid))[:24]}-{_hash(machine)[:12]}.json"


def _read_cache(path: Path, fields: dict, machine: dict) -> BlockLatency | None:
    """The cached block at `path` when it was measured here with these settings; None (logged) if not."""
    stem = path.name.split("-")[0]
    if not path.is_file():
        for other in sorted(path.parent.glob(f"{stem}-*.json")):
            try:
                theirs = json.loads(other.read_text()).get("machine")
            except (OSError, ValueError):
                theirs = None
            log.info("latency table cache %s not used: it was measured on another machine (%s), this is %s",
                     other.name, theirs, machine)
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("latency table cache %s not used: unreadable (%s)", path, e)
        return None
    if d.get("machine") != machine:
        log.info("latency table cache %s not used: it was measured on another machine (%s), this is %s",
                 path.name, d.get("machine"), machine)
        return None
    if d.get("key") != fields:
        log.info("latency table cache %s not used: its backend, batch or block shape differ", path.name)
        return None
    try:
        return BlockLatency.model_validate(d["block"])
    except (KeyError, ValueError) as e:
        log.warning("latency table cache %s not used: %s", path, str(e).splitlines()[0])
        return None


# ----------------------------------------------------------------------------- blocks

def _layer(m: nn.Module, input_shape: Sequence[int], in_group: int = 0, out_group: int = 0,
           norm: bool = False) -> LayerShape:
    if isinstance(m, nn.Conv2d):
        return LayerShape(kind="depthwise" if is_depthwise(m) else "conv", in_dim=m.in_channels,
                          out_dim=m.out_channels, kernel=list(m.kernel_size), stride=list(m.stride),
                          padding=list(m.padding) if not isinstance(m.padding, str) else [0, 0],
                          dilation=list(m.dilation), bias=m.bias is not None, input_shape=list(input_shape),
                          in_group=in_group, out_group=out_group, norm=norm)
    return LayerShape(kind="linear", in_dim=m.in_features, out_dim=m.out_features, bias=m.bias is not None,
                      input_shape=list(input_shape), in_group=in_group, out_group=out_group, norm=norm)


def _input_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, list[int]]:
    """Each Conv2d/Linear's input shape without the batch axis, from one forward pass."""
    shapes: dict[str, list[int]] = {}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(name, list(inputs[0].shape[1:]))

        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with eval_mode(model, hooks), torch.no_grad():
        model(example_input[:1])
    return shapes


def block_shapes(model: nn.Module, example_input: torch.Tensor, ignore_layers: Sequence[str] = ()) -> dict[str, BlockShape]:
    """Every prunable group of `model` (as pfp.prune finds them) -> the shape of its block."""
    return blocks_and_pairs(model, example_input, ignore_layers)[0]


def layer_flops(layer: LayerShape) -> float:
    """Multiply-accumulates of one sample through `layer` at full width."""
    if layer.kind == "linear":
        return float(layer.in_dim * layer.out_dim)
    _, h, w = layer.input_shape
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1
           for n, p, d, k, s in zip((h, w), layer.padding, layer.dilation, layer.kernel, layer.stride)]
    per_out = layer.kernel[0] * layer.kernel[1] * (1 if layer.kind == "depthwise" else layer.in_dim)
    return float(max(out[0], 1) * max(out[1], 1) * layer.out_dim * per_out)


def blocks_and_pairs(model: nn.Module, example_input: torch.Tensor,
                     ignore_layers: Sequence[str] = ()) -> tuple[dict[str, BlockShape], list[LayerPair]]:
    """The block shape of every group, and the layers that sit in two blocks (input of one
    group, output of another) with their share of each block's FLOPs."""
    model = copy.deepcopy(model).cpu().eval()
    example_input = example_input[:1].cpu()
    graph = PruningGraph(model, example_input, list(ignore_layers))
    shapes = _input_shapes(model, example_input)
    modules = dict(model.named_modules())
    out: dict[str, BlockShape] = {}
    as_producer: dict[str, tuple[str, float]] = {}  # layer -> (group, share of its block's FLOPs)
    as_consumer: dict[str, tuple[str, float]] = {}
    for g in graph.groups:
        normed = len(g.norms) >= len(g.producers)
        producers = [_layer(p.module, shapes[p.name], out_group=len(p.out_idxs), norm=normed) for p in g.producers]
        dws = [_layer(modules[n], shapes[n], in_group=c, out_group=c) for n, d, c in g.members
               if is_depthwise(modules[n]) and n in shapes]
        timed = [c for c in g.consumers if c.name in shapes]
        consumers = [_layer(c.module, shapes[c.name], in_group=len(c.in_idxs)) for c in timed]
        out[g.name] = BlockShape(size=g.size, producers=producers, depthwise=dws, consumers=consumers)
        total = sum(layer_flops(x) for x in producers + dws + consumers) or 1.0
        for p, shape in zip(g.producers, producers):
            as_producer[p.name] = (g.name, layer_flops(shape) / total)
        for c, shape in zip(timed, consumers):
            as_consumer[c.name] = (g.name, layer_flops(shape) / total)
    pairs = [LayerPair(layer=name, in_group=as_consumer[name][0], in_share=min(1.0, as_consumer[name][1]),
                       out_group=grp, out_share=min(1.0, share))
             for name, (grp, share) in as_producer.items() if name in as_consumer and as_consumer[name][0] != grp]
    return out, pairs


def _kept(full: int, in_group: int, size: int, k: int) -> int:
    """A dim of `full` indices, `in_group` of them the group's, with k of the group's `size` kept."""
    return max(1, full - round(in_group * (1 - k / size)))


def _adapt(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`t` brought to (batch, *shape) by k-independent cheap ops: slicing, tiling, pooling."""
    if len(shape) == 1:
        if t.dim() == 4:
            t = F.adaptive_avg_pool2d(t, 1).flatten(1)
        elif t.dim() > 2:
            t = t.flatten(1)
        c = t.shape[1]
        if c < shape[0]:
            t = t.repeat(1, math.ceil(shape[0] / c))
        return t[:, : shape[0]]
    if t.dim() == 2:
        t = t[:, :, None, None]
    c, h, w = shape
    if t.shape[1] < c:
        t = t.repeat(1, math.ceil(c / t.shape[1]), 1, 1)
    t = t[:, :c]
    if tuple(t.shape[2:]) != (h, w):
        t = F.adaptive_avg_pool2d(t, (h, w)) if t.shape[2] >= h and t.shape[3] >= w else F.interpolate(t, size=(h, w))
    return t


def _module(layer: LayerShape, in_dim: int, out_dim: int) -> nn.Module:
    if layer.kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=layer.bias)
    groups = in_dim if layer.kind == "depthwise" else 1
    return nn.Conv2d(in_dim, out_dim, tuple(layer.kernel), stride=tuple(layer.stride), padding=tuple(layer.padding),
                     dilation=tuple(layer.dilation), groups=groups, bias=layer.bias)


class BlockModule(nn.Module):
    """A group's block at k channels: producers (+norm, ReLU), depthwise layers, then consumers.

    Takes the first producer's input; every other layer's input is derived from what comes
    before it by slicing, tiling and pooling, which costs the same at every k.
    """

    def __init__(self, shape: BlockShape, k: int) -> None:
        super().__init__()
        n = shape.size
        self.shapes = shape
        self.producers = nn.ModuleList()
        self.norms = nn.ModuleList()
        for p in shape.producers:
            out = _kept(p.out_dim, p.out_group, n, k)
            self.producers.append(_module(p, p.in_dim, out))
            self.norms.append(nn.BatchNorm2d(out) if p.norm and p.kind != "linear" else nn.Identity())
        self.dw = nn.ModuleList(_module(d, _kept(d.in_dim, d.in_group, n, k), _kept(d.out_dim, d.out_group, n, k))
                                for d in shape.depthwise)
        self.dw_shapes = [[_kept(d.in_dim, d.in_group, n, k), *d.input_shape[1:]] for d in shape.depthwise]
        self.consumers = nn.ModuleList(_module(c, _kept(c.in_dim, c.in_group, n, k), c.out_dim) for c in shape.consumers)
        self.consumer_shapes = [[_kept(c.in_dim, c.in_group, n, k), *c.input_shape[1:]] for c in shape.consumers]
        self.producer_shapes = [p.input_shape for p in shape.producers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for conv, norm, shp in zip(self.producers, self.norms, self.producer_shapes):
            z = torch.relu(norm(conv(_adapt(x, shp))))
            y = z if y is None else y + _adapt(z, list(y.shape[1:]))
        for dw, shp in zip(self.dw, self.dw_shapes):
            y = torch.relu(dw(_adapt(y, shp)))
        outs = [c(_adapt(y, shp)).flatten(1) for c, shp in zip(self.consumers, self.consumer_shapes)]
        return torch.cat(outs, 1) if len(outs) > 1 else (outs[0] if outs else y.flatten(1))


# ----------------------------------------------------------------------------- timing

def check_target(spec: LatencyTargetConfig) -> Backend:
    """The backend `spec` names, ready to run here; LatencyTableError in one line otherwise."""
    try:
        backend = get_backend(spec.backend)
    except BackendError as e:
        raise LatencyTableError(f"prune.latency.backend: {e}") from None
    try:
        backend.check_available()
    except BackendUnavailable as e:
        raise LatencyTableError(f"prune.latency.backend: {spec.backend} is not installed here ({e})") from None
    if spec.precision not in backend.precisions:
        raise LatencyTableError(f"prune.latency.precision: backend {spec.backend} runs "
                                f"{', '.join(backend.precisions)}, not {spec.precision}")
    if spec.batch > MAX_BATCH:
        raise LatencyTableError(f"prune.latency.batch: backend {spec.backend} cannot run batch {spec.batch} "
                                f"(exported models take 1..{MAX_BATCH})")
    return backend


def load_runner(backend: Backend, module: nn.Module, input_shape: Sequence[int], spec: LatencyTargetConfig,
                workdir: Path, name: str = "block") -> Runner:
    """`module` as a runner of `backend`: exported to ONNX, or handed to torch as it is."""
    module = module.eval()
    build = BuildSpec(precision=spec.precision, batch_sizes=(spec.batch,), threads=spec.threads, workdir=workdir,
                      calibration=random_input(min(spec.batch, 8), input_shape) if spec.precision == "int8" else None)
    if backend.name.startswith("torch"):
        from export.backends.torch_runtime import TorchRunner  # noqa: PLC0415 - torch backends only

        backend.check_precision(build)
        model = module.to(backend.device)
        if spec.precision == "fp16":
            model = model.half()
        if backend.device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if getattr(backend, "compile", False):
            model = torch.compile(model, dynamic=False)
        bundle = ModelBundle(onnx=workdir / f"{name}.onnx", checkpoint=None, input_shape=tuple(input_shape))
        return TorchRunner(model, bundle, backend.device, spec.precision, spec.threads, backend.name)
    path = workdir / f"{name}.onnx"
    try:
        # the TorchScript exporter: a block is exported per count, and it is several times faster
        export_onnx(module.cpu(), path, input_shape, exporter="torchscript")
    except ExportError as e:
        raise LatencyTableError(f"latency table: block {name} cannot be exported ({e})") from None
    bundle = ModelBundle(onnx=path, checkpoint=None, input_shape=tuple(input_shape))
    try:
        return backend.load(bundle, build)
    except (BackendError, BackendUnavailable) as e:
        raise LatencyTableError(f"latency table: backend {backend.name} cannot load block {name} ({e})") from None


def time_runner(runner: Runner, spec: LatencyTargetConfig, settings: LatencySettings) -> float:
    """Median ms of one inference of spec.batch samples; LatencyTableError if the backend cannot run it."""
    with pin_cpu_threads(spec.threads if runner.device == "cpu" else None):
        try:
            step = runner.timed_step(spec.batch)
            step()
        except Exception as e:  # noqa: BLE001 - each runtime fails in its own way (memory, limits)
            first = first_line(e)
            raise LatencyTableError(f"prune.latency.batch: backend {runner.backend} cannot run batch "
                                    f"{spec.batch} ({first})") from None
        times, _, _ = measure(step, batch=spec.batch, timer=runner.timer, synchronize=runner.synchronize,
                              settings=settings)
    return float(np.median(times))


def time_module(backend: Backend, module: nn.Module, input_shape: Sequence[int], spec: LatencyTargetConfig,
                settings: LatencySettings, workdir: Path, name: str = "block") -> float:
    """Median ms of `module` on `backend` at spec.batch."""
    runner = load_runner(backend, module, input_shape, spec, workdir, name)
    try:
        return time_runner(runner, spec, settings)
    finally:
        runner.close()


def measure_block(shape: BlockShape, time_at: Callable[[int], float], grid: GridSettings,
                  negligible_ms: float = 0.0) -> BlockLatency:
    """Time a block at the grid's counts, refining between counts across a step; returns its table row.

    The ends come first: a block whose range (1 channel to all) is positive but below
    `negligible_ms` cannot move the model's latency, so its staircases are not worth the
    measurements.
    """
    n = shape.size
    ms = {n: time_at(n)}
    if n > 1:
        ms[1] = time_at(1)
        # a range at or below zero is noise, not a measurement: the grid's minimum envelope copes
        if 0 < ms[n] - ms[1] < negligible_ms:
            return BlockLatency(size=n, counts=[1, n], ms=[ms[1], ms[n]], step_tol=grid.step_tol)
    if n <= grid.dense_upto:
        ms.update({k: time_at(k) for k in range(2, n)})
        return BlockLatency(size=n, counts=list(range(1, n + 1)), ms=[ms[k] for k in range(1, n + 1)],
                            step_tol=grid.step_tol)
    ms.update({int(k): time_at(int(k)) for k in sorted({round(v) for v in np.linspace(1, n, grid.coarse_points)})
               if int(k) not in ms})
    while len(ms) < grid.max_points:
        ks = sorted(ms)
        gaps = [(ms[b] / max(ms[a], 1e-12) - 1, b - a, a, b) for a, b in zip(ks, ks[1:])
                if b - a > 1 and ms[b] > ms[a] * (1 + grid.step_tol)]
        if not gaps:
            break
        _, _, a, b = max(gaps, key=lambda g: (g[0] * g[1], g[1]))  # the biggest unresolved jump first
        k = (a + b) // 2
        ms[k] = time_at(k)
    ks = sorted(ms)
    return BlockLatency(size=n, counts=ks, ms=[ms[k] for k in ks], step_tol=grid.step_tol)


def build_latency_table(model: nn.Module, example_input: torch.Tensor, spec: LatencyTargetConfig, *,
                        ignore_layers: Sequence[str] = (), cache_dir: str | Path | None = None,
                        grid: GridSettings | None = None, block_settings: LatencySettings | None = None,
                        model_settings: LatencySettings | None = None, machine: dict | None = None,
                        progress: Callable[[str], None] | None = None,
                        whole_settings: LatencySettings | None = None) -> LatencyModel:
    """The latency table of `model` on spec's backend: every block timed (or read from the cache).

    `example_input` gives one sample's shape; `machine` is the machine description to key the
    cache with (None: this machine's). The whole model is timed at full width every time: it
    is the table's reference. Then, within spec.context_s, each group's staircase tops are timed
    in the whole model, and the model pruned uniformly at each of spec.calibration sets
    `realized`; those are timed side by side with the unpruned model (`whole_settings`; default
    `model_settings`, else export.latency.SIDE_BY_SIDE). build_seconds counts this call, cache
    reads included.
    """
    start = time.perf_counter()
    backend = check_target(spec)
    grid = grid or GridSettings()
    desc = describe_machine() if machine is None else machine
    key = machine_key(desc)
    cache = Path(cache_dir or spec.cache_dir or DEFAULT_CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    input_shape = list(example_input.shape[1:])
    shapes, pairs = blocks_and_pairs(model, example_input, ignore_layers)
    blocks: dict[str, BlockLatency] = {}
    cached, from_cache = 0, []
    with tempfile.TemporaryDirectory(prefix="pfp-latency-") as tmp:
        workdir = Path(tmp)

        def time_block(k: int, shape: BlockShape, tag: str) -> float:
            torch.manual_seed(0)
            return time_module(backend, BlockModule(shape, k), shape.producers[0].input_shape, spec,
                               block_settings or BLOCK_SETTINGS, workdir, tag)

        full_ms = time_module(backend, copy.deepcopy(model).cpu(), input_shape, spec,
                              model_settings or MODEL_SETTINGS, workdir, "model")
        for i, (name, shape) in enumerate(shapes.items()):
            path = cache_path(cache, shape, spec, grid, key)
            fields = _key_fields(shape, spec, grid)
            with FileLock(str(path) + ".lock"):  # one builder per block: a fleet's hosts may share the dir
                block = _read_cache(path, fields, key)
                if block is not None and len(block.counts) == 2 < block.size and \
                        block.ms[-1] - block.ms[0] >= 2 * grid.negligible * full_ms:
                    block = None  # only its ends were timed, for a model where it hardly counted (2x: not on noise)
                hit = block is not None
                if block is None:
                    t0 = time.perf_counter()

                    def time_at(k: int, shape: BlockShape = shape, i: int = i) -> float:
                        return time_block(k, shape, f"block{i}_{k}")

                    block = measure_block(shape, time_at, grid, negligible_ms=grid.negligible * full_ms)
                    write_text_atomic(path, json.dumps({"format": CACHE_FORMAT, "key": fields, "machine": key,
                                                        "machine_summary": machine_summary(desc),
                                                        "seconds": time.perf_counter() - t0,
                                                        "block": block.model_dump()}, indent=1, default=str))
            cached += hit
            blocks[name] = block
            if hit:
                from_cache.append(name)
            if progress:
                progress(f"block {i + 1}/{len(shapes)} {name}: {len(block.counts)} counts" + (" (cached)" if hit else ""))
        load_factor = 1.0
        if from_cache:
            load_factor = _load_factor(blocks, from_cache, shapes, time_block)
            blocks.update({n: blocks[n].scaled(load_factor) for n in from_cache})
        table = LatencyModel(backend=spec.backend, precision=spec.precision, batch=spec.batch, threads=spec.threads,
                             machine=key, full_ms=full_ms, blocks=blocks, pairs=pairs, cached_blocks=cached,
                             load_factor=load_factor)
        whole = (whole_settings or model_settings or SIDE_BY_SIDE).model_copy(update={"threads": spec.threads})
        table, points = _on_the_whole_model(table, model, example_input, spec, backend, whole, workdir, cache, key,
                                            shapes, grid, ignore_layers, progress)
    seconds = time.perf_counter() - start
    realized = realized_share(points)
    log.info("latency table for %s batch %d %s: %d blocks (%d from the cache, %d timed in context) in %.1f s, "
             "full model %.4g ms, %.0f%% of the blocks' savings realized", spec.backend, spec.batch, spec.precision,
             len(blocks), cached, len(table.in_context), seconds, full_ms, 100 * realized)
    return table.model_copy(update={"build_seconds": seconds, "realized": realized, "calibration": points})


def _on_the_whole_model(table: LatencyModel, model: nn.Module, example_input: torch.Tensor,
                        spec: LatencyTargetConfig, backend: Backend, settings: LatencySettings, workdir: Path,
                        cache: Path, machine: dict, shapes: dict[str, BlockShape], grid: GridSettings,
                        ignore_layers: Sequence[str], progress: Callable[[str], None] | None,
                        ) -> tuple[LatencyModel, list[CalibrationPoint]]:
    """`table` with its groups timed in context (cached by the model's blocks), and its calibration
    points. A model that cannot be pruned uniformly or run so gives no points (with a warning):
    the table then predicts with the blocks' sum as it is."""
    if spec.context_s <= 0 and not spec.calibration:
        return table, []
    input_shape = list(example_input.shape[1:])
    full = load_runner(backend, copy.deepcopy(model).cpu(), input_shape, spec, workdir, "reference")

    def time_ratio(pruned: nn.Module, tag: str) -> float:
        runner = load_runner(backend, pruned, input_shape, spec, workdir, tag)
        try:
            p_ms, u_ms = time_side_by_side([runner, full], spec.batch, spec.threads, settings, 3)
        finally:
            runner.close()
        return p_ms / u_ms

    points: list[CalibrationPoint] = []
    try:
        if spec.context_s > 0:
            fields = {"format": CONTEXT_FORMAT, "backend": spec.backend, "precision": spec.precision,
                      "batch": spec.batch, "threads": spec.threads, "input": input_shape,
                      "blocks": {n: sh.model_dump() for n, sh in shapes.items()}, "grid": grid.model_dump()}
            # beside the block files, so flows.latency_tables copies them to and from MLflow too
            path = cache / f"context-{_hash(fields)[:24]}-{_hash(machine)[:12]}.json"
            with FileLock(str(path) + ".lock"):
                known = _read_context(path, fields, machine, table)
                ratios = time_in_context(table, model, example_input, time_ratio, spec.context_s, ignore_layers,
                                         known, progress)
                if ratios != known:
                    write_text_atomic(path, json.dumps({"format": CONTEXT_FORMAT, "key": fields, "machine": machine,
                                                        "ratios": ratios}, indent=1, default=str))
            table = apply_context(table, ratios)
        points = calibrate(table, model, example_input, spec.calibration, time_ratio, ignore_layers, progress)
    except Exception as e:  # noqa: BLE001 - a model the uniform prune or the backend cannot take
        first = first_line(e)
        log.warning("latency table: not calibrated on the whole model (%s); the blocks' sum predicts as it is", first)
    finally:
        full.close()
    return table, points


def _read_context(path: Path, fields: dict, machine: dict, table: LatencyModel) -> dict[str, dict[int, float]]:
    """Cached in-context ratios of the groups whose staircase tops are still those the table has."""
    try:
        d = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    if d.get("key") != fields or d.get("machine") != machine:
        return {}
    out = {}
    for name, rows in (d.get("ratios") or {}).items():
        ratios = {int(c): float(r) for c, r in rows.items()}
        if name in table.blocks and sorted(ratios) == context_counts(table.blocks[name]):
            out[name] = ratios
    return out


def _load_factor(blocks: dict[str, BlockLatency], cached: list[str], shapes: dict[str, BlockShape],
                 time_block: Callable[[int, BlockShape, str], float]) -> float:
    """How much slower this machine runs now than when the cached blocks were measured.

    The whole model is timed afresh on every build, so cached blocks measured on a quieter (or
    busier) moment of the same machine would be in other units than the model they are set
    against: a loaded machine would make every block look too small to reach the target. The
    widest cached blocks (the best measured, up to REFERENCE_BLOCKS) are re-timed at full width
    and the median ratio rescales all cached blocks.
    """
    refs = sorted(cached, key=lambda n: blocks[n].ms[-1], reverse=True)[:REFERENCE_BLOCKS]
    ratios = [time_block(shapes[n].size, shapes[n], f"ref_{j}") / blocks[n].ms[-1]
              for j, n in enumerate(refs) if blocks[n].ms[-1] > 0]
    factor = float(np.median(ratios)) if ratios else 1.0
    if abs(factor - 1) > 0.05:
        log.info("latency table: cached blocks rescaled by %.3f (this machine runs %s now than when they were "
                 "measured; %d reference blocks re-timed)", factor, "slower" if factor > 1 else "faster", len(ratios))
    return factor


def cache_size_bytes(cache_dir: str | Path) -> int:
    """Bytes the cached block files take on disk."""
    return sum(p.stat().st_size for p in Path(cache_dir).glob("*.json"))
