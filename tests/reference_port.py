"""A plain, line-by-line port of the PFP reference code (torchprune), for tests.

NOT a test module: `tests/test_reference_port.py` compares the project against it.

Ported from the public repository github.com/lucaslie/torchprune, snapshot at commit
14b392cb3e5523c8677bcb78c92d5e155366d85a ("Sparse Flow (Node) paper and v2.2.0 release";
the files below are unchanged since v2.0.0, b753745, except where noted):

  src/torchprune/torchprune/method/base_sens/base_sens_tracker.py  BaseSensTracker
      __init__ (W+/W- split), _adapt_activations, _process_denominator, _get_g_sens_f,
      _compute_g_sens_f, _update_g_sens, _update_sensitivity          -> channel_sensitivity
  src/torchprune/torchprune/method/pfp/pfp_tracker.py               PFPTracker._reduction = max
  src/torchprune/torchprune/method/base_sens/base_sens_net.py       _start_preprocessing: S is fed
      one point at a time (tensor.MiniDataLoader(loader_s, 1)); delta_failure=1e-16, c_constant=3
  src/torchprune/torchprune/method/sipp/sipp_allocator.py           SiPPRandAllocator._get_coefficients
      (alpha, coeffs = alpha * sum_sens)                               -> alpha, coefficient
  src/torchprune/torchprune/method/pfp/pfp_allocator.py             PFPRandAllocator._get_sens_stats,
      _get_sample_complexity, _get_unique_samples, _get_proposed_num_features (commit 0932cbc)
                                                                       -> sample_complexity, kept_count
  src/torchprune/torchprune/method/base/base_util.py                expected_unique -> expected_unique
  src/torchprune/torchprune/method/base/base_allocator.py           BaseFilterAllocator (in_features =
      input channels with a nonzero weight; brentq over eps in [1e-300, 1e150] on the param budget)
  src/experiment/experiment/util/data.py                            get_data_loader: size of S
  src/torchprune/torchprune/util/net.py                             NetHandle.cache_etas: eta per layer
                                                                       -> calibration_size

Everything is float64 here; the reference runs in the network's dtype (float32). The
zero-denominator threshold is kept at the reference's float32 machine eps, as in their code.

Where the reference differs from /work/shared/pfp-spec.md (section 2):
  * Kernel offsets: the reference's g is per (output filter f, input index c*K+k, position p),
    i.e. one kernel offset at a time; it then takes the max over p, then over k, then over f
    and points. The spec's formula sums the channel's share over k first (the project's
    mode="sum"); the reference corresponds to the project's mode="max_offset".
  * The two signs are compared per element: g = max(W+ a / z+, W- a / z-), with W- <= 0 and
    z- <= 0, so the second ratio is |W-| a / |z-| >= 0.
  * Zero denominators: |z| <= float32 eps (1.19e-7, absolute, not relative) is replaced by
    +inf, so that term becomes 0 (the spec: "counted as 0 where its denominator is 0 or below
    float eps"); the project uses an absolute 1e-12 instead.
  * Negative inputs: if any entry of the (one-point) batch is negative, the batch becomes
    [A+, -A-] (concatenated along the batch dimension): two points, as in the spec. Entries
    equal to 0 go to A+.
  * A Linear consumer is scored per input *feature* (its weight's columns); a Linear after a
    flatten therefore has C*H*W features, not C channels. `units_max` takes the max over the
    features of each channel, which is what the project's `linear_sensitivity(units=...)` does;
    the reference itself never forms that per-channel max (it prunes features, then
    propagates zero columns to the producer's filters).
  * Grouped / depthwise convs are not supported by the reference tracker (the unfolded input
    has C_in*K rows, the weight C_in/groups*K columns); `channel_sensitivity` refuses them.
  * Bias is removed from both W+ and W- copies (z has no bias), as in the spec.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # BaseSensTracker._process_denominator
C_CONSTANT = 3.0  # BaseSensNet / evaluator: "MAGIC C CONSTANT (C = 3 for ICLR experiments)"
K_CONSTANT = 3.0  # PFPRandAllocator._get_sample_complexity
DELTA_FAILURE = 1e-16  # BaseSensNet default and experiment/param/default.yaml coresets.deltaS


# ----------------------------------------------------------------------------- the tracker
def _adapt_activations(a_original: torch.Tensor) -> torch.Tensor:
    """BaseSensTracker._adapt_activations (absolute=False for PFP)."""
    bigger = a_original >= 0.0
    if torch.all(bigger):
        return a_original
    a_pos = torch.zeros_like(a_original)
    a_neg = torch.zeros_like(a_original)
    a_pos[bigger] = a_original[bigger]
    a_neg[~bigger] = a_original[~bigger]
    return torch.cat((a_pos, -a_neg))


def _process_denominator(z_values: torch.Tensor) -> torch.Tensor:
    """BaseSensTracker._process_denominator: |z| <= float32 eps -> +inf (the ratio becomes 0)."""
    mask = torch.le(torch.abs(z_values), FLOAT32_EPS)
    return z_values.masked_fill(mask, float("inf"))


def _split_module(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """BaseSensTracker.__init__: deep copies with W+ (W > 0) and W- (W < 0, signed), bias zeroed."""
    weight = module.weight.data.double()
    idx_plus = weight > 0.0
    idx_minus = weight < 0.0
    weight_plus = torch.zeros_like(weight)
    weight_minus = torch.zeros_like(weight)
    weight_plus[idx_plus] = weight[idx_plus]
    weight_minus[idx_minus] = weight[idx_minus]
    module_plus = copy.deepcopy(module).double()
    module_plus.weight.data = weight_plus
    module_minus = copy.deepcopy(module).double()
    module_minus.weight.data = weight_minus
    for m in (module_plus, module_minus):
        if m.bias is not None:
            m.bias.data.zero_()
    return module_plus, module_minus


def _unfold(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BaseSensTracker.unfold -> [batch, feature_size, patches]."""
    if isinstance(module, nn.Conv2d):
        return F.unfold(x, kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                        dilation=module.dilation)
    return x.reshape(-1, x.shape[-1]).unsqueeze(-1)  # tensor.flatten_all_but_last(x).unsqueeze(-1)


