"""Coverage: the share of torchvision's classification models that PFP prunes to 50% FLOPs
and that still run and give the right output shape.

    .venv/bin/python benchmarks/torchvision_coverage.py [--size 64] [--keep 0.5] [--only a,b] [--timeout 300]
Calibration uses random images (this measures mechanics, not accuracy). Each model runs in
its own process with a time limit, so one huge model cannot stall or exhaust the machine;
--rows FILE appends one JSON line per model and a re-run skips the models already there.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import logging
import time

import torch
import torchvision

from pfp.config import PruneConfig
from pfp.models import build_model
from pfp.prune import prune


def one(name: str, size: int, keep: float, points: int) -> dict:
    """Prune one torchvision model; the row says whether it ran with the right output."""
    t = time.perf_counter()
    row = {"model": name, "size": size}
    try:
        torch.manual_seed(0)
        model = build_model("tv:" + name, 10, 3, size).eval()
        x = torch.rand(points, 3, size, size)
        calib = [(x, torch.zeros(points, dtype=torch.long))]
        pruned, rep, _ = prune(model, calib, PruneConfig(method="pfp", keep_ratios=[keep]), keep, example_input=x[:1])
        with torch.no_grad():
            out = pruned.eval()(x[:2])
        ok_shape = tuple(out.shape) == (2, 10)
        kept = rep.flops / rep.original_flops
        row.update(ok=ok_shape and abs(kept - keep) <= 0.02 * keep, flops_kept=round(kept, 4),
                   params_kept=round(rep.params / rep.original_params, 4), skipped=len(rep.skipped),
                   reason="" if ok_shape else f"output shape {tuple(out.shape)}")
        if ok_shape and not row["ok"]:
            row["reason"] = f"reached {kept:.3f} of FLOPs, not {keep} (groups left unpruned: {len(rep.skipped)})"
    except Exception as e:  # noqa: BLE001 - the benchmark records every failure and goes on
        row.update(ok=False, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    row["seconds"] = round(time.perf_counter() - t, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--points", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--rows", default="", help="JSON-lines file: append rows, skip models already in it")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.one:
        print(json.dumps(one(args.one, args.size, args.keep, args.points)))
        return
    names = torchvision.models.list_models(module=torchvision.models)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    rows = []
    if args.rows:
        try:
            with open(args.rows) as f:
                rows = [json.loads(line) for line in f if line.startswith("{")]
        except FileNotFoundError:
            pass
    done = {r["model"] for r in rows}
    for name in names:
        if name in done:
            continue
        size = args.size
        if name.startswith(("swin", "maxvit")):  # their window/block sizes need the native input
            size = 224
        elif name == "inception_v3":  # its stem needs at least 75 px
            size = max(size, 96)
        elif name == "vit_h_14":  # patch size 14
            size = 56
        cmd = [sys.executable, __file__, "--one", name, "--size", str(size), "--keep", str(args.keep),
               "--points", str(args.points)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            row = json.loads(line[-1]) if line else {
                "model": name, "size": size, "ok": False,
                "reason": f"process died (exit {out.returncode}): {out.stderr.strip().splitlines()[-1][:160] if out.stderr.strip() else ''}"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "size": size, "ok": False, "reason": f"not finished in {args.timeout}s on this machine"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.rows:
            with open(args.rows, "a") as f:
                f.write(json.dumps(row) + "\n")
    ok = sum(r["ok"] for r in rows)
    print(f"\n{ok}/{len(rows)} models pruned to {args.keep:.0%} of FLOPs (within 2%) and ran with the right output shape"
          f" ({ok / max(1, len(rows)):.1%})")
    for r in rows:
        if not r["ok"]:
            print(f"  FAIL {r['model']}: {r['reason']}")


if __name__ == "__main__":
    main()
