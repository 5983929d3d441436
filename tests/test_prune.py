"""One pruning step end to end: every method on LeNet5 and ResNet20 (28px, 1 channel),
budgets, selection, PFP's report, randomized reweighting, SFP, save/load, and a quality check."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset

from pfp import allocation as alloc
from pfp.config import DataConfig, PruneConfig
from pfp.data import build_data, make_loader
from pfp.groups import PruningGraph
from pfp.importance import pfp_sensitivity
from pfp.models import build_model
from pfp.prune import PruneError, sample_randomized, reweight_consumers, prune
from pfp.resources import count_flops, count_params
from pfp.serialization import load_model, save_model

METHODS = ["pfp", "pfp_reference", "ft", "sfp", "fpgm", "hrank", "random", "tp_magnitude", "tp_taylor"]
X1 = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(123))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return build_data(DataConfig(name="synthetic", synthetic_channels=1, synthetic_size=28,
                                 synthetic_train=256, synthetic_test=128))


@pytest.fixture(scope="module")
def calib(data):
    return make_loader(Subset(data.train, range(4)), 4, False)


@pytest.fixture(scope="module")
def holdout(data):
    return make_loader(Subset(data.train, range(200, 216)), 8, False)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    m = build_model(name, 10, 1, 28)
    with torch.no_grad():  # distinct biases / BN means: they identify kept channels after removal
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.uniform_(-0.1, 0.1)
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.8, 1.2)
    return m.eval()


@pytest.fixture(scope="module")
def models():
    return {"lenet5": _model("lenet5"), "resnet20": _model("resnet20")}


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _match(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Indices into `original` (1-D, distinct values) of the entries of `pruned`."""
    d = (pruned.view(-1, 1) - original.view(1, -1)).abs()
    idx = d.argmin(1)
    assert torch.allclose(original[idx], pruned), "pruned entries are not a subset of the original ones"
    assert len(set(idx.tolist())) == len(idx)
    return idx


# ----------------------------------------------------------------------------- every method
ROUND = {"lenet5": 1, "resnet20": 8}


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_to_flops_target(models, calib, holdout, method, name):
    model = models[name]
    before = _state(model)
    params0, flops0 = count_params(model), count_flops(model, X1)
    cfg = PruneConfig(method=method, round_to=ROUND[name], target="flops")
    pruned, rep, soft = prune(model, calib, cfg, 0.5, example_input=X1,
                              holdout_loader=holdout if method == "pfp" else None)
    assert _same_state(before, _state(model)), "the input model was modified"
    if method == "sfp":
        assert soft is not None
        # soft pruning: same shapes, filters zeroed, removal deferred to finalize()
        assert count_params(pruned) == params0
        predicted = (rep.params, rep.flops)
        pruned, rep = soft.finalize()
        assert (rep.params, rep.flops) == predicted
    else:
        assert soft is None
    assert rep.original_params == params0 and rep.original_flops == flops0
    assert rep.params == count_params(pruned) < params0
    assert rep.flops == count_flops(pruned, X1)
    assert rep.target_value == pytest.approx(0.5 * flops0)
    # within the budget, and close to it: 2% with free counts, 3% with multiples of 8
    tol = 0.02 if ROUND[name] == 1 else 0.03
    if method == "pfp_reference":  # one eps and no top-up, as the reference: a count step may be left unused
        tol = 0.25
    assert (1 - tol) * rep.target_value <= rep.flops <= rep.target_value, rep.flops / rep.target_value
    shrunk = [n for n, c in _convs(pruned).items() if c.out_channels < _convs(model)[n].out_channels]
    assert shrunk, "no conv lost output channels"
    if ROUND[name] == 8:
        for n, c in _convs(pruned).items():
            assert c.out_channels % 8 == 0 or n == "conv1" and c.out_channels == 16
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y = pruned.eval()(x)
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    assert len(rep.layers) >= 4 and all(r["kept"] <= r["size"] for r in rep.layers)


@pytest.mark.parametrize("name,method", [("lenet5", m) for m in METHODS] + [("resnet20", "pfp"), ("resnet20", "ft")])
def test_params_target(models, calib, name, method):
    model = models[name]
    cfg = PruneConfig(method=method, round_to=ROUND[name], target="params")
    pruned, rep, soft = prune(model, calib, cfg, 0.5, example_input=X1)
    if soft is not None:
        pruned, rep = soft.finalize()
    params0 = count_params(model)
    assert rep.target == "params" and rep.target_value == pytest.approx(0.5 * params0)
    assert rep.params == count_params(pruned)
    # one step of 8 channels of ResNet20's last stage is about 3.3% of its parameters
    low = 0.75 if method == "pfp_reference" else 0.96 if ROUND[name] == 8 else 0.97
    assert low * rep.target_value <= rep.params <= rep.target_value


