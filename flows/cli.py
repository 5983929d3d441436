"""The `pfp` program: one Typer app for every layer (pfp, export, deploy, flows).

    pfp run [CONFIG] [--set k=v ...]        the compress flow (no CONFIG: the pipeline quickstart)
    pfp compare [CONFIG] [--methods ...]    the method comparison flow (MLflow runs per point)
    pfp validate [CONFIG] [--show-default]  check a pipeline config without running anything
    pfp serve [CONFIG ...] [--cron "..."]   serve the flows with their schedules (Prefect)
    pfp deploy TARGETS --model NAME         roll the registry's champion out to edge devices
    pfp export / pfp bench                  ONNX export and latency (export.cli)
    pfp models                              the model names configs accept
    pfp device register|status|rollback     edge devices
    pfp local run|train|prune|compare|validate   the bare cascade, no Prefect or MLflow (pfp.cli)

`python -m flows.cli` is the same program. Without PREFECT_API_URL, Prefect starts its
ephemeral server; without MLFLOW_TRACKING_URI or tracking.tracking_uri, MLflow uses
sqlite:///<output_dir>/mlflow.db. Log lines of the project's loggers are rendered on stderr
(-v: debug, -q: warnings only). Heavy modules are imported inside the commands, so that
`pfp --help` stays fast.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from export.cli import app as export_app
from flows import PROJECT_LOGGERS
from flows.errors import FlowError
from pfp.cli import ConfigArg, SetOpt, ShowDefaultOpt, parse_sets, split_option, user_errors
from pfp.cli import app as local_app
from pfp.cli import models as models_cmd

# No telemetry from the ephemeral server (these machines are offline; its heartbeat also
# contends for the server's sqlite file). A user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The ephemeral server's default 20 s to come up is tight on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(
    name="pfp",
    help="Provable Filter Pruning pipeline: prune CNN filters with data-informed sensitivities, retrain, "
         "export, benchmark, gate and register (Prefect flows, MLflow tracking), deploy to edge devices.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def render_logs(level: int) -> Callable[[], None]:
    """Show the project's log records at `level` and above on stderr through rich; returns the undo.

    The loggers stop propagating meanwhile, so that a root handler (Prefect's console) does
    not print the same line twice; Prefect's API handler sits on the loggers themselves.
    """
    from rich.logging import RichHandler

    handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False, rich_tracebacks=False,
                          log_time_format="[%X]")
    saved = []
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False

    def undo() -> None:
        for logger, old_level, old_propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_propagate

    return undo


@app.callback()
def main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug log lines too")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="only warnings and errors")] = False,
) -> None:
    """Provable Filter Pruning pipeline: prune, retrain, export, benchmark, gate, register, deploy."""
    if verbose and quiet:
        raise typer.BadParameter("-v and -q together")
    ctx.call_on_close(render_logs(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO))


def _load(config: Optional[Path], set_: Optional[list[str]]):
    from flows.config import load_pipeline_config
    from flows.tracking import check_tracking_server, resolve_tracking_uri

    cfg = load_pipeline_config(config, parse_sets(set_))
    check_tracking_server(resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir))
    return cfg


def _summary(result: dict) -> Table:
    metric = result["base"].get("metric") or "acc"
    t = Table(title="compress flow: rounds")
    for col in ("round", "keep", metric, "change (+ better)", "FLOPs removed", "pre-act. error p95 (worst layer)"):
        t.add_column(col, justify="right")
    for i, r in enumerate(result["rounds"]):
        if r.get("error"):
            t.add_row(str(r["round"]), f"{r['keep_ratio']:.0%}", "failed", "", "", "", style="red")
            continue
        mark = " *" if result["chosen"] == i else ""
        cov = f"{r['preact_err_p95_max']:.3g}" if r.get("preact_err_p95_max") is not None else "-"
        value = r["score"] if r.get("score") is not None else r["acc"]
        change = r["score_change"] if r.get("score_change") is not None else r["acc_change"]
        t.add_row(f"{r['round']}{mark}", f"{r['keep_ratio']:.0%}", f"{value:.4g}" + ("%" if metric == "acc" else ""),
                  f"{change:+.3g}", f"{r['flops_removed_pct']:.1f}%", cov)
    return t


@app.command("run")
def run_cmd(config: ConfigArg = None, set_: SetOpt = None) -> None:
    """The pipeline as a Prefect flow: calibrate, prune-retrain rounds, export, benchmark, gate, register."""
    with user_errors():
        from flows.compress import run_compress

        cfg = _load(config, set_)
        console = Console()
        result = run_compress(cfg)
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
    with user_errors():
        from flows.compare import compare_flow

        cfg = _load(config, set_)
        compare_flow(cfg.model_dump(mode="json"), methods=split_option(methods, "methods"),
                     reductions=split_option(reductions, "reductions", float))


@app.command("validate")
def validate_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config to check (default: the pipeline quickstart)")] = None,
    set_: SetOpt = None,
    show_default: ShowDefaultOpt = False,
) -> None:
    """Check a pipeline config (every section, model name, backends, gate) without running anything."""
    if show_default:
        from flows.config import pipeline_quickstart_text

        typer.echo(pipeline_quickstart_text(), nl=False)
        return
    with user_errors():
        from flows.config import load_pipeline_config
        from pfp.cli import check_runnable

        cfg = load_pipeline_config(config, parse_sets(set_))
        check_runnable(cfg, config)
        p = cfg.prune
        Console().print(
            f"OK: {config or '<quickstart defaults>'}: '{cfg.name}': {cfg.model.name} on {cfg.data.name}; {p.method} cascade to "
            f"{', '.join(f'{r:g}' for r in p.keep_ratios)} of the {p.target}; backends "
            f"{', '.join(t.name + ' (' + t.backend + ')' for t in cfg.backends)}; gate: accuracy drop <= "
            f"{cfg.gate.max_acc_drop:g} points and {len(cfg.gate.latency)} latency check(s)",
            highlight=False, soft_wrap=True,
        )


@app.command("serve")
def serve_cmd(
    configs: Annotated[Optional[list[Path]], typer.Argument(help="pipeline configs to serve (default: the quickstart)")] = None,
    cron: Annotated[Optional[str], typer.Option(help="cron schedule for every config without schedule.cron")] = None,
) -> None:
    """Serve the compress flow for each config with its cron schedule (Ctrl-C stops)."""
    with user_errors():
        from flows.serve import serve_configs

        serve_configs([_load(c, None) for c in (configs or [None])], cron=cron, sources=configs or [None])


# --------------------------------------------------------------------------- edge devices

device_app = typer.Typer(help="Edge devices: register their flows, read their state, roll back.", no_args_is_help=True)
TargetsArg = Annotated[Path, typer.Argument(help="targets YAML (see configs/targets_example.yaml)")]


def _rollout_table(report: dict) -> Table:
    t = Table(title=f"rollout {report['rollout_id']}: {report['model']} v{report['version']}")
    for col in ("device", "stage", "status", "backend", "p50 ms", "repo version", "seconds", "reason"):
        t.add_column(col)
    for o in report["outcomes"]:
        r = o.get("result") or {}
        lat = next(iter((r.get("latency") or {}).values()), {})
        style = None if o["status"] in ("active", "benchmarked") else "yellow" if o["status"] == "skipped" else "red"
        t.add_row(o["device"], o["stage"], o["status"], str(r.get("backend", "-")), str(lat.get("p50_ms", "-")),
                  str(r.get("repository_version", "-")), f"{o['seconds']:.1f}", o["reason"][:200], style=style)
    return t


@app.command("deploy")
def deploy_cmd(
    targets: TargetsArg,
    model: Annotated[str, typer.Option(help="registered model name (a pipeline config's model_name)")],
    version: Annotated[Optional[str], typer.Option(help="registered version (default: the one --alias names)")] = None,
    alias: Annotated[str, typer.Option(help="registry alias to deploy when --version is not given")] = "champion",
    only: Annotated[Optional[str], typer.Option(help="comma-separated device names (default: all canary and fleet targets)")] = None,
    benchmark_only: Annotated[bool, typer.Option("--benchmark-only", help="build, check and time on the devices; install nothing")] = False,
    roles: Annotated[str, typer.Option(help="stages in order, from gate, canary, fleet")] = "canary,fleet",
    max_parallel: Annotated[int, typer.Option(help="devices deployed at once within a stage")] = 4,
    pickup_timeout: Annotated[float, typer.Option(help="seconds before a job nobody took counts as device offline")] = 120.0,
    run_timeout: Annotated[float, typer.Option(help="seconds before a running job is cancelled")] = 1800.0,
    lost_after: Annotated[float, typer.Option(help="seconds a device's queue may go unpolled before it counts as offline or lost")] = 60.0,
    max_time: Annotated[float, typer.Option(help="timing budget per batch size on the device, seconds")] = 5.0,
) -> None:
    """Roll the registry's champion (or --version) out to the edge: canaries first, then the fleet."""
    with user_errors():
        from deploy.targets import load_targets
        from flows.deploy_flow import RolloutStopped, deploy_flow

        load_targets(targets)  # one-line errors before anything starts
        _need_servers()
        console = Console()
        settings = {"roles": split_option(roles, "roles"), "max_parallel": max_parallel, "pickup_timeout_s": pickup_timeout,
                    "run_timeout_s": run_timeout, "lost_after_s": lost_after, "max_time_s": max_time}
        try:
            report = deploy_flow(str(targets.resolve()), model, version=version, alias=alias, settings=settings,
                                 only=split_option(only, "only"), mode="benchmark" if benchmark_only else "deploy")
        except RolloutStopped as e:
            if e.report:
                console.print(_rollout_table(e.report))
            Console(stderr=True).print(f"[bold red]rollout stopped:[/] {e}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None
        console.print(_rollout_table(report))
        console.print(f"{report['summary']} in {report['seconds']:.0f} s", highlight=False)


def _need_servers() -> None:
    """Devices poll a real Prefect server and read a shared MLflow registry; an ephemeral one reaches no device."""
    from flows.tracking import check_tracking_server

    if not os.environ.get("PREFECT_API_URL"):
        raise FlowError("PREFECT_API_URL is not set: devices' workers poll a Prefect server, "
                        "an ephemeral one reaches none of them (see README: edge deployment)")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise FlowError("MLFLOW_TRACKING_URI is not set: devices download from the same MLflow registry")
    check_tracking_server(uri)


def _target(targets: Path, device: str):
    from deploy.targets import load_targets

    found = [t for t in load_targets(targets) if t.name == device]
    if not found:
        raise FlowError(f"{targets}: no target named {device!r}")
    return found[0]


def _run_on_device(kind: str, target, parameters: dict, timeout: float) -> None:
    from flows.deploy_flow import dispatch, wait_for_run

    fr = dispatch(kind, target, parameters, f"{target.name}: {kind}")
    status, reason = wait_for_run(fr.id, min(timeout, 120.0), timeout)
    if status != "ok":
        raise FlowError(f"{kind} on {target.name}: {status}: {reason}")


@device_app.command("register")
def device_register_cmd(
    targets: TargetsArg,
    source: Annotated[Optional[Path], typer.Option(help="this repository as the workers see it (default: here)")] = None,
) -> None:
    """Create the device flows' deployments on every work pool of the targets, and each device's concurrency limit."""
    with user_errors():
        from deploy.targets import load_targets
        from flows.device_flows import ensure_device_limits, register_device_deployments
        from flows.tracking import REPO

        ts = load_targets(targets)
        if not os.environ.get("PREFECT_API_URL"):
            raise FlowError("PREFECT_API_URL is not set: register the device flows on the server the devices poll")
        names = register_device_deployments(sorted({t.work_pool for t in ts}), source or REPO)
        ensure_device_limits([t.name for t in ts])
        Console().print(f"deployments: {', '.join(names)}; concurrency limits: "
                        f"{', '.join('pfp-device-' + t.name for t in ts)}", highlight=False)


@device_app.command("status")
def device_status_cmd(device: Annotated[str, typer.Argument(help="device name")], targets: TargetsArg,
                      timeout: Annotated[float, typer.Option(help="seconds to wait for the device")] = 300.0) -> None:
    """What the device serves, read on the device by its own worker."""
    with user_errors():
        import json as _json

        from prefect.artifacts import Artifact

        from flows.device_flows import status_key

        t = _target(targets, device)
        _need_servers()
        _run_on_device("status", t, {"device": t.name}, timeout)
        art = Artifact.get(status_key(t.name))
        table = Table(title=f"{t.name}: model repository")
        rows = _json.loads(art.data) if art and art.data else []
        cols = ["model", "active", "previous", "serving", "in_sync", "registry_version", "backend", "problems"]
        for c in cols:
            table.add_column(c)
        for r in rows:
            table.add_row(*(str(r.get(c, "")) for c in cols))
        Console().print(table)


@device_app.command("rollback")
def device_rollback_cmd(device: Annotated[str, typer.Argument(help="device name")], targets: TargetsArg,
                        model: Annotated[str, typer.Option(help="model name on the device")],
                        timeout: Annotated[float, typer.Option(help="seconds to wait for the device")] = 300.0) -> None:
    """Re-activate the previous version of a model on one device."""
    with user_errors():
        t = _target(targets, device)
        _need_servers()
        _run_on_device("rollback", t, {"device": t.name, "model_name": model}, timeout)
        Console().print(f"{t.name}: {model} rolled back", highlight=False)


# The other layers' commands, after the pipeline's own (the order of `pfp --help`).
app.add_typer(export_app)  # no name: `pfp export` and `pfp bench` are top-level commands
app.command("models")(models_cmd)
app.add_typer(device_app, name="device")
app.add_typer(local_app, name="local")

if __name__ == "__main__":  # `python -m flows.cli` (torchrun -m) is the same program as `pfp`
    app()