def _reshape_z(module: nn.Module, z_values: torch.Tensor) -> torch.Tensor:
    """BaseSensTracker._reshape_z -> [batch, out_features, out_examples]."""
    if isinstance(module, nn.Linear):
        z_values = z_values.reshape(-1, z_values.shape[-1])
    return z_values.reshape(z_values.shape[0], z_values.shape[1], -1)


def _g_sens_in_one_batch(module: nn.Module, module_plus: nn.Module, module_minus: nn.Module,
                         activations: torch.Tensor) -> torch.Tensor:
    """BaseSensTracker._update_g_sens with PFPTracker._reduction = max; returns g_sens_in [batch, C_in]."""
    weight_plus = module_plus.weight.data
    weight_minus = module_minus.weight.data
    w_unfold_plus = weight_plus.view((weight_minus.shape[0], -1))
    w_unfold_minus = weight_minus.view((weight_minus.shape[0], -1))

    z_plus = _reshape_z(module, module_plus(activations))
    z_minus = _reshape_z(module, module_minus(activations))
    z_plus = _process_denominator(z_plus)
    z_minus = _process_denominator(z_minus)

    a_unfolded = _unfold(module, activations)  # [B, C_in*K, P]
    batch_size = a_unfolded.shape[0]
    g_sens_in = torch.zeros((batch_size, weight_plus.shape[1]), dtype=torch.float64)

    for idx_f in range(w_unfold_plus.shape[0]):
        # _get_g_sens_f for each sign, then the elementwise max (_compute_g_sens_f)
        g_plus = w_unfold_plus[idx_f].unsqueeze(0).unsqueeze(-1) * a_unfolded
        g_plus = g_plus / z_plus[:, idx_f].unsqueeze(1)
        g_minus = w_unfold_minus[idx_f].unsqueeze(0).unsqueeze(-1) * a_unfolded
        g_minus = g_minus / z_minus[:, idx_f].unsqueeze(1)
        g_sens_f = torch.max(g_plus, g_minus)  # [B, C_in*K, P]

        # reduction over outExamples (positions)
        g_sens_f = torch.max(g_sens_f, dim=-1)[0]  # [B, C_in*K]
        # reduction over the kernel offsets of each input channel
        g_sens_in_f = torch.max(g_sens_f.view((g_sens_f.shape[0], weight_plus.shape[1], -1)), dim=-1)[0]
        # reduction over output filters
        g_sens_in = torch.max(g_sens_in, g_sens_in_f)
    return g_sens_in


