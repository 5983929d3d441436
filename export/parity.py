"""Parity of an exported model against the PyTorch model it came from.

Both run on the same real inputs (the test set); the report gives the largest absolute
logit difference and the share of samples whose top-1 class agrees. Over tolerance is an
error (ParityError), never a warning: a deployable artifact that disagrees with the model
that was evaluated is not that model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from export.errors import ExportPackageError

# (max relative |diff|, min top-1 agreement). The difference is taken relative to each
# sample's largest |logit| (at least 1): untrained or BN-free nets have logits in the
# thousands, where float32 rounding alone exceeds any fixed absolute bound. Reduced
# precisions change logits by design; what must survive there is the decision.
DEFAULT_TOLERANCES: dict[str, tuple[float | None, float]] = {
    "fp32": (1e-4, 0.999),
    "fp16": (2e-2, 0.99),
    "int8": (None, 0.97),
}


class ParityError(ExportPackageError, ValueError):
    """The exported model's outputs differ from PyTorch's beyond tolerance."""


@dataclass
class ParityReport:
    """Side-by-side outputs of PyTorch and one backend on the same samples."""

    backend: str
    precision: str
    samples: int
    max_abs_diff: float
    max_rel_diff: float          # max over samples of |diff| / max(1, max |logit|)
    mean_abs_diff: float
    top1_agreement: float
    max_rel_tolerance: float | None
    min_top1_agreement: float

    @property
    def passed(self) -> bool:
        ok_abs = self.max_rel_tolerance is None or self.max_rel_diff <= self.max_rel_tolerance
        return ok_abs and self.top1_agreement >= self.min_top1_agreement

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        return (
            f"{self.backend} {self.precision}: max |diff| {self.max_abs_diff:.2e} "
            f"(relative {self.max_rel_diff:.1e}), "
            f"top-1 agreement {100 * self.top1_agreement:.2f}% on {self.samples} samples"
        )


def tolerances(precision: str, max_rel: float | None = None, min_top1: float | None = None) -> tuple[float | None, float]:
    """(max relative diff, min top-1 agreement) for `precision`, with explicit overrides."""
    default_rel, default_top1 = DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])
    return (max_rel if max_rel is not None else default_rel, min_top1 if min_top1 is not None else default_top1)


def batch_differences(out: np.ndarray, ref: np.ndarray) -> tuple[float, float, float, int]:
    """(max |diff|, max |diff| relative to each sample's largest |logit| (at least 1), mean
    |diff|, samples whose top-1 class agrees) of one batch of logits against the reference."""
    diff = np.abs(out - ref)
    scale = np.maximum(1.0, np.abs(ref).max(axis=1, keepdims=True))
    return (float(diff.max()), float((diff / scale).max()), float(diff.mean()),
            int((out.argmax(1) == ref.argmax(1)).sum()))


def compare_outputs(
    model: nn.Module,
    run: Callable[[np.ndarray], np.ndarray],
    batches: Iterable[torch.Tensor],
    *,
    backend: str,
    precision: str = "fp32",
    max_rel: float | None = None,
    min_top1: float | None = None,
    limit: int | None = None,
) -> ParityReport:
    """Run `model` (PyTorch, CPU) and `run` (the backend) on `batches` and compare.

    `batches` yields input tensors (N, C, H, W); at most `limit` samples are used.
    """
    model = model.eval().cpu()
    tol_rel, tol_top1 = tolerances(precision, max_rel, min_top1)
    n = agree = 0
    max_diff = max_rel_diff = sum_diff = 0.0
    for x in batches:
        if limit is not None and n >= limit:
            break
        if limit is not None:
            x = x[: limit - n]
        x = x.float().cpu()
        with torch.no_grad():
            ref = model(x).numpy()
        out = np.asarray(run(np.ascontiguousarray(x.numpy())), dtype=np.float32)
        if out.shape != ref.shape:
            raise ParityError(f"{backend}: output shape {list(out.shape)} differs from PyTorch's {list(ref.shape)}")
        b_max, b_rel, b_mean, b_agree = batch_differences(out, ref)
        max_diff, max_rel_diff = max(max_diff, b_max), max(max_rel_diff, b_rel)
        sum_diff += b_mean * len(x)
        agree += b_agree
        n += len(x)
    if n == 0:
        raise ParityError(f"{backend}: no samples to compare")
    return ParityReport(
        backend=backend, precision=precision, samples=n,
        max_abs_diff=max_diff, max_rel_diff=max_rel_diff, mean_abs_diff=sum_diff / n, top1_agreement=agree / n,
        max_rel_tolerance=tol_rel, min_top1_agreement=tol_top1,
    )


def require_parity(report: ParityReport, artifact: str | Path) -> ParityReport:
    """`report` if it passed, else ParityError naming the artifact and what was off."""
    if report.passed:
        return report
    problems = []
    if report.max_rel_tolerance is not None and report.max_rel_diff > report.max_rel_tolerance:
        problems.append(
            f"max |diff| {report.max_abs_diff:.3g}, relative to the largest |logit| "
            f"{report.max_rel_diff:.3g} > {report.max_rel_tolerance:.3g}"
        )
    if report.top1_agreement < report.min_top1_agreement:
        problems.append(
            f"top-1 agreement {100 * report.top1_agreement:.2f}% < {100 * report.min_top1_agreement:.2f}%"
        )
    raise ParityError(
        f"{artifact}: {report.backend} {report.precision} output differs from PyTorch on "
        f"{report.samples} samples: {'; '.join(problems)}"
    )
