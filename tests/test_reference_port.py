"""The project's PFP pieces against a line-by-line port of the reference code (tests/reference_port.py).

- scores: `conv_sensitivity` / `linear_sensitivity` with mode="max_offset" equal the
  reference tracker's `sensitivity_in` (non-negative and signed inputs, stride/padding/dilation
  variants, Linear per feature and per flatten channel);
- counts: `pfp_counts` equals the reference allocator's kept count at one eps, and
  `sample_size` its m; `calibration_size` equals the reference's |S|;
- end to end: `prune(method="pfp_reference")` keeps, per group, what the reference rule
  gives at the report's global eps applied to the port's scores.

Where the two legitimately differ, the test compares where they agree and says so; the
known differences are marked xfail (non-strict) so that they stay visible.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from pfp import allocation as alloc
from pfp.sensitivity import conv_sensitivity, linear_sensitivity
from tests import reference_port as ref

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL32 = 1e-5  # project in float32 against the float64 port
RTOL64 = 1e-10  # project run in float64
ATOL = 1e-9


def _inputs(shape, signed: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g)
    if not signed:
        a = a.clamp(min=0)  # post-ReLU: about half the entries are exact zeros
    return a


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    got = got.double().cpu()
    assert got.shape == want.shape
    err = ((got - want).abs() / want.abs().clamp(min=1e-30)).max().item()
    assert torch.allclose(got, want, rtol=rtol, atol=ATOL), f"max relative error {err:.3g}"


# ----------------------------------------------------------------------------- scores: Conv2d
CONVS = [
    # cin, cout, kernel, stride, padding, dilation, bias, H, W
    (3, 5, 3, 1, 0, 1, True, 7, 7),
    (4, 6, 3, 1, 1, 1, False, 6, 6),
    (4, 3, 3, 2, 1, 1, True, 9, 8),
    (5, 4, (3, 2), (2, 1), (0, 1), 1, True, 7, 6),
    (3, 4, 3, 1, 2, 2, False, 7, 7),
    (6, 8, 1, 1, 0, 1, True, 5, 5),
    (2, 3, 5, 1, 2, 1, True, 8, 8),
]


@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
@pytest.mark.parametrize("spec", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_conv_max_offset_equals_reference(spec, signed):
    cin, cout, k, s, p, d, bias, h, w = spec
    torch.manual_seed(hash((spec, signed)) % 1000)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias)
    a = _inputs((3, cin, h, w), signed, seed=len(str(spec)) + signed)
    want = ref.channel_sensitivity(a, conv)
    assert (want > 0).all()
    _assert_close(conv_sensitivity(a, conv, mode="max_offset"), want, RTOL32)
    # the same arithmetic in float64: equal to rounding
    conv64 = copy.deepcopy(conv).double()
    _assert_close(conv_sensitivity(a.double(), conv64, mode="max_offset"), want, RTOL64)


def test_conv_signed_batch_mixed_with_nonnegative_points():
    """The project splits the whole batch when any entry is negative; the reference splits per point.

    A non-negative point's negative half is all zeros and scores 0, so both agree.
    """
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    a = torch.cat([_inputs((2, 3, 6, 6), False, 3), _inputs((2, 3, 6, 6), True, 4)])
    want = ref.channel_sensitivity(a, conv)
    _assert_close(conv_sensitivity(a, conv, mode="max_offset"), want, RTOL32)


def test_grouped_conv_per_group_equals_reference():
    """The reference tracker refuses grouped convs; per conv group, a grouped conv is a plain one.

    An extension, not a port: the project's grouped/depthwise scores equal the port applied to
    each group's own slice of inputs and filters.
    """
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2)
    a = _inputs((3, 6, 6, 6), False, 5)
    with pytest.raises(NotImplementedError):
        ref.channel_sensitivity(a, conv)
    want = torch.zeros(6, dtype=torch.float64)
    for gi in range(2):
        sub = nn.Conv2d(3, 2, 3, padding=1)
        sub.weight.data = conv.weight.data[2 * gi : 2 * gi + 2].clone()
        sub.bias.data = conv.bias.data[2 * gi : 2 * gi + 2].clone()
        want[3 * gi : 3 * gi + 3] = ref.channel_sensitivity(a[:, 3 * gi : 3 * gi + 3], sub)
    _assert_close(conv_sensitivity(a, conv, mode="max_offset"), want, RTOL32)


@pytest.mark.xfail(reason="known difference: zero-denominator threshold, project |z| <= 1e-12, reference "
                          "|z| <= float32 eps (1.19e-7), both absolute", strict=False)
def test_tiny_denominator_threshold():
    """A unit whose positive total is 1e-9: the reference drops its ratios, the project keeps them."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    conv.weight.data = torch.tensor([[[[1.0]], [[-1.0]]]])
    a = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    a[0, 0, 0, 0] = 1e-9  # channel 0 alone, tiny: z+ = 1e-9
    a[0, 1, 1, 1] = 1.0  # channel 1: z- = -1 at another position
    want = ref.channel_sensitivity(a, conv)  # [0, 1]
    got = conv_sensitivity(a, copy.deepcopy(conv).double(), mode="max_offset")  # [1, 1]
    _assert_close(got, want, RTOL64)


