"""Reconstruction (ridge least-squares refit) and BatchNorm recalibration."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pfp.recalibrate import recalibrate_batchnorm
from pfp.reconstruct import reconstruct

pytestmark = pytest.mark.usefixtures("one_thread")


class Take(nn.Module):
    """Keeps some channels (dim 1) or features (last dim): the pruned network's view of its input."""

    def __init__(self, idx: list[int], dim: int = 1) -> None:
        super().__init__()
        self.register_buffer("idx", torch.tensor(idx))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.idx)


def batches(x: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], torch.zeros(len(x[i : i + size]))) for i in range(0, len(x), size)]


def out_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    box = []
    h = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: box.append(o))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    return box[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def sliced_pair(keep: list[int], c: int = 8, seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    """conv1 -> relu -> conv2; the pruned copy drops conv1's filters outside `keep` (and conv2's inputs)."""
    torch.manual_seed(seed)
    original = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 5, 3, padding=1))
    pruned = copy.deepcopy(original)
    k = torch.tensor(keep)
    c1 = nn.Conv2d(3, len(keep), 3, padding=1)
    c2 = nn.Conv2d(len(keep), 5, 3, padding=1)
    with torch.no_grad():
        c1.weight.copy_(original[0].weight[k])
        c1.bias.copy_(original[0].bias[k])
        c2.weight.copy_(original[2].weight[:, k])
        c2.bias.copy_(original[2].bias)
    pruned[0], pruned[2] = c1, c2
    return original, pruned


def lstsq_fit(a: torch.Tensor, y: torch.Tensor, bias: bool) -> torch.Tensor:
    """Unregularised least squares of rows a [R, F] onto y [R, C] (bias column last); float64."""
    a = a.double()
    if bias:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    return torch.linalg.lstsq(a, y.double()).solution


def unfold_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    u = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return u.transpose(1, 2).reshape(-1, u.shape[1])


# ----------------------------------------------------------------------------- reconstruct
def test_refit_beats_the_plain_slice_and_reports_true_errors():
    original, pruned = sliced_pair([0, 2, 3, 5, 6])
    x = torch.randn(64, 3, 10, 10)
    y = out_of(original, "2", x)
    sliced = rel(out_of(pruned, "2", x), y)
    rep = reconstruct(original, pruned, ["2"], batches(x, 16))
    (fit,) = rep.layers
    after = rel(out_of(pruned, "2", x), y)
    assert fit.applied and after < 0.9 * sliced
    # the errors come from the accumulators alone; they must match the outputs
    assert fit.error_before == pytest.approx(sliced, rel=1e-3)
    assert fit.error_after == pytest.approx(after, rel=1e-3)
    assert (fit.name, fit.rows, fit.features, rep.points) == ("2", 64 * 100, 5 * 9 + 1, 64)
    assert fit.ridge > 0 and fit.note is None and rep.peak_bytes > 0 and rep.seconds >= 0


