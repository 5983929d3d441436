"""One prune-retrain-evaluate round, resumable: the step both the cascade and the comparison repeat.

`run_round` prunes a parent model (a round's saved model, or the base model) to a share of
the ORIGINAL network's resource, retrains it with cfg.retrain, evaluates it and saves it:

    <out>/model.pt       the pruned, retrained model; its meta holds the round's row, the
                         PruneReport and the step key (the round's inputs, hashed)
    <out>/report.json    the PruneReport
    <out>/retrain.ckpt   resumable retraining checkpoint (only while the round runs)

A round whose model.pt carries the same step key is reused, not recomputed; an interrupted
retraining resumes from retrain.ckpt.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pfp.config import ConfigError, PruneConfig, RunConfig, TrainConfig
from pfp.extensions import LATENCY_PRUNER, lookup
from pfp.files import stable_hash
from pfp.models import build_model
from pfp.prune import prune
from pfp.resources import count_flops, count_params, format_count
from pfp.results import RoundResult
from pfp.serialization import CheckpointError, load_model, save_model
from pfp.setup import DATA_RUNTIME_FIELDS, Setup, hash_view
from pfp.tasks import check_metrics, is_classification
from pfp.train import claim_checkpoint, drop_checkpoint, evaluate, seed_everything, switch_enabled, train

__all__ = ["RoundSpec", "run_round", "step_key"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundSpec:
    """What one round does: prune with `prune` to `keep_ratio` of the original resource, retrain
    with seed `seed`, save in `out`. `chain` lists the keep ratios from the base model to this
    round (the parent's history, part of the step key)."""

    prune: PruneConfig
    keep_ratio: float
    chain: tuple[float, ...]
    seed: int
    out: Path
    round: int | None = None  # the cascade round (1-based); None for a comparison point
    label: str = ""  # how the log names the round

    @classmethod
    def cascade(cls, cfg: RunConfig, index: int, run_dir: Path) -> "RoundSpec":
        """Cascade round `index` (0-based) of cfg.prune.keep_ratios, saved in run_dir/round_<index+1>."""
        pc = cfg.prune
        if not 0 <= index < len(pc.keep_ratios):
            raise ConfigError(f"prune.keep_ratios: no round {index + 1} (the schedule has {len(pc.keep_ratios)})")
        return cls(prune=pc, keep_ratio=pc.keep_ratios[index], chain=tuple(pc.keep_ratios[: index + 1]),
                   seed=cfg.seed + index, out=run_dir / f"round_{index + 1}", round=index + 1,
                   label=f"round {index + 1}/{len(pc.keep_ratios)}")


def step_key(setup: Setup, spec: RoundSpec) -> str:
    """Identity of a round's inputs: base model, pruning and retraining settings, chain, seed, data."""
    cfg = setup.cfg
    return stable_hash(
        {
            "base": setup.base_key,
            "prune": spec.prune.model_dump(exclude={"keep_ratios", "tolerance"}),
            "retrain": cfg.retrain.model_dump() if cfg.retrain else None,
            "chain": list(spec.chain),
            "seed": spec.seed,
            "data": hash_view(cfg.data, DATA_RUNTIME_FIELDS),
        }
    )


def _pct_removed(value: float, original: float) -> float:
    return 100.0 * (1.0 - value / original) if original else 0.0


def _measured(report: dict) -> dict:
    """The report's measurements a round's row carries: worst consumer's error on held-out
    points and the coverage of the kept channels."""
    measured = report.get("guarantee") or []
    coverage = [layer["coverage"] for layer in report.get("layers", []) if layer.get("coverage") is not None]
    return {
        "preact_err_p95_max": max((m["rel_p95"] for m in measured), default=None),
        "preact_eps99_max": max((m["eps99"] for m in measured), default=None),
        "coverage_min": min(coverage) if coverage else None,
        "coverage_mean": sum(coverage) / len(coverage) if coverage else None,
    }


def _finished(spec: RoundSpec, key: str) -> RoundResult | None:
    """The round saved in spec.out by an earlier run with the same step key, if any."""
    model_path, report_path = spec.out / "model.pt", spec.out / "report.json"
    if not model_path.exists():
        return None
    try:
        _, info = load_model(model_path, build_model)
    except CheckpointError as e:
        log.warning("%s; recomputing", e)
        return None
    meta = info["meta"]
    if meta.get("hash") != key or not isinstance(meta.get("row"), dict):
        return None
    drop_checkpoint(spec.out / "retrain.ckpt")  # left behind when a run stopped right after saving
    row = {k: v for k, v in meta["row"].items() if k in RoundResult.model_fields}
    return RoundResult.model_validate(
        row | _measured(meta.get("report") or {}) | {
            "round": spec.round, "model_path": str(model_path), "report_path": str(report_path), "reused": True}
    )


def run_round(setup: Setup, spec: RoundSpec, parent: str | Path | None = None, *, progress: bool = True) -> RoundResult:
    """Prune `parent` (a saved model file; None: the base model's weights) as `spec` says,
    retrain with cfg.retrain, evaluate on the test set, save in spec.out.

    A round finished earlier with the same inputs is reused (`reused=True`). PruneError
    propagates. `progress`: retraining progress bars.
    """
    key = step_key(setup, spec)
    done = _finished(spec, key)
    if done is not None:
        log.info("%s: done in an earlier run, reusing %s", spec.label, done.model_path)
        return done

    cfg, device, pc, keep_ratio = setup.cfg, setup.device, spec.prune, spec.keep_ratio
    if parent is None:
        setup.model.load_state_dict(setup.base_state())  # every point starts from the same weights
        model = setup.model
    else:
        model, _ = load_model(parent, build_model)
        model.to(device)
    model_path, report_path = spec.out / "model.pt", spec.out / "report.json"
    target_value = keep_ratio * (setup.flops if pc.target == "flops" else setup.params)
    log.info("%s: %s: keep %.0f%% of the original %s (%s)", spec.label, pc.method, 100 * keep_ratio, pc.target,
             format_count(target_value))
    seed_everything(spec.seed)
    start = time.perf_counter()
    target_report = None
    if pc.target == "latency":  # measured on the backend: the table and the timing come from export
        pruner = lookup(LATENCY_PRUNER, "prune.target latency")
        pruned, report, target_report = pruner(setup, model, pc, keep_ratio, seed=spec.seed,
                                               divergence=setup.task.divergence)
        soft = None
    else:
        pruned, report, soft = prune(
            model, setup.calib_loader, pc, keep_ratio, example_input=setup.example_input,
            reference=(setup.params, setup.flops), holdout_loader=setup.holdout_loader,
            postprocess_loader=setup.postprocess_loader, device=device, seed=spec.seed,
            divergence=setup.task.divergence,
        )  # fmt: skip
    prune_seconds = time.perf_counter() - start
    pruned.to(device)
    rcfg: TrainConfig = cfg.retrain  # type: ignore[assignment]  # RunConfig fills it from train
    amp = switch_enabled(rcfg.amp, device)
    task = setup.task
    before = evaluate(pruned, setup.test_loader, device, amp=amp, task=task)
    eps = getattr(report, "eps", None)
    eps = eps if isinstance(eps, (int, float)) else None
    log.info("pruned in %.1fs%s: %s params, %s FLOPs; test %s before retraining %.4g", prune_seconds,
             f" (eps {eps:.3g})" if eps is not None else "", format_count(report.params), format_count(report.flops),
             task.metric, check_metrics(task, before))

    # Same data order for every step with this seed, whatever ran before it in this process.
    gen = getattr(setup.train_loader, "generator", None)
    if gen is not None:
        gen.manual_seed(spec.seed)
    seed_everything(spec.seed)
    spec.out.mkdir(parents=True, exist_ok=True)
    ckpt = claim_checkpoint(spec.out / "retrain.ckpt", key)
    callbacks = [soft.callback] if soft is not None else []
    log.info("retraining %d epoch%s%s", rcfg.epochs, "" if rcfg.epochs == 1 else "s",
             "  (resuming from retrain.ckpt)" if ckpt.exists() else "")
    start = time.perf_counter()
    try:
        trained = train(pruned, setup.train_loader, setup.test_loader, rcfg, device, epoch_callbacks=callbacks,
                        checkpoint_path=ckpt, resume=True, progress=progress, task=task)
    except CheckpointError as e:  # e.g. the re-pruned network has other channel counts than the checkpoint
        log.warning("%s; retraining from the start", e)
        drop_checkpoint(ckpt)
        ckpt = claim_checkpoint(spec.out / "retrain.ckpt", key)
        trained = train(pruned, setup.train_loader, setup.test_loader, rcfg, device, epoch_callbacks=callbacks,
                        checkpoint_path=ckpt, resume=False, progress=progress, task=task)
    if soft is not None:
        pruned, report = soft.finalize(pruned)
        pruned.to(device)
    retrain_seconds = time.perf_counter() - start
    after = evaluate(pruned, setup.test_loader, device, amp=amp, task=task)
    score_before, score = check_metrics(task, before), check_metrics(task, after)
    acc = {"acc_before_retrain": before["acc"], "acc": after["acc"], "loss": after["loss"],
           "acc_change": after["acc"] - setup.acc} if is_classification(task) else {"loss": after.get("loss")}

    params, flops = count_params(pruned), count_flops(pruned, setup.example_input)
    report_dict = report.to_dict()
    result = RoundResult(
        method=pc.method, target=pc.target, keep_ratio=keep_ratio, round=spec.round,
        achieved_keep=(target_report.best_ratio if target_report is not None else
                       (flops / setup.flops) if pc.target == "flops" else (params / setup.params)),
        params=params, flops=flops, params_removed_pct=_pct_removed(params, setup.params),
        flops_removed_pct=_pct_removed(flops, setup.flops), **acc, metric=task.metric,
        score_before_retrain=score_before, score=score, score_change=task.change(score, setup.score), metrics=after,
        eps=eps, prune_seconds=prune_seconds,
        retrain_seconds=retrain_seconds, seconds=prune_seconds + retrain_seconds, model_path=str(model_path),
        report_path=str(report_path), history=list(trained.history),
        **_measured(report_dict),
        **({} if target_report is None else {
            "latency_measured_ratio": target_report.best_ratio, "latency_met": target_report.met,
            "latency_message": target_report.message}),
    )  # fmt: skip
    report.save_json(report_path)
    # The model file is written last: with its step key it marks the round finished.
    save_model(model_path, pruned, setup.spec,
               meta={"row": result.model_dump(mode="json"), "report": report_dict, "hash": key,
                     "input_shape": list(setup.example_input.shape[1:])})  # export reads it for any model
    drop_checkpoint(ckpt)
    log.info("test %s after retraining %.4g (change %+.4g, positive is better), FLOPs -%.1f%%, params -%.1f%% (%.0fs)", task.metric,
             score, result.score_change, result.flops_removed_pct, result.params_removed_pct, result.seconds)
    return result