# ----------------------------------------------------------------------------- scores: Linear
def _flatten_units(channels: int, per_channel: int) -> torch.Tensor:
    return torch.arange(channels * per_channel).view(channels, per_channel)


@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_per_feature_equals_reference(signed, bias):
    """One unit per feature: exactly the reference tracker's per-feature `sensitivity_in`."""
    torch.manual_seed(3 + signed)
    lin = nn.Linear(12, 7, bias=bias)
    a = _inputs((5, 12), signed, 6 + signed)
    want = ref.channel_sensitivity(a, lin)
    units = torch.arange(12).unsqueeze(1)
    _assert_close(linear_sensitivity(a, lin, units, mode="max_offset"), want, RTOL32)
    _assert_close(linear_sensitivity(a.double(), copy.deepcopy(lin).double(), units, mode="max_offset"), want, RTOL64)


@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
def test_linear_after_flatten_is_max_over_channel_features(signed):
    """Units = channels after a flatten (C x H*W features): the max of the reference's per-feature scores.

    The reference itself scores (and prunes) features; the per-channel max is the project's
    mapping of those scores to channels (reference_port.units_max).
    """
    torch.manual_seed(4 + signed)
    C, HW = 4, 6
    lin = nn.Linear(C * HW, 5)
    a = _inputs((4, C * HW), signed, 8 + signed)
    units = _flatten_units(C, HW)
    want = ref.units_max(ref.channel_sensitivity(a, lin), units)
    _assert_close(linear_sensitivity(a, lin, units, mode="max_offset"), want, RTOL32)


# ----------------------------------------------------------------------------- counts
def _random_stats(seed: int) -> list[alloc.GroupStats]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, K, P in [(6, 25, 100), (16, 9, 64), (32, 1, 1), (64, 9, 256), (120, 1, 1), (10, 16, 1)]:
        s = torch.rand(n, generator=g, dtype=torch.float64) ** 3  # skewed, like measured sensitivities
        s[torch.rand(n, generator=g) < 0.1] = 0.0  # a few dead channels (p_j = 0)
        s[0] = max(float(s[0]), 0.05)
        out.append(alloc.GroupStats(n, s, K, P))
    return out


EPS_VALUES = [0.1, 0.7, 3.0, 25.0, 200.0, 1500.0, 9000.0]
TIE = 1e-9


def _reference_counts(s: torch.Tensor, eps: float, k: int, p: int, delta: float) -> tuple[int, set[int]]:
    """(the port's kept count, the counts it could give were its ceil not decided by the last ulp).

    The reference takes ceil(sum_j 1 - (1 - p_j)^m) with no tolerance. Where that sum is an
    integer in exact arithmetic (always at m = 1, where it is sum_j p_j = 1) float rounding
    decides: 1 + 2**-52 gives 2. The project subtracts 1e-9 before the ceil. Both counts are
    accepted where the sum lies within 1e-9 of an integer.
    """
    want = ref.kept_count(s, eps, k, p, delta_failure=delta)
    raw = ref.expected_unique_raw(s.double() / s.double().sum(), ref.layer_sample_complexity(s, eps, k, p, delta))
    allowed = {want}
    if abs(raw - round(raw)) < TIE:
        allowed.add(min(max(1, round(raw)), s.numel()))
    return want, allowed