def test_reference_resource_is_honoured(models, calib):
    # cascade rounds prune relative to the unpruned network, not to the current one
    model = models["lenet5"]
    p0, f0 = count_params(model), count_flops(model, X1)
    cfg = PruneConfig(method="ft", round_to=1)
    first, _, _ = prune(model, calib, cfg, 0.7, example_input=X1)
    second, rep, _ = prune(first, calib, cfg, 0.4, example_input=X1, reference=(p0, f0))
    assert rep.target_value == pytest.approx(0.4 * f0)
    assert 0.97 * 0.4 * f0 <= count_flops(second, X1) <= 0.4 * f0
    # nothing to do when the model already meets the target
    same, rep, _ = prune(second, calib, cfg, 0.9, example_input=X1, reference=(p0, f0))
    assert count_params(same) == count_params(second)


def test_impossible_target_names_the_limit(models, calib):
    for cfg in (PruneConfig(method="pfp", round_to=1, min_channels=1), PruneConfig(method="ft", round_to=1,
                                                                                 min_channels=3)):
        with pytest.raises(PruneError) as err:
            prune(models["lenet5"], calib, cfg, 0.001, example_input=X1)
        msg = str(err.value)
        assert "smallest reachable" in msg
        assert f"min_channels={cfg.min_channels}" in msg and "round_to=1" in msg
    with pytest.raises(PruneError, match="round_to=8"):
        prune(models["resnet20"], calib, PruneConfig(method="ft", round_to=8), 0.05, example_input=X1)


def test_min_channels_respected(models, calib):
    pruned, rep, _ = prune(models["lenet5"], calib, PruneConfig(method="pfp", round_to=1, min_channels=4,
                                                                target="params"), 0.2, example_input=X1)
    assert all(r["kept"] >= min(4, r["size"]) for r in rep.layers)
    assert pruned.conv1.out_channels >= 4 and pruned.conv2.out_channels >= 4


# ----------------------------------------------------------------------------- PFP report + selection
def test_pfp_reference_report_rows(models, calib, holdout):
    """The faithful method: one global eps, every group's count from the bound at that eps."""
    model = models["lenet5"]
    cfg = PruneConfig(method="pfp_reference", round_to=1, delta=1e-6)
    pruned, rep, _ = prune(model, calib, cfg, 0.5, example_input=X1, holdout_loader=holdout)
    assert rep.eps is not None and rep.eps > 0 and rep.delta == 1e-6 and rep.allocation == "single_eps"
    assert rep.calib_points == 4
    rows = {r["name"]: r for r in rep.layers}
    assert set(rows) == {"conv1", "conv2", "fc1", "fc2"}
    actual = {"conv1": pruned.conv1.out_channels, "conv2": pruned.conv2.out_channels,
              "fc1": pruned.fc1.out_features, "fc2": pruned.fc2.out_features}
    sizes = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
    graph = PruningGraph(copy.deepcopy(model), X1)
    sens = pfp_sensitivity(graph.model, graph.groups, calib, "cpu", "max_offset", "max")
    for g in graph.groups:
        r = rows[g.name]
        assert r["size"] == sizes[g.name] and r["kept"] == actual[g.name]
        assert r["eps"] == rep.eps and r["delta"] == 1e-6
        st = alloc.GroupStats(g.size, sens.scores[g.gid], sens.kernel[g.gid], sens.positions[g.gid])
        assert r["S"] == pytest.approx(st.mass)
        assert r["m"] == alloc.sample_size(st, r["eps"], 1e-6)
        # no top-up: exactly what the bound asks for at the one eps
        assert r["kept"] == alloc.pfp_counts([st], r["eps"], 1e-6)[0]
    d = rep.to_dict()
    assert d["flops_removed"] == pytest.approx(1 - rep.flops / rep.original_flops)
    assert d["budget_error"] <= 0


