"""The layer-budget plot and the report it draws from: network order, widths relative to the original."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from pfp.config import PruneConfig
from pfp.models import build_model
from pfp.plots import plot_layer_budget
from pfp.prune import prune


def test_report_layers_are_in_network_order(tmp_path):
    model = build_model("resnet20", 10, 3, 32).eval()
    data = TensorDataset(torch.randn(96, 3, 32, 32), torch.zeros(96, dtype=torch.long))
    _, report, _ = prune(model, DataLoader(data, batch_size=48), PruneConfig(method="tp_magnitude", calib_split=0.25),
                         0.5, example_input=torch.randn(1, 3, 32, 32))
    names = [layer["name"] for layer in report.layers]
    order = [n for n, _ in model.named_modules()]
    assert names[0] == "conv1"
    assert [order.index(n) for n in names] == sorted(order.index(n) for n in names)
    png = plot_layer_budget(report.to_dict(), tmp_path / "layer_budget.png",
                            original={n: 2 * layer["size"] for n, layer in zip(names, report.layers)})
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