def test_dropped_channels_that_are_combinations_of_kept_ones_are_recovered():
    original, _ = sliced_pair(list(range(8)))
    with torch.no_grad():  # filters 4..7 = 2 x filters 0..3; relu(2z) = 2 relu(z)
        original[0].weight[4:] = 2 * original[0].weight[:4]
        original[0].bias[4:] = 2 * original[0].bias[:4]
    _, pruned = sliced_pair(list(range(4)))
    pruned[0].load_state_dict({k: v[:4] for k, v in original[0].state_dict().items()})
    pruned[2].weight.data.copy_(original[2].weight[:, :4])
    x = torch.randn(64, 3, 10, 10)
    y = out_of(original, "2", x)
    assert rel(out_of(pruned, "2", x), y) > 0.3
    # the exact solution folds the dropped half into the kept one: w_kept + 2 w_dropped
    expected = original[2].weight[:, :4] + 2 * original[2].weight[:, 4:]
    for ridge, tol in ((1e-4, 3e-4), (1e-6, 1e-5)):  # the ridge's shrinkage is all that is left
        net = copy.deepcopy(pruned)
        reconstruct(original, net, ["2"], batches(x, 32), ridge=ridge)
        assert rel(out_of(net, "2", x), y) < tol
        assert rel(net[2].weight, expected) < 2 * tol


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(dilation=2, padding=2), dict(padding=0),
                                dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)), dict(padding="same")])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_matches_direct_least_squares(kw, bias):
    torch.manual_seed(1)
    keep = [0, 1, 3, 4]
    k = (4, 3)  # an even side: 'same' then pads one more row at the bottom than at the top
    original = nn.Sequential(nn.Identity(), nn.Conv2d(6, 4, k, bias=bias, **kw)).double()
    pruned = nn.Sequential(Take(keep), nn.Conv2d(4, 4, k, bias=bias, **kw)).double()
    x = torch.randn(20, 6, 9, 9, dtype=torch.float64)
    rep = reconstruct(original, pruned, ["1"], batches(x, 7), ridge=0.0)
    (fit,) = rep.layers
    conv = pruned[1]
    if kw.get("padding") == "same":
        a = unfold_rows(nn.Conv2d(4, 4, k), F.pad(x[:, keep], (1, 1, 1, 2)))
    else:
        a = unfold_rows(conv, x[:, keep])
    y = out_of(original, "1", x)
    w = lstsq_fit(a, y.permute(0, 2, 3, 1).reshape(-1, 4), bias)
    assert fit.applied and fit.ridge == 0 and fit.rows == len(a) and fit.features == 4 * 12 + bias
    torch.testing.assert_close(conv.weight.reshape(4, -1), w[: 4 * 12].T, rtol=1e-8, atol=1e-10)
    if bias:
        torch.testing.assert_close(conv.bias, w[-1], rtol=1e-8, atol=1e-10)
    else:
        assert conv.bias is None
    # the rows are the conv's own view of its input: the refit layer computes exactly A w
    z = out_of(pruned, "1", x).permute(0, 2, 3, 1).reshape(-1, 4)
    a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1) if bias else a
    torch.testing.assert_close(z, a1 @ w)


def test_ridge_is_relative_and_spares_the_bias():
    torch.manual_seed(9)
    original = nn.Sequential(nn.Identity(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        original[1].bias.fill_(50.0)  # a large offset a shrunk bias could not carry
    pruned = nn.Sequential(Take([0, 1, 2, 3], dim=-1), nn.Linear(4, 3)).double()
    x = 3 * torch.randn(200, 6, dtype=torch.float64)
    ridge = 0.5
    (fit,) = reconstruct(original, pruned, ["1"], batches(x, 64), ridge=ridge).layers
    a, y = x[:, :4], out_of(original, "1", x)
    lam = ridge * float((a * a).sum(0).mean())  # relative to the mean diagonal of X^T X
    a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    reg = torch.diag(torch.tensor([1.0, 1, 1, 1, 0], dtype=a.dtype))
    w = torch.linalg.solve(a1.T @ a1 + lam * reg, a1.T @ y)
    assert fit.ridge == pytest.approx(lam)
    torch.testing.assert_close(pruned[1].weight, w[:4].T)
    torch.testing.assert_close(pruned[1].bias, w[4])
    assert float(pruned[1].bias.detach().mean()) == pytest.approx(50.0, abs=1.0)


def test_forward_passes_stop_after_the_layer():
    original, pruned = sliced_pair([0, 2, 4])
    seen = {"original": 0, "pruned": 0}
    for key, net in (("original", original), ("pruned", pruned)):
        net.append(nn.ReLU())
        net[3].register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, seen[key] + len(o)))
    reconstruct(original, pruned, ["2"], batches(torch.randn(32, 3, 6, 6), 8))
    # one point each, from the passes finding the order and sizes; none of the 32
    assert seen == {"original": 1, "pruned": 1}


