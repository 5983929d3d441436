"""Latency targets: ResNet20/56 pruned to a measured latency on ONNX Runtime CPU, against FLOPs targets.

For each batch size: build the latency table (build time, size on disk), then for each
target prune with `prune.target: latency` (export.latency_target.prune_to_latency: table,
prune, measure, correct) and report measured/target. FLOPs-targeted pfp and tp_magnitude are
pruned to the same measured latency (their FLOPs keep ratio corrected by the measured
latency ratio, the same bounded loop) and every model's one-shot accuracy is compared on a
small Fashion-MNIST test set (the data of benchmarks/quality.py).

    .venv/bin/python benchmarks/latency_targets.py                        # batch 1 and 32, 0.5/0.3/0.15
    .venv/bin/python benchmarks/latency_targets.py --batches 1 --targets 0.5 --train-epochs 0 \
        --limit-train 512 --limit-test 256 --quick                        # a smoke run, a few minutes

The base model is trained for --train-epochs on --limit-train images (or read from
--checkpoint, a pfp model file); the table cache is --cache-dir (a fresh temporary one by
default, so the build time is a real build's).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from export.latency import LatencySettings
from export.latency_table import GridSettings, build_latency_table, cache_size_bytes, check_target, load_runner
from export.latency_target import SIDE_BY_SIDE, LatencyTry, next_ask, prune_to_latency, time_side_by_side
from pfp.config import LatencyTargetConfig, PruneConfig, load_config
from pfp.data import build_data, make_loader, split_calibration
from pfp.models import build_model
from pfp.prune import PruneError, prune
from pfp.serialization import load_model
from pfp.train import evaluate, train

HERE = Path(__file__).parent
QUICK_BLOCK = LatencySettings(warmup=2, warmup_s=0.01, min_iters=5, max_iters=100, min_time_s=0.02, max_time_s=0.2)
QUICK_MODEL = LatencySettings(warmup=3, warmup_s=0.05, min_iters=10, max_iters=300, min_time_s=0.2, max_time_s=1.0)


def base_model(args, data, console: Console) -> torch.nn.Module:
    """The unpruned --model: from --checkpoint, or trained briefly here."""
    if args.checkpoint:
        model, _ = load_model(args.checkpoint, build_model)
        return model.eval()
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        input_size=data.input_size)
    if args.train_epochs:
        cfg = load_config(HERE / "quality_resnet20.yaml", {"train.epochs": args.train_epochs}).train
        loader = make_loader(data.train, 128, shuffle=True)
        test = make_loader(data.test, 1000, shuffle=False)
        console.print(f"training {args.model} for {args.train_epochs} epochs on {len(data.train)} images")
        train(model, loader, test, cfg, "cpu", progress=False)
    return model.eval()


def measured_ratio(model, pruned, spec: LatencyTargetConfig, settings: LatencySettings, workdir: Path,
                   input_shape: list[int]) -> float:
    """pruned p50 / unpruned p50 on spec's backend, side by side."""
    backend = check_target(spec)
    a = load_runner(backend, copy.deepcopy(pruned).cpu(), input_shape, spec, workdir, "flops_pruned")
    b = load_runner(backend, copy.deepcopy(model).cpu(), input_shape, spec, workdir, "flops_unpruned")
    try:
        p, u = time_side_by_side([a, b], spec.batch, spec.threads, settings, 2)
    finally:
        a.close()
        b.close()
    return p / u


def flops_at_latency(model, calib, method: str, want: float, spec, settings, x, post, workdir, tries: int):
    """A FLOPs-targeted prune whose measured latency ratio is closest to `want` within `tries`."""
    cfg = PruneConfig(method=method, target="flops", calib_size=len(calib[0][0]))
    ask, best, seen, floored = want, None, [], False
    for _ in range(tries):
        try:
            pruned, rep, _ = prune(model, calib, cfg, min(ask, 0.99), example_input=x, postprocess_loader=post)
        except PruneError as e:
            if e.floor is None or floored:
                break
            ask, floored = e.floor * 1.001, True  # below the FLOPs floor: its fastest model, once
            continue
        m = measured_ratio(model, pruned, spec, settings, workdir, list(x.shape[1:]))
        if best is None or abs(m - want) < abs(best[1] - want):
            best = (pruned, m, rep.flops / rep.original_flops)
        if abs(m / want - 1) <= spec.tolerance:
            break
        # a FLOPs prune predicts no latency: the ask stands in for the prediction
        seen.append(LatencyTry(keep_ratio=ask, predicted_ratio=ask, measured_ratio=m, pruned_ms=m, unpruned_ms=1.0,
                               flops_ratio=rep.flops / rep.original_flops))
        ask = next_ask(seen, want)  # the latency target's own correction: the same loop for every method
    return best


