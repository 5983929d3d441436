"""Coverage: the share of torchvision's classification models that PFP prunes to 50% FLOPs
and that still run and give the right output shape.

    .venv/bin/python benchmarks/torchvision_coverage.py [--method pfp] [--size 64] [--keep 0.5]
        [--only a,b] [--timeout 900] [--jobs 2] [--rows rows.jsonl] [--json summary.json]
Calibration uses random images (this measures mechanics, not accuracy). Each model runs in
its own process with a time limit (--timeout, per model; the 224 px Swin/MaxViT models need
several minutes on a small CPU), so one hang or out-of-memory kill does not stop the sweep;
--rows FILE appends one JSON line per model and a re-run skips the models already there;
--json FILE writes the summary (rows, pass rate, and the torchvision models not run).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
import torchvision

from pfp.config import PruneConfig
from pfp.models import build_model
from pfp.prune import prune


@dataclass
class Summary:
    """One sweep: a row per model run, the pass rate, and the torchvision models left out."""

    method: str
    keep: float
    timeout_s: int
    rows: list[dict] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(bool(r["ok"]) for r in self.rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(passed=self.passed, run=len(self.rows), pass_rate=self.passed / max(1, len(self.rows)))
        return d


def input_size(name: str, size: int) -> int:
    """The input side a model is run at: `size` unless the architecture needs more."""
    if name.startswith(("swin", "maxvit")):  # their window/block sizes need the native input
        return 224
    if name == "inception_v3":  # its stem needs at least 75 px
        return max(size, 96)
    if name == "vit_h_14":  # patch size 14
        return 56
    return size


def one(name: str, size: int, keep: float, points: int, method: str = "pfp") -> dict:
    """Prune one torchvision model; the row says whether it ran with the right output."""
    t = time.perf_counter()
    row = {"model": name, "size": size, "method": method}
    try:
        torch.manual_seed(0)
        model = build_model("tv:" + name, 10, 3, size).eval()
        x = torch.rand(points, 3, size, size)
        calib = [(x, torch.zeros(points, dtype=torch.long))]
        pruned, rep, _ = prune(model, calib, PruneConfig(method=method, keep_ratios=[keep]), keep, example_input=x[:1])
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


def run_in_process(name: str, args: argparse.Namespace) -> dict:
    """One model's row, pruned in a child process under the time limit (a hang or a kill is a row too)."""
    size = input_size(name, args.size)
    cmd = [sys.executable, __file__, "--one", name, "--size", str(size), "--keep", str(args.keep),
           "--points", str(args.points), "--method", args.method]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "size": size, "method": args.method, "ok": False,
                "reason": f"not finished in {args.timeout}s on this machine"}
    line = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if line:
        return json.loads(line[-1])
    err = out.stderr.strip().splitlines()
    return {"model": name, "size": size, "method": args.method, "ok": False,
            "reason": f"process died (exit {out.returncode}): {err[-1][:160] if err else ''}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--points", type=int, default=2)
    ap.add_argument("--method", default="pfp")
    ap.add_argument("--only", default="", help="comma-separated torchvision names, run in this order (default: all)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model, measured in its own process")
    ap.add_argument("--rows", default="", help="JSON-lines file: append rows, skip models already in it")
    ap.add_argument("--json", default="", help="write the summary (rows, pass rate, models not run) here")
    ap.add_argument("--skip", default="", help="comma-separated names not to run (listed as not run)")
    ap.add_argument("--jobs", type=int, default=1, help="models pruned at once, each in its own process "
                    "(time limits are per model; on a shared machine, jobs beyond the cores slow every model)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.one:
        print(json.dumps(one(args.one, args.size, args.keep, args.points, args.method)))
        return
    all_names = torchvision.models.list_models(module=torchvision.models)
    names = all_names
    if args.only:
        wanted = args.only.split(",")
        unknown = [n for n in wanted if n not in all_names]
        if unknown:
            raise SystemExit(f"--only: {unknown[0]!r} is not a torchvision classification model")
        names = list(dict.fromkeys(wanted))  # in the order given: the most telling models first
    skip = set(filter(None, args.skip.split(",")))
    names = [n for n in names if n not in skip]
    rows = []
    if args.rows:
        try:
            with open(args.rows) as f:
                rows = [json.loads(line) for line in f if line.startswith("{")]
        except FileNotFoundError:
            pass
    done = {r["model"] for r in rows}
    todo = [n for n in names if n not in done]
    lock = threading.Lock()

    def run_one(name: str) -> None:
        row = run_in_process(name, args)
        with lock:  # rows land whole, in the order models finish
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.rows:
                with open(args.rows, "a") as f:
                    f.write(json.dumps(row) + "\n")

    # each model is its own process; --jobs of them at once (threads here only wait on them)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(run_one, todo))
    ran = {r["model"] for r in rows}
    summary = Summary(args.method, args.keep, args.timeout, rows, [n for n in all_names if n not in ran])
    ok = summary.passed
    print(f"\n{ok}/{len(rows)} models pruned to {args.keep:.0%} of FLOPs (within 2%) and ran with the right output shape"
          f" ({ok / max(1, len(rows)):.1%}); {len(summary.not_run)} of {len(all_names)} torchvision models not run")
    for r in rows:
        if not r["ok"]:
            print(f"  FAIL {r['model']}: {r['reason']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary.to_dict(), f, indent=2)


if __name__ == "__main__":
    main()