@pytest.mark.parametrize("delta", [1e-16, 1e-12, 1e-3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pfp_counts_equal_reference(seed, delta):
    stats = _random_stats(seed)
    seen, ties, total = set(), 0, 0
    for eps in EPS_VALUES:
        got = alloc.pfp_counts(stats, eps, delta)
        for g, k_got in zip(stats, got):
            want, allowed = _reference_counts(g.sensitivity, eps, g.kernel, g.positions, delta)
            assert k_got in allowed, (eps, g.size, k_got, want)
            ties += k_got != want
            total += 1
            seen.add(k_got)
    # the eps values above span more than "keep all" and "keep 1"
    assert len(seen) > 8
    assert ties <= total // 10  # only the m = 1 rounding ties, never a real difference


def test_count_tie_at_one_sample():
    """m = 1: the reference's ceil(sum p_j) can be 2 by float rounding; the project keeps 1 channel."""
    s = _random_stats(0)[1].sensitivity  # sum p_j rounds to 1 + 2**-52 for this one
    eps = 9000.0
    assert ref.layer_sample_complexity(s, eps, 9, 64, 1e-16) == 1
    assert ref.kept_count(s, eps, 9, 64, delta_failure=1e-16) == 2
    assert alloc.pfp_counts([alloc.GroupStats(s.numel(), s, 9, 64)], eps, 1e-16) == [1]


@pytest.mark.parametrize("delta", [1e-16, 1e-12])
def test_sample_size_equals_reference(delta):
    for g in _random_stats(5):
        for eps in EPS_VALUES:
            m_ref = ref.sample_complexity(eps, ref.coefficient(g.sensitivity, g.kernel, g.positions, delta))
            m = alloc.sample_size(g, eps, delta)
            # both are ceil() of the same product, in a different order of multiplication
            assert m == m_ref or abs(m - m_ref) <= 1 and m_ref > 1e6, (eps, m, m_ref)
            assert alloc.alpha(g.kernel, g.positions, delta) == pytest.approx(ref.alpha(g.kernel, g.positions, delta),
                                                                              rel=1e-14)


def test_calibration_size_formula_equals_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        etas = torch.randint(1, 20000, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
        for delta in (1e-16, 1e-12, 1e-3):
            assert alloc.calibration_size(sum(etas), max(etas), delta) == ref.calibration_size(etas, delta)


@pytest.mark.parametrize("name,size,channels", [("lenet5", 28, 1), ("resnet20", 32, 3)])
def test_calibration_size_of_models_equals_reference(name, size, channels):
    from pfp.models import build_model
    from pfp.prune import calibration_size

    torch.manual_seed(0)
    model = build_model(name, 10, channels, size)
    x = torch.randn(2, channels, size, size)
    for delta in (1e-16, 1e-12):
        assert calibration_size(model, x, delta) == ref.calibration_size(ref.layer_etas(model, x), delta)
    if name == "resnet20":  # the spec's number, and the reference's default deltaS
        assert ref.calibration_size(ref.layer_etas(model, x), 1e-16) == 183


# ----------------------------------------------------------------------------- end to end
try:
    from pfp.config import PruneConfig

    PruneConfig(method="pfp_reference")
    HAVE_PFP_REFERENCE = True
except Exception:  # noqa: BLE001 - the method has not landed yet
    HAVE_PFP_REFERENCE = False


def _port_group_scores(model: nn.Module, x_calib: torch.Tensor, example: torch.Tensor):
    """Per group: the port's scores (max over consumers), and (K, P) for the bound."""
    from pfp.groups import PruningGraph

    graph = PruningGraph(copy.deepcopy(model).eval(), example)
    names = dict(graph.model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    hooks = [names[c.name].register_forward_pre_hook(lambda m, i, n=c.name: inputs.setdefault(n, i[0].detach()))
             for g in graph.groups for c in g.consumers]
    with torch.no_grad():
        graph.model(x_calib)
    for h in hooks:
        h.remove()
    out = {}
    for g in graph.groups:
        s = torch.zeros(g.size, dtype=torch.float64)
        kp = (1, 1)
        for c in g.consumers:
            mod, a = names[c.name], inputs[c.name]
            s_in = ref.channel_sensitivity(a, mod)  # per input channel (conv) or feature (Linear)
            for i, r in zip(c.in_idxs.tolist(), c.root_idxs.tolist()):
                s[r] = max(float(s[r]), float(s_in[i]))
            if isinstance(mod, nn.Conv2d):
                k, p = ref.kernel_size(mod), ref.num_patches(a, mod)
            else:
                # the reference: K = 1, P = 1, n = features. The project prunes channels, so a
                # Linear after a flatten has K = features per channel (its "kernel"), P = 1.
                per_root = torch.bincount(c.root_idxs, minlength=g.size)
                k, p = int(per_root.max()), 1
            kp = max(kp, (k, p), key=lambda t: (t[1] + 1) * t[0])  # the project's choice for several consumers
        out[g.name] = (g.size, s, kp)
    return out


@pytest.mark.skipif(not HAVE_PFP_REFERENCE, reason='PruneConfig does not accept method="pfp_reference" yet')
def test_pfp_reference_end_to_end_counts_equal_reference_rule():
    from pfp.models import build_model
    from pfp.prune import prune

    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 28).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    cfg = PruneConfig(method="pfp_reference", round_to=1, calib_size=8)
    _, report, _ = prune(model, loader, cfg, 0.5, example_input=x[:1])
    assert report.eps is not None and report.eps > 0
    delta = report.delta if report.delta is not None else cfg.delta

    port = _port_group_scores(model, x, x[:1])
    rows = {r["name"]: r for r in report.layers}
    assert set(rows) == set(port), (set(rows), set(port))
    # the bisected eps sits on a count step of some group, and the port's scores are float64 of
    # the project's float32 ones: accept the counts at eps * (1 -+ rel) too
    rel = 1e-5
    exact = 0
    for name, (size, s, (k, p)) in port.items():
        row = rows[name]
        assert row["size"] == size
        at, allowed = _reference_counts(s, report.eps, k, p, delta)
        for e in (report.eps * (1 + rel), report.eps * (1 - rel)):
            allowed |= _reference_counts(s, e, k, p, delta)[1]
        assert min(allowed) <= row["kept"] <= max(allowed), (name, row["kept"], at, sorted(allowed), report.eps)
        exact += row["kept"] == at
        assert row["S"] == pytest.approx(float(s.sum()), rel=1e-5)
    assert exact >= len(port) - 1  # at most the group that sets the step differs
    assert any(r["kept"] < r["size"] for r in report.layers)