def accuracies(pruned, test, retrain) -> tuple[float, float | None]:
    """(one-shot, after retraining) test accuracy; retraining works on a copy."""
    one_shot = evaluate(pruned, test, "cpu")["acc"]
    if retrain is None:
        return one_shot, None
    loader, cfg = retrain
    model = copy.deepcopy(pruned)
    torch.manual_seed(0)
    train(model, loader, test, cfg, "cpu", progress=False)
    return one_shot, evaluate(model, test, "cpu")["acc"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20", help="resnet20, resnet56 or any built-in model name")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--targets", default="0.5,0.3,0.15")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--comparator-tries", type=int, default=6,
                    help="tries for the FLOPs-targeted models to reach the latency target's measured latency")
    ap.add_argument("--flops-fallback", default=str(LatencyTargetConfig().flops_fallback),
                    help="prune.latency.flops_fallback for the latency target ('none': the table only)")
    ap.add_argument("--calibration", default=",".join(str(w) for w in LatencyTargetConfig().calibration),
                    help="prune.latency.calibration: uniform widths timed on the whole model ('': the blocks alone)")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--limit-train", type=int, default=6000)
    ap.add_argument("--limit-test", type=int, default=1000)
    ap.add_argument("--retrain-epochs", type=int, default=1, help="the same retraining for every pruned model (0: none)")
    ap.add_argument("--calib", type=int, default=256, help="images for scores and post-processing")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="short timings and a coarse grid (smoke runs)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    console = Console(width=160)

    dcfg = load_config(HERE / "quality_resnet20.yaml", {"data.limit_train": args.limit_train,
                                                         "data.limit_test": args.limit_test}).data
    data = build_data(dcfg)
    model = base_model(args, data, console)
    test = make_loader(data.test, 500, shuffle=False)
    calib_ds, post_ds = split_calibration(data.train, args.calib, args.calib, 0)
    xs = torch.stack([calib_ds[i][0] for i in range(len(calib_ds))])
    ys = torch.tensor([int(calib_ds[i][1]) for i in range(len(calib_ds))])
    calib = [(xs, ys)]
    post = make_loader(post_ds, 128, shuffle=False)
    x = xs[:1]
    base_acc = evaluate(model, test, "cpu")["acc"]
    retrain = None
    if args.retrain_epochs:
        rcfg = load_config(HERE / "quality_resnet20.yaml", {"retrain.epochs": args.retrain_epochs}).retrain
        retrain = (make_loader(data.train, 128, shuffle=True), rcfg)
    console.print(f"unpruned {args.model}: accuracy {base_acc:.2f}% on {len(data.test)} test images")

    grid = GridSettings(dense_upto=16, coarse_points=8, max_points=14) if args.quick else GridSettings()
    block_settings, model_settings = (QUICK_BLOCK, QUICK_MODEL) if args.quick else (None, None)
    side = QUICK_MODEL if args.quick else SIDE_BY_SIDE
    rows = []
    with tempfile.TemporaryDirectory(prefix="pfp-latency-bench-") as tmp:
        workdir = Path(tmp)
        for batch in [int(b) for b in args.batches.split(",")]:
            spec = LatencyTargetConfig(backend="ort-cpu", batch=batch, threads=args.threads, tries=args.tries,
                                       calibration=[float(w) for w in args.calibration.split(",") if w],
                                       flops_fallback=None if args.flops_fallback.lower() == "none" else float(args.flops_fallback))
            cache = args.cache_dir or workdir / f"cache_b{batch}"
            t0 = time.perf_counter()
            table = build_latency_table(model, x, spec, cache_dir=cache, grid=grid, block_settings=block_settings,
                                        model_settings=model_settings)
            build_s = time.perf_counter() - t0
            size = cache_size_bytes(cache)
            console.print(f"batch {batch}: table of {len(table.blocks)} blocks built in {build_s:.1f} s "
                          f"({table.cached_blocks} cached), {size / 1024:.1f} KiB on disk, full model {table.full_ms:.3f} ms, "
                          f"{table.realized:.0%} of the blocks' savings realized")
            for target in [float(t) for t in args.targets.split(",")]:
                cfg = PruneConfig(method="pfp", target="latency", calib_size=args.calib, latency=spec)
                try:
                    pruned, prep, rep = prune_to_latency(model, calib, cfg, target, example_input=x, table=table,
                                                         postprocess_loader=post, settings=side.model_copy(
                                                             update={"threads": args.threads}), rounds=2)
                except PruneError as e:
                    console.print(f"[yellow]batch {batch} target {target}: {e}[/yellow]")
                    continue
                console.print(rep.message)
                measured = rep.best_ratio
                row = {"batch": batch, "target": target, "table_s": build_s, "table_bytes": size,
                       "measured": measured, "measured_over_target": measured / target, "met": rep.met,
                       "tries": len(rep.tries), "latency_flops": prep.flops / prep.original_flops,
                       "picked": rep.tries[rep.best_try].cost_model,
                       # (cost model, asked, predicted, measured, divergence) per try: where the table and the
                       # machine parted, and which met try kept the outputs closest
                       "per_try": [(t.cost_model, round(t.keep_ratio, 4),
                                    None if t.predicted_ratio is None else round(t.predicted_ratio, 4),
                                    round(t.measured_ratio, 4), t.divergence and float(f"{t.divergence:.3g}"))
                                   for t in rep.tries]}
                row["latency_acc"], row["latency_acc_retrained"] = accuracies(pruned, test, retrain)
                for method in ("pfp", "tp_magnitude"):
                    got = flops_at_latency(model, calib, method, measured, spec,
                                           side.model_copy(update={"threads": args.threads}), x, post, workdir,
                                           args.comparator_tries)
                    if got is None:
                        row[f"{method}_flops_acc"] = None
                        continue
                    p, m, f = got
                    row[f"{method}_flops_acc"], row[f"{method}_flops_acc_retrained"] = accuracies(p, test, retrain)
                    row[f"{method}_flops_measured"] = m
                    row[f"{method}_flops_flops"] = f
                rows.append(row)
                console.print(json.dumps(row))  # each point as it lands: a long run shows progress

    t = Table(title=f"{args.model}, ort-cpu {args.threads} thread(s): latency target vs FLOPs target at the same "
                    f"measured latency (unpruned accuracy {base_acc:.2f}%)", title_justify="left")
    for col in ("batch", "target", "table s", "table KiB", "measured", "meas/target", "tries", "acc latency",
                "acc pfp@flops (lat)", "acc tp_magnitude@flops (lat)", "retrained: latency / pfp / tp"):
        t.add_column(col, justify="right")
    for r in rows:
        def acc(m: str) -> str:
            a = r.get(f"{m}_flops_acc")
            return "-" if a is None else f"{a:.2f}% ({r[f'{m}_flops_measured']:.3f})"

        def retrained(r: dict) -> str:
            vals = [r.get(k) for k in ("latency_acc_retrained", "pfp_flops_acc_retrained",
                                       "tp_magnitude_flops_acc_retrained")]
            return " / ".join("-" if v is None else f"{v:.2f}" for v in vals)

        t.add_row(str(r["batch"]), f"{r['target']:.2f}", f"{r['table_s']:.1f}", f"{r['table_bytes'] / 1024:.1f}",
                  f"{r['measured']:.3f}", f"{r['measured_over_target']:.3f}", str(r["tries"]),
                  f"{r['latency_acc']:.2f}%", acc("pfp"), acc("tp_magnitude"), retrained(r))
    console.print(t)
    if args.json:
        args.json.write_text(json.dumps({"base_accuracy": base_acc, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
