"""Models Torch-Pruning cannot handle give one clear PruneError, not a tracer traceback."""
import pytest
import torch
import torch.nn as nn

from pfp.config import PruneConfig
from pfp.models import build_model
from pfp.prune import PruneError, prune


def _calib(x):
    return [(x, torch.zeros(len(x), dtype=torch.long))]


def test_untraceable_model_is_a_prune_error():
    model = build_model("tv:shufflenet_v2_x0_5", 10, 3, 32).eval()  # its channel shuffle defeats the tracer
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(PruneError, match="dependency graph"):
        prune(model, _calib(x), PruneConfig(method="ft"), 0.5, example_input=x[:1])


class HardCodedWidth(nn.Module):
    """A forward that reshapes with a width fixed at construction, as ViT does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.reshape(y.shape[0], 16 * 6 * 6))


def test_pruned_model_that_no_longer_runs_is_a_prune_error():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(PruneError, match="no longer runs"):
        prune(HardCodedWidth(), _calib(x), PruneConfig(method="ft", round_to=1), 0.5, example_input=x[:1])
