"""The `pfp` command line, complete: pfp's commands, export's, and the flows.

    pfp run [CONFIG] [--set k=v ...]        the compress flow (no CONFIG: the CPU quickstart)
    pfp compare [CONFIG] [--methods ...]    the method comparison flow (MLflow runs per point)
    pfp serve [CONFIG ...] [--cron "..."]   serve the flows with their schedules (Prefect)

`run` and `compare` replace pfp's untracked versions of the same names (still available as
`python -m pfp.cli run|compare`). Without PREFECT_API_URL, Prefect starts its ephemeral
server; without MLFLOW_TRACKING_URI or tracking.tracking_uri, MLflow uses
sqlite:///<output_dir>/mlflow.db.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from export.cli import EXPORT_ERRORS, extend
from export.cli import app as export_app
from pfp.cli import ConfigArg, ProgressOpt, SetOpt, _errors, _split, parse_sets

# No telemetry from the ephemeral server (these machines are offline; its heartbeat also
# contends for the server's sqlite file). A user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral server's default 20 s to come up is tight on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# run, compare and validate are replaced below by their pipeline versions.
app = extend(export_app, drop=("run", "compare", "validate"))
app.info.help = ("Provable Filter Pruning pipeline: prune CNN filters with data-informed sensitivities, "
                 "retrain, export, benchmark, gate and register (Prefect flows, MLflow tracking).")


def _flow_errors():
    from flows.tracking import TrackingError

    return _errors((*EXPORT_ERRORS, TrackingError))


def _load(config: Optional[Path], set_: Optional[list[str]]):
    from flows.config import load_pipeline_config
    from flows.tracking import check_tracking_server, resolve_tracking_uri

    cfg = load_pipeline_config(config, parse_sets(set_))
    check_tracking_server(resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir))
    return cfg


def _summary(result: dict) -> Table:
    t = Table(title="compress flow: rounds")
    for col in ("round", "keep", "acc", "change", "FLOPs removed", "coverage (min)"):
        t.add_column(col, justify="right")
    for i, r in enumerate(result["rounds"]):
        if r.get("error"):
            t.add_row(str(r["round"]), f"{r['keep_ratio']:.0%}", "failed", "", "", "", style="red")
            continue
        mark = " *" if result["chosen"] == i else ""
        cov = f"{r['coverage_min']:.3f}" if r.get("coverage_min") is not None else "-"
        t.add_row(f"{r['round']}{mark}", f"{r['keep_ratio']:.0%}", f"{r['acc']:.2f}%", f"{r['acc_change']:+.2f}",
                  f"{r['flops_removed_pct']:.1f}%", cov)
    return t


@app.command("run")
def run_cmd(config: ConfigArg = None, set_: SetOpt = None, progress: ProgressOpt = False) -> None:
    """The pipeline as a Prefect flow: calibrate, prune-retrain rounds, export, benchmark, gate, register."""
    with _flow_errors():
        from flows.compress import run_compress

        cfg = _load(config, set_)
        console = Console()
        result = run_compress(cfg, progress=progress)
        console.print(_summary(result))
        if result["version"]:
            d = result["decision"]
            verdict = "[bold green]promoted to champion[/]" if result["promoted"] else "[bold yellow]not promoted[/]"
            console.print(f"{cfg.model_name} v{result['version']}: candidate, {verdict}: {d['summary']}")
        console.print(
            f"flow {result['seconds']:.0f}s, orchestration overhead {100 * result['orchestration_overhead']:.1f}%; "
            f"results in {Path(cfg.output_dir) / cfg.name}; MLflow run {result['parent_run_id']}"
        )


@app.command("compare")
def compare_cmd(
    config: ConfigArg = None,
    methods: Annotated[Optional[str], typer.Option(help="comma-separated, e.g. pfp,ft,sfp (default: compare.methods)")] = None,
    reductions: Annotated[Optional[str], typer.Option(help="FLOP reductions, e.g. 0.5,0.7 (default: compare.reductions)")] = None,
    set_: SetOpt = None,
) -> None:
    """Several pruning methods on the same trained model, each point an MLflow run (a Prefect flow)."""
    with _flow_errors():
        from flows.compare import compare_flow

        cfg = _load(config, set_)
        compare_flow(cfg.model_dump(mode="json"), methods=_split(methods, "methods"),
                     reductions=_split(reductions, "reductions", float))


@app.command("validate")
def validate_cmd(config: Annotated[Path, typer.Argument(help="YAML config to check")], set_: SetOpt = None) -> None:
    """Check a pipeline config (every section, model name, targets, gate) without running anything."""
    with _flow_errors():
        from flows.config import load_pipeline_config
        from pfp.cli import _check_model_name
        from pfp.config import ConfigError

        cfg = load_pipeline_config(config, parse_sets(set_))
        _check_model_name(cfg.model.name)
        ckpt = cfg.model.pretrained_checkpoint
        if ckpt and not Path(ckpt).is_file():
            raise ConfigError(f"{config}: field 'model.pretrained_checkpoint': file {ckpt} not found")
        p = cfg.prune
        Console().print(
            f"OK: {config}: '{cfg.name}': {cfg.model.name} on {cfg.data.name}; {p.method} cascade to "
            f"{', '.join(f'{r:g}' for r in p.keep_ratios)} of the {p.target}; targets "
            f"{', '.join(t.name + ' (' + t.backend + ')' for t in cfg.targets)}; gate: accuracy drop <= "
            f"{cfg.gate.max_acc_drop:g} points and {len(cfg.gate.latency)} latency check(s)",
            highlight=False, soft_wrap=True,
        )


@app.command("serve")
def serve_cmd(
    configs: Annotated[Optional[list[Path]], typer.Argument(help="pipeline configs to serve (default: the quickstart)")] = None,
    cron: Annotated[Optional[str], typer.Option(help="cron schedule for every config without schedule.cron")] = None,
) -> None:
    """Serve the compress flow for each config with its cron schedule (Ctrl-C stops)."""
    with _flow_errors():
        from flows.serve import serve_configs

        serve_configs([_load(c, None) for c in (configs or [None])], cron=cron, sources=configs or [None])


def main() -> None:  # pragma: no cover
    app()
