"""Load-test figures: per-level summary against the targets, server metrics, table, and the PNG plot.

`summarize(results, ...)` turns one load level's `SessionResult`s and two scrapes of
the server's `/metrics` (before and after) into a flat dict of figures; a session
counts toward `goodput` when it met every target in `Targets`. `table` renders
summaries for people, `plot` draws latency and jitter over time per level. This
module knows nothing about sockets or how sessions are paced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from .session import SessionResult

TICK_HISTOGRAM = "microturn_tick_seconds"
MISSED_TICKS = "microturn_missed_ticks_total"
SERVER_UNDERRUNS = "microturn_underruns_total"
SESSIONS_TOTAL = "microturn_sessions_total"
PLOT_BIN_S = 1.0  # time bin of the jitter and lateness curves


@dataclass(frozen=True)
class Targets:
    """What one session must meet to count toward goodput."""

    first_audio_ms: float = 1000.0  # connect -> first output chunk
    jitter_ms_p99: float = 200.0  # inter-arrival deviation from 200 ms, per session p99 (= the cushion)
    max_underruns: int = 0  # chunks later than the client's playback cushion
    max_missed_seq: int = 0  # skipped or duplicated micro-turns


def percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {sample name with sorted labels: value}."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def histogram_quantile(
    before: dict[str, float], after: dict[str, float], name: str, q: float
) -> float | None:
    """Quantile (seconds) of a histogram's observations between two scrapes, as Prometheus computes it."""
    buckets = []
    for key, value in after.items():
        if key.startswith(f"{name}_bucket{{le="):
            bound = float(key[len(name) + 11 : -1])
            buckets.append((bound, value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if np.isinf(bound):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


def meets_targets(r: SessionResult, targets: Targets) -> bool:
    if r.refused or r.closed_early or r.errors or r.first_audio_ms is None or r.tasks_failed:
        return False
    jitter = percentile(r.jitter_ms, 99) or 0.0
    return (
        r.first_audio_ms <= targets.first_audio_ms
        and jitter <= targets.jitter_ms_p99
        and r.underruns <= targets.max_underruns
        and r.missed_seq + r.duplicate_seq <= targets.max_missed_seq
    )


def summarize(
    results: Sequence[SessionResult],
    duration_s: float,
    before: dict[str, float],
    after: dict[str, float],
    targets: Targets,
) -> dict:
    first = [r.first_audio_ms for r in results if r.first_audio_ms is not None]
    jitter = [j for r in results for j in r.jitter_ms]
    tasks = [t for r in results for t in r.task_latency_ms]
    lag = [x for r in results for x in r.send_lag_ms]
    tick_ms = {q: histogram_quantile(before, after, TICK_HISTOGRAM, q / 100) for q in (50, 99)}

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    return {
        "sessions": len(results),
        "duration_s": duration_s,
        "admitted": sum(r.refused is None for r in results),
        "refused": sum(r.refused is not None for r in results),
        "chunks": sum(r.chunks for r in results),
        "first_audio_ms_p50": percentile(first, 50),
        "first_audio_ms_p95": percentile(first, 95),
        "first_audio_ms_p99": percentile(first, 99),
        "jitter_ms_p50": percentile(jitter, 50),
        "jitter_ms_p95": percentile(jitter, 95),
        "jitter_ms_p99": percentile(jitter, 99),
        "underruns": sum(r.underruns for r in results),
        "missed_seq": sum(r.missed_seq for r in results),
        "duplicate_seq": sum(r.duplicate_seq for r in results),
        "task_latency_ms_p50": percentile(tasks, 50),
        "task_latency_ms_p95": percentile(tasks, 95),
        "task_latency_ms_p99": percentile(tasks, 99),
        "tasks_done": len(tasks),
        "tasks_failed": sum(r.tasks_failed for r in results),
        "tasks_supported": not any(r.tasks_unsupported for r in results),
        "errors": sum(len(r.errors) for r in results),
        "client_send_lag_ms_p99": percentile(lag, 99),
        "server_tick_ms_p50": None if tick_ms[50] is None else round(tick_ms[50] * 1000, 2),
        "server_tick_ms_p99": None if tick_ms[99] is None else round(tick_ms[99] * 1000, 2),
        "server_ticks": delta(f"{TICK_HISTOGRAM}_count"),
        "server_missed_ticks": delta(MISSED_TICKS),
        "server_input_underruns": delta(SERVER_UNDERRUNS),
        "server_sessions": delta(SESSIONS_TOTAL),
        "goodput": round(sum(meets_targets(r, targets) for r in results) / max(1, len(results)), 4),
        # sessions per replica that served them (several behind a load balancer; then the server_*
        # figures are of whichever replica answered the /metrics scrape)
        "replicas": dict(sorted(Counter(r.replica or "?" for r in results if r.refused is None).items())),
    }


TABLE_ROWS = (
    ("first audio ms", "first_audio_ms"),
    ("jitter ms", "jitter_ms"),
    ("task latency ms", "task_latency_ms"),
)


def table(summaries: Sequence[dict]) -> str:
    """A text table: one block per load level, p50/p95/p99 of the latency figures and the counts."""
    lines = []
    for s in summaries:
        lines.append(
            f"load level: {s['sessions']} sessions x {s['duration_s']:g} s  (goodput {s['goodput']:.2%})"
        )
        lines.append(f"  {'':<18}{'p50':>10}{'p95':>10}{'p99':>10}")
        for label, key in TABLE_ROWS:
            cells = "".join(f"{_cell(s[f'{key}_p{q}']):>10}" for q in (50, 95, 99))
            lines.append(f"  {label:<18}{cells}")
        lines.append(
            f"  {'server tick ms':<18}{_cell(s['server_tick_ms_p50']):>10}{'':>10}"
            f"{_cell(s['server_tick_ms_p99']):>10}"
        )
        counts = (
            "admitted",
            "refused",
            "chunks",
            "underruns",
            "missed_seq",
            "duplicate_seq",
            "tasks_done",
            "tasks_failed",
            "errors",
            "server_missed_ticks",
            "client_send_lag_ms_p99",
        )
        lines.append("  " + "  ".join(f"{k}={_cell(s[k])}" for k in counts))
        if s.get("replicas"):
            lines.append("  served by: " + "  ".join(f"{name}={n}" for name, n in s["replicas"].items()))
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _binned(times: np.ndarray, values: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    bins = np.floor(times / PLOT_BIN_S).astype(int)
    keys = np.unique(bins)
    return keys * PLOT_BIN_S, np.array([np.percentile(values[bins == k], q) for k in keys])


def plot(levels: Sequence[tuple[dict, Sequence[SessionResult]]], path: str) -> None:
    """Per load level: first-audio latency per session, chunk lateness p99 and jitter p99 over time."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for summary, results in levels:
        label = f"{summary['sessions']} sessions"
        starts = [r.start_s for r in results if r.first_audio_ms is not None]
        firsts = [r.first_audio_ms for r in results if r.first_audio_ms is not None]
        (line,) = axes[0].plot(starts, firsts, "o", ms=4, label=label)
        times = np.array([t for r in results for t in r.arrivals])
        if times.size:
            late = np.array([x for r in results for x in r.lateness_ms])
            axes[1].plot(*_binned(times, late, 99), color=line.get_color(), label=label)
        jitter_times = np.array(
            [t for r in results for t in r.arrivals[1:]]
        )  # jitter_ms[i] ends arrivals[i+1]
        if jitter_times.size:
            jit = np.array([x for r in results for x in r.jitter_ms])
            axes[2].plot(*_binned(jitter_times, jit, 99), color=line.get_color(), label=label)
    axes[0].set_ylabel("first audio (ms)")
    axes[0].set_title("microturn load test")
    axes[1].set_ylabel("chunk lateness p99 (ms)")
    axes[2].set_ylabel("inter-arrival jitter p99 (ms)")
    axes[2].set_xlabel(f"seconds since level start ({PLOT_BIN_S:g} s bins)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
