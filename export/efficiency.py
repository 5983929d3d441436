"""Speed-up efficiency: measured speed-up over the unpruned model divided by the ideal one.

The ideal speed-up of a pruned model is its FLOPs reduction (unpruned FLOPs / pruned
FLOPs). Latency ratios are only meaningful when both models are timed under the same
conditions, so `bench_side_by_side` interleaves them: in every round, for every batch size,
each model is measured in turn (the order rotating per round), and the per-round samples
are pooled. Slow drift of the machine (clocks, other load) then hits all models alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from export.backends import BuildSpec, ModelBundle, Runner, get_backend
from export.latency import LatencyResult, LatencySettings, measure, median_ci_rel
from export.machine import pin_cpu_threads
from pfp.plots import new_axes, save_figure


@dataclass
class Candidate:
    """One model to time: a label, its bundle and its FLOPs per sample."""

    label: str
    bundle: ModelBundle
    flops: int


def _round_settings(settings: LatencySettings, rounds: int) -> LatencySettings:
    """Each round gets its share of the time budget; warm-up repeats every round."""
    return settings.model_copy(update={
        "min_iters": max(5, settings.min_iters // rounds),
        "max_iters": max(5, settings.max_iters // rounds),
        "min_time_s": settings.min_time_s / rounds,
        "max_time_s": max(settings.max_time_s / rounds, settings.min_time_s / rounds),
    })


def bench_side_by_side(
    candidates: Sequence[Candidate],
    backends: Sequence[str],
    precisions: Sequence[str] = ("fp32",),
    batch_sizes: Sequence[int] = (1, 32),
    *,
    settings: LatencySettings | None = None,
    rounds: int = 3,
    calibration=None,
    workdir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[LatencyResult]:
    """Latency of every candidate on every (backend, precision, batch), interleaved.

    Each result's `model` field is the candidate's label.
    """
    settings = settings or LatencySettings()
    per_round = _round_settings(settings, max(1, rounds))
    runners: dict[tuple[str, str, str], Runner] = {}
    for c in candidates:
        for name in backends:
            backend = get_backend(name)
            backend.check_available()
            for precision in precisions:
                spec = BuildSpec(precision=precision, batch_sizes=batch_sizes, threads=settings.threads,
                                 calibration=calibration, workdir=workdir)
                runners[(c.label, name, precision)] = backend.load(c.bundle, spec)
    times: dict[tuple[str, str, str, int], list[float]] = {}
    converged: dict[tuple[str, str, str, int], bool] = {}
    labels = [c.label for c in candidates]
    for r in range(max(1, rounds)):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for (name, precision) in [(b, p) for b in backends for p in precisions]:
            for batch in batch_sizes:
                for label in order:
                    runner = runners[(label, name, precision)]
                    with pin_cpu_threads(settings.threads if runner.device == "cpu" else None):
                        step = runner.timed_step(int(batch))
                        ts, ok, _ = measure(step, batch=int(batch), timer=runner.timer,
                                            synchronize=runner.synchronize, settings=per_round)
                    key = (label, name, precision, int(batch))
                    times.setdefault(key, []).extend(ts)
                    converged[key] = converged.get(key, True) and ok
                    if progress:
                        progress(f"round {r + 1}/{rounds} {label} {name} {precision} batch {batch}")
    results = []
    for (label, name, precision, batch), ts in times.items():
        runner = runners[(label, name, precision)]
        ci = median_ci_rel(ts, settings.confidence)
        result = LatencyResult.from_times(
            ts, backend=name, device=runner.device, precision=precision, batch=batch, warmup=per_round.warmup,
            timer=runner.timer, threads=runner.threads or settings.threads,
            converged=ci is not None and ci <= settings.rel_ci, ci_rel=ci,
            input_shape=list(runner_input_shape(candidates, label)),
        )
        result.model = label
        results.append(result)
    for runner in runners.values():
        runner.close()
    return results


def runner_input_shape(candidates: Sequence[Candidate], label: str) -> tuple[int, ...]:
    return next(c.bundle.input_shape for c in candidates if c.label == label)


def efficiency_rows(results: Sequence[LatencyResult], flops: dict[str, int], baseline: str) -> list[dict]:
    """Per (model, backend, precision, batch): speed-up over `baseline`, ideal speed-up, efficiency."""
    base = {(r.backend, r.precision, r.batch): r for r in results if r.model == baseline}
    rows = []
    for r in results:
        if r.model == baseline or (r.backend, r.precision, r.batch) not in base:
            continue
        b = base[(r.backend, r.precision, r.batch)]
        ideal = flops[baseline] / flops[r.model]
        speedup = b.p50_ms / r.p50_ms
        rows.append({
            "model": r.model, "backend": r.backend, "precision": r.precision, "batch": r.batch,
            "flops": flops[r.model], "flops_removed": 1 - flops[r.model] / flops[baseline],
            "p50_ms": r.p50_ms, "baseline_p50_ms": b.p50_ms,
            "speedup": speedup, "ideal_speedup": ideal, "efficiency": speedup / ideal,
        })
    return rows


def efficiency_table(rows: Sequence[dict], title: str = "Speed-up efficiency (measured / ideal)"):
    """A rich Table of efficiency rows."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("model", "backend", "precision", "batch", "FLOPs removed", "p50 ms", "base p50 ms",
                "speed-up", "ideal", "efficiency"):
        t.add_column(col, justify="left" if col in ("model", "backend", "precision") else "right")
    for r in rows:
        t.add_row(r["model"], r["backend"], r["precision"], str(r["batch"]), f"{100 * r['flops_removed']:.0f}%",
                  f"{r['p50_ms']:.3f}", f"{r['baseline_p50_ms']:.3f}", f"{r['speedup']:.2f}x",
                  f"{r['ideal_speedup']:.2f}x", f"{r['efficiency']:.2f}")
    return t


def plot_efficiency(rows: Sequence[dict], path: str | Path) -> Path:
    """Measured vs ideal speed-up, one line per (backend, precision, batch), as a PNG."""
    fig, ax = new_axes()
    series: dict[str, list[dict]] = {}
    for r in rows:
        family = f"{r['family']} " if r.get("family") else ""  # e.g. one line per architecture
        series.setdefault(f"{family}{r['backend']} {r['precision']} batch {r['batch']}", []).append(r)
    top = 1.0
    for name, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["ideal_speedup"])
        ax.plot([r["ideal_speedup"] for r in rs], [r["speedup"] for r in rs], marker="o", label=name)
        top = max(top, *(r["ideal_speedup"] for r in rs), *(r["speedup"] for r in rs))
    ax.plot([1, top], [1, top], color="grey", linestyle="--", label="ideal (efficiency 1)")
    ax.set_xlabel("ideal speed-up (FLOPs ratio)")
    ax.set_ylabel("measured speed-up (p50)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, ax, path)
