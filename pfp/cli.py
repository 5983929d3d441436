"""`pfp local`: the bare cascade without Prefect or MLflow, and what every `pfp` command shares.

    pfp local run [CONFIG] [--set key=value ...]     prune-and-retrain cascade (no CONFIG: the quickstart)
    pfp local compare [CONFIG] [--methods pfp,ft] [--reductions 0.5,0.7] [--set ...]
    pfp local train [CONFIG] [--set ...]             train and save the base model (torchrun works)
    pfp local prune CHECKPOINT --config CONFIG --keep 0.5 --out FILE
    pfp local validate [CONFIG] [--show-default]     check a config without running it

The `pfp` program itself (flows.cli) adds this app as `pfp local`. Expected failures (a
PfpError: bad config, missing data, unreadable checkpoint, impossible target, unknown model)
print one red line "error: ..." and exit with status 2; set PFP_DEBUG=1 to get the traceback
instead. Anything else is a bug and shows its traceback.

Multi-GPU training of the base model:
    torchrun --standalone --nproc_per_node=4 --no-python pfp local train CONFIG
    (or: torchrun ... -m flows.cli local train CONFIG), then `pfp local run CONFIG` reuses its base.pt.
"""
from __future__ import annotations

import contextlib
import logging
import os
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional, TypeVar

import typer
import yaml
from rich.console import Console
from rich.text import Text

from pfp.config import ConfigError, RunConfig, config_from_dict, load_config
from pfp.errors import PfpError

T = TypeVar("T")

app = typer.Typer(
    name="local",
    help="The bare prune-and-retrain cascade, without Prefect or MLflow (files under output_dir only).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[
    Optional[Path], typer.Argument(help="YAML config (see configs/); without it the quickstart defaults are used")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="override a config value: --set train.epochs=1 (value parsed as YAML); repeatable"),
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars while training")]
ShowDefaultOpt = Annotated[bool, typer.Option("--show-default", help="print the quickstart config (YAML) and exit")]