def test_float32_network_close_to_least_squares():
    torch.manual_seed(2)
    original = nn.Sequential(nn.Identity(), nn.Conv2d(6, 4, 3, stride=2, padding=1))
    pruned = nn.Sequential(Take([1, 2, 5]), nn.Conv2d(3, 4, 3, stride=2, padding=1))
    x = torch.randn(32, 6, 12, 12)
    reconstruct(original, pruned, ["1"], batches(x, 16), ridge=0.0)
    w = lstsq_fit(unfold_rows(pruned[1], x[:, [1, 2, 5]]), out_of(original, "1", x).permute(0, 2, 3, 1).reshape(-1, 4),
                  True)
    assert pruned[1].weight.dtype == torch.float32
    assert rel(pruned[1].weight.reshape(4, -1).double(), w[:-1].T) < 1e-4


def test_grouped_conv_solves_each_group_on_its_own_inputs():
    torch.manual_seed(3)
    keep = [0, 1, 2, 4, 5, 6]  # 3 of the 4 channels of each of the 2 groups
    original = nn.Sequential(nn.Identity(), nn.Conv2d(8, 6, 3, padding=1, groups=2)).double()
    pruned = nn.Sequential(Take(keep), nn.Conv2d(6, 6, 3, padding=1, groups=2)).double()
    x = torch.randn(16, 8, 8, 8, dtype=torch.float64)
    reconstruct(original, pruned, ["1"], batches(x, 16), ridge=0.0)
    y = out_of(original, "1", x)
    conv = pruned[1]
    for g in range(2):
        a = unfold_rows(nn.Conv2d(3, 3, 3, padding=1), x[:, keep[3 * g : 3 * g + 3]])
        w = lstsq_fit(a, y[:, 3 * g : 3 * g + 3].permute(0, 2, 3, 1).reshape(-1, 3), True)
        torch.testing.assert_close(conv.weight[3 * g : 3 * g + 3].reshape(3, -1), w[:-1].T)
        torch.testing.assert_close(conv.bias[3 * g : 3 * g + 3], w[-1])


def test_depthwise_conv_that_lost_outputs_too():
    torch.manual_seed(4)
    keep = [0, 2, 3, 5]
    original = nn.Sequential(nn.Identity(), nn.Conv2d(6, 6, 3, padding=1, groups=6)).double()
    pruned = nn.Sequential(Take(keep), nn.Conv2d(4, 4, 3, padding=1, groups=4)).double()  # unrelated weights
    x = torch.randn(8, 6, 7, 7, dtype=torch.float64)
    (fit,) = reconstruct(original, pruned, ["1"], batches(x, 4), ridge=0.0,
                         kept_out={"1": torch.tensor(keep)}).layers
    # each kept channel reads exactly its original input: the original filters come back
    assert fit.applied and fit.features == 10 and fit.error_after < 1e-6
    torch.testing.assert_close(pruned[1].weight, original[1].weight[keep])
    torch.testing.assert_close(pruned[1].bias, original[1].bias[keep])


def test_lost_outputs_are_matched_from_the_weights():
    """A layer that lost inputs and outputs (Torch-Pruning slices both): kept units found without kept_out."""
    torch.manual_seed(5)
    original = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    pruned = copy.deepcopy(original)
    k1, k2 = torch.tensor([0, 1, 4, 5, 7]), torch.tensor([1, 2, 4])
    pruned[0] = nn.Conv2d(3, 5, 3)
    pruned[2] = nn.Conv2d(5, 3, 3)
    pruned[4] = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        pruned[0].weight.copy_(original[0].weight[k1])
        pruned[0].bias.copy_(original[0].bias[k1])
        pruned[2].weight.copy_(original[2].weight[k2][:, k1])
        pruned[2].bias.copy_(original[2].bias[k2])
        pruned[4].weight.copy_(original[4].weight[:, k2])
        pruned[4].bias.copy_(original[4].bias)
    x = torch.randn(32, 3, 12, 12)
    sliced = rel(out_of(pruned, "4", x), out_of(original, "4", x))
    rep = reconstruct(original, pruned, ["4", "2"], batches(x, 16))
    assert [f.name for f in rep.layers] == ["2", "4"]  # forward order, whatever order they were given in
    assert all(f.applied and f.note is None for f in rep.layers)
    target = out_of(original, "2", x)[:, k2]
    assert rep.layers[0].error_after == pytest.approx(rel(out_of(pruned, "2", x), target), rel=1e-3)
    assert rel(out_of(pruned, "4", x), out_of(original, "4", x)) < sliced


