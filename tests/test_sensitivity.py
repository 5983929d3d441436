"""Empirical sensitivity (spec section 2): the fast tiled kernels against plain formulas.

Three implementations are compared: the fast `conv_sensitivity` / `linear_sensitivity`,
the module's own `reference_sensitivity`, and an independent brute force written here
that never unfolds: channel j's share c[i, j, p] is the layer applied to the input with
every other channel zeroed (and, for "max_offset", every other kernel offset zeroed).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pfp.sensitivity as sens
from pfp.sensitivity import (
    conv_sensitivity,
    kernel_positions,
    linear_sensitivity,
    reference_sensitivity,
    split_sign,
)

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- brute force
def _split(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    return torch.cat([a.clamp(min=0), (-a).clamp(min=0)]) if a.min() < 0 else a


def _ratio(c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.where(z.abs() > 1e-12, c / torch.where(z.abs() > 1e-12, z, torch.ones_like(z)), torch.zeros_like(z))


def brute_conv(a: torch.Tensor, conv: nn.Conv2d, mode: str) -> torch.Tensor:
    a = _split(a)
    w = conv.weight.detach().double()
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    C = conv.in_channels
    kh, kwid = conv.kernel_size
    s = torch.zeros(C, dtype=torch.float64)
    for ws in (w.clamp(min=0), w.clamp(max=0)):
        z = F.conv2d(a, ws, **kw)
        for j in range(C):
            only_j = torch.zeros_like(a)
            only_j[:, j] = a[:, j]
            if mode == "sum":
                best = _ratio(F.conv2d(only_j, ws, **kw), z).max()
            else:
                best = torch.tensor(0.0, dtype=torch.float64)
                for u in range(kh):
                    for v in range(kwid):
                        wk = torch.zeros_like(ws)
                        wk[:, :, u, v] = ws[:, :, u, v]
                        best = torch.maximum(best, _ratio(F.conv2d(only_j, wk, **kw), z).max())
            s[j] = max(s[j], best)
    return s


def brute_linear(a: torch.Tensor, lin: nn.Linear, units: torch.Tensor, mode: str) -> torch.Tensor:
    a = _split(a.reshape(-1, a.shape[-1]))
    w = lin.weight.detach().double()
    s = torch.zeros(units.shape[0], dtype=torch.float64)
    for ws in (w.clamp(min=0), w.clamp(max=0)):
        z = a @ ws.t()  # [N, O]
        for u in range(units.shape[0]):
            f = units[u][units[u] >= 0]
            terms = a[:, None, f] * ws[None, :, f]  # [N, O, |f|]
            if mode == "sum":
                r = _ratio(terms.sum(-1), z)
            else:
                r = _ratio(terms, z.unsqueeze(-1)).amax(-1)
            s[u] = max(s[u], r.max())
    return s


def _input(kind: str, shape, gen) -> torch.Tensor:
    if kind == "pos":  # dense, strictly positive: every channel shares every unit
        return torch.rand(shape, generator=gen) + 0.3
    if kind == "relu":
        return torch.relu(torch.randn(shape, generator=gen))
    return torch.randn(shape, generator=gen)  # signed: split into A+ and -A-


CONV_CASES = {
    "plain3x3": dict(cin=8, cout=6, k=3),
    "stride2": dict(cin=8, cout=6, k=3, stride=2),
    "dilation2": dict(cin=8, cout=6, k=3, dilation=2),
    "padding1": dict(cin=8, cout=6, k=3, padding=1),
    "groups2": dict(cin=16, cout=6, k=3, groups=2),
    "1x1": dict(cin=32, cout=4, k=1),
    "rect_kernel": dict(cin=8, cout=4, k=(3, 2), stride=(2, 1)),
}


def _conv(case: str, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    c = dict(CONV_CASES[case])
    return nn.Conv2d(c.pop("cin"), c.pop("cout"), c.pop("k"), **c)


@pytest.mark.parametrize("mode", ["sum", "max_offset"])
@pytest.mark.parametrize("kind", ["pos", "relu", "signed"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_reference_and_brute_force(case, kind, mode):
    conv = _conv(case)
    gen = torch.Generator().manual_seed(1)
    a = _input(kind, (3, conv.in_channels, 9, 9), gen)
    fast = conv_sensitivity(a, conv, mode)
    ref = reference_sensitivity(a, conv, mode=mode)
    brute = brute_conv(a, conv, mode)
    assert fast.shape == (conv.in_channels,)
    torch.testing.assert_close(ref, brute, atol=ATOL, rtol=0)
    torch.testing.assert_close(fast.double(), ref, atol=ATOL, rtol=0)
    # the case must be informative: not every unit has a single contributor
    assert (ref < 0.99).any(), f"degenerate test case: {ref}"
    assert (ref > 0).all()


@pytest.mark.parametrize("mode", ["sum", "max_offset"])
def test_conv_cases_are_not_degenerate_for_dense_input(mode):
    # with dense positive inputs no channel ever approaches a share of 1
    for case in CONV_CASES:
        conv = _conv(case)
        a = _input("pos", (3, conv.in_channels, 9, 9), torch.Generator().manual_seed(1))
        s = conv_sensitivity(a, conv, mode)
        assert float(s.max()) < 0.9, (case, s)


def test_split_sign():
    a = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    torch.testing.assert_close(split_sign(a), torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 2.0], [0.0, 0.0]]))
    b = a.abs()
    assert split_sign(b) is b


def test_signed_input_is_two_points():
    conv = _conv("plain3x3")
    a = torch.randn(2, 8, 7, 7, generator=torch.Generator().manual_seed(3))
    both = conv_sensitivity(a, conv)
    pos = conv_sensitivity(a.clamp(min=0), conv)
    neg = conv_sensitivity((-a).clamp(min=0), conv)
    torch.testing.assert_close(both, torch.maximum(pos, neg), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["sum", "max_offset"])
@pytest.mark.parametrize("kind", ["pos", "relu", "signed"])
def test_linear_contiguous_units(kind, mode):
    torch.manual_seed(0)
    lin = nn.Linear(24, 5)
    a = _input(kind, (4, 24), torch.Generator().manual_seed(2))
    units = torch.arange(24).view(6, 4)  # flatten: unit u = features [4u, 4u + 4)
    fast = linear_sensitivity(a, lin, units, mode)
    ref = reference_sensitivity(a, lin, units, mode)
    brute = brute_linear(a, lin, units, mode)
    torch.testing.assert_close(ref, brute, atol=ATOL, rtol=0)
    torch.testing.assert_close(fast.double(), ref, atol=ATOL, rtol=0)
    assert (ref < 0.99).any()


@pytest.mark.parametrize("mode", ["sum", "max_offset"])
@pytest.mark.parametrize("kind", ["pos", "signed"])
def test_linear_padded_irregular_units(kind, mode):
    torch.manual_seed(1)
    lin = nn.Linear(11, 5)
    units = torch.tensor([[0, 5, 7, -1, -1], [1, 2, -1, -1, -1], [3, 4, 6, 8, 9], [10, -1, -1, -1, -1]])
    a = _input(kind, (4, 11), torch.Generator().manual_seed(4))
    fast = linear_sensitivity(a, lin, units, mode)
    ref = reference_sensitivity(a, lin, units, mode)
    brute = brute_linear(a, lin, units, mode)
    torch.testing.assert_close(ref, brute, atol=ATOL, rtol=0)
    torch.testing.assert_close(fast.double(), ref, atol=ATOL, rtol=0)
    # padding entries (-1) gather feature 0 with weight 0: unit 3 = feature 10 alone must not
    # pick up feature 0's contribution; a units table without padding on that row agrees
    single = linear_sensitivity(a, lin, torch.tensor([[10]]), mode)
    torch.testing.assert_close(fast[3:], single, atol=1e-6, rtol=0)


def test_linear_3d_input_is_points_times_positions():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    a = torch.rand(2, 5, 6) + 0.1
    units = torch.arange(6).view(3, 2)
    torch.testing.assert_close(linear_sensitivity(a, lin, units), linear_sensitivity(a.reshape(10, 6), lin, units))
    assert kernel_positions(lin, a) == (1, 5)
    assert kernel_positions(lin, a[:, 0]) == (1, 1)


@pytest.mark.parametrize("mode", ["sum", "max_offset"])
def test_tiny_tiles_give_identical_results(monkeypatch, mode):
    conv = nn.Conv2d(8, 12, 3, padding=1, stride=1)
    torch.manual_seed(0)
    conv.reset_parameters()
    a = torch.rand(5, 8, 10, 10, generator=torch.Generator().manual_seed(5))
    lin = nn.Linear(40, 7)
    la = torch.randn(6, 40, generator=torch.Generator().manual_seed(6))
    units = torch.arange(40).view(8, 5)
    base_conv = conv_sensitivity(a, conv, mode)
    base_lin = linear_sensitivity(la, lin, units, mode)

    calls = {"tiles": 0}
    real = sens._tiled_max

    def counting(*args, **kw):
        calls["tiles"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(sens, "TILE_BYTES", 64)
    monkeypatch.setattr(sens, "UNFOLD_BYTES", 64)
    monkeypatch.setattr(sens, "_tiled_max", counting)
    tiled_conv = conv_sensitivity(a, conv, mode)
    conv_calls = calls["tiles"]
    tiled_lin = linear_sensitivity(la, lin, units, mode)
    assert conv_calls >= 5  # at most one point per unfold tile
    assert calls["tiles"] > conv_calls
    torch.testing.assert_close(tiled_conv, base_conv, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiled_lin, base_lin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_values_in_unit_interval_for_nonnegative_input(case):
    for seed in range(3):
        conv = _conv(case, seed)
        a = torch.relu(torch.randn(2, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(seed)))
        for mode in ("sum", "max_offset"):
            s = conv_sensitivity(a, conv, mode)
            assert (s >= 0).all() and (s <= 1 + 1e-6).all(), s


def test_zero_channel_has_zero_sensitivity():
    conv = _conv("padding1")
    a = torch.rand(3, 8, 9, 9) + 0.1
    a[:, 3] = 0
    for mode in ("sum", "max_offset"):
        s = conv_sensitivity(a, conv, mode)
        assert s[3] == 0
        assert (s[torch.arange(8) != 3] > 0).all()
    lin = nn.Linear(12, 4)
    la = torch.rand(5, 12) + 0.1
    la[:, 4:8] = 0
    s = linear_sensitivity(la, lin, torch.arange(12).view(3, 4))
    assert s[1] == 0 and (s[[0, 2]] > 0).all()


@pytest.mark.parametrize("signed_weights", [False, True])
def test_dominant_channel_is_most_sensitive(signed_weights):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3)
    with torch.no_grad():
        if not signed_weights:
            conv.weight.abs_()
        conv.weight[:, 2] *= 10
    a = torch.rand(3, 6, 8, 8) + 0.2
    for mode in ("sum", "max_offset"):
        s = conv_sensitivity(a, conv, mode)
        assert int(s.argmax()) == 2, s
        others = s[torch.arange(6) != 2]
        assert float(s[2]) > 1.5 * float(others.max()), s
    lin = nn.Linear(12, 4)
    with torch.no_grad():
        lin.weight[:, 8:12] *= 20
    s = linear_sensitivity(torch.rand(6, 12) + 0.2, lin, torch.arange(12).view(3, 4))
    assert int(s.argmax()) == 2, s


def test_more_points_never_lower_sensitivity():
    conv = _conv("plain3x3")
    a = torch.rand(6, 8, 9, 9, generator=torch.Generator().manual_seed(7))
    full = conv_sensitivity(a, conv)
    for part in (a[:2], a[2:4], a[4:]):
        assert (conv_sensitivity(part, conv) <= full + 1e-7).all()
    torch.testing.assert_close(
        full, torch.stack([conv_sensitivity(p, conv) for p in (a[:2], a[2:4], a[4:])]).amax(0), atol=1e-7, rtol=0
    )


@pytest.mark.parametrize(
    "kw", [dict(), dict(stride=2), dict(padding=1), dict(dilation=2), dict(stride=(2, 1), padding=(1, 0))]
)
def test_kernel_positions_conv(kw):
    conv = nn.Conv2d(3, 4, 3, **kw)
    a = torch.rand(1, 3, 11, 9)
    K, P = kernel_positions(conv, a)
    out = conv(a)
    assert K == 9
    assert P == out.shape[2] * out.shape[3]


def test_string_padding_is_refused():
    conv = nn.Conv2d(3, 4, 3, padding="same")
    with pytest.raises(NotImplementedError):
        conv_sensitivity(torch.rand(1, 3, 8, 8), conv)
