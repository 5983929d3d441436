"""Ridge least-squares refit of the consumers whose inputs shrank.

After filter pruning a Conv2d/Linear reads fewer input channels. For each such layer, in
forward order, its weights (and bias) are refit so that on calibration points S its
output in the pruned network, fed by the pruned network's own (already refit) inputs,
matches the unpruned network's output of the same-named module:

    min_W ||X W - Y||^2 + lambda ||W_no_bias||^2,  W = (G + lambda I')^-1 B

with G = X^T X and B = X^T Y accumulated tile by tile in float64, so S's unfolded input
is never held at once. A grouped conv (depthwise included) is one independent system per
group. The residual of any W follows from the accumulators alone:
||XW - Y||^2 = tr(W^T G W) - 2 tr(W^T B) + ||Y||^2, so a refit is applied only when it
beats the layer's current weights.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import eval_mode

log = logging.getLogger(__name__)

__all__ = ["LayerFit", "ReconstructReport", "reconstruct"]

FALLBACK_RIDGE = 1e-1  # relative lambda the ill-conditioned systems start from
FALLBACK_STEPS = 8  # x10 each: up to 1e7 relative before giving up
TARGET_TILES = 2  # the unpruned network's outputs held at once, in tile_bytes
MAX_SYSTEM_BYTES = 2 << 30  # a layer whose normal equations and solve need more is left as pruned


@dataclass
class LayerFit:
    name: str
    rows: int  # rows of the least-squares system (points x positions)
    features: int  # unknowns per output unit (in_channels/groups * kh * kw [+1 bias])
    # relative residual ||XW-Y||/||Y|| with the pruned layer's current weights; from the
    # accumulators, so with float32 tiles values below ~1e-3 are at their resolution
    error_before: float
    error_after: float  # with the refit weights (== error_before if the refit was not applied)
    applied: bool  # False when the refit would not reduce the error (weights then kept)
    ridge: float  # the ridge lambda actually used (absolute)
    note: str | None = None  # e.g. why the ridge fallback was used


@dataclass
class ReconstructReport:
    layers: list[LayerFit]
    seconds: float
    peak_bytes: int  # accumulators + solve + the largest tile + the targets held (an estimate, tracked)
    points: int


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has run."""


def _first(batch) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def _gather(loader, device, max_points: int | None) -> list[torch.Tensor]:
    # every layer needs the same points for both networks; a shuffling loader would not
    # give them twice, so S's raw inputs are kept (their unfolded form never is)
    out: list[torch.Tensor] = []
    left = math.inf if max_points is None else max_points
    for batch in loader:
        if left <= 0:
            break
        x = _first(batch)
        if x.shape[0] > left:
            x = x[: int(left)]
        out.append(x.to(device))
        left -= x.shape[0]
    return out


def _pads(m: nn.Conv2d) -> tuple[int, int, int, int] | tuple[int, int]:
    """Padding for F.unfold, or (left, right, top, bottom) for F.pad when asymmetric ('same')."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        pads: list[int] = []
        for d, k in zip(reversed(m.dilation), reversed(m.kernel_size)):  # F.pad takes the last dim first
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    return tuple(m.padding)  # type: ignore[return-value]


def system_bytes(m: nn.Module) -> int:
    """Bytes of a layer's float64 normal equations (G, B, sums) and its solve, from its shape alone."""
    conv = isinstance(m, nn.Conv2d)
    g = m.groups if conv else 1
    fg = (m.in_channels if conv else m.in_features) // g * (math.prod(m.kernel_size) if conv else 1)
    cg = (m.out_channels if conv else m.out_features) // g
    fb = fg + int(m.bias is not None)
    n = g * (fg * fg + fg * cg + fg + cg)
    # the solve holds about three more of these (G+lambda I', B with its bias row, W)
    n += 3 * g * fb * max(fb, cg)
    return 8 * n


