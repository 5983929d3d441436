"""ONNX parity: max |logit difference| and top-1 agreement between PyTorch and the exported
ONNX file run in ONNX Runtime (CPU), on the real Fashion-MNIST test set, unpruned and pruned.

    .venv/bin/python benchmarks/onnx_parity.py [--samples 1000] [--models lenet5,resnet20,...]

LeNet5 and ResNet20 use the trained models of the quality benchmarks when they exist
(runs/quality_*/base.pt and compare/pfp_r0.5/model.pt); the others are untrained (weights
do not change what the check measures: the exporter's and runtime's numerics), pruned by
PFP to 50% of FLOPs in one shot. torchvision models see the images resized to 64 px.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Subset

from export.bundle import export_bundle
from export.inputs import test_batches
from pfp.config import DataConfig, PruneConfig
from pfp.data import build_data, make_loader
from pfp.models import build_model
from pfp.prune import prune
from pfp.serialization import save_model

TRAINED = {
    "lenet5": ("runs/quality_lenet5/base.pt", "runs/quality_lenet5/compare/pfp_r0.5/model.pt"),
    "resnet20": ("runs/quality_resnet20/base.pt", "runs/quality_resnet20/compare/pfp_r0.5/model.pt"),
}
SIZES = {"tv:resnet50": 64, "tv:mobilenet_v2": 64}


def model_files(name: str, folder: Path, data, size: int) -> tuple[Path, Path, str]:
    """(unpruned file, pruned file, 'trained'/'untrained') for `name`."""
    if name in TRAINED and all(Path(p).is_file() for p in TRAINED[name]):
        base, pruned = TRAINED[name]
        return Path(base), Path(pruned), "trained"
    torch.manual_seed(0)
    spec = {"name": name, "num_classes": 10, "in_channels": 1, "input_size": size}
    model = build_model(**spec).eval()
    base = folder / f"{name.replace(':', '_')}_base.pt"
    save_model(base, model, spec)
    calib = make_loader(Subset(data.train, range(64)), 64, False)
    small, _, _ = prune(copy.deepcopy(model), calib, PruneConfig(method="pfp", calib_size=64), 0.5,
                        example_input=torch.zeros(1, 1, size, size))
    pruned = folder / f"{name.replace(':', '_')}_pruned.pt"
    save_model(pruned, small, spec)
    return base, pruned, "untrained"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet5,resnet20,resnet56,tv:resnet50,tv:mobilenet_v2")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            size = SIZES.get(name, 28)
            data = build_data(DataConfig(name="fashion_mnist", input_size=None if size == 28 else size,
                                         limit_test=args.samples))
            base, pruned, source = model_files(name, folder, data, size)
            for variant, path in (("unpruned", base), ("pruned 50%", pruned)):
                _, meta = export_bundle(path, folder / "bundle", test_batches(data), parity_samples=args.samples)
                p = meta["parity"][0]
                rows.append({"model": name, "weights": source, "variant": variant, "flops": meta["flops"],
                             "max_abs_diff": p["max_abs_diff"], "max_rel_diff": p["max_rel_diff"], "top1_agreement": p["top1_agreement"],
                             "samples": p["samples"]})
                r = rows[-1]
                print(f"{name:16s} {source:9s} {variant:10s} FLOPs {r['flops'] / 1e6:9.2f}M  "
                      f"max|diff| {r['max_abs_diff']:.2e} (rel {r['max_rel_diff']:.1e})  top-1 agreement {100 * r['top1_agreement']:.2f}% "
                      f"({r['samples']} test images)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
