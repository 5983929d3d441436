"""Channel groups (Torch-Pruning's dependency graph), their scoring inputs, physical removal, and
the resource model's prediction against torch's own counters after real removal."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from pfp.groups import PruningGraph, find_output_layer
from pfp.importance import pfp_sensitivity
from pfp.models import build_model
from pfp.resources import ResourceModel, count_flops, count_params
from pfp.sensitivity import conv_sensitivity, linear_sensitivity


pytestmark = pytest.mark.usefixtures("one_thread")


class ConcatNet(nn.Module):
    """stem -> (a: 3x3 conv + BN, b: 3x3 conv) -> concat -> conv c -> pool -> fc."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.bna = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(8, 10, 3, padding=1)
        self.c = nn.Conv2d(16, 12, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.bna(self.a(x))), torch.relu(self.b(x))], 1)
        return self.fc(self.pool(torch.relu(self.c(y))).flatten(1))


def _concat_net() -> nn.Module:
    torch.manual_seed(0)
    m = ConcatNet()
    with torch.no_grad():  # non-trivial BN statistics so removal errors would show
        m.stem.bias.uniform_(0.5, 1.0)  # dense stem activations: informative sensitivities
        m.bna.running_mean.uniform_(-0.5, 0.5)
        m.bna.running_var.uniform_(0.5, 2.0)
        m.bna.weight.uniform_(0.5, 1.5)
        m.bna.bias.uniform_(-0.2, 0.2)
    return m.eval()


def _by_root(graph: PruningGraph) -> dict:
    return {g.root_name: g for g in graph.groups}