class _System:
    """Normal equations of one layer: per group G, B, column sums, ||Y||^2; float64."""

    def __init__(self, name: str, m: nn.Module, tile_bytes: int) -> None:
        self.name = name
        self.m = m
        self.conv = isinstance(m, nn.Conv2d)
        self.groups = m.groups if self.conv else 1
        out = m.out_channels if self.conv else m.out_features
        cin = m.in_channels if self.conv else m.in_features
        self.k = math.prod(m.kernel_size) if self.conv else 1
        self.fg = cin // self.groups * self.k
        self.cg = out // self.groups
        self.bias = m.bias is not None
        self.tile_bytes = tile_bytes
        z = dict(dtype=torch.float64, device=m.weight.device)
        g = self.groups
        self.G = torch.zeros(g, self.fg, self.fg, **z)
        self.B = torch.zeros(g, self.fg, self.cg, **z)
        self.sx = torch.zeros(g, self.fg, **z)
        self.sy = torch.zeros(g, self.cg, **z)
        self.yy = 0.0
        self.rows = 0
        self.max_tile = 0
        if self.conv:
            p = _pads(m)
            self.pre_pad = p if len(p) == 4 else None
            self.unfold_pad = (0, 0) if len(p) == 4 else p

    @property
    def features(self) -> int:
        return self.fg + int(self.bias)

    def acc_bytes(self) -> int:
        return system_bytes(self.m)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate one batch: x the layer's input in the pruned net, y the target output."""
        if self.conv:
            if x.dim() == 3:  # unbatched conv input
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            positions = y.shape[2] * y.shape[3]
            cin = x.shape[1]
            per_sample = positions * (cin * self.k * (x.element_size() + 4) + y.shape[1] * 4)
            step = max(1, self.tile_bytes // max(per_sample, 1))
            for i in range(0, x.shape[0], step):
                self._conv_tile(x[i : i + step], y[i : i + step])
        else:
            x = x.reshape(-1, x.shape[-1])
            y = y.reshape(-1, y.shape[-1])
            per_row = (x.shape[1] * (x.element_size() + 4)) + y.shape[1] * 4
            step = max(1, self.tile_bytes // max(per_row, 1))
            for i in range(0, x.shape[0], step):
                xt, yt = x[i : i + step], y[i : i + step]
                cd = _compute_dtype(xt)
                self._accumulate(xt.to(cd).t().unsqueeze(0), yt.to(cd).t().unsqueeze(0), xt.numel() * xt.element_size())

    def _conv_tile(self, x: torch.Tensor, y: torch.Tensor) -> None:
        m = self.m
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)
        u = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=self.unfold_pad, stride=m.stride)
        n, f, length = u.shape
        if length != y.shape[2] * y.shape[3]:
            raise ValueError(f"reconstruct: {self.name}: unfolded {length} positions, output has "
                             f"{y.shape[2]}x{y.shape[3]}")
        cd = _compute_dtype(u)
        # rows = (sample, position); group g's features are a contiguous block of channels
        xg = u.to(cd).permute(1, 0, 2).reshape(self.groups, self.fg, n * length)
        yt = y.to(cd).permute(1, 0, 2, 3).reshape(self.groups, self.cg, n * length)
        self._accumulate(xg, yt, u.numel() * u.element_size())

    def _accumulate(self, xg: torch.Tensor, yt: torch.Tensor, extra_bytes: int) -> None:
        """xg [groups, F_g, rows], yt [groups, C_g, rows] in the compute dtype."""
        self.G += torch.bmm(xg, xg.transpose(1, 2)).double()
        self.B += torch.bmm(xg, yt.transpose(1, 2)).double()
        if self.bias:
            self.sx += xg.sum(-1, dtype=torch.float64)
            self.sy += yt.sum(-1, dtype=torch.float64)
        self.yy += float(yt.double().pow(2).sum())
        self.rows += xg.shape[-1]
        tile = extra_bytes + (xg.numel() + yt.numel()) * xg.element_size() + yt.numel() * 8
        self.max_tile = max(self.max_tile, tile)

    # ---------------------------------------------------------------- solve
    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """G and B with the bias column/row appended (when the layer has a bias)."""
        if not self.bias:
            return self.G, self.B
        g, f = self.groups, self.fg
        G = self.G.new_zeros(g, f + 1, f + 1)
        G[:, :f, :f] = self.G
        G[:, :f, f] = self.sx
        G[:, f, :f] = self.sx
        G[:, f, f] = self.rows
        B = self.B.new_zeros(g, f + 1, self.cg)
        B[:, :f] = self.B
        B[:, f] = self.sy
        return G, B

    def current(self) -> torch.Tensor:
        """The layer's weights as [groups, features, C_g] float64."""
        w = self.m.weight.detach().double().reshape(self.groups, self.cg, self.fg).transpose(1, 2)
        if self.bias:
            b = self.m.bias.detach().double().reshape(self.groups, 1, self.cg)
            w = torch.cat([w, b], dim=1)
        return w

    def error(self, G: torch.Tensor, B: torch.Tensor, W: torch.Tensor) -> float:
        """||XW - Y|| / ||Y|| from the accumulators."""
        sq = float((W * torch.bmm(G, W)).sum() - 2 * (W * B).sum()) + self.yy
        return math.sqrt(max(sq, 0.0) / self.yy) if self.yy > 0 else math.sqrt(max(sq, 0.0))

    def write(self, W: torch.Tensor) -> None:
        m = self.m
        w = W[:, : self.fg, :].transpose(1, 2).reshape(m.weight.shape)
        m.weight.copy_(w.to(m.weight.dtype))
        if self.bias:
            m.bias.copy_(W[:, self.fg, :].reshape(m.bias.shape).to(m.bias.dtype))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # float32 tiles (float64 accumulators) run ~2x faster than float64 on CPU; a float64
    # network keeps float64 throughout; half/bfloat16 would lose too much in X^T X
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _solve(G: torch.Tensor, B: torch.Tensor, lam: float, bias: bool) -> torch.Tensor | None:
    f = G.shape[-1]
    d = torch.ones(f, dtype=G.dtype, device=G.device)
    if bias:
        d[-1] = 0  # the bias is not shrunk: it absorbs the mean the removed channels carried
    try:
        W = torch.linalg.solve(G + lam * torch.diag(d), B)
    except RuntimeError:  # torch.linalg.LinAlgError (singular) is a RuntimeError
        return None
    return W if bool(torch.isfinite(W).all()) else None