def test_pfp_report_rows_per_layer_eps_and_measured_error(models, calib, holdout):
    model = models["lenet5"]
    pruned, rep, _ = prune(model, calib, PruneConfig(method="pfp", round_to=1, delta=1e-6), 0.5, example_input=X1,
                           holdout_loader=holdout)
    assert rep.allocation == "search" and rep.eps is None  # no single eps: one per layer
    for r in rep.layers:
        assert r["eps"] is not None and r["eps"] >= 0 and r["delta"] == 1e-6
        if r["kept"] == r["size"]:
            assert r["eps"] == 0  # keeping every channel introduces no error
    d = rep.to_dict()
    assert -0.02 <= d["budget_error"] <= 0
    # measured figures per consumer whose inputs shrank, on the held-out points
    assert rep.guarantee
    shrunk = {r["name"] for r in rep.layers if r["kept"] < r["size"]}
    consumers = {"conv1": "conv2", "conv2": "fc1", "fc1": "fc2", "fc2": "fc3"}
    assert {g["name"] for g in rep.guarantee} == {consumers[n] for n in shrunk}
    for g in rep.guarantee:
        assert 0 <= g["rel_p50"] <= g["rel_p95"] <= g["rel_max"]
        assert g["eps95"] == g["rel_p95"] <= g["eps99"] <= g["rel_max"]
        assert g["values"] > 0 and 0 <= g["inside_eps"] <= 1
    assert rep.postprocess["order"] in ("refit", "refit+bn", "refit+bn_unrestored")


def test_guarantee_measures_the_pruned_layer_on_unpruned_inputs(models, calib, holdout):
    """Refit and BN off: the measured error is that of the pruned layer fed the unpruned input."""
    model = models["lenet5"]
    cfg = PruneConfig(method="pfp_reference", round_to=1, reconstruct=False, bn_recalibration=False)
    pruned, rep, _ = prune(model, calib, cfg, 0.5, example_input=X1, holdout_loader=holdout)
    rows = {g["name"]: g for g in rep.guarantee}
    name = "fc3" if "fc3" in rows else "fc2"
    assert name in rows
    prev = {"fc3": "fc2", "fc2": "fc1"}[name]
    inputs = []
    big = dict(model.named_modules())[name]
    h = big.register_forward_pre_hook(lambda m, i: inputs.append(i[0]))
    with torch.no_grad():
        model.eval()(torch.cat([b[0] for b in holdout]))
    h.remove()
    a = inputs[0]
    small = dict(pruned.named_modules())[name]
    kept = _match(dict(model.named_modules())[prev].bias.detach(), dict(pruned.named_modules())[prev].bias.detach())
    assert torch.equal(kept, kept.sort().values)  # removal keeps the order
    with torch.no_grad():
        z = F.linear(a, big.weight, big.bias)
        z_hat = F.linear(a[:, kept], small.weight, small.bias)
    rel = ((z_hat - z).abs() / z.abs().clamp(min=1e-12)).flatten().double()
    assert rows[name]["rel_max"] == pytest.approx(float(rel.max()), rel=1e-4)
    assert rows[name]["rel_p50"] == pytest.approx(float(rel.quantile(0.5)), rel=1e-3)
    assert rows[name]["values"] == rel.numel()


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_deterministic_selection_keeps_top_scores(models, calib, name):
    model = models[name]
    # no refit or BN recalibration: the kept channels are identified by their unchanged biases
    cfg = PruneConfig(method="pfp_sensitivity", round_to=ROUND[name], reconstruct=False, bn_recalibration=False)
    pruned, rep, _ = prune(model, calib, cfg, 0.5, example_input=X1)
    graph = PruningGraph(copy.deepcopy(model), X1)
    sens = pfp_sensitivity(graph.model, graph.groups, calib, "cpu", aggregate="weighted")
    orig_mods, new_mods = dict(model.named_modules()), dict(pruned.named_modules())
    checked = 0
    for g in graph.groups:
        # a per-channel vector identifies the kept channels: a bias, else a BN's running mean
        key = next((n for n, d, _ in g.members if d == "out" and getattr(orig_mods[n], "bias", None) is not None
                    and isinstance(orig_mods[n], (nn.Conv2d, nn.Linear))), None)
        if key is not None:
            before, after = orig_mods[key].bias.detach(), new_mods[key].bias.detach()
        else:
            key = next(n for n, d, _ in g.members if isinstance(orig_mods[n], nn.BatchNorm2d))
            before, after = orig_mods[key].running_mean, new_mods[key].running_mean
        prod = next(p for p in g.producers if p.name == key) if any(p.name == key for p in g.producers) else None
        kept_out = _match(before, after)
        kept = kept_out if prod is None else prod.root_idxs[torch.argsort(prod.out_idxs)][kept_out]
        s = sens.scores[g.gid]
        row = next(r for r in rep.layers if r["name"] == g.name)
        assert len(kept) == row["kept"]
        if len(kept) == g.size:
            continue
        dropped = torch.ones(g.size, dtype=torch.bool)
        dropped[kept] = False
        assert float(s[kept].min()) >= float(s[dropped].max()), (g.name, s, kept)
        top = set(torch.topk(s, len(kept)).indices.tolist())
        if len(set(s.tolist())) == g.size:  # no ties: exactly the top-k
            assert set(kept.tolist()) == top
        checked += 1
    assert checked >= 2


