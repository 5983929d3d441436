"""Quality benchmark: every method at equal FLOPs and equal parameters, one-shot and retrained.

Runs `pfp compare` (pfp.compare.run_compare: the same base model, S, target, post-processing
and retraining for every method) on each model's config, for FLOPs and parameter targets, and
prints one table per model with each method's rank. Each method runs plain and with the
shared post-processing (BN recalibration + reconstruction), so a win is attributed to its cause.

    .venv/bin/python benchmarks/quality.py                                 # every model, every method
    .venv/bin/python benchmarks/quality.py --models lenet5 --seeds 0,1,2 --retrain-epochs 0
    .venv/bin/python benchmarks/quality.py --models resnet20 --methods pfp,ft,tp_magnitude --targets flops
    .venv/bin/python benchmarks/quality.py --models lenet5 --methods pfp,pfp@sample_bound,pfp@uniform

A method written NAME@ALLOCATION is NAME with another allocator: registered here as a method of
its own (the registry's one-entry extension), so alternatives are measured side by side.

Results land in runs/quality_<model>[_s<seed>]/compare/{compare.json, params/...}; the summary
is also written to runs/quality_summary.json. Figures depend on the machine only through time.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from rich.console import Console

from dataclasses import replace

from pfp.compare import run_compare
from pfp.config import known_methods, load_config
from pfp.methods import METHODS, register_method

HERE = Path(__file__).parent
MODELS = {  # model -> its config (a CPU-sized schedule on Fashion-MNIST)
    "lenet5": HERE / "quality_lenet5.yaml",
    "resnet20": HERE / "quality_resnet20.yaml",
    "vgg_small": HERE / "quality_vgg_small.yaml",
    "mobilenet_v2": HERE / "quality_mobilenet_v2.yaml",
}
REDUCTIONS = {"flops": [0.5, 0.7, 0.85], "params": [0.5, 0.7, 0.9]}


def run(model: str, seed: int, methods: list[str], targets: list[str], postprocess: str,
        retrain_epochs: int | None, reductions: list[float] | None = None) -> list[dict]:
    rows = []
    for target in targets:
        overrides = {"seed": seed, "name": f"quality_{model}" + (f"_s{seed}" if seed else ""),
                     "compare.target": target, "compare.postprocess": postprocess}
        if retrain_epochs is not None:
            overrides["retrain.epochs"] = retrain_epochs
        cfg = load_config(MODELS[model], overrides)
        for r in run_compare(cfg, methods, reductions or REDUCTIONS[target], progress=False).rows:
            rows.append(r.model_dump() | {"model": model, "seed": seed, "target": target})
    return rows


def summarize(rows: list[dict], console: Console) -> dict:
    """Mean accuracy over seeds per (model, target, reduction, method, postprocess), with ranks."""
    out: dict = {}
    for r in rows:
        if r.get("error"):
            continue
        key = (r["model"], r["target"], r["reduction"])
        label = r["method"] + (" + pp" if r["postprocess"] == "shared" else "")
        cell = out.setdefault(key, {}).setdefault(label, {"oneshot": [], "retrained": [], "change": []})
        cell["oneshot"].append(r["acc_before_retrain"])
        cell["retrained"].append(r["acc"])
        cell["change"].append(r["acc_change"])
    table = []
    for (model, target, red), cells in sorted(out.items()):
        console.print(f"\n[bold]{model}[/]: {red:.0%} of the {target} removed (mean over seeds; rank of 1 is best)")
        for phase in ("oneshot", "retrained"):
            means = {m: statistics.mean(c[phase]) for m, c in cells.items()}
            order = sorted(means, key=means.get, reverse=True)
            line = "  ".join(f"{m} {means[m]:.2f}" for m in order)
            console.print(f"  {phase:<9} {line}", highlight=False)
            for rank, m in enumerate(order, 1):
                table.append({"model": model, "target": target, "reduction": red, "phase": phase, "method": m,
                              "acc": means[m], "rank": rank, "seeds": len(cells[m][phase])})
    return {"rows": table}


def register_variants(methods: list[str]) -> None:
    """NAME@ALLOCATION -> a registered method: NAME's scorer and defaults with another allocator."""
    for m in methods:
        if "@" in m and m not in METHODS:
            base, allocation = m.split("@", 1)
            register_method(replace(METHODS[base], name=m, allocation=allocation))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(known_methods()))
    ap.add_argument("--targets", default="flops,params")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--postprocess", default="both", choices=["both", "plain", "shared"])
    ap.add_argument("--retrain-epochs", type=int, default=None, help="override each config's retrain.epochs")
    ap.add_argument("--reductions", default=None, help="override the shares removed, e.g. 0.5,0.7")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default="runs/quality_summary.json")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    register_variants(a.methods.split(","))
    rows = []
    for model in a.models.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            rows += run(model, seed, a.methods.split(","), a.targets.split(","), a.postprocess, a.retrain_epochs,
                        [float(r) for r in a.reductions.split(",")] if a.reductions else None)
    summary = summarize(rows, Console())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"points": rows, **summary}, indent=1, default=str))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
