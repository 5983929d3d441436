"""`pfp export` and `pfp bench`: the export layer's commands.

pfp itself never imports export code, so these commands live here, in a Typer app of their
own; the `pfp` program (flows.cli) adds them as top-level commands.

    pfp export MODEL --out DIR [--config CONFIG] [--backends ort-cpu,tensorrt] [--precisions fp32,fp16]
    pfp bench DIR [DIR ...] [--backends ort-cpu] [--batch 1,8,32] [--threads N] [--json FILE]
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console

from pfp.cli import SetOpt, load_run_config, parse_sets, split_option, user_errors

# No name: the `pfp` app adds these as top-level commands (`pfp export`, `pfp bench`).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _export_extra(bundle_dir: Path, backends: list[str], precisions: list[str], batch_sizes: list[int],
                  cfg, data, parity_samples: int, console: Console) -> list:
    """Build every requested (backend, precision) from the bundle and check its parity."""
    from export.backends import BuildSpec, get_backend
    from export.bundle import add_parity, load_bundle
    from export.inputs import calibration_inputs, test_batches
    from export.parity import compare_outputs, require_parity
    from pfp.models import build_model
    from pfp.serialization import load_model

    bundle = load_bundle(bundle_dir)
    model, _ = load_model(bundle.checkpoint, build_model)
    calibration = None
    reports = []
    for name in backends:
        backend = get_backend(name)
        backend.check_available()
        for precision in precisions:
            if (name, precision) == ("ort-cpu", "fp32"):
                continue  # checked by the export itself
            if precision == "int8" and calibration is None:
                calibration = calibration_inputs(data, n=512, seed=cfg.seed)
            spec = BuildSpec(precision=precision, batch_sizes=batch_sizes, calibration=calibration,
                             workdir=bundle_dir / "build")
            runner = backend.load(bundle, spec)
            report = compare_outputs(model, runner.run, test_batches(data), backend=name, precision=precision,
                                     limit=parity_samples)
            console.print(f"  parity {report.summary()}  ({runner.artifact})", highlight=False)
            reports.append(report)
            add_parity(bundle_dir, [report])
            require_parity(report, runner.artifact or bundle.onnx)
    return reports


@app.command("export")
def export_cmd(
    model_file: Annotated[Path, typer.Argument(help="a model saved by pfp (base.pt, round_*/model.pt, ...)")],
    out: Annotated[Path, typer.Option(help="bundle folder to write (model.onnx, model.pt, export.json)")],
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config naming the data set for parity (default: quickstart's)")] = None,
    backends: Annotated[str, typer.Option(help="also build and check these backends, e.g. ort-cpu,tensorrt")] = "ort-cpu",
    precisions: Annotated[str, typer.Option(help="fp32, fp16, int8 (comma-separated)")] = "fp32",
    batch: Annotated[str, typer.Option(help="batch sizes engines are built for")] = "1,8,32",
    parity_samples: Annotated[int, typer.Option(min=1, help="test-set samples compared against PyTorch")] = 1000,
    simplify: Annotated[bool, typer.Option(help="simplify the graph with onnxslim")] = False,
    exporter: Annotated[Literal["dynamo", "torchscript"], typer.Option(help="dynamo (torch.export) or torchscript")] = "dynamo",
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    set_: SetOpt = None,
) -> None:
    """Export a model to ONNX (dynamic batch), check it, and compare it with PyTorch on the test set."""
    with user_errors():
        from export.bundle import export_bundle
        from export.inputs import check_fits, test_batches
        from pfp.setup import load_data
        from pfp.serialization import load_model
        from pfp.models import build_model

        cfg = load_run_config(config, parse_sets(set_))
        console = Console()
        _, info = load_model(model_file, build_model)
        data = load_data(cfg)
        check_fits(info["spec"], data, str(model_file))
        console.print(f"[bold]export[/] {model_file} -> {out}/model.onnx ({exporter}, opset {opset})")
        _, meta = export_bundle(model_file, out, test_batches(data), parity_samples=parity_samples,
                                opset=opset, exporter=exporter, simplify=simplify)
        p = meta["parity"][0]
        console.print(
            f"  onnx.checker OK; {meta['onnx']['nodes']} nodes; parity ort-cpu fp32: max |diff| "
            f"{p['max_abs_diff']:.2e} (relative {p['max_rel_diff']:.1e}), top-1 agreement {100 * p['top1_agreement']:.2f}% on {p['samples']} test images",
            highlight=False,
        )
        _export_extra(out, split_option(backends, "backends"), split_option(precisions, "precisions"),
                      split_option(batch, "batch", int), cfg, data, parity_samples, console)
        console.print(f"wrote {out}/ (model.onnx, model.pt, export.json)")


@app.command("bench")
def bench_cmd(
    bundles: Annotated[list[Path], typer.Argument(help="bundle folders from `pfp export`; with several, the first is the baseline")],
    backends: Annotated[str, typer.Option(help="comma-separated: ort-cpu, ort-cuda, torch-cpu, torch-cuda, torch-compile-cpu, torch-compile-cuda, tensorrt")] = "ort-cpu",
    precisions: Annotated[str, typer.Option(help="fp32, fp16, int8")] = "fp32",
    batch: Annotated[str, typer.Option(help="batch sizes")] = "1,8,32",
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (pinned to as many cores); default: leave as is")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds when timing several bundles side by side")] = 3,
    max_time: Annotated[float, typer.Option(help="seconds at most per model, backend and batch size")] = 20.0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the report (results, machine, efficiency) as JSON")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="write the measured-vs-ideal speed-up plot (PNG)")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="config naming the data set (int8 calibration only)")] = None,
) -> None:
    """Latency (p50/p90/p99, throughput) per backend and batch size; speed-up efficiency vs the first bundle."""
    with user_errors():
        from export.bundle import load_bundle, read_meta
        from export.efficiency import (
            Candidate, bench_side_by_side, efficiency_rows, efficiency_table, plot_efficiency,
        )
        from export.latency import BenchReport, LatencySettings, table

        console = Console()
        settings = LatencySettings(threads=threads, max_time_s=max_time, min_time_s=min(1.0, max_time))
        candidates, labels = [], set()
        for folder in bundles:
            label = folder.name if folder.name not in labels else str(folder)
            labels.add(label)
            candidates.append(Candidate(label, load_bundle(folder), int(read_meta(folder)["flops"])))
        precision_list = split_option(precisions, "precisions")
        calibration = None
        if "int8" in precision_list:
            from export.inputs import calibration_inputs
            from pfp.setup import load_data

            cfg = load_run_config(config)
            calibration = calibration_inputs(load_data(cfg), n=512, seed=cfg.seed)
        results = bench_side_by_side(
            candidates, split_option(backends, "backends"), precision_list, split_option(batch, "batch", int),
            settings=settings, rounds=rounds if len(candidates) > 1 else 1, calibration=calibration,
            workdir=bundles[0] / "build",
            progress=lambda msg: console.print(f"  {msg}", style="dim", highlight=False),
        )
        flops = {c.label: c.flops for c in candidates}
        rows = efficiency_rows(results, flops, candidates[0].label) if len(candidates) > 1 else []
        report = BenchReport.new(results, settings, extra={"flops": flops, "efficiency": rows,
                                                           "baseline": candidates[0].label})
        console.print(table(report))
        if rows:
            console.print(efficiency_table(rows))
        if json_out:
            console.print(f"wrote {report.to_json(json_out)}")
        if plot and rows:
            console.print(f"wrote {plot_efficiency(rows, plot)}")
