"""The paper's protocol: a cascade at equal parameters, pfp_reference against ft (and pfp).

Each method prunes the same trained LeNet5 (benchmarks/quality_lenet5.yaml's base) to a
geometric sequence of parameter budgets, retraining after every round, and reports the
smallest network within the tolerance of the unpruned one. The paper's ordering is that PFP
keeps accuracy to a smaller size than FT.

    .venv/bin/python benchmarks/reference_protocol.py [--methods pfp_reference,ft,pfp] [--retrain-epochs 1]
"""
from __future__ import annotations

import argparse
from pathlib import Path


from pfp.config import load_config
from pfp.cascade import run_cascade

HERE = Path(__file__).parent
RATIOS = [0.7, 0.5, 0.35, 0.25, 0.15, 0.1, 0.07]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="pfp_reference,ft,pfp")
    ap.add_argument("--retrain-epochs", type=int, default=1)
    ap.add_argument("--tolerance", type=float, default=0.5)
    ap.add_argument("--postprocess", action="store_true", help="BN recalibration and refit for every method")
    a = ap.parse_args()
    for method in a.methods.split(","):
        overrides = {
            "prune.method": method, "prune.target": "params", "prune.keep_ratios": RATIOS,
            "prune.tolerance": a.tolerance, "retrain.epochs": a.retrain_epochs,
            "prune.reconstruct": a.postprocess, "prune.bn_recalibration": a.postprocess,
            "name": "quality_lenet5",  # the same trained base as the quality benchmark
        }
        cfg = load_config(HERE / "quality_lenet5.yaml", overrides)
        cfg = cfg.model_copy(update={"output_dir": "runs/reference_protocol_" + method + ("_pp" if a.postprocess else "")})
        base_src = Path("runs/quality_lenet5/base.pt")
        dst = Path(cfg.output_dir) / cfg.name / "base.pt"
        if base_src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(base_src.read_bytes())
        res = run_cascade(cfg, progress=False)
        print(f"{method}: unpruned {res.base.acc:.2f}%")
        for r in (r.model_dump() for r in res.rounds):
            if r.get("error"):
                print(f"   keep {r['keep_ratio']:.2f} of params: {r['error']}")
                continue
            print(f"   keep {r['keep_ratio']:.2f} of params: params -{r['params_removed_pct']:.1f}%, "
                  f"FLOPs -{r['flops_removed_pct']:.1f}%, one-shot {r['acc_before_retrain']:.2f}%, "
                  f"retrained {r['acc']:.2f}% ({r['acc_change']:+.2f})")
        c = res.chosen_row.model_dump() if res.chosen_row else None
        print(f"   smallest within {a.tolerance} points: "
              + (f"{c['params_removed_pct']:.1f}% of params removed ({c['acc_change']:+.2f})" if c else "none"))


if __name__ == "__main__":
    main()
