"""The promotion gate: may a pruned candidate replace the champion?

A gate is an accuracy budget (points lost against the unpruned model) plus latency checks
on named targets: an absolute budget (`max_ms`) and/or a speed-up over the unpruned model
timed side by side in the same run (`min_speedup`, baseline metric / candidate metric at
the same batch size). `evaluate_gate` turns measurements into a `GateDecision`; a check
that cannot be evaluated (target down, backend missing, batch not measured) does not pass,
and its reason says why — an unmeasured target must never wave a model through.

Pure Python on purpose: no MLflow or Prefect here, so the decision can be computed, tested
and shipped anywhere (flows.registry records it; flows.compress shows it as an artifact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Tolerance when comparing against a limit, so 0.1 + 0.2 <= 0.3 style noise never flips a check.
_EPS = 1e-9


class LatencyCheck(BaseModel):
    """One latency requirement for the candidate on one target at one batch size."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1, description="a target name (flows.config TargetConfig.name)")
    batch: int = Field(1, ge=1)
    metric: Literal["p50", "p99"] = "p50"
    max_ms: float | None = Field(None, gt=0, allow_inf_nan=False, description="candidate's metric must be <= this")
    min_speedup: float | None = Field(None, gt=0, allow_inf_nan=False,
                                      description="baseline metric / candidate metric must be >= this")

    @model_validator(mode="after")
    def _has_a_limit(self) -> "LatencyCheck":
        # A check without a limit would always pass silently; refuse it at config time.
        if self.max_ms is None and self.min_speedup is None:
            raise ValueError(f"latency check on target {self.target!r} sets neither max_ms nor min_speedup; "
                             "set max_ms, min_speedup or both")
        return self


class GateConfig(BaseModel):
    """The gate: an accuracy budget plus any number of latency checks."""

    model_config = ConfigDict(extra="forbid")

    max_acc_drop: float = Field(1.0, ge=0, allow_inf_nan=False,
                                description="accuracy points the candidate may lose against the unpruned model")
    latency: list[LatencyCheck] = Field(default_factory=list)


