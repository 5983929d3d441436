"""torchvision architectures Torch-Pruning cannot take as they are: ShuffleNetV2's channel shuffle,
Swin's window attention and MaxViT's window partitions (traced as one node each) and the attention
blocks of ViT (a stored hidden_dim and head count). Each is pruned (to half its FLOPs where
attention leaves room), still runs, and keeps its output shape; what is left whole is named
with the reason."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import VisionTransformer

from pfp.config import PruneConfig
from pfp.groups import PruningGraph
from pfp.models import build_model
from pfp.prune import prune

pytestmark = pytest.mark.usefixtures("one_thread")


def _prune_half(model: torch.nn.Module, size: int, method: str):
    torch.manual_seed(0)
    x = torch.rand(4, 3, size, size)
    pruned, rep, _ = prune(model, [(x, torch.zeros(4, dtype=torch.long))],
                           PruneConfig(method=method, keep_ratios=[0.5]), 0.5, example_input=x[:1])
    with torch.no_grad():
        out = pruned.eval()(x[:2])
    return pruned, rep, out


@pytest.mark.parametrize("method", ["tp_magnitude", "pfp"])
def test_shufflenet_pruned_to_half_flops(method):
    original_shuffle = torchvision.models.shufflenetv2.channel_shuffle
    model = build_model("tv:shufflenet_v2_x0_5", 10, 3, 32).eval()
    pruned, rep, out = _prune_half(model, 32, method)
    assert out.shape == (2, 10)
    assert rep.flops / rep.original_flops == pytest.approx(0.5, rel=0.02)
    # the stand-in is swapped in only while Torch-Pruning traces
    assert torchvision.models.shufflenetv2.channel_shuffle is original_shuffle
    # branch-internal channels are removed; the shuffled stage channels are not
    mods = dict(pruned.named_modules())
    assert any(mods[f"stage3.{i}.branch2.0"].out_channels < 48 for i in range(8))
    assert mods["stage3.7.branch2.5"].out_channels == 48
    assert any("channel shuffle" in why for _, why in rep.skipped)


def test_shufflenet_shuffled_channels_never_form_a_group():
    model = build_model("tv:shufflenet_v2_x0_5", 10, 3, 32).eval()
    graph = PruningGraph(model, torch.rand(1, 3, 32, 32))
    producers = {p.name for g in graph.groups for p in g.producers}
    # a branch's last 1x1 conv feeds the concat that is shuffled; the first feeds the depthwise conv only
    assert not any(n.endswith("branch2.5") or n.endswith("branch1.2") for n in producers)
    assert "stage2.0.branch2.0" in producers and "conv5.0" in producers


def test_vit_prunes_mlp_hidden_units_and_keeps_its_width():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                              mlp_dim=256, num_classes=10).eval()
    pruned, rep, out = _prune_half(model, 32, "pfp")
    assert out.shape == (2, 10)
    assert rep.flops / rep.original_flops == pytest.approx(0.5, rel=0.02)
    assert pruned.hidden_dim == 32 and pruned.conv_proj.out_channels == 32
    for layer in pruned.encoder.layers:
        assert layer.mlp[0].out_features < 256 and layer.mlp[3].in_features == layer.mlp[0].out_features
        assert layer.self_attention.embed_dim == 32
    assert any("attention block" in why for _, why in rep.skipped)


def test_swin_prunes_mlp_hidden_units_and_keeps_its_width():
    from torchvision.models import swin_transformer
    from torchvision.models.swin_transformer import SwinTransformer

    original = swin_transformer.shifted_window_attention
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            num_classes=10).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # attention is most of a 16-wide Swin at 32 px: half its FLOPs are below what the MLPs can give
    pruned, rep, _ = prune(model, [(x, torch.zeros(4, dtype=torch.long))],
                           PruneConfig(method="pfp", keep_ratios=[0.6]), 0.6, example_input=x[:1])
    with torch.no_grad():
        out = pruned.eval()(x[:2])
    assert out.shape == (2, 10)
    assert rep.flops / rep.original_flops == pytest.approx(0.6, rel=0.02)
    assert swin_transformer.shifted_window_attention is original  # swapped only while tracing
    mods = dict(pruned.named_modules())
    assert any(mods[f"features.{s}.{b}.mlp.0"].out_features < 64 for s in (1, 3) for b in (0, 1))
    for s in (1, 3):  # the width and heads of every attention stay
        for b in (0, 1):
            attn = mods[f"features.{s}.{b}.attn"]
            assert attn.qkv.in_features == attn.proj.out_features == (16 if s == 1 else 32)
    reasons = " ".join(why for _, why in PruningGraph(model, x[:1]).skipped)
    assert "window partition or attention" in reasons


def test_maxvit_builds_its_groups_and_prunes_its_mlp_and_mbconv_hidden_units():
    from torchvision.models import maxvit
    from torchvision.models.maxvit import MaxVit

    original = maxvit.WindowPartition.forward
    model = MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4, block_channels=[16, 32],
                   block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    # traced as written, this model had not built its groups in 10 minutes (window reshapes)
    pruned, rep, out = _prune_half(model, 64, "pfp")
    assert out.shape == (2, 10)
    assert rep.flops / rep.original_flops == pytest.approx(0.5, rel=0.02)
    assert maxvit.WindowPartition.forward is original  # swapped only while tracing
    mods = dict(pruned.named_modules())
    assert any(mods[f"blocks.{b}.layers.0.layers.{a}.mlp_layer.1"].out_features < w
               for b, w in ((0, 64), (1, 128)) for a in ("window_attention", "grid_attention"))
    for b, width in ((0, 16), (1, 32)):  # the width of every attention stays
        for a in ("window_attention", "grid_attention"):
            attn = mods[f"blocks.{b}.layers.0.layers.{a}.attn_layer.1"]
            assert attn.to_qkv.in_features == attn.merge.out_features == width
    assert any("window partition or attention" in why for _, why in rep.skipped)