def test_unmatched_lost_outputs_skip_the_layer_with_a_warning(caplog):
    torch.manual_seed(6)
    original = nn.Sequential(nn.Identity(), nn.Conv2d(4, 6, 3))
    pruned = nn.Sequential(Take([0, 1]), nn.Conv2d(2, 3, 3))  # unrelated weights, no kept_out
    before = pruned[1].weight.clone()
    with caplog.at_level(logging.WARNING, logger="pfp.reconstruct"):
        (fit,) = reconstruct(original, pruned, ["1"], batches(torch.randn(4, 4, 6, 6), 4)).layers
    assert not fit.applied and "kept_out" in fit.note and "1" in caplog.text
    assert torch.equal(pruned[1].weight, before)


def test_linear_with_three_dimensional_input():
    torch.manual_seed(7)
    keep = [0, 2, 3, 5, 6]
    original = nn.Sequential(nn.Identity(), nn.Linear(8, 5)).double()
    pruned = nn.Sequential(Take(keep, dim=-1), nn.Linear(5, 5)).double()
    x = torch.randn(12, 7, 8, dtype=torch.float64)  # (batch, tokens, features)
    (fit,) = reconstruct(original, pruned, ["1"], batches(x, 5), ridge=0.0).layers
    w = lstsq_fit(x[..., keep].reshape(-1, 5), out_of(original, "1", x).reshape(-1, 5), True)
    assert fit.rows == 12 * 7 and fit.features == 6
    torch.testing.assert_close(pruned[1].weight, w[:-1].T)
    torch.testing.assert_close(pruned[1].bias, w[-1])


def test_too_few_rows_fall_back_to_a_stronger_ridge(caplog):
    torch.manual_seed(8)
    original = nn.Sequential(nn.Identity(), nn.Linear(60, 4))
    pruned = nn.Sequential(Take(list(range(50)), dim=-1), nn.Linear(50, 4))
    with caplog.at_level(logging.WARNING, logger="pfp.reconstruct"):
        (fit,) = reconstruct(original, pruned, ["1"], batches(torch.randn(10, 60), 10)).layers
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 has 10 rows for 51 unknowns; ridge fallback lambda=" in warnings[0].message
    assert fit.note and "10 rows for 51 unknowns" in fit.note
    assert torch.isfinite(pruned[1].weight).all() and torch.isfinite(pruned[1].bias).all()
    assert fit.error_after <= fit.error_before


