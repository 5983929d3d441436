"""What a pipeline run tells its reader in the MLflow UI: metric names with units, the
params a round is compared by, and the parent run's markdown summary.

One naming scheme, units in the name, values rounded to what they mean:
`acc_pct`, `acc_change_pts`, `flops_removed_pct`, `latency_p50_ms.<target>.b<N>`,
`speedup.<target>.b<N>` (unpruned p50 / this model's p50, side by side in one run).
"""
from __future__ import annotations

from pydantic import BaseModel

from deploy.gate import GateDecision
from pfp.results import BaseInfo, RoundResult, change_of, score_of


class LatencyPoint(BaseModel):
    """One model's latency on one benchmark backend at one batch size."""

    target: str
    batch: int
    p50_ms: float
    p99_ms: float | None = None
    throughput_per_s: float | None = None
    speedup: float | None = None  # the unpruned model's p50 over this one's, measured side by side
    converged: bool | None = None


def gate_value(x: BaseInfo | RoundResult, base: BaseInfo | None = None) -> float:
    """What the gate's `max_acc_drop` check compares: the metric, negated when lower is better,
    so "drop" is always how much worse the candidate is, in the metric's units."""
    higher = (base or x).higher_is_better
    return score_of(x) if higher else -score_of(x)


def _r(value: float | int | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def base_metrics(base: BaseInfo) -> dict[str, float | None]:
    """The unpruned model's metrics, named as a round's so compare views line up."""
    return {"acc_pct": _r(base.acc, 2), "loss": _r(base.loss, 4), "flops": float(base.flops),
            "params": float(base.params), "flops_removed_pct": 0.0, "params_removed_pct": 0.0}


def round_metrics(r: RoundResult) -> dict[str, float | None]:
    """A round's metrics with units in their names (None: not measured, not logged); a task
    other than classification adds its own metrics under their names."""
    own = {k: _r(v, 4) for k, v in (r.metrics or {}).items() if k not in ("acc", "loss")}
    return own | {
        "acc_pct": _r(r.acc, 2), "acc_before_retrain_pct": _r(r.acc_before_retrain, 2),
        "acc_change_pts": _r(r.acc_change, 2), "loss": _r(r.loss, 4),
        "flops": None if r.flops is None else float(r.flops), "params": None if r.params is None else float(r.params),
        "flops_removed_pct": _r(r.flops_removed_pct, 1), "params_removed_pct": _r(r.params_removed_pct, 1),
        "preact_err_p95_max": _r(r.preact_err_p95_max, 4), "prune_s": _r(r.prune_seconds, 1),
        "retrain_s": _r(r.retrain_seconds, 1),
    }


def latency_metrics(points: list[LatencyPoint]) -> dict[str, float | None]:
    """`latency_p50_ms.<target>.b<N>`, `latency_p99_ms…`, `throughput_per_s…` and `speedup…`."""
    out: dict[str, float | None] = {}
    for p in points:
        key = f"{p.target}.b{p.batch}"
        out[f"latency_p50_ms.{key}"] = _r(p.p50_ms, 3)
        out[f"latency_p99_ms.{key}"] = _r(p.p99_ms, 3)
        out[f"throughput_per_s.{key}"] = _r(p.throughput_per_s, 1)
        out[f"speedup.{key}"] = _r(p.speedup, 3)
    return out


def round_params(prune: dict, keep_ratio: float) -> dict[str, str]:
    """What rounds are compared by: the method, the keep ratio, the target and the
    post-processing switches. `prune` is the config's prune section as a mapping."""
    from pfp.methods import get_method

    keys = ("method", "target", "allocation", "bn_recalibration", "reconstruct")
    resolved = dict(prune)
    try:  # None means the method's own default: show which
        method = get_method(prune["method"])
        if resolved.get("allocation") is None:
            resolved["allocation"] = method.allocation
        if resolved.get("reconstruct") is None:
            resolved["reconstruct"] = method.reconstruct
    except Exception:  # noqa: BLE001 - an unknown method was refused long before; show what was given
        pass
    params = {f"prune.{k}": str(resolved.get(k)) for k in keys if k in resolved}
    params["prune.keep_ratio"] = f"{keep_ratio:g}"
    return params


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def summary_markdown(
    title: str,
    base: BaseInfo,
    rounds: list[RoundResult],
    latency: dict[int, list[LatencyPoint]],
    chosen: int | None,
    decision: GateDecision | None,
    version: str | None,
    promoted: bool,
    tolerance: float,
) -> str:
    """The parent run's description: every round beside the unpruned model, the chosen
    round, the gate's verdict with each check's value and limit, and the registered version.

    `latency` maps a round number (0: unpruned) to its latency points.
    """
    columns = sorted({(p.target, p.batch) for points in latency.values() for p in points})
    m = "acc %" if base.metric == "acc" else base.metric
    head = ["round", "keep", m, f"Δ{m.split()[0]} (+ better)", "FLOPs removed", "params removed"]
    head += [f"{t} b{b} p50 ms (speed-up)" for t, b in columns]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def lat_cells(n: int) -> list[str]:
        by_key = {(p.target, p.batch): p for p in latency.get(n, [])}
        cells = []
        for key in columns:
            p = by_key.get(key)
            cells.append("–" if p is None else f"{p.p50_ms:.3g}" + (f" ({p.speedup:.2f}x)" if p.speedup else ""))
        return cells

    lines.append("| " + " | ".join(["0 (unpruned)", "100%", f"{score_of(base):.4g}", "", "0%", "0%"] + lat_cells(0)) + " |")
    for i, r in enumerate(rounds):
        n = r.round or i + 1
        mark = f"**{n}** ✓" if chosen == i else str(n)
        if r.error:
            lines.append("| " + " | ".join([mark, f"{r.keep_ratio:.0%}", f"error: {r.error}"] + [""] * (len(head) - 3)) + " |")
            continue
        lines.append("| " + " | ".join([
            mark, f"{r.keep_ratio:.0%}", _fmt(score_of(r), ".4g"), _fmt(change_of(r), "+.3g"),
            _fmt(r.flops_removed_pct, ".1f", "%"), _fmt(r.params_removed_pct, ".1f", "%")] + lat_cells(n)) + " |")
    lines.append("")
    if chosen is None:
        lines.append(f"**No round** stayed within the tolerance of {tolerance:g}; nothing was registered.")
    else:
        lines.append(f"**Chosen: round {rounds[chosen].round or chosen + 1}**, the most pruned round within "
                     f"{tolerance:g} of the unpruned {base.metric}.")
    if decision is not None:
        lines += ["", f"**Gate: {decision.verdict}**" + (" – promoted to champion" if promoted else " – not promoted"),
                  "", "| check | verdict | value | limit | why |", "|---|---|---|---|---|"]
        for c in decision.checks:
            ci = f" [{_fmt(c.ci_low, '.3g')}, {_fmt(c.ci_high, '.3g')}]" if c.ci_low is not None or c.ci_high is not None else ""
            lines.append(f"| {c.name} | {c.verdict} | {_fmt(c.value, '.4g')}{ci} | {c.limit:g} | {c.reason} |")
    if version is not None:
        lines += ["", f"Registered as version **{version}**."]
    return "\n".join(lines) + "\n"