# ----------------------------------------------------------------------------- randomized selection
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(28 * 28, 12)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def _mlp() -> MLP:
    torch.manual_seed(3)
    m = MLP().eval()
    with torch.no_grad():
        m.fc1.bias.uniform_(0.0, 0.5)  # most hidden units active: a spread of sensitivities
    return m


def test_randomized_scale_is_unbiased(data):
    model = _mlp()
    graph = PruningGraph(model, X1)
    g = graph.groups[0]
    assert g.root_name == "fc1" and [c.name for c in g.consumers] == ["fc2"]
    loader = make_loader(Subset(data.train, range(16)), 16, False)
    s = pfp_sensitivity(model, graph.groups, loader, "cpu").scores[g.gid]
    assert (s > 0).sum() >= 8
    x = torch.stack([data.train[i][0] for i in range(16, 24)])
    with torch.no_grad():
        a = model.relu(model.fc1(model.flatten(x)))  # fc2's input, [8, 12]
    w = model.fc2.weight.detach()
    z = a @ w.t()
    gen = torch.Generator().manual_seed(0)
    k = 6
    trials = 2000
    zh, zh_plain, n_kept = [], [], []
    for _ in range(trials):
        kept, scale = sample_randomized(s, k, gen)
        assert (scale > 0).all()
        zh.append((a[:, kept] * scale.float()) @ w[:, kept].t())
        zh_plain.append(a[:, kept] @ w[:, kept].t())
        n_kept.append(len(kept))
    zh = torch.stack(zh)
    mean, se = zh.mean(0), zh.std(0) / math.sqrt(trials)
    assert (mean - z).abs().max() <= (5 * se + 1e-4).max(), ((mean - z).abs() / (se + 1e-9)).max()
    assert torch.allclose(mean, z, atol=float(5 * se.max()) + 1e-4)
    # without the reweighting the estimate is biased: dropping channels loses mass
    plain = torch.stack(zh_plain).mean(0)
    assert (plain - z).norm() > 5 * (mean - z).norm()
    # m' was chosen so that the expected number of distinct channels is k
    assert sum(n_kept) / trials == pytest.approx(k, abs=0.15)


def test_reweight_scales_consumer_columns():
    model = _mlp()
    graph = PruningGraph(model, X1)
    g = graph.groups[0]
    w0 = model.fc2.weight.detach().clone()
    kept = torch.tensor([1, 4, 7])
    scale = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    reweight_consumers(g, kept, scale)
    w = model.fc2.weight.detach()
    torch.testing.assert_close(w[:, kept], w0[:, kept] * scale.float())
    others = torch.ones(12, dtype=torch.bool)
    others[kept] = False
    assert (w[:, others] == 0).all()  # dropped channels contribute nothing


def test_randomized_end_to_end(data):
    model = _mlp()
    loader = make_loader(Subset(data.train, range(16)), 16, False)
    x = torch.stack([data.train[i][0] for i in range(16, 24)])
    with torch.no_grad():
        z = model.fc2(model.relu(model.fc1(model.flatten(x)))) - model.fc2.bias
    # the reweighting itself, without the refit that would replace it
    cfg = PruneConfig(method="pfp_reference", selection="randomized", round_to=1, target="params")
    outs = []
    for seed in range(40):
        pruned, rep, _ = prune(model, loader, cfg, 0.6, example_input=X1, seed=seed)
        kept = _match(model.fc1.bias.detach(), pruned.fc1.bias.detach())
        assert pruned.fc2.in_features == len(kept) < 12
        ratio = pruned.fc2.weight.detach() / model.fc2.weight.detach()[:, kept]
        # each kept column carries one positive factor count_j / (m' p_j)
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), atol=1e-5, rtol=1e-5)
        assert (ratio > 0).all()
        with torch.no_grad():
            outs.append(pruned(x) - pruned.fc2.bias)
    outs = torch.stack(outs)
    assert not torch.allclose(outs[0], outs[1]) or not torch.allclose(outs[1], outs[2])  # seeds matter
    rel = (outs.mean(0) - z).norm() / z.norm()
    assert rel < 0.2, rel
    # any single draw is further off than the average of many
    assert float((outs - z).flatten(1).norm(dim=1).mean()) > 1.5 * float((outs.mean(0) - z).norm())