def test_tiny_tiles_give_the_same_result():
    original, pruned = sliced_pair([1, 2, 4, 7], c=8)
    original.append(nn.ReLU())
    original.append(nn.Conv2d(5, 3, 3))
    pruned.append(nn.ReLU())
    pruned.append(copy.deepcopy(original[4]))
    with torch.no_grad():  # a second consumer, so the big run shares one pass of the original
        pruned[2] = nn.Conv2d(4, 4, 3, padding=1)
        pruned[2].weight.copy_(original[2].weight[[0, 1, 3, 4]][:, [1, 2, 4, 7]])
        pruned[2].bias.copy_(original[2].bias[[0, 1, 3, 4]])
        pruned[4] = nn.Conv2d(4, 3, 3)
        pruned[4].weight.copy_(original[4].weight[:, [0, 1, 3, 4]])
        pruned[4].bias.copy_(original[4].bias)
    x = torch.randn(40, 3, 10, 10)
    small, big = copy.deepcopy(pruned), copy.deepcopy(pruned)
    passes = []
    original.register_forward_pre_hook(lambda m, i: passes.append(len(i[0])))
    rs = reconstruct(original, small, ["2", "4"], batches(x, 20), tile_bytes=1)
    assert passes == [1, 20, 20, 20, 20]  # sizes, then per layer: its targets on both batches
    passes.clear()
    rb = reconstruct(original, big, ["2", "4"], batches(x, 20))
    assert passes == [1, 20, 20]  # the targets of both layers from one pass
    for a, b in zip(rs.layers, rb.layers):
        assert (a.rows, a.applied) == (b.rows, b.applied) and a.error_after == pytest.approx(b.error_after, rel=1e-5)
    for a, b in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert rs.peak_bytes < rb.peak_bytes


def test_max_points_modes_and_batchnorm_untouched():
    original, pruned = sliced_pair([0, 1, 2, 3])
    pruned.insert(1, nn.BatchNorm2d(4))
    original.insert(1, nn.BatchNorm2d(8))
    pruned.train()
    original.eval()
    stats = pruned[1].running_mean.clone()
    rep = reconstruct(original, pruned, ["3"], batches(torch.randn(48, 3, 6, 6), 16), max_points=20)
    assert rep.points == 20 and rep.layers[0].rows == 20 * 36
    assert pruned.training and all(m.training for m in pruned.modules())
    assert not original.training
    assert torch.equal(pruned[1].running_mean, stats) and int(pruned[1].num_batches_tracked) == 0
    assert all(p.grad is None for p in pruned.parameters())


def test_lenet5_consumer_of_a_pruned_conv():
    from pfp.models import build_model

    torch.manual_seed(10)
    original = build_model("lenet5", 10, 1, 28).eval()
    pruned = copy.deepcopy(original)
    k = torch.tensor([0, 2, 3, 5])
    with torch.no_grad():
        conv1, conv2 = nn.Conv2d(1, 4, 5, padding=2), nn.Conv2d(4, 16, 5)
        conv1.weight.copy_(original.conv1.weight[k])
        conv1.bias.copy_(original.conv1.bias[k])
        conv2.weight.copy_(original.conv2.weight[:, k])
        conv2.bias.copy_(original.conv2.bias)
    pruned.conv1, pruned.conv2 = conv1, conv2
    x = torch.randn(64, 1, 28, 28)
    y = out_of(original, "conv2", x)
    sliced = rel(out_of(pruned, "conv2", x), y)
    (fit,) = reconstruct(original, pruned, ["conv2"], batches(x, 32)).layers
    assert fit.applied and fit.rows == 64 * 10 * 10 and fit.features == 4 * 25 + 1
    assert rel(out_of(pruned, "conv2", x), y) == pytest.approx(fit.error_after, rel=1e-3)
    assert fit.error_after < 0.9 * sliced


def test_bad_layers_are_named():
    original, pruned = sliced_pair([0, 1])
    loader = batches(torch.randn(4, 3, 5, 5), 4)
    with pytest.raises(ValueError, match="'nope'"):
        reconstruct(original, pruned, ["2", "nope"], loader)
    with pytest.raises(ValueError, match="'1'.*ReLU"):
        reconstruct(original, pruned, ["1"], loader)
    pruned[2].padding_mode = original[2].padding_mode = "reflect"
    with pytest.raises(ValueError, match="'2'.*reflect"):
        reconstruct(original, pruned, ["2"], loader)


def test_a_refit_that_does_not_help_is_not_applied():
    original, pruned = sliced_pair([0, 1, 2, 3, 4, 5, 6, 7])  # nothing dropped: the slice is exact
    before = copy.deepcopy(pruned.state_dict())
    (fit,) = reconstruct(original, pruned, ["2"], batches(torch.randn(16, 3, 6, 6), 8), ridge=1.0).layers
    assert not fit.applied and fit.error_after == fit.error_before < 1e-3
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, before[k])