@dataclass
class GateDecision:
    """The gate's verdict: passed only if every check passed.

    `checks` holds plain dicts {name, passed, value, limit, reason} so the decision crosses
    task boundaries and lands in tags and JSON as is.
    """

    passed: bool
    checks: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # `passed` drives promotion; it must never disagree with the checks it summarizes.
        if bool(self.passed) != all(c["passed"] for c in self.checks):
            raise ValueError(f"gate decision says passed={self.passed} but its checks say otherwise")
        self.passed = bool(self.passed)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The checks that did not pass."""
        return [c for c in self.checks if not c["passed"]]

    def summary(self) -> str:
        """One line: the verdict and, when failed, each failed check and why."""
        n = len(self.checks)
        if self.passed:
            return f"passed: all {n} check{'s' if n != 1 else ''} ({', '.join(c['name'] for c in self.checks)})"
        reasons = "; ".join(f"{c['name']}: {_one_line(c.get('reason'))}" for c in self.failed)
        return f"failed {len(self.failed)} of {n} checks: {reasons}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: passed, summary and the checks."""
        return {"passed": self.passed, "summary": self.summary(), "checks": [dict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GateDecision":
        """Inverse of to_dict (the summary is recomputed, not trusted)."""
        return cls(passed=bool(d["passed"]), checks=[dict(c) for c in d["checks"]])

    def to_markdown(self) -> str:
        """A markdown table of the checks, headed by the verdict (for a Prefect artifact)."""
        verdict = "PASSED" if self.passed else "FAILED"
        ok = sum(c["passed"] for c in self.checks)
        lines = [
            f"**Promotion gate: {verdict}** ({ok} of {len(self.checks)} checks passed)",
            "",
            "| check | result | value | limit | reason |",
            "|---|---|---|---|---|",
        ]
        for c in self.checks:
            lines.append("| " + " | ".join([
                _cell(c["name"]), "pass" if c["passed"] else "**FAIL**", _cell(_num(c.get("value"))),
                _cell(_num(c.get("limit"))), _cell(c.get("reason") or ""),
            ]) + " |")
        return "\n".join(lines) + "\n"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _cell(text: str) -> str:
    # A '|' inside a cell would split the markdown table row.
    return _one_line(text).replace("|", "\\|")


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _check(name: str, passed: bool, value: float | None, limit: float, reason: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "value": value, "limit": limit, "reason": reason}


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _accuracy_check(gate: GateConfig, base_acc: float, acc: float) -> dict[str, Any]:
    base, cand = _finite(base_acc), _finite(acc)
    if base is None or cand is None:
        return _check("accuracy_drop", False, None, gate.max_acc_drop,
                      f"accuracy not known (candidate {acc!r}, unpruned {base_acc!r})")
    drop = base - cand
    ok = drop <= gate.max_acc_drop + _EPS
    return _check("accuracy_drop", ok, drop, gate.max_acc_drop,
                  f"{cand:.2f}% vs {base:.2f}% unpruned: drop {drop:.2f} points "
                  f"{'<=' if ok else '>'} {gate.max_acc_drop:g}")


def _row_at(rows: list[dict] | None, batch: int, what: str, target: str) -> tuple[dict | None, str | None]:
    """The one result at `batch`, or why there is none."""
    if not rows:
        return None, f"no {what} results on target {target!r}"
    at = [r for r in rows if _finite(r.get("batch")) == batch]
    if not at:
        measured = sorted({r.get("batch") for r in rows}, key=str)
        return None, f"no {what} result at batch {batch} on target {target!r} (measured: {measured})"
    if len(at) > 1:
        # Which one would be the candidate? Refuse to guess in a gate.
        return None, f"{len(at)} {what} results at batch {batch} on target {target!r}; expected one"
    return at[0], None


def _latency_checks(c: LatencyCheck, latency: dict[str, list[dict]], baseline: dict[str, list[dict]],
                    errors: dict[str, str]) -> list[dict[str, Any]]:
    prefix = f"{c.target}.b{c.batch}.{c.metric}"
    key = f"{c.metric}_ms"
    wanted = []  # (name, limit) for each limit this check sets
    if c.max_ms is not None:
        wanted.append((f"{prefix}_ms", c.max_ms))
    if c.min_speedup is not None:
        wanted.append((f"{prefix}_speedup", c.min_speedup))

    def unmeasured(reason: str) -> list[dict[str, Any]]:
        return [_check(name, False, None, limit, reason) for name, limit in wanted]

    # An error means the target was not (fully) measured: whatever rows exist are not trusted.
    if c.target in errors:
        return unmeasured(f"target {c.target!r} not measured: {_one_line(errors[c.target])}")
    row, why = _row_at(latency.get(c.target), c.batch, "candidate", c.target)
    if row is None:
        return unmeasured(why or "")
    cand = _finite(row.get(key))
    if cand is None or cand <= 0:
        return unmeasured(f"candidate {key} on {c.target!r} at batch {c.batch} is {row.get(key)!r}")

    out = []
    if c.max_ms is not None:
        ok = cand <= c.max_ms + _EPS
        out.append(_check(f"{prefix}_ms", ok, cand, c.max_ms,
                          f"{c.metric} {cand:.3g} ms {'<=' if ok else '>'} {c.max_ms:g} ms"))
    if c.min_speedup is not None:
        name = f"{prefix}_speedup"
        base_row, why = _row_at(baseline.get(c.target), c.batch, "baseline", c.target)
        base = _finite(base_row.get(key)) if base_row is not None else None
        if base_row is None:
            out.append(_check(name, False, None, c.min_speedup, why or ""))
        elif base is None:
            out.append(_check(name, False, None, c.min_speedup,
                              f"baseline {key} on {c.target!r} at batch {c.batch} is {base_row.get(key)!r}"))
        else:
            speedup = base / cand
            ok = speedup >= c.min_speedup - _EPS
            out.append(_check(name, ok, speedup, c.min_speedup,
                              f"{c.metric} {base:.3g} -> {cand:.3g} ms: {speedup:.2f}x "
                              f"{'>=' if ok else '<'} {c.min_speedup:g}x"))
    return out


def evaluate_gate(
    gate: GateConfig,
    *,
    base_acc: float,
    acc: float,
    latency: dict[str, list[dict]],
    baseline_latency: dict[str, list[dict]],
    errors: dict[str, str] | None = None,
) -> GateDecision:
    """Check a candidate against the gate.

    `latency[target]`: the candidate's results on that target (dicts with at least batch,
    p50_ms, p99_ms, as dataclasses.asdict(LatencyResult) gives); `baseline_latency`: the
    unpruned model's, from the same run; `errors[target]`: why a target was not measured.
    Accuracies are in percent; the drop is base_acc - acc in points.
    """
    errors = errors or {}
    checks = [_accuracy_check(gate, base_acc, acc)]
    for c in gate.latency:
        checks.extend(_latency_checks(c, latency, baseline_latency, errors))
    return GateDecision(passed=all(c["passed"] for c in checks), checks=checks)


__all__ = ["GateConfig", "GateDecision", "LatencyCheck", "evaluate_gate"]
