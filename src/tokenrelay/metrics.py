"""Prometheus metrics: one registry per process, at the gateway's `/metrics` and, for
`tokenrelay worker`, on TOKENRELAY_METRICS_PORT.

What happens (answers ending, chunks, errors, reclaims) is counted where it happens, by
one-line hooks; what is a state (viewers, their lag, requests pending in Redis) is read
when scraped. Each process counts its own work: scrape every process (see
docs/deployment.md), and sum in Prometheus.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from tokenrelay.wire import STATUS_OF_TERMINAL, Entry, EntryType, Status

if TYPE_CHECKING:  # the relay and the store call the hooks below; only the scrape needs them
    from tokenrelay.relay import Relay
    from tokenrelay.store import Store

__all__ = ["CONTENT_TYPE_LATEST", "REGISTRY", "scrape", "serve"]

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

QUESTIONS = Counter(
    "tokenrelay_questions",
    "Answers that ended, by final status (counted by the worker that ended them).",
    ["status"],
    registry=REGISTRY,
)
MODEL_ERRORS = Counter(
    "tokenrelay_model_errors",
    "Answers that ended in an error, by kind (auth, rate_limit, timeout, ..., internal).",
    ["kind"],
    registry=REGISTRY,
)
TTFT = Histogram(
    "tokenrelay_time_to_first_token_seconds",
    "From the question being asked to its first chunk in Redis (includes queueing).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
    registry=REGISTRY,
)


class _Gaps(Collector):
    """A histogram observed once per chunk on the worker, kept as plain counts:
    prometheus_client's `Histogram.observe` takes a lock for the sum and one for the bucket
    (about 2% of a worker's busy samples at 100 answers x 20 tokens/s). Scraped as that
    Histogram was: buckets, count, sum, created. Only the event loop's thread observes."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = buckets
        # As prometheus_client writes `le` for these bounds: 0.005, 1.0, +Inf.
        self._les = [repr(float(bound)) for bound in buckets] + ["+Inf"]
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._created = time.time()

    def observe(self, amount_s: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, amount_s)] += 1  # le: bound included
        self._sum += amount_s

    def collect(self) -> Iterator[Metric]:
        counts, total_s = list(self._counts), self._sum
        buckets, seen = [], 0
        for le, count in zip(self._les, counts, strict=True):
            seen += count
            buckets.append((le, seen))
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], buckets, total_s)
        yield family
        created = GaugeMetricFamily(f"{self._name}_created", self._documentation)
        created.add_metric([], self._created)
        yield created


GAP = _Gaps(
    "tokenrelay_inter_token_gap_seconds",
    "Between two consecutive chunks of one answer, as written to Redis.",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REGISTRY.register(GAP)
RELAYED = Counter(
    "tokenrelay_entries_relayed",
    "Answer entries delivered to viewers by this gateway, by type (`chunk`: the text).",
    ["type"],
    registry=REGISTRY,
)
RECLAIMED = Counter(
    "tokenrelay_requests_reclaimed",
    "Requests this process took over from a worker that stopped answering (XAUTOCLAIM).",
    registry=REGISTRY,
)
SLOTS = Gauge(
    "tokenrelay_worker_slots",
    "Answers this process's workers may generate at once.",
    registry=REGISTRY,
)
SLOTS_IN_USE = Gauge(
    "tokenrelay_worker_slots_in_use",
    "Answers this process's workers are generating.",
    registry=REGISTRY,
)
SOCKETS = Gauge(
    "tokenrelay_socketio_connections",
    "Socket.IO clients connected to this gateway.",
    registry=REGISTRY,
)
VIEWERS = Gauge(
    "tokenrelay_viewers_connected",
    "Viewers following an answer live on this gateway (SSE, Socket.IO, whole answers).",
    registry=REGISTRY,
)
LAG_MAX = Gauge(
    "tokenrelay_viewer_lag_max_entries",
    "Entries of the stream's tail (as this gateway read it) the furthest-behind viewer has "
    "yet to receive.",
    registry=REGISTRY,
)
LAG_TOTAL = Gauge(
    "tokenrelay_viewer_lag_entries",
    "Entries read but not yet delivered, summed over this gateway's viewers.",
    registry=REGISTRY,
)
PENDING = Gauge(
    "tokenrelay_requests_pending",
    "Requests a worker took and has not acknowledged yet (whole deployment, read from Redis).",
    registry=REGISTRY,
)
WAITING = Gauge(
    "tokenrelay_requests_waiting",
    "Requests no worker has taken yet (whole deployment, read from Redis).",
    registry=REGISTRY,
)
PROCESS_UP = Gauge(
    "tokenrelay_process_up",
    "1 while a process `serve` supervises runs, 0 while it is down (restarting or stopped).",
    ["name", "kind"],
    registry=REGISTRY,
)
PROCESS_RESTARTS = Gauge(
    "tokenrelay_process_restarts",
    "Times `serve` restarted this process since it started.",
    ["name", "kind"],
    registry=REGISTRY,
)
PROCESS_PID = Gauge(
    "tokenrelay_process_pid",
    "Process id of each process `serve` supervises (0 while down).",
    ["name", "kind"],
    registry=REGISTRY,
)

for _status in (Status.DONE, Status.FAILED, Status.CANCELLED):
    QUESTIONS.labels(_status.value)  # present at 0, so rates work from the first scrape
RELAYED.labels(EntryType.CHUNK.value)


# -- hooks --------------------------------------------------------------------


def answer_ended(entry: Entry, ttft_ms: int) -> None:
    """On the worker, once per answer, with its terminal entry."""
    QUESTIONS.labels(STATUS_OF_TERMINAL[entry.type].value).inc()
    if ttft_ms >= 0:
        TTFT.observe(ttft_ms / 1000)
    if entry.type is EntryType.ERROR:
        MODEL_ERRORS.labels(str(entry.meta.get("kind") or "internal")).inc()


class GapTimer:
    """Times the gaps between one answer's chunks."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0.0

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last:
            GAP.observe(now - self._last)
        self._last = now


# -- exposing them --------------------------------------------------------------


def processes(states: list[dict[str, object]]) -> None:
    """The supervisor's children, as the gateway read them from its state file."""
    for state in states:
        labels = (str(state.get("name")), str(state.get("kind")))
        up = state.get("state") in ("running", "adopted")
        PROCESS_UP.labels(*labels).set(1 if up else 0)
        restarts = state.get("restarts")
        PROCESS_RESTARTS.labels(*labels).set(restarts if isinstance(restarts, int) else 0)
        pid = state.get("pid")
        PROCESS_PID.labels(*labels).set(pid if isinstance(pid, int) else 0)


async def scrape(store: Store, relay: Relay | None) -> bytes:
    """The registry in Prometheus text format, with the state gauges read now."""
    if relay is not None:
        lags = relay.lags()
        VIEWERS.set(len(lags))
        LAG_MAX.set(max(lags, default=0))
        LAG_TOTAL.set(sum(lags))
    try:
        depth = await store.group.depth()
    except RedisError:
        pass  # keep the last figures: metrics must answer while Redis is away (healthz says it)
    else:
        PENDING.set(depth.pending)
        WAITING.set(depth.waiting)
    return generate_latest(REGISTRY)


def serve(host: str, port: int | None) -> Callable[[], None]:
    """Serve /metrics from a thread (for `tokenrelay worker`, which has no HTTP server).
    Returns the function that stops it; with no port, serves nothing."""
    if port is None:
        return lambda: None
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
