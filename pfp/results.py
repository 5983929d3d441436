"""Typed results that cross a step, task or process boundary on the model side.

Pydantic models, so a Prefect task can return them, persist them as results and validate
them on the way back in, and so MLflow logging reads attributes instead of string keys.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pfp.train import EpochStats
from pfp.errors import first_line


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class BaseInfo(_Result):
    """The trained base model and the calibration set S drawn for pruning it.

    `metric`/`score` are the task's own metric (classification: "acc", top-1 percent) and
    `higher_is_better` its direction; `metrics` the task's whole evaluation. `acc`/`loss`
    are set for classification only.
    """

    base_path: str
    run_dir: str
    acc: float | None = None
    loss: float | None = None
    task: str = "classification"
    metric: str = "acc"
    higher_is_better: bool = True
    score: float | None = None
    metrics: dict[str, float] = {}
    params: int
    flops: int
    trained_now: bool
    data_hash: str
    calib_hash: str | None = None
    calib_size: int
    holdout_size: int
    seconds: float = 0.0


class RoundResult(_Result):
    """One prune-retrain-evaluate round (or one comparison point).

    A round that pruning could not reach has `error` set and no measurements. `metric`,
    `score_before_retrain`, `score` (after retraining), `score_change` (signed so that
    positive is better, whatever the metric's direction) and `metrics` are the task's; the
    acc_* fields are set for classification only.
    """

    method: str
    target: str
    keep_ratio: float
    round: int | None = None
    achieved_keep: float | None = None
    params: int | None = None
    flops: int | None = None
    params_removed_pct: float | None = None
    flops_removed_pct: float | None = None
    acc_before_retrain: float | None = None
    acc: float | None = None
    loss: float | None = None
    acc_change: float | None = None
    metric: str | None = None
    score_before_retrain: float | None = None
    score: float | None = None
    score_change: float | None = None
    metrics: dict[str, float] = {}
    eps: float | None = None
    prune_seconds: float | None = None
    retrain_seconds: float | None = None
    seconds: float | None = None
    model_path: str | None = None
    report_path: str | None = None
    # measured first: the worst consumer's relative pre-activation error on held-out points
    preact_err_p95_max: float | None = None
    preact_eps99_max: float | None = None
    coverage_min: float | None = None
    coverage_mean: float | None = None
    task_seconds: float | None = None
    # a comparison point: the share of the target resource removed, and "plain" or "shared"
    # (with the post-processing every method may have)
    reduction: float | None = None
    postprocess: str | None = None
    reused: bool = False  # found finished on disk, not recomputed
    history: list[EpochStats] = []  # the retraining curve
    # prune.target latency: the one-shot model's p50 over the unpruned one's, timed side by side
    latency_measured_ratio: float | None = None
    latency_met: bool | None = None
    latency_message: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, method: str, target: str, keep_ratio: float, error: BaseException,
               round: int | None = None) -> "RoundResult":
        """The row of a round that raised: its first message line, no measurements."""
        first = first_line(error)
        return cls(method=method, target=target, keep_ratio=keep_ratio, round=round,
                   error=f"{type(error).__name__}: {first}")


# Rows written before tasks existed carry only `acc`; these read either kind.
def score_of(x: BaseInfo | RoundResult) -> float | None:
    """The task's metric (after retraining, for a round); classification: accuracy in percent."""
    return x.score if x.score is not None else x.acc


def score_before_retrain(r: RoundResult) -> float | None:
    """A round's metric before retraining."""
    return r.score_before_retrain if r.score_before_retrain is not None else r.acc_before_retrain


def change_of(r: RoundResult) -> float | None:
    """How much better than the unpruned model (negative: worse), in the metric's direction."""
    return r.score_change if r.score_change is not None else r.acc_change