def _outputs(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _match_rows(orig: nn.Module, small: nn.Module) -> torch.Tensor | None:
    """Original output units the pruned layer kept, from its weights; None when not found.

    Torch-Pruning slices rows and columns in order and leaves the values alone, so each
    kept row's values are a subset of its original row's (an increasing match).
    """
    ow = orig.weight.detach().reshape(orig.weight.shape[0], -1)
    pw = small.weight.detach().reshape(small.weight.shape[0], -1).to(ow)
    ob = None if orig.bias is None else orig.bias.detach()
    pb = None if small.bias is None else small.bias.detach().to(ow)
    idx, o = [], 0
    for r in range(pw.shape[0]):
        while o < ow.shape[0] and not (
            bool(torch.isin(pw[r], ow[o]).all()) and (ob is None or pb is None or bool(pb[r] == ob[o]))
        ):
            o += 1
        if o == ow.shape[0]:
            return None
        idx.append(o)
        o += 1
    return torch.tensor(idx, dtype=torch.long)


def _input_of(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input `module` receives when `model` runs on x; the pass stops there."""
    box: list[torch.Tensor] = []

    def pre(mod, inputs):
        box.append(inputs[0].detach())
        raise _Stop

    h = module.register_forward_pre_hook(pre)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not box:
        raise RuntimeError("layer not reached")
    return box[0]


def _targets(model: nn.Module, mods: dict[str, nn.Module], idx: Mapping[str, torch.Tensor | None],
             inputs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Outputs of several layers (the kept units) for every batch; each pass stops after the last."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    left: set[str] = set()

    def hook(name: str):
        def fn(mod, inputs, output):
            y = output.detach()
            keep = idx.get(name)
            if keep is not None:
                # channels: dim -3 of a conv output (batched or not), the last of a Linear's
                y = y.index_select(y.dim() - 3 if isinstance(mod, nn.Conv2d) else y.dim() - 1, keep.to(y.device))
            out[name].append(y)
            left.discard(name)
            if not left:
                raise _Stop

        return fn

    with ExitStack() as stack:
        for n, m in mods.items():
            stack.callback(m.register_forward_hook(hook(n)).remove)
        for x in inputs:
            left.update(mods)
            try:
                model(x)
            except _Stop:
                pass
            if left:
                raise RuntimeError(f"layers not reached: {', '.join(sorted(left))}")
    return out


def _trace(model: nn.Module, mods: Mapping[str, nn.Module],
           x: torch.Tensor) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Forward order (first calls), calls per pass, and output elements per point of `mods`."""
    order: list[str] = []
    calls: dict[str, int] = {}
    numel: dict[str, int] = {}

    def hook(name: str):
        def fn(mod, inputs, output):
            if name not in calls:
                order.append(name)
                numel[name] = output.numel() // max(x.shape[0], 1)
            calls[name] = calls.get(name, 0) + 1

        return fn

    with ExitStack() as stack:
        for n, m in mods.items():
            stack.callback(m.register_forward_hook(hook(n)).remove)
        model(x)
    return order, calls, numel


def _validate(original: nn.Module, pruned: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    p_mods = dict(pruned.named_modules())
    o_mods = dict(original.named_modules())
    out: dict[str, nn.Module] = {}
    for name in layers:
        if name not in p_mods:
            raise ValueError(f"reconstruct: no layer named {name!r} in the pruned model")
        m = p_mods[name]
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"reconstruct: {name!r} is a {type(m).__name__}, not a Conv2d or Linear")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise ValueError(f"reconstruct: {name!r} pads with {m.padding_mode!r}; only 'zeros' is supported")
        if name not in o_mods or type(o_mods[name]) is not type(m):
            raise ValueError(f"reconstruct: the original model has no {type(m).__name__} named {name!r}")
        out[name] = m
    return out


def _skip(name: str, why: str) -> LayerFit:
    log.warning("reconstruct: %s not refit: %s", name, why)
    return LayerFit(name, 0, 0, 0.0, 0.0, False, 0.0, why)


def _windows(order: list[str], nbytes: Mapping[str, int], budget: int) -> list[list[str]]:
    """Consecutive layers whose targets on all points fit the budget together (at least one each)."""
    out: list[list[str]] = []
    size = 0
    for n in order:
        if out and size + nbytes[n] <= budget:
            out[-1].append(n)
            size += nbytes[n]
        else:
            out.append([n])
            size = nbytes[n]
    return out


def reconstruct(original: nn.Module, pruned: nn.Module, layers: Sequence[str], loader, device="cpu", *,
                ridge: float = 1e-4, max_points: int | None = None, tile_bytes: int = 64 << 20,
                kept_out: Mapping[str, torch.Tensor] | None = None,
                max_system_bytes: int = MAX_SYSTEM_BYTES) -> ReconstructReport:
    """Refit `layers` of `pruned` in place so their outputs match `original`'s on the loader's points.

    Layers are refit in forward order, each on the inputs produced by the already refit
    ones. ridge is relative to the mean diagonal of X^T X (bias excluded); a layer with
    fewer rows than unknowns, or whose system cannot be solved, gets a stronger ridge and
    one warning. kept_out: for layers that also lost output units, the original units
    kept (in order); when absent they are matched from the weights. Memory: the loader's
    raw inputs, the accumulators, one unfolded tile of at most tile_bytes (one point when
    a point alone is larger) and the unpruned network's outputs of consecutive layers,
    up to TARGET_TILES x tile_bytes, computed in one pass. A layer whose system would need
    more than max_system_bytes (`system_bytes`) is skipped, with the reason in its LayerFit.
    """
    start = time.perf_counter()
    mods = _validate(original, pruned, list(dict.fromkeys(layers)))
    o_mods = dict(original.named_modules())
    inputs = _gather(loader, device, max_points)
    points = sum(x.shape[0] for x in inputs)
    fits: dict[str, LayerFit] = {}
    peak = 0
    if not mods or not inputs:
        return ReconstructReport([], time.perf_counter() - start, peak, points)
    precision = torch.get_float32_matmul_precision()
    # TF32/bfloat16 products (a global setting elsewhere) would cost X^T X its low digits
    torch.set_float32_matmul_precision("highest")
    with ExitStack() as stack:
        stack.callback(torch.set_float32_matmul_precision, precision)
        stack.enter_context(eval_mode(original))
        stack.enter_context(eval_mode(pruned))
        stack.enter_context(torch.no_grad())
        order, calls, _ = _trace(pruned, mods, inputs[0][:1])
        for name in mods:
            if name not in calls:
                fits[name] = _skip(name, "not reached by the forward pass")
        todo: list[str] = []
        idx: dict[str, torch.Tensor | None] = {}
        for name in order:
            m, om = mods[name], o_mods[name]
            if calls[name] > 1:
                fits[name] = _skip(name, f"called {calls[name]} times per forward pass (shared weights)")
                continue
            need = system_bytes(m)
            if need > max_system_bytes:  # VGG's 25088-input classifier: a 5 GiB system, refit on few points
                fits[name] = _skip(name, f"its least squares would hold {need / 2**30:.1f} GiB "
                                         f"(over {max_system_bytes / 2**30:.1f} GiB)")
                continue
            idx[name] = None
            if _outputs(om) != _outputs(m):
                idx[name] = kept_out.get(name) if kept_out is not None else None
                if idx[name] is None:
                    idx[name] = _match_rows(om, m)
                if idx[name] is None or len(idx[name]) != _outputs(m):
                    fits[name] = _skip(name, f"lost output units ({_outputs(om)} -> {_outputs(m)}) that could "
                                             "not be matched to the original's; pass kept_out")
                    continue
            todo.append(name)
        # the unpruned network does not change: one pass serves several layers' targets, which
        # saves most of its forward passes (each layer would otherwise cost one up to itself)
        _, _, numel = _trace(original, {n: o_mods[n] for n in todo}, inputs[0][:1]) if todo else ({}, {}, {})
        nbytes = {n: points * numel[n] * _outputs(mods[n]) // _outputs(o_mods[n])
                  * o_mods[n].weight.element_size() for n in todo}
        for window in _windows(todo, nbytes, TARGET_TILES * tile_bytes):
            ys = _targets(original, {n: o_mods[n] for n in window}, idx, inputs)
            sizes = {n: sum(y.numel() * y.element_size() for y in v) for n, v in ys.items()}
            held = sum(sizes.values())
            for name in window:
                fits[name], used = _fit(name, mods[name], pruned, inputs, ys.pop(name), ridge, tile_bytes)
                peak = max(peak, used + held)
                held -= sizes[name]
    out = [fits[n] for n in order] + [fits[n] for n in mods if n not in calls]  # as refit, then unreached
    seconds = time.perf_counter() - start
    log.info("reconstruct: %d of %d layers refit on %d points in %.2fs, peak %.1f MB",
             sum(f.applied for f in out), len(out), points, seconds, peak / 2**20)
    return ReconstructReport(out, seconds, peak, points)


def _fit(name: str, m: nn.Module, pruned: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor],
         ridge: float, tile_bytes: int) -> tuple[LayerFit, int]:
    sys_ = _System(name, m, tile_bytes)
    for x, y in zip(inputs, targets):
        sys_.add(_input_of(pruned, m, x), y)
    G, B = sys_.full()
    features = sys_.features
    before = sys_.error(G, B, sys_.current())
    diag = torch.diagonal(sys_.G, dim1=1, dim2=2)
    scale = float(diag.sum()) / max(diag.numel(), 1)
    scale = scale if scale > 0 else 1.0  # all-zero inputs: any lambda > 0 pins the weights at 0
    note = None
    lam = ridge * scale
    W = _solve(G, B, lam, sys_.bias) if sys_.rows >= features else None
    if W is None:
        rel = max(FALLBACK_RIDGE, ridge)
        for _ in range(FALLBACK_STEPS):
            lam = rel * scale
            W = _solve(G, B, lam, sys_.bias)
            if W is not None:
                break
            rel *= 10
        why = f"{sys_.rows} rows for {features} unknowns" if sys_.rows < features else "a singular or non-finite solve"
        note = f"{why}; ridge fallback lambda={lam:.3g}" + ("" if W is not None else " failed, weights kept")
        log.warning("reconstruct: %s has %s", name, note)
    after = sys_.error(G, B, W) if W is not None else before
    applied = W is not None and after < before
    if applied:
        sys_.write(W)
    else:
        after = before
    log.debug("reconstruct: %s rows=%d features=%d error %.4g -> %.4g%s", name, sys_.rows, features, before,
              after, "" if applied else " (kept)")
    return LayerFit(name, sys_.rows, features, before, after, applied, lam, note), sys_.acc_bytes() + sys_.max_tile
