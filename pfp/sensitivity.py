"""Empirical sensitivity of channels (spec section 2), batched and tiled.

For a consumer with weight W and non-negative input A, channel j's share of unit (i, p) is
c[j, i, p] = sum_k W[i, j, k] A[j, k, p], computed with W+ and W- separately; its relative
contribution is c / z with z = sum_j c; the sensitivity of j is the maximum over points,
units and positions. All of it is written here as one layout:

    Wp:   [C, R, K]   per input unit j, R = 2 * out rows (W+ then W-), K offsets
    U:    [C, K, Q]   the input, unfolded, Q = points x positions
    zinv: [R, Q]      1 / z (0 where z is 0), from one dense product

so a conv and a Linear (after flatten, K = features per channel) share one kernel:
per tile, a batched matmul Wp @ U, a multiply by zinv and a max. Tiles over points and
units keep the [n, c, R, Q] intermediate a few MiB, in cache, never materialised whole.
`reference_sensitivity` is the plain formula with Python loops, for tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TILE_BYTES = 4 << 20
UNFOLD_BYTES = 64 << 20
EPS = 1e-12


def split_sign(a: torch.Tensor) -> torch.Tensor:
    """Inputs that can be negative become two non-negative points: A+ and -A-."""
    if a.numel() and a.min() < 0:
        return torch.cat([a.clamp(min=0), (-a).clamp(min=0)], 0)
    return a


def _zinv(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z.abs() > EPS, z.reciprocal(), torch.zeros((), dtype=z.dtype, device=z.device))


def _tiled_max(Wp: torch.Tensor, U: torch.Tensor, zinv: torch.Tensor, mode: str) -> torch.Tensor:
    """max over n, r, q of (Wp[c] @ U[n, c])[r, q] * zinv[n, r, q], for every unit c. -> [C]

    Wp [C, R, K], U [N, C, K, Q], zinv [N, R, Q]. Tiles over points and units keep the
    [n, c, R, Q] intermediate a few MiB.
    """
    C, R, K = Wp.shape
    N, _, _, Q = U.shape
    per_unit = R * Q * 4 * (K if mode == "max_offset" else 1)
    c_tile = max(1, min(C, TILE_BYTES // max(1, per_unit)))
    n_tile = max(1, min(N, TILE_BYTES // max(1, per_unit * c_tile)))
    out = torch.zeros(C, dtype=Wp.dtype, device=Wp.device)
    for c0 in range(0, C, c_tile):
        w = Wp[c0 : c0 + c_tile]
        best = out[c0 : c0 + c_tile]
        for n0 in range(0, N, n_tile):
            u = U[n0 : n0 + n_tile, c0 : c0 + c_tile]  # [n, c, K, Q]
            zi = zinv[n0 : n0 + n_tile].unsqueeze(1)  # [n, 1, R, Q]
            if mode == "sum":
                c = torch.matmul(w, u)  # [n, c, R, Q]
            else:  # the reference code's choice: the largest single kernel offset
                c = (w.unsqueeze(-1) * u.unsqueeze(2)).amax(3)
            c.mul_(zi)
            torch.maximum(best, c.amax(dim=(0, 2, 3)), out=best)
    return out


def _signed_rows(w: torch.Tensor) -> torch.Tensor:
    """[O, ...] -> [2O, ...]: W+ rows then |W-| rows.

    c-/z- equals |c-|/|z-|, so with |W-| both halves are non-negative and one max serves.
    """
    return torch.cat([w.clamp(min=0), (-w).clamp(min=0)], 0)


def conv_sensitivity(a: torch.Tensor, conv: nn.Conv2d, mode: str = "sum") -> torch.Tensor:
    """Sensitivity of each input channel of `conv` on the points in `a` -> [C_in]."""
    a = split_sign(a.detach())
    w = conv.weight.detach()
    if a.dtype != w.dtype:
        a = a.to(w.dtype)
    g = conv.groups
    cin_g = conv.in_channels // g
    out_g = conv.out_channels // g
    kh, kw = conv.kernel_size
    K = kh * kw
    kwargs = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise NotImplementedError(f"padding {conv.padding!r}/{conv.padding_mode}")
    result = torch.zeros(conv.in_channels, dtype=w.dtype, device=w.device)
    N = a.shape[0]
    per_point = a[0].numel() * K * 4
    n_tile = max(1, UNFOLD_BYTES // max(1, per_point))
    for gi in range(g):
        wg = w[gi * out_g : (gi + 1) * out_g]  # [O, cin_g, kh, kw]
        w2 = _signed_rows(wg)  # [2O, cin_g, kh, kw]
        Wp = w2.reshape(2 * out_g, cin_g, K).permute(1, 0, 2).contiguous()
        ch = slice(gi * cin_g, (gi + 1) * cin_g)
        for n0 in range(0, N, n_tile):
            x = a[n0 : n0 + n_tile, ch]
            n = x.shape[0]
            z = F.conv2d(x, w2, **kwargs)  # [n, 2O, H', W']
            P = z.shape[2] * z.shape[3]
            zinv = _zinv(z).view(n, 2 * out_g, P)
            U = F.unfold(x, (kh, kw), **kwargs).view(n, cin_g, K, P)
            s = _tiled_max(Wp, U, zinv, mode)
            torch.maximum(result[ch], s, out=result[ch])
    return result


def linear_sensitivity(a: torch.Tensor, linear: nn.Linear, units: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Sensitivity of feature units of `linear` -> [n_units].

    units: [n_units, K] feature indices of each unit (-1 pads shorter units); a Linear after
    flatten has one unit per channel holding that channel's H*W features.
    """
    a = a.detach().reshape(-1, a.shape[-1])
    a = split_sign(a)
    w = linear.weight.detach()
    if a.dtype != w.dtype:
        a = a.to(w.dtype)
    w2 = _signed_rows(w)  # [R, F]
    zinv = _zinv(a @ w2.t()).t().unsqueeze(0)  # [1, R, Q]: all points as positions
    n_units, K = units.shape
    R, Q = w2.shape[0], a.shape[0]
    chunk = max(1, UNFOLD_BYTES // max(1, 4 * K * (R + Q)))  # gathered weights and inputs per unit
    out = []
    at = a.t()
    for u0 in range(0, n_units, chunk):
        part = units[u0 : u0 + chunk]
        pad = part < 0
        idx = part.clamp(min=0)
        # padding gathers feature 0 with a zero weight, so it adds nothing
        Wp = w2[:, idx].masked_fill(pad.unsqueeze(0), 0).permute(1, 0, 2).contiguous()  # [c, R, K]
        U = at[idx].masked_fill(pad.unsqueeze(-1), 0).unsqueeze(0)  # [1, c, K, Q]
        out.append(_tiled_max(Wp, U, zinv, mode))
    return torch.cat(out)


def reference_sensitivity(a: torch.Tensor, conv_or_linear: nn.Module, units: torch.Tensor | None = None,
                          mode: str = "sum") -> torch.Tensor:
    """The spec's formula with plain loops: obviously correct, slow. For tests."""
    a = split_sign(a.detach().double())
    m = conv_or_linear
    if isinstance(m, nn.Conv2d):
        w = m.weight.detach().double()
        g = m.groups
        cin_g, out_g = m.in_channels // g, m.out_channels // g
        kh, kw = m.kernel_size
        cols = F.unfold(a, (kh, kw), stride=m.stride, padding=m.padding, dilation=m.dilation)
        cols = cols.view(a.shape[0], m.in_channels, kh * kw, -1)  # [N, C, K, P]
        s = torch.zeros(m.in_channels, dtype=torch.float64)
        for n in range(a.shape[0]):
            for i in range(m.out_channels):
                gi = i // out_g
                chans = range(gi * cin_g, (gi + 1) * cin_g)
                wi = w[i].reshape(cin_g, kh * kw)
                for sign in (1, -1):
                    ws = (wi * sign).clamp(min=0) * sign  # W+ or W-, signs kept: the literal formula
                    # a channel's share over its kernel offsets: summed, or the largest single
                    # one (most negative for W-)
                    if mode == "sum":
                        share = lambda t: t.sum(0)  # noqa: E731
                    else:
                        share = lambda t: t.max(0).values if sign > 0 else t.min(0).values  # noqa: E731
                    contrib = torch.stack([share(ws[jj].unsqueeze(-1) * cols[n, j]) for jj, j in enumerate(chans)])
                    total = (ws.unsqueeze(-1) * cols[n, gi * cin_g:(gi + 1) * cin_g]).sum((0, 1))
                    ratio = torch.where(total.abs() > EPS, contrib / total, torch.zeros(()).double())
                    for jj, j in enumerate(chans):
                        s[j] = max(s[j], ratio[jj].max().item())
        return s
    w = m.weight.detach().double()
    a = a.reshape(-1, a.shape[-1])
    s = torch.zeros(units.shape[0], dtype=torch.float64)
    for n in range(a.shape[0]):
        for i in range(w.shape[0]):
            for sign in (1, -1):
                ws = (w[i] * sign).clamp(min=0) * sign
                total = (ws * a[n]).sum()
                if abs(total) <= EPS:
                    continue
                for u in range(units.shape[0]):
                    f = units[u][units[u] >= 0]
                    terms = ws[f] * a[n, f]
                    if mode == "sum":
                        c = terms.sum()
                    else:
                        c = terms.max() if sign > 0 else terms.min()
                    s[u] = max(s[u], (c / total).item())
    return s


def kernel_positions(module: nn.Module, a: torch.Tensor) -> tuple[int, int]:
    """(K, P): kernel offsets per channel and output positions per point, for the bound."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        h, w = a.shape[-2:]
        sh, sw = module.stride
        ph, pw = module.padding
        dh, dw = module.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return kh * kw, ho * wo
    return 1, max(1, math.prod(a.shape[1:-1]))