def one_line(e: BaseException) -> str:
    """The exception's message on one line (its type name when it has none)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text or type(e).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A PfpError -> one red line on stderr and exit status 2 (PFP_DEBUG=1: its traceback).

    Only PfpError: any other exception is a bug, and its traceback is what finds it.
    """
    try:
        yield
    except PfpError as e:
        if os.environ.get("PFP_DEBUG"):
            raise
        Console(stderr=True).print(Text(f"error: {one_line(e)}", style="bold red"), soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        Console(stderr=True).print(
            Text("interrupted; run the same command again to continue from the last checkpoint", style="yellow"),
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


def parse_sets(items: list[str] | None) -> dict:
    """["a.b=1", "c=[0.5, 0.3]"] -> {"a.b": 1, "c": [0.5, 0.3]} (values parsed with yaml.safe_load)."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=1")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


def quickstart_text() -> str:
    """The quickstart config as shipped (package data pfp/quickstart.yaml)."""
    return files("pfp").joinpath("quickstart.yaml").read_text(encoding="utf-8")


def load_run_config(path: Path | None, overrides: dict | None = None) -> RunConfig:
    """The config at `path` (or the quickstart defaults) with dotted-key overrides applied."""
    if path is not None:
        return load_config(path, overrides)
    return config_from_dict(yaml.safe_load(quickstart_text()), "<quickstart defaults>", overrides)


def check_model_name(name: str) -> None:
    """ConfigError with the closest names when `name` is not a model `build_model` knows."""
    from pfp.models import check_model_name as check

    check(name)


def split_option(value: str | None, what: str, cast: Callable[[str], T] = str) -> list[T] | None:
    """A comma-separated option value as a list (None stays None); ConfigError naming --`what`."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ConfigError(f"--{what}: empty list")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise ConfigError(f"--{what} {value!r}: expected a comma-separated list of numbers") from None


# --------------------------------------------------------------------------- commands


@app.command()
def run(config: ConfigArg = None, set_: SetOpt = None, progress: ProgressOpt = True) -> None:
    """Prune-and-retrain cascade: train (or reuse) the base model, prune to each keep ratio, choose."""
    with user_errors():
        from pfp.cascade import run_cascade, summary_table

        cfg = load_run_config(config, parse_sets(set_))
        check_model_name(cfg.model.name)
        result = run_cascade(cfg, progress=progress)
        Console().print(summary_table(result))


@app.command()
def compare(
    config: ConfigArg = None,
    methods: Annotated[Optional[str], typer.Option(help="comma-separated, e.g. pfp,ft,sfp (default: compare.methods)")] = None,
    reductions: Annotated[
        Optional[str], typer.Option(help="FLOP reductions, e.g. 0.5,0.7 (default: compare.reductions)")
    ] = None,
    set_: SetOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Several pruning methods side by side: same base model, FLOP targets and retraining budget."""
    with user_errors():
        from pfp.compare import run_compare, summary_table

        cfg = load_run_config(config, parse_sets(set_))
        check_model_name(cfg.model.name)
        result = run_compare(cfg, split_option(methods, "methods"), split_option(reductions, "reductions", float),
                             progress=progress)
        Console().print(summary_table(result))


@app.command("train")
def train_cmd(config: ConfigArg = None, set_: SetOpt = None, progress: ProgressOpt = True) -> None:
    """Train the unpruned model and save it as output_dir/<name>/base.pt (works under torchrun)."""
    with user_errors():
        from pfp.distributed import cleanup, init_distributed
        from pfp.setup import run_train

        cfg = load_run_config(config, parse_sets(set_))
        check_model_name(cfg.model.name)
        rank, world, _ = init_distributed()
        try:
            if rank != 0:  # one rank speaks for all
                logging.getLogger("pfp").setLevel(logging.WARNING)
            run_train(cfg, progress=progress, distributed=world > 1)
        finally:
            cleanup()


@app.command("prune")
def prune_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a model saved by pfp (base.pt, round_*/model.pt, ...)")],
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config: data (for calibration) and prune settings")],
    keep: Annotated[float, typer.Option(help="share of the resource to keep, in (0, 1)")],
    out: Annotated[Path, typer.Option(help="where to write the pruned model; the report goes next to it (.report.json)")],
    method: Annotated[Optional[str], typer.Option(help="override prune.method")] = None,
    target: Annotated[Optional[str], typer.Option(help="override prune.target: flops or params (a latency target: prune.target in a `pfp local run` config)")] = None,
    of_original: Annotated[
        bool, typer.Option("--of-original", help="keep is relative to the unpruned network recorded in the file's report")
    ] = False,
    evaluate_: Annotated[bool, typer.Option("--eval/--no-eval", help="test accuracy before and after")] = True,
    set_: SetOpt = None,
) -> None:
    """One-shot prune of a saved model (no retraining); prints and writes the report."""
    with user_errors():
        import torch

        from pfp.data import make_loader
        from pfp.setup import calibration_loaders, load_checkpoint_for, load_data, split_training
        from pfp.prune import prune
        from pfp.serialization import CheckpointError, save_model
        from pfp.train import evaluate, resolve_device, seed_everything

        overrides = parse_sets(set_)
        if method is not None:
            overrides["prune.method"] = method
        if target is not None:
            overrides["prune.target"] = target
        cfg = load_run_config(config, overrides)
        if not 0 < keep < 1:
            raise ConfigError(f"--keep {keep}: must be in (0, 1)")
        console = Console()
        seed_everything(cfg.seed)
        device = resolve_device(cfg.device)
        data = load_data(cfg)
        example = torch.zeros(1, *data.example_shape)
        model, info, _ = load_checkpoint_for(checkpoint, data, example, cfg)
        reference = None
        if of_original:
            rep = (info["meta"].get("report") or {}) if isinstance(info["meta"], dict) else {}
            if not rep.get("original_params") or not rep.get("original_flops"):
                raise CheckpointError(f"{checkpoint}: --of-original needs a file written by a pruning run (no report in it)")
            reference = (int(rep["original_params"]), int(rep["original_flops"]))
        model.to(device)
        example = example.to(device)
        _, held_out = split_training(cfg, data.train)
        cal = calibration_loaders(cfg, data, model, example, pool=held_out)
        test_loader = make_loader(data.test, cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.workers)
        before = evaluate(model, test_loader, device)["acc"] if evaluate_ else None
        console.print(f"[bold]prune[/] {checkpoint}: {cfg.prune.method}, keep {keep:.0%} of the {cfg.prune.target}, |S| = {cal.calib_size}")
        pruned, report, soft = prune(
            model, cal.calib, cfg.prune, keep, example_input=example, reference=reference, holdout_loader=cal.holdout,
            postprocess_loader=cal.postprocess,
            device=device, seed=cfg.seed,
        )  # fmt: skip
        if soft is not None:  # SFP without retraining: remove the zeroed filters now
            pruned, report = soft.finalize(pruned)
        pruned.to(device)
        after = evaluate(pruned, test_loader, device)["acc"] if evaluate_ else None
        console.print(report.summary())
        meta = {
            "source": str(checkpoint), "keep_ratio": keep, "acc_before_prune": before,
            "acc_before_retrain": after, "report": report.to_dict(),
        }  # fmt: skip
        save_model(out, pruned, info["spec"], meta=meta)
        report_path = out.with_suffix(".report.json")
        report.save_json(report_path)
        if evaluate_:
            console.print(f"test acc {before:.2f}% -> {after:.2f}% (no retraining)")
        console.print(f"wrote {out} and {report_path}")


def models() -> None:
    """List the model names that configs accept (model.name)."""
    from pfp.models import TV_PREFIX, OUR_MODELS, available_models

    console = Console()
    console.print("[bold]ours[/] (sized for the data set's images):")
    for name in OUR_MODELS:
        console.print(f"  {name}", highlight=False)
    tv = [n for n in available_models() if n.startswith(TV_PREFIX)]
    console.print(f"[bold]torchvision[/] ({len(tv)}, untrained, first conv adapted to the data's channels):")
    console.print("  " + ", ".join(tv), highlight=False)


def check_runnable(cfg: RunConfig, source: Path | None) -> None:
    """What `validate` checks beyond the schema: the model name resolves and the checkpoint exists."""
    check_model_name(cfg.model.name)
    ckpt = cfg.model.pretrained_checkpoint
    if ckpt and not Path(ckpt).is_file():
        raise ConfigError(f"{source}: field 'model.pretrained_checkpoint': file {ckpt} not found")


@app.command()
def validate(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config to check (default: the quickstart)")] = None,
    set_: SetOpt = None,
    show_default: ShowDefaultOpt = False,
) -> None:
    """Check a config (keys, values, model name, checkpoint file) without running anything."""
    if show_default:
        typer.echo(quickstart_text(), nl=False)
        return
    with user_errors():
        cfg = load_run_config(config, parse_sets(set_))
        check_runnable(cfg, config)
        p = cfg.prune
        Console().print(
            f"OK: {config or '<quickstart defaults>'}: '{cfg.name}': {cfg.model.name} on {cfg.data.name}, "
            f"{cfg.train.epochs} training epochs; {p.method} cascade to {', '.join(f'{r:g}' for r in p.keep_ratios)} "
            f"of the {p.target}, {cfg.retrain.epochs} retraining epochs per round",  # type: ignore[union-attr]
            highlight=False,
            soft_wrap=True,
        )