def test_randomized_keep_all_positive_channels_does_not_explode(monkeypatch):
    real = torch.multinomial

    def guarded(p, m, *args, **kw):
        assert m <= 10**8, f"{m} draws asked of torch.multinomial"
        return real(p, m, *args, **kw)

    monkeypatch.setattr(torch, "multinomial", guarded)
    s = torch.tensor([1.0, 1.0, 1e-12, 0.0], dtype=torch.float64)
    kept, scale = sample_randomized(s, 3, torch.Generator().manual_seed(0))
    assert kept.tolist() == [0, 1, 2]
    torch.testing.assert_close(scale, torch.ones(3, dtype=torch.float64), atol=0.05, rtol=0)


# ----------------------------------------------------------------------------- SFP
def test_soft_pruner_zero_callback_finalize(models, calib):
    model = models["lenet5"]
    soft_model, rep, soft = prune(model, calib, PruneConfig(method="sfp", round_to=1), 0.5, example_input=X1)
    assert soft is not None and soft.graph.model is soft_model
    kept = {r["name"]: r["kept"] for r in rep.layers}

    def nonzero_filters(m):
        return {n: int((getattr(m, n).weight.detach().flatten(1).abs().sum(1) > 0).sum())
                for n in ("conv1", "conv2", "fc1", "fc2")}

    assert nonzero_filters(soft_model) == kept
    assert nonzero_filters(model) == {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
    # training moves every weight; the epoch callback zeroes the weakest filters again
    with torch.no_grad():
        for p in soft_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert nonzero_filters(soft_model) == {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
    soft.callback(0, soft_model)
    assert nonzero_filters(soft_model) == kept
    # zeroed filters (weights and bias) output exactly 0 after ReLU: removing them changes nothing
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        y_soft = soft_model.eval()(x)
    final, rep2 = soft.finalize()
    with torch.no_grad():
        y_final = final.eval()(x)
    torch.testing.assert_close(y_final, y_soft, atol=1e-5, rtol=1e-5)
    assert final.conv2.out_channels == kept["conv2"] and final.fc1.out_features == kept["fc1"]
    assert rep2.params == count_params(final) and rep2.flops == count_flops(final, X1)


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_pruned_model_save_load_roundtrip(models, calib, tmp_path, name):
    pruned, rep, _ = prune(models[name], calib, PruneConfig(method="pfp", round_to=ROUND[name]), 0.5,
                           example_input=X1)
    path = tmp_path / f"{name}.pt"
    spec = {"name": name, "num_classes": 10, "in_channels": 1, "input_size": 28}
    save_model(path, pruned, spec, meta={"flops": rep.flops})
    loaded, info = load_model(path, build_model)
    assert info["meta"]["flops"] == rep.flops
    assert count_params(loaded) == count_params(pruned) < count_params(models[name])
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), pruned.eval()(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------- quality
def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_pfp_beats_random_at_mild_ratio_on_trained_lenet5(data):
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = make_loader(data.train, 32, True, seed=0)
    step = 0
    model.train()
    while step < 100:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 100:
                break
    xt = torch.stack([data.test[i][0] for i in range(len(data.test))])
    yt = torch.tensor([data.test[i][1] for i in range(len(data.test))])
    base = _accuracy(model, xt, yt)
    assert base >= 0.8, f"training failed: {base}"
    calib = make_loader(Subset(data.train, range(32)), 16, False)
    pfp_model, _, _ = prune(model, calib, PruneConfig(method="pfp", round_to=1), 0.8, example_input=X1)
    pfp_acc = _accuracy(pfp_model, xt, yt)
    rand = [_accuracy(prune(model, calib, PruneConfig(method="random", round_to=1), 0.8, example_input=X1,
                            seed=s)[0], xt, yt) for s in range(4)]
    mean_rand = sum(rand) / len(rand)
    assert pfp_acc >= base - 0.05, (pfp_acc, base)
    assert pfp_acc >= mean_rand + 0.05, (pfp_acc, rand)


# ----------------------------------------------------------------------------- a known failure
def test_pfp_mild_params_target_with_few_calibration_points(models, calib):
    # 4 calibration points leave 45 of fc1's 120 and 33 of fc2's 84 units without any measured
    # sensitivity, so even eps -> 0 keeps few enough of them for a 0.8 params target
    model = models["lenet5"]
    pruned, rep, _ = prune(model, calib, PruneConfig(method="pfp", round_to=1, target="params"), 0.8,
                           example_input=X1)
    assert 0.97 * rep.target_value <= rep.params <= rep.target_value
