"""Models Torch-Pruning cannot handle give one clear PruneError, not a tracer traceback."""
import pytest
import torch
import torch.nn as nn

from pfp.config import PruneConfig
from pfp.prune import PruneError, prune


def _calib(x):
    return [(x, torch.zeros(len(x), dtype=torch.long))]


class RawShuffle(nn.Module):
    """ShuffleNetV2's concat, channel shuffle and split written inline (torchvision's own
    channel_shuffle gets a traceable stand-in, pfp.groups.TRACE_STAND_INS; this one does not)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        x1, x2 = y.chunk(2, dim=1)
        y = torch.cat([x1, self.c(torch.cat([x2, x2], 1))], 1)
        return self.fc(y.mean((2, 3))[:, :8])


def test_untraceable_model_is_a_prune_error():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(PruneError, match="dependency graph"):  # the inline shuffle defeats the tracer
        prune(RawShuffle().eval(), _calib(x), PruneConfig(method="ft"), 0.5, example_input=x[:1])


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
