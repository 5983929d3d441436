"""Coverage: the share of torchvision's classification models that PFP prunes to 50% FLOPs
and that still run and give the right output shape.

    .venv/bin/python benchmarks/torchvision_coverage.py [--size 64] [--keep 0.5] [--only a,b]
Calibration uses random images (this measures mechanics, not accuracy).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import traceback

import torch
import torchvision

from pfp.config import PruneConfig
from pfp.models import build_model
from pfp.prune import prune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--only", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    names = torchvision.models.list_models(module=torchvision.models)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    rows = []
    for name in names:
        size = args.size
        if name.startswith(("swin", "maxvit")):  # their window/block sizes need the native input
            size = 224
        elif name == "inception_v3":  # its stem needs at least 75 px
            size = max(size, 96)
        t = time.perf_counter()
        row = {"model": name, "size": size}
        try:
            torch.manual_seed(0)
            model = build_model("tv:" + name, 10, 3, size).eval()
            x = torch.rand(args.points, 3, size, size)
            calib = [(x, torch.zeros(args.points, dtype=torch.long))]
            pruned, rep, _ = prune(model, calib, PruneConfig(method="pfp", keep_ratios=[args.keep]), args.keep,
                                   example_input=x[:1])
            with torch.no_grad():
                out = pruned.eval()(x[:2])
            ok_shape = tuple(out.shape) == (2, 10)
            kept = rep.flops / rep.original_flops
            row.update(ok=ok_shape and abs(kept - args.keep) <= 0.02 * args.keep, flops_kept=round(kept, 4),
                       params_kept=round(rep.params / rep.original_params, 4), skipped=len(rep.skipped),
                       reason="" if ok_shape else f"output shape {tuple(out.shape)}")
            if ok_shape and not row["ok"]:
                row["reason"] = f"reached {kept:.3f} of FLOPs, not {args.keep} (skipped groups: {len(rep.skipped)})"
        except Exception as e:  # noqa: BLE001 - the benchmark records every failure and goes on
            row.update(ok=False, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            if "--trace" in str(args):
                traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = sum(r["ok"] for r in rows)
    print(f"\n{ok}/{len(rows)} models pruned to {args.keep:.0%} of FLOPs (within 2%) and ran with the right output shape"
          f" ({ok / max(1, len(rows)):.1%})")
    for r in rows:
        if not r["ok"]:
            print(f"  FAIL {r['model']}: {r['reason']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
