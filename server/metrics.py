"""Prometheus metrics of one server instance (its own registry, so several apps can coexist in tests).

Written from the tick thread (tick time, batch size, missed ticks, underruns, input
queue) and the event loop (sessions, output queue, errors, build info, capacity);
prometheus-client metrics are thread-safe. Names follow the Prometheus conventions:
base units (seconds), counters end in `_total`; the client's `*_created` series are
left out of the scrape. README.md "Metrics" lists every name (tests/test_metrics.py
holds the two to each other). This module knows nothing about sessions or the engine.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from .. import __version__

TICK_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.3, 0.5, 1.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tick_seconds = Histogram(
            "microturn_tick_seconds", "engine step time per tick", buckets=TICK_BUCKETS, registry=r
        )
        self.ticks = Counter("microturn_ticks_total", "ticks stepped with at least one session", registry=r)
        self.missed_ticks = Counter(
            "microturn_missed_ticks_total", "tick deadlines skipped because a step overran", registry=r
        )
        self.active_sessions = Gauge(
            "microturn_active_sessions", "sessions holding an engine slot", registry=r
        )
        self.capacity = Gauge(
            "microturn_capacity_sessions", "concurrent sessions the server admits", registry=r
        )
        self.build_info = Gauge(
            "microturn_build_info", "always 1; the labels say what is serving",
            ["version", "torch", "device", "model"], registry=r,
        )
        self.sessions = Counter("microturn_sessions_total", "sessions admitted", registry=r)
        self.batch_size = Gauge("microturn_batch_size", "sessions in the last engine step", registry=r)
        self.engine_rows = Gauge(
            "microturn_engine_rows", "rows the engine itself steps (equals active sessions when all is well)",
            registry=r,
        )
        self.engine_up = Gauge(
            "microturn_engine_up", "1 while the engine serves, 0 while it restarts", registry=r
        )
        self.engine_restarts = Counter(
            "microturn_engine_restarts_total", "engine processes replaced after dying or hanging", registry=r
        )
        self.input_queue_seconds = Gauge(
            "microturn_input_queue_seconds", "input audio buffered, summed over sessions", registry=r
        )
        self.output_queue_turns = Gauge(
            "microturn_output_queue_turns", "unsent output micro-turns, summed over sessions", registry=r
        )
        self.underruns = Counter(
            "microturn_underruns_total", "ticks a streaming session's audio was late", registry=r
        )
        self.errors = Counter(
            "microturn_errors_total", "error events and refusals by code", ["code"], registry=r
        )

        self.background_text_tokens = Counter(
            "microturn_background_text_tokens_total",
            "background result tokens scheduled into sessions' text-in slots", registry=r,
        )
        self.background_tasks = Gauge(
            "microturn_background_tasks", "background tasks waiting or running", registry=r
        )

    def set_build_info(self, device: str, model: str) -> None:
        """Once the engine is up: its device and model (preset or checkpoint name)."""
        self.build_info.clear()
        self.build_info.labels(__version__, torch_version(), device, model).set(1)

    def render(self) -> bytes:
        return generate_latest(_NoCreated(self.registry))


def torch_version() -> str:
    """Read from the installed distribution: the server process itself never imports torch."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


class _NoCreated:
    """The registry's families without the `*_created` timestamp samples (noise on every scrape)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