# ----------------------------------------------------------------------------- structure
def test_lenet5_groups_and_flatten_coupling():
    model = build_model("lenet5", 10, 1, 28).eval()
    graph = PruningGraph(model, torch.randn(1, 1, 28, 28))
    assert graph.output_layer == "fc3"
    groups = _by_root(graph)
    assert set(groups) == {"conv1", "conv2", "fc1", "fc2"}
    assert {n: g.size for n, g in groups.items()} == {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
    g = groups["conv2"]
    assert [p.name for p in g.producers] == ["conv2"]
    torch.testing.assert_close(g.producers[0].out_idxs, torch.arange(16))
    assert [c.name for c in g.consumers] == ["fc1"]
    fc1 = g.consumers[0]
    assert len(fc1.in_idxs) == 400
    order = torch.argsort(fc1.in_idxs)
    torch.testing.assert_close(fc1.in_idxs[order], torch.arange(400))
    torch.testing.assert_close(fc1.root_idxs[order], torch.arange(400) // 25)  # channel = feature // (5 * 5)
    assert ("fc1", "in", 400) in g.members and ("conv2", "out", 16) in g.members
    assert [c.name for c in groups["fc2"].consumers] == ["fc3"]
    assert not g.unscorable and not graph.skipped


def test_output_layer_is_never_a_producer():
    for name, x in [("lenet5", torch.randn(1, 1, 28, 28)), ("resnet20", torch.randn(1, 1, 28, 28)),
                    ("vgg16_bn", torch.randn(1, 1, 28, 28))]:
        model = build_model(name, 10, 1, 28).eval()
        graph = PruningGraph(model, x)
        assert graph.output_layer == find_output_layer(model, x)
        assert graph.output_layer in {"fc3", "fc", "classifier.2"}
        producers = {p.name for g in graph.groups for p in g.producers}
        assert graph.output_layer not in producers
        assert any(graph.output_layer == c.name for g in graph.groups for c in g.consumers)


def test_resnet20_residual_groups():
    model = build_model("resnet20", 10, 1, 28).eval()
    graph = PruningGraph(model, torch.randn(1, 1, 28, 28))
    assert graph.output_layer == "fc"
    assert len(graph.groups) == 12  # 3 residual streams + 9 inner block channels
    groups = _by_root(graph)
    stream1 = next(g for g in graph.groups if "conv1" in {p.name for p in g.producers})
    assert {p.name for p in stream1.producers} == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert stream1.size == 16
    assert {c.name for c in stream1.consumers} == {
        "layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"}
    members = {(n, d) for n, d, _ in stream1.members}
    assert {("bn1", "out"), ("layer1.0.bn2", "out"), ("layer1.2.bn2", "out")} <= members
    for stage, width, nxt in (("layer2", 32, {"layer3.0.conv1", "layer3.0.shortcut.0"}), ("layer3", 64, {"fc"})):
        g = next(g for g in graph.groups if f"{stage}.0.shortcut.0" in {p.name for p in g.producers})
        assert {p.name for p in g.producers} == {f"{stage}.0.shortcut.0"} | {f"{stage}.{i}.conv2" for i in range(3)}
        assert g.size == width
        assert {c.name for c in g.consumers} == {f"{stage}.1.conv1", f"{stage}.2.conv1"} | nxt
    inner = groups["layer2.1.conv1"]
    assert [p.name for p in inner.producers] == ["layer2.1.conv1"]
    assert [c.name for c in inner.consumers] == ["layer2.1.conv2"]
    assert inner.size == 32
    # every producer is in exactly one group
    producers = [p.name for g in graph.groups for p in g.producers]
    assert len(producers) == len(set(producers))


def test_concat_groups_offsets():
    model = _concat_net()
    graph = PruningGraph(model, torch.randn(1, 1, 12, 12))
    groups = _by_root(graph)
    assert set(groups) == {"stem", "a", "b", "c"}
    ca = groups["a"].consumers[0]
    cb = groups["b"].consumers[0]
    assert ca.name == cb.name == "c"
    torch.testing.assert_close(ca.in_idxs, torch.arange(6))
    torch.testing.assert_close(cb.in_idxs, torch.arange(6, 16))  # offset by a's 6 channels
    torch.testing.assert_close(cb.root_idxs, torch.arange(10))
    assert {c.name for c in groups["stem"].consumers} == {"a", "b"}
    assert ("bna", "out", 6) in groups["a"].members


def test_ignore_layers():
    model = build_model("lenet5", 10, 1, 28).eval()
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(ValueError, match="conv_nope"):
        PruningGraph(model, x, ["conv2", "conv_nope"])
    graph = PruningGraph(model, x, ["conv2"])
    assert {g.root_name for g in graph.groups} == {"conv1", "fc1", "fc2"}
    assert "conv2" not in {p.name for g in graph.groups for p in g.producers}
    assert "conv2" in {c.name for g in graph.groups for c in g.consumers}  # still reads conv1's channels


# ----------------------------------------------------------------------------- scoring inputs
def _inputs_of(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hs = [mods[n].register_forward_pre_hook(lambda m, i, n=n: seen.__setitem__(n, i[0].detach().clone()))
          for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return seen


def test_concat_scored_per_consumer_and_max_over_consumers():
    model = _concat_net()
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    graph = PruningGraph(model, x[:1])
    loader = [(x[:2], torch.zeros(2, dtype=torch.long)), (x[2:], torch.zeros(2, dtype=torch.long))]
    res = pfp_sensitivity(model, graph.groups, loader, "cpu")
    assert res.points == 4 and not res.unscored
    inp = _inputs_of(model, ["a", "b", "c", "fc"], x)
    groups = _by_root(graph)
    s_c = conv_sensitivity(inp["c"], model.c).double()
    torch.testing.assert_close(res.scores[groups["a"].gid], s_c[:6], atol=1e-6, rtol=0)
    torch.testing.assert_close(res.scores[groups["b"].gid], s_c[6:], atol=1e-6, rtol=0)
    s_stem = torch.maximum(conv_sensitivity(inp["a"], model.a), conv_sensitivity(inp["b"], model.b)).double()
    torch.testing.assert_close(res.scores[groups["stem"].gid], s_stem, atol=1e-6, rtol=0)
    # the max over the two consumers is not just one of them
    only_a = conv_sensitivity(inp["a"], model.a).double()
    only_b = conv_sensitivity(inp["b"], model.b).double()
    assert not torch.allclose(s_stem, only_a) and not torch.allclose(s_stem, only_b)
    s_fc = linear_sensitivity(inp["fc"], model.fc, torch.arange(12).view(12, 1)).double()
    torch.testing.assert_close(res.scores[groups["c"].gid], s_fc, atol=1e-6, rtol=0)
    assert res.kernel[groups["a"].gid] == 9
    assert res.positions[groups["a"].gid] == 144


def test_lenet5_flatten_scored_by_channel_units():
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 28).eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    graph = PruningGraph(model, x[:1])
    res = pfp_sensitivity(model, graph.groups, [(x, torch.zeros(3, dtype=torch.long))], "cpu")
    inp = _inputs_of(model, ["fc1", "conv2"], x)
    g = _by_root(graph)
    want = linear_sensitivity(inp["fc1"], model.fc1, torch.arange(400).view(16, 25)).double()
    torch.testing.assert_close(res.scores[g["conv2"].gid], want, atol=1e-6, rtol=0)
    assert (res.kernel[g["conv2"].gid], res.positions[g["conv2"].gid]) == (25, 1)
    torch.testing.assert_close(res.scores[g["conv1"].gid], conv_sensitivity(inp["conv2"], model.conv2).double(),
                               atol=1e-6, rtol=0)
    assert (res.kernel[g["conv1"].gid], res.positions[g["conv1"].gid]) == (25, 100)


# ----------------------------------------------------------------------------- removal + resources
def _random_keep(graph: PruningGraph, seed: int, partial: bool = False) -> tuple[list[int], dict]:
    gen = torch.Generator().manual_seed(seed)
    kept, keep = [], {}
    for i, g in enumerate(graph.groups):
        if partial and i % 3 == 0:
            kept.append(g.size)  # not in `keep`: untouched
            continue
        k = int(torch.randint(1, g.size + 1, (1,), generator=gen))
        if i % 4 == 1:
            k = g.size  # some groups listed but whole
        kept.append(k)
        keep[g.gid] = torch.randperm(g.size, generator=gen)[:k].sort().values
    return kept, keep


def _masked_reference(model: nn.Module, graph: PruningGraph, keep: dict) -> nn.Module:
    """The unpruned model with every dropped channel's consumer inputs zeroed: what removal must equal."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for g in graph.groups:
            if g.gid not in keep:
                continue
            drop = torch.ones(g.size, dtype=torch.bool)
            drop[keep[g.gid]] = False
            for c in g.consumers:
                cols = c.in_idxs[drop[c.root_idxs]]
                mods[c.name].weight[:, cols] = 0
    return ref


CASES = {
    "lenet5": (lambda: build_model("lenet5", 10, 1, 28), (1, 1, 28, 28)),
    "resnet20": (lambda: build_model("resnet20", 10, 1, 28), (1, 1, 28, 28)),
    "vgg16_bn": (lambda: build_model("vgg16_bn", 10, 1, 28), (1, 1, 28, 28)),
    "mobilenet_v2": (lambda: build_model("tv:mobilenet_v2", 10, 3, 64), (1, 3, 64, 64)),
    "concat": (_concat_net, (1, 1, 12, 12)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_resource_prediction_matches_counters_after_removal(name):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    graph = PruningGraph(model, x)
    rm = ResourceModel(model, x, graph.groups)
    full = [g.size for g in graph.groups]
    assert rm.predict(full) == (pytest.approx(count_params(model)), pytest.approx(count_flops(model, x)))
    kept, keep = _random_keep(graph, seed=3, partial=(name == "resnet20"))
    params, flops = rm.predict(kept)
    before = count_params(model)
    graph.prune(keep)
    assert round(params) == count_params(model)
    assert round(flops) == count_flops(model, x)
    assert count_params(model) < before
    with torch.no_grad():
        assert model(x).shape == (1, 10)


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "concat"])
def test_removal_equals_masking_dropped_channels(name):
    build, shape = CASES[name]
    torch.manual_seed(1)
    model = build().eval()
    x = torch.randn((3,) + shape[1:], generator=torch.Generator().manual_seed(4))
    if name == "resnet20":  # non-trivial BN statistics
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    original = copy.deepcopy(model)
    graph = PruningGraph(model, x[:1])
    kept, keep = _random_keep(graph, seed=5)
    ref = _masked_reference(original, graph, keep)
    graph.prune(keep)
    for g, k in zip(graph.groups, kept):  # the producers really shrank
        for p in g.producers:
            w = p.module.weight
            assert w.shape[0] == k, (p.name, w.shape, k)
    with torch.no_grad():
        out, want, unpruned = model(x), ref(x), original(x)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, unpruned, atol=1e-3)  # the masking mattered