# ----------------------------------------------------------------------------- recalibrate_batchnorm
def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.9), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
                         nn.BatchNorm2d(5))


def corrupt(bn: nn.BatchNorm2d) -> None:
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(0.01)


def test_recalibration_recovers_the_batch_statistics():
    net = bn_net()
    corrupt(net[2])
    corrupt(net[5])
    net[2].momentum = 0.3
    net.train()
    net[3].eval()  # a mixed set of flags, restored as they were
    flags = [m.training for m in net.modules()]
    xs = [torch.randn(16, 3, 8, 8) + 1 for _ in range(3)]
    n = recalibrate_batchnorm(net, [(x, 0) for x in xs], max_points=40)  # 16 + 16 + 8
    assert n == 40
    assert [m.training for m in net.modules()] == flags and net[2].momentum == 0.3 and net[5].momentum == 0.1
    with torch.no_grad():
        x = torch.cat(xs)[:40]
        parts = [x[:16], x[16:32], x[32:]]
        z = [net[0](p) for p in parts]  # dropout off during the pass
        mean1 = sum(len(p) * q.mean((0, 2, 3)) for p, q in zip(parts, z)) / 40
        var1 = sum(len(p) * q.var((0, 2, 3)) for p, q in zip(parts, z)) / 40
        torch.testing.assert_close(net[2].running_mean, mean1)
        torch.testing.assert_close(net[2].running_var, var1)
        # the second BN saw the first normalised by each batch's own statistics
        z2 = [net[4](torch.relu(F.batch_norm(q, None, None, net[2].weight, net[2].bias, True))) for q in z]
        mean2 = sum(len(p) * q.mean((0, 2, 3)) for p, q in zip(parts, z2)) / 40
        torch.testing.assert_close(net[5].running_mean, mean2)


def test_recalibration_only_named_layers():
    net = bn_net(1).eval()
    corrupt(net[2])
    corrupt(net[5])
    x = torch.randn(32, 3, 8, 8)
    assert recalibrate_batchnorm(net, [(x,)], only={"5"}) == 32
    assert torch.all(net[2].running_mean == 7.0)
    with torch.no_grad():
        z = net[:5](x)  # bn 2 in eval mode with its (corrupted) statistics
    torch.testing.assert_close(net[5].running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(net[5].running_var, z.var((0, 2, 3)))
    with pytest.raises(ValueError, match="'4'|4"):
        recalibrate_batchnorm(net, [(x,)], only={"4"})


def test_recalibration_without_batchnorm_does_nothing():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert recalibrate_batchnorm(net, [(torch.randn(4, 3, 6, 6),)]) == 0
    assert recalibrate_batchnorm(nn.Linear(3, 2), [(torch.randn(4, 3),)]) == 0
    net = bn_net()
    corrupt(net[2])
    assert recalibrate_batchnorm(net, []) == 0  # no data: the statistics stay
    assert torch.all(net[2].running_mean == 7.0)


def test_a_layer_whose_system_is_too_large_is_left_as_pruned(caplog):
    from pfp.reconstruct import system_bytes

    original, pruned = sliced_pair([0, 2, 3, 5, 6])
    need = system_bytes(pruned[2])
    before = pruned[2].weight.clone()
    x = torch.randn(16, 3, 10, 10)
    with caplog.at_level(logging.WARNING, logger="pfp.reconstruct"):
        (fit,) = reconstruct(original, pruned, ["2"], batches(x, 8), max_system_bytes=need - 1).layers
    assert not fit.applied and "GiB" in fit.note and "2" in caplog.text
    assert torch.equal(pruned[2].weight, before)
    (fit,) = reconstruct(original, pruned, ["2"], batches(x, 8), max_system_bytes=need).layers
    assert fit.applied
