"""SFP's soft phase must act like removal."""
import torch

from pfp.config import PruneConfig
from pfp.models import build_model
from pfp.prune import prune


def _with_bn_stats(model: torch.nn.Module) -> torch.nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 28, 28))
    return model.eval()


def test_soft_pruned_resnet_equals_removed_resnet():
    torch.manual_seed(0)
    model = _with_bn_stats(build_model("resnet20", 10, 1, 28))
    x = torch.randn(8, 1, 28, 28)
    soft_model, _, soft = prune(model, [(x, torch.zeros(8, dtype=torch.long))], PruneConfig(method="sfp"), 0.5,
                                example_input=x[:1])
    soft.callback(0, soft_model)
    with torch.no_grad():
        before = soft_model.eval()(x)
    small, report = soft.finalize(soft_model)
    with torch.no_grad():
        after = small.eval()(x)
    assert report.params < sum(p.numel() for p in model.parameters())
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()