def channel_sensitivity(a: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """PFPTracker's `sensitivity_in` of a Conv2d (per input channel) or Linear (per input feature).

    a: the consumer's input on the points of S, [N, C, H, W] or [N, F]. Fed one point at a
    time, as BaseSensNet._start_preprocessing does (MiniDataLoader(loader_s, 1)).
    """
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise NotImplementedError(type(module).__name__)
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise NotImplementedError("the reference tracker does not support grouped convs")
    module_plus, module_minus = _split_module(module)
    sensitivity_in = torch.zeros(module.weight.shape[1], dtype=torch.float64)
    a = a.detach().double()
    with torch.no_grad():
        for n in range(a.shape[0]):
            a_adapted = _adapt_activations(a[n : n + 1])
            g_sens_in = _g_sens_in_one_batch(module, module_plus, module_minus, a_adapted)
            # _update_sensitivity: max over this batch, then over everything seen so far
            sensitivity_in = torch.max(sensitivity_in, torch.max(g_sens_in, dim=0)[0])
    return sensitivity_in


def num_patches(a: torch.Tensor, module: nn.Module) -> int:
    """BaseSensTracker.num_patches = a_unfolded.shape[-1] of the first point (1 for a Linear)."""
    return int(_unfold(module, a[:1].double()).shape[-1])


def kernel_size(module: nn.Module) -> int:
    """SiPPRandAllocator._get_coefficients: k_size = weight[0, 0].numel() (1 for a Linear)."""
    return int(module.weight[0, 0].numel())


def units_max(s_features: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Max of per-feature sensitivities over each unit's features (units: [n, K], -1 pads).

    Not in the reference (see the module docstring): it maps the reference's per-feature
    scores of a Linear-after-flatten onto the channels the project prunes.
    """
    out = torch.zeros(units.shape[0], dtype=torch.float64)
    for u in range(units.shape[0]):
        f = units[u][units[u] >= 0]
        out[u] = s_features[f].max()
    return out


# ----------------------------------------------------------------------------- the allocator
def alpha(k_size: int, patches: int, delta_failure: float = DELTA_FAILURE, c_constant: float = C_CONSTANT) -> float:
    """SiPPRandAllocator._get_coefficients: alpha = 2 C log(8 (P + 1) K / delta)."""
    log_numerator = 8.0 * (patches + 1) * k_size
    log_term = c_constant * math.log(log_numerator / delta_failure)
    return 2.0 * log_term


def coefficient(sensitivity_in: torch.Tensor, k_size: int, patches: int, delta_failure: float = DELTA_FAILURE,
                c_constant: float = C_CONSTANT) -> float:
    """coeffs = sum_sens * alpha (PFP's _adapt_l_coeffs leaves l_coeffs at 1 and is unused here)."""
    sum_sens = float(sensitivity_in.double().sum())
    return sum_sens * alpha(k_size, patches, delta_failure, c_constant)


def sample_complexity(eps: float, coeff: float) -> float:
    """PFPRandAllocator._get_sample_complexity: m = ceil(3 (6 + 2 eps) coeffs / eps^2); 0 -> 1."""
    m_budget = K_CONSTANT * (6 + 2 * eps) * coeff / (eps ** 2)
    m_budget = math.ceil(m_budget)
    if m_budget == 0:
        m_budget = 1
    return float(m_budget)


def layer_sample_complexity(sensitivity_in: torch.Tensor, eps: float, k_size: int, patches: int,
                            delta_failure: float = DELTA_FAILURE, c_constant: float = C_CONSTANT) -> float:
    """m of one layer at eps (sample_complexity of its coefficient)."""
    return sample_complexity(eps, coefficient(sensitivity_in, k_size, patches, delta_failure, c_constant))


def expected_unique_raw(probabilities: torch.Tensor, sample_size: float) -> float:
    """sum_j 1 - (1 - p_j)^m, before base_util.expected_unique's ceil (for diagnosing ties)."""
    vals = 1 - (1 - probabilities.double()) ** sample_size
    return float(torch.sum(vals, dim=-1))


def expected_unique(probabilities: torch.Tensor, sample_size: float) -> float:
    """base_util.expected_unique: ceil(sum_j 1 - (1 - p_j)^m).

    No tolerance before the ceil, as in the reference: at m = 1 the sum is exactly 1 in exact
    arithmetic but may round to 1 + 2**-52, and the ceil then gives 2 (see test_reference_port).
    """
    return math.ceil(expected_unique_raw(probabilities, sample_size))


def kept_count(sensitivity_in: torch.Tensor, eps: float, k_size: int, patches: int, in_features: int | None = None,
               delta_failure: float = DELTA_FAILURE, c_constant: float = C_CONSTANT) -> int:
    """PFPRandAllocator._get_proposed_num_features for one layer: the kept input channels at eps.

    in_features: BaseFilterAllocator's get_num_features(weight, 1), the input channels with a
    nonzero weight; None = all channels. A layer with zero sensitivity mass gets NaN
    probabilities in the reference (0/0) and a platform-dependent NaN -> int64 cast; that case
    is refused here rather than guessed.
    """
    s = sensitivity_in.double()
    n = s.numel() if in_features is None else in_features
    sum_sens = float(s.sum())  # _get_sens_stats
    if not sum_sens > 0:
        raise ValueError("zero sensitivity mass: the reference's probabilities are NaN")
    probs = s / sum_sens
    m_budget = layer_sample_complexity(s, eps, k_size, patches, delta_failure, c_constant)
    m_unique = expected_unique(probs, m_budget)  # _get_unique_samples
    k = n
    if m_unique < k:  # in_features[m_budget < in_features] = m_budget[m_budget < in_features]
        k = m_unique
    if k < 1:  # in_features[in_features < 1] = 1
        k = 1
    return int(k)


# ----------------------------------------------------------------------------- size of S
def calibration_size(etas: list[int], delta_s: float = DELTA_FAILURE, c_constant: float = C_CONSTANT,
                     valid_size: int | None = None) -> int:
    """experiment/util/data.py get_data_loader: |S| = ceil(C log(8 eta* / (deltaS / eta))).

    etas: per compressible layer (every Conv2d and Linear, first and last included), the
    number of neurons of one point's output (C*H*W for a conv, out_features for a Linear;
    NetHandle.cache_etas, which keeps the max over repeated calls of a module). eta is their
    sum, eta* their max. The reference then caps |S| at half the validation set.
    """
    eta = float(sum(etas))
    eta_star = float(max(etas))
    delta = delta_s / eta
    size_s = math.ceil(c_constant * math.log(8.0 * eta_star / delta))
    if valid_size is not None:
        size_s = min(size_s, int(math.ceil(0.5 * valid_size)))
    return size_s


def layer_etas(model: nn.Module, x: torch.Tensor) -> list[int]:
    """NetHandle.cache_etas: eta per Conv2d/Linear module on one point (max over repeated calls)."""
    etas: dict[nn.Module, int] = {}

    def hook(module, inputs, output):
        if isinstance(module, nn.Linear):
            this = output.data.shape[-1]
        else:
            this = output.data[0].numel()
        etas[module] = max(etas.get(module, 0), this)

    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x[:1])
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return [etas[m] for m in mods if m in etas]
