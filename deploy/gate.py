"""The promotion gate: may a pruned candidate replace the champion?

A gate is an accuracy budget (points lost against the unpruned model) plus latency checks
on named targets: an absolute budget (`max_ms`) and/or a speed-up over the unpruned model
timed side by side in the same run (`min_speedup`, baseline metric / candidate metric at
the same batch size). `evaluate_gate` turns measurements into a `GateDecision`; a check
that cannot be evaluated (target down, backend missing, batch not measured) does not pass,
and its reason says why — an unmeasured target must never wave a model through.

Latency is noisy, so a gate must not decide on noise. Each latency check's verdict is
passed, failed or inconclusive: inconclusive when the measurement did not reach its
precision goal (export.latency: not converged) and its confidence interval straddles the
limit. The decision is passed only if every check passed, failed if any failed, otherwise
inconclusive; only passed promotes. Each check records its CI. Before deciding, the flow
re-times what `GateDecision.to_remeasure()` names, longer (export.latency.remeasure_longer),
and passes both attempts' results (their `attempt` field tells them apart): the latest
decides, every attempt is recorded on the check.

Pure Python on purpose: no MLflow or Prefect here, so the decision can be computed, tested
and shipped anywhere (flows.registry records it; flows.compress shows it as an artifact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

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


Verdict = Literal["passed", "failed", "inconclusive"]


class Attempt(BaseModel):
    """One measurement behind a latency check (a re-measurement is a second attempt)."""

    model_config = ConfigDict(extra="forbid")

    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    converged: bool | None = Field(None, description="None: the measurement did not say")
    max_time_s: float | None = None
    verdict: Verdict


class GateCheck(BaseModel):
    """One check of the gate: its verdict, the value against the limit, the value's CI
    (None for a side that is not known) and, for latency, every attempt at measuring it.

    `c["name"]`, `c["passed"]` and `c.get("value")` still work, for code written when checks
    were plain dicts.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    verdict: Verdict
    value: float | None = None
    limit: float
    reason: str = ""
    ci_low: float | None = None
    ci_high: float | None = None
    converged: bool | None = None
    target: str | None = Field(None, description="the latency target measured; None for accuracy")
    batch: int | None = None
    attempts: list[Attempt] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _verdict_from_passed(cls, data: Any) -> Any:
        # Decisions recorded before verdicts existed carry only `passed`.
        if isinstance(data, dict) and "passed" in data:
            data = dict(data)
            passed = bool(data.pop("passed"))
            data.setdefault("verdict", "passed" if passed else "failed")
            if (data["verdict"] == "passed") != passed:
                raise ValueError(f"check {data.get('name')!r} says passed={passed} but verdict {data['verdict']!r}")
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        """True only for verdict 'passed'."""
        return self.verdict == "passed"

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style read of a field (None-valued fields give None, as a dict would)."""
        return getattr(self, key, default)


class GateDecision(BaseModel):
    """The gate's verdict: passed only if every check passed; failed if any failed;
    otherwise, with some check inconclusive, inconclusive. Only 'passed' promotes.

    A pydantic model so that it crosses task boundaries as JSON (`to_dict`/`from_dict`).
    """

    model_config = ConfigDict(extra="forbid")

    passed: bool
    checks: list[GateCheck] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _passed_from_checks(cls, data: Any) -> Any:
        if isinstance(data, dict) and "passed" not in data:
            data = {**data, "passed": all(GateCheck.model_validate(c).passed if isinstance(c, dict) else c.passed
                                          for c in data.get("checks") or [])}
        return data

    @model_validator(mode="after")
    def _passed_agrees(self) -> "GateDecision":
        # `passed` drives promotion; it must never disagree with the checks it summarizes.
        if self.passed != all(c.passed for c in self.checks):
            raise ValueError(f"gate decision says passed={self.passed} but its checks say otherwise")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def verdict(self) -> Verdict:
        """passed, failed (some check failed) or inconclusive (none failed, some inconclusive)."""
        if any(c.verdict == "failed" for c in self.checks):
            return "failed"
        if any(c.verdict == "inconclusive" for c in self.checks):
            return "inconclusive"
        return "passed"

    @property
    def failed(self) -> list[GateCheck]:
        """The checks that failed."""
        return [c for c in self.checks if c.verdict == "failed"]

    @property
    def inconclusive(self) -> list[GateCheck]:
        """The checks whose measurement was too noisy to decide."""
        return [c for c in self.checks if c.verdict == "inconclusive"]

    def to_remeasure(self, max_attempts: int = 2) -> dict[str, list[int]]:
        """{target: batch sizes} of the inconclusive latency checks measured fewer than
        `max_attempts` times: what to re-time longer (export.latency.remeasure_longer) before
        deciding again. Empty when nothing would change the verdict."""
        out: dict[str, set[int]] = {}
        for c in self.inconclusive:
            if c.target is not None and c.batch is not None and len(c.attempts) < max_attempts:
                out.setdefault(c.target, set()).add(c.batch)
        return {t: sorted(b) for t, b in sorted(out.items())}

    def summary(self) -> str:
        """One line: the verdict and each failed or inconclusive check and why."""
        n = len(self.checks)
        if self.passed:
            return f"passed: all {n} check{'s' if n != 1 else ''} ({', '.join(c.name for c in self.checks)})"
        parts = []
        for word, checks in (("failed", self.failed), ("inconclusive", self.inconclusive)):
            if checks:
                reasons = "; ".join(f"{c.name}: {_one_line(c.reason)}" for c in checks)
                parts.append(f"{word} {len(checks)} of {n} checks: {reasons}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: passed, verdict, summary and the checks (each with its passed and verdict)."""
        return {**self.model_dump(mode="json"), "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GateDecision":
        """Inverse of to_dict (summary and verdict are recomputed, not trusted)."""
        return cls.model_validate({k: v for k, v in d.items() if k not in ("summary", "verdict")})

    def to_markdown(self) -> str:
        """A markdown table of the checks, headed by the verdict (for a Prefect artifact)."""
        ok = sum(c.passed for c in self.checks)
        lines = [
            f"**Promotion gate: {self.verdict.upper()}** ({ok} of {len(self.checks)} checks passed)",
            "",
            "| check | result | value | CI | limit | reason |",
            "|---|---|---|---|---|---|",
        ]
        shown = {"passed": "pass", "failed": "**FAIL**", "inconclusive": "**INCONCLUSIVE**"}
        for c in self.checks:
            lines.append("| " + " | ".join([
                _cell(c.name), shown[c.verdict], _cell(_num(c.value)), _cell(_ci(c.ci_low, c.ci_high)),
                _cell(_num(c.limit)), _cell(c.reason),
            ]) + " |")
        return "\n".join(lines) + "\n"


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _cell(text: str) -> str:
    # A '|' inside a cell would split the markdown table row.
    return _one_line(text).replace("|", "\\|")


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _ci(low: float | None, high: float | None) -> str:
    if low is None and high is None:
        return "-"
    return f"[{_num(low) if low is not None else '?'}, {_num(high) if high is not None else '?'}]"


def _check(name: str, passed: bool, value: float | None, limit: float, reason: str, **more: Any) -> GateCheck:
    return GateCheck(name=name, verdict="passed" if passed else "failed", value=value, limit=limit, reason=reason,
                     **more)


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _accuracy_check(gate: GateConfig, base_acc: float, acc: float) -> GateCheck:
    base, cand = _finite(base_acc), _finite(acc)
    if base is None or cand is None:
        return _check("accuracy_drop", False, None, gate.max_acc_drop,
                      f"accuracy not known (candidate {acc!r}, unpruned {base_acc!r})")
    drop = base - cand
    ok = drop <= gate.max_acc_drop + _EPS
    return _check("accuracy_drop", ok, drop, gate.max_acc_drop,
                  f"{cand:.2f}% vs {base:.2f}% unpruned: drop {drop:.2f} points "
                  f"{'<=' if ok else '>'} {gate.max_acc_drop:g}")


def _attempt_of(row: dict) -> int:
    a = _finite(row.get("attempt"))
    return int(a) if a is not None else 1


def _rows_at(rows: list[dict] | None, batch: int, what: str, target: str) -> tuple[list[dict], str | None]:
    """The results at `batch`, one per attempt in attempt order, or why there are none."""
    if not rows:
        return [], f"no {what} results on target {target!r}"
    at = [r for r in rows if _finite(r.get("batch")) == batch]
    if not at:
        measured = sorted({r.get("batch") for r in rows}, key=str)
        return [], f"no {what} result at batch {batch} on target {target!r} (measured: {measured})"
    attempts = sorted(_attempt_of(r) for r in at)
    if len(set(attempts)) < len(attempts):
        # Which one would be the candidate? Refuse to guess in a gate.
        return [], f"{len(at)} {what} results at batch {batch} on target {target!r}; expected one per attempt"
    return sorted(at, key=_attempt_of), None


@dataclass(frozen=True)
class _Timed:
    """One row's figure for a check: value, CI (None: side unknown), convergence."""

    value: float
    low: float | None
    high: float | None
    converged: bool | None
    ci_rel: float | None
    goal: float | None
    max_time_s: float | None
    attempt: int


def _timed(row: dict, metric: str) -> _Timed | None:
    value = _finite(row.get(f"{metric}_ms"))
    if value is None or value <= 0:
        return None
    low, high = _finite(row.get(f"{metric}_ci_low_ms")), _finite(row.get(f"{metric}_ci_high_ms"))
    ci_rel = _finite(row.get("ci_rel"))
    if low is None and high is None and metric == "p50" and ci_rel is not None:
        # Results written before the CI bounds were recorded: ci_rel is the CI's larger
        # distance from the median, so ±ci_rel around it contains the CI (never narrower).
        low, high = value * (1 - ci_rel), value * (1 + ci_rel)
    converged = row.get("converged")
    return _Timed(value, low, high, bool(converged) if converged is not None else None, ci_rel,
                  _finite(row.get("rel_ci_goal")), _finite(row.get("max_time_s")), _attempt_of(row))


def _judge(value: float, low: float | None, high: float | None, limit: float, converged: bool | None,
           at_most: bool) -> tuple[Verdict, str]:
    """The verdict on one measurement against `limit` (value <= limit if at_most, else >=), and
    what decided it beyond the comparison of the value itself ('' when that did)."""
    if at_most:
        all_pass = high is not None and high <= limit + _EPS
        all_fail = low is not None and low > limit + _EPS
    else:
        all_pass = low is not None and low >= limit - _EPS
        all_fail = high is not None and high < limit - _EPS
    # A CI wholly on one side of the limit decides even when it is wider than its goal: the
    # goal is about how precisely the value is known, and no more precision could move a
    # value the data already place (at the CI's confidence) on that side of the limit.
    if all_pass or all_fail:
        return ("passed" if all_pass else "failed"), ("" if converged is not False else "CI wholly on one side")
    if converged is False:
        return "inconclusive", "not converged and the CI straddles the limit"
    # Converged (the CI is within its goal), or convergence not reported (edge devices'
    # figures): the value decides, as a measurement precise enough to be believed.
    ok = value <= limit + _EPS if at_most else value >= limit - _EPS
    return ("passed" if ok else "failed"), ("" if converged else "convergence not reported")


def _noise(t: _Timed) -> str:
    """How far from its goal a measurement's precision got, e.g. '±4.3% vs ±2% goal'."""
    got = f"±{100 * t.ci_rel:.1f}%" if t.ci_rel is not None else "too few samples for a CI"
    return got + (f" vs ±{100 * t.goal:g}% goal" if t.goal is not None else "")


def _ci_text(low: float | None, high: float | None, unit: str) -> str:
    return f"CI [{_num(low) if low is not None else '?'}, {_num(high) if high is not None else '?'}]{unit}"


def _latency_check(name: str, limit: float, at_most: bool, metric: str, target: str, batch: int,
                   pairs: list[tuple[_Timed, _Timed | None]]) -> GateCheck:
    """A check over its attempts (oldest first; each a candidate figure and, for a speed-up,
    the baseline's): the latest attempt decides, the earlier ones are its history."""
    attempts, texts = [], []
    for cand, base in pairs:
        if base is None:
            value, low, high, unit = cand.value, cand.low, cand.high, " ms"
            converged = cand.converged
            shown = f"{metric} {value:.3g} ms"
        else:
            # The ratio's CI from the two CIs' far ends: conservative (it holds whenever both
            # do), and the only one available without the raw samples.
            value = base.value / cand.value
            low = base.low / cand.high if base.low is not None and cand.high else None
            high = base.high / cand.low if base.high is not None and cand.low else None
            unit = ""
            converged = None if base.converged is None or cand.converged is None else base.converged and cand.converged
            shown = f"{metric} {base.value:.3g} -> {cand.value:.3g} ms: {value:.2f}x"
        verdict, why = _judge(value, low, high, limit, converged, at_most)
        attempts.append(Attempt(value=value, ci_low=low, ci_high=high, converged=converged,
                                max_time_s=cand.max_time_s, verdict=verdict))
        rel = "<=" if at_most else ">="
        if verdict == "inconclusive":
            text = (f"inconclusive: {shown}, {_ci_text(low, high, unit)} straddles {limit:g}{unit}; not converged "
                    f"({'; '.join(_noise(t) for t in (cand, base) if t is not None and t.converged is False)})")
        else:
            ok = verdict == "passed"
            text = f"{shown} {rel if ok else {'<=': '>', '>=': '<'}[rel]} {limit:g}{'x' if base is not None else ' ms'}"
            if why == "CI wholly on one side":
                text += (f" (not converged, {'; '.join(_noise(t) for t in (cand, base) if t is not None and t.converged is False)}"
                         f", but its whole {_ci_text(low, high, unit)} is on that side)")
            elif why:
                text += f" ({why})"
        texts.append(text)
    last = attempts[-1]
    reason = texts[-1]
    if len(attempts) > 1:
        budget = pairs[-1][0].max_time_s
        reason = (f"attempt {len(attempts)}" + (f" (max {budget:g} s)" if budget is not None else "") + f": {reason}"
                  + "; earlier: " + "; ".join(f"attempt {i + 1}: {t}" for i, t in enumerate(texts[:-1])))
    return GateCheck(name=name, verdict=last.verdict, value=last.value, limit=limit, reason=reason,
                     ci_low=last.ci_low, ci_high=last.ci_high, converged=last.converged, target=target, batch=batch,
                     attempts=attempts)


def _latency_checks(c: LatencyCheck, latency: dict[str, list[dict]], baseline: dict[str, list[dict]],
                    errors: dict[str, str]) -> list[GateCheck]:
    prefix = f"{c.target}.b{c.batch}.{c.metric}"
    key = f"{c.metric}_ms"
    where = {"target": c.target, "batch": c.batch}
    wanted = []  # (name, limit) for each limit this check sets
    if c.max_ms is not None:
        wanted.append((f"{prefix}_ms", c.max_ms))
    if c.min_speedup is not None:
        wanted.append((f"{prefix}_speedup", c.min_speedup))

    def unmeasured(reason: str) -> list[GateCheck]:
        return [_check(name, False, None, limit, reason, **where) for name, limit in wanted]

    # An error means the target was not (fully) measured: whatever rows exist are not trusted.
    if c.target in errors:
        return unmeasured(f"target {c.target!r} not measured: {_one_line(errors[c.target])}")
    rows, why = _rows_at(latency.get(c.target), c.batch, "candidate", c.target)
    if not rows:
        return unmeasured(why or "")
    cands = [_timed(r, c.metric) for r in rows]
    for r, t in zip(rows, cands):
        if t is None:
            return unmeasured(f"candidate {key} on {c.target!r} at batch {c.batch} is {r.get(key)!r}"
                              + (f" (attempt {_attempt_of(r)})" if len(rows) > 1 else ""))
    cands_ok = [t for t in cands if t is not None]

    out = []
    if c.max_ms is not None:
        out.append(_latency_check(f"{prefix}_ms", c.max_ms, True, c.metric, c.target, c.batch,
                                  [(t, None) for t in cands_ok]))
    if c.min_speedup is not None:
        name = f"{prefix}_speedup"
        base_rows, why = _rows_at(baseline.get(c.target), c.batch, "baseline", c.target)
        bases = [_timed(r, c.metric) for r in base_rows]
        if not base_rows:
            out.append(_check(name, False, None, c.min_speedup, why or "", **where))
        elif any(b is None for b in bases):
            bad = next(r for r, b in zip(base_rows, bases) if b is None)
            out.append(_check(name, False, None, c.min_speedup,
                              f"baseline {key} on {c.target!r} at batch {c.batch} is {bad.get(key)!r}", **where))
        else:
            out.append(_latency_check(name, c.min_speedup, False, c.metric, c.target, c.batch,
                                      _pair_attempts(cands_ok, [b for b in bases if b is not None])))
    return out


def _pair_attempts(cands: list[_Timed], bases: list[_Timed]) -> list[tuple[_Timed, _Timed | None]]:
    """Candidate and baseline figures attempt by attempt; a side not re-measured in an attempt
    contributes its latest earlier one."""
    pairs = []
    for a in sorted({t.attempt for t in cands} | {t.attempt for t in bases}):
        cand = [t for t in cands if t.attempt <= a]
        base = [t for t in bases if t.attempt <= a]
        if cand and base:
            pairs.append((cand[-1], base[-1]))
    return pairs


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
    return GateDecision(passed=all(c.passed for c in checks), checks=checks)


__all__ = ["Attempt", "GateCheck", "GateConfig", "GateDecision", "LatencyCheck", "Verdict", "evaluate_gate"]
