"""What the server measures for its HTTP surface (:mod:`.http`): Prometheus metrics, and the
live state the dashboard shows.

Only made when the server serves HTTP (``--http-port``); otherwise the server's hooks cost one
``is None`` test each. Everything runs in the server's event loop: the server calls the hooks
(:meth:`Metrics.task_stored`, :meth:`~Metrics.task_sent`, :meth:`~Metrics.result`,
:meth:`~Metrics.task_done`, :meth:`~Metrics.project_finished`,
:meth:`~Metrics.commit_took`), and a one-second sampler keeps the time series.

Each :class:`Metrics` has its own :class:`prometheus_client.CollectorRegistry`, so several
servers in one process (tests, the embedded default) never share a metric. Counters and
histograms are updated as events happen; gauges (queues, workers, slots) are read from the
scheduler when scraped, so they are never stale.

What the timings measure:

* ``dcproto_task_queue_wait_seconds`` -- push latency: from the server taking a task from its
  creator to sending its first attempt to a worker (tasks restored after a restart and later
  attempts are not counted);
* ``dcproto_task_round_trip_seconds`` -- from sending the winning attempt to a worker to its
  result arriving (the ``round_trip`` the creator sees in a result's stats);
* ``dcproto_task_service_seconds`` -- the task's run time on the worker, as the worker reports
  it (``service``), kept only when it fits within the round trip the server saw;
* ``dcproto_store_commit_seconds`` -- one group commit of the state database (commits with
  nothing to write are not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import protocol as p

if TYPE_CHECKING:
    from . import scheduler as s
    from .server import Server, ServerConnection

SAMPLE_INTERVAL = 1.0  # seconds between samples of the time series
HISTORY = 600  # samples kept: ten minutes of throughput
PROJECT_HISTORY = 120  # samples kept per running project (its rate and sparkline)
RATE_WINDOW = 30  # samples a project's current rate is averaged over
NOW_WINDOW = 10  # samples the server's current throughput is averaged over
RECENT_FINISHED = 20  # finished projects the dashboard still lists
TEXT_LIMIT = 200  # characters of a peer's text passed on to the dashboard

# from a millisecond to an hour: tasks of every size
TASK_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    math.inf,
)
COMMIT_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    math.inf,
)
FAILED_OUTCOMES = (*p.FAILED_ATTEMPTS, "error", "load_error")


def _number(value: object) -> float | None:
    """``value`` if it is a finite number (not a bool), else None: workers' figures are
    untrusted."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: object) -> str | None:
    return value[:TEXT_LIMIT] if isinstance(value, str) else None


@dataclass
class _ProjectSeries:
    """What the sampler remembers about one running project."""

    samples: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=PROJECT_HISTORY + 1)
    )  # (monotonic time, tasks done)
    reissued: int = 0  # its tasks_reissued as of the last sample (for the counter's deltas)
    recalled: int = 0
    failures: int = 0  # failed attempts reported by a worker that held the task


class _LiveCollector(Collector):
    """The gauges, and counters the server already keeps, read when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        server = self.metrics.server
        scheduler = server.scheduler
        queued = GaugeMetricFamily(
            "dcproto_queue_depth",
            "Tasks of a running project waiting for a worker (retries included)",
            labels=["project", "name"],
        )
        in_flight = GaugeMetricFamily(
            "dcproto_tasks_in_flight",
            "Tasks of a running project leased to workers",
            labels=["project", "name"],
        )
        for project in scheduler.projects.values():
            if project.status != "running":
                continue
            labels = [project.project_id, project.name]
            queued.add_metric(labels, len(project.queue) + len(project.retries))
            in_flight.add_metric(labels, len(project.leased))
        yield queued
        yield in_flight
        workers = list(scheduler.workers.values())
        yield GaugeMetricFamily(
            "dcproto_workers_connected", "Workers logged in", value=len(server.workers)
        )
        yield GaugeMetricFamily(
            "dcproto_workers_paused",
            "Workers their volunteer paused",
            value=sum(worker.paused for worker in workers),
        )
        yield GaugeMetricFamily(
            "dcproto_worker_slots",
            "Slots of the connected workers (tasks they run at once)",
            value=sum(worker.slots for worker in workers),
        )
        yield GaugeMetricFamily(
            "dcproto_worker_slots_busy",
            "Slots running a task",
            value=sum(min(worker.running, worker.slots) for worker in workers),
        )
        yield GaugeMetricFamily(
            "dcproto_creators_connected",
            "Creator connections logged in",
            value=len(server.creators),
        )
        yield GaugeMetricFamily(
            "dcproto_projects_running",
            "Projects running",
            value=sum(project.status == "running" for project in scheduler.projects.values()),
        )
        refused = CounterMetricFamily(
            "dcproto_connections_refused",
            "Connections refused or closed before or at login, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(server.refusals.items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "dcproto_forged_results_dropped",
            "Results dropped because their worker never held the task",
            value=scheduler.forged_results_dropped,
        )


class Metrics:
    """The server's Prometheus registry, its one-second time series and its dashboard state."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.registry = CollectorRegistry()
        self.started = time.monotonic()
        self.started_wall = time.time()
        registry = self.registry
        self.tasks_done = Counter(
            "dcproto_tasks_done", "Tasks completed (results forwarded)", registry=registry
        )
        self.tasks_failed = Counter(
            "dcproto_tasks_failed",
            "Failed task attempts reported by the worker holding the task, by outcome",
            ["outcome"],
            registry=registry,
        )
        for outcome in FAILED_OUTCOMES:
            self.tasks_failed.labels(outcome)  # shown at 0 from the start
        self.tasks_reissued = Counter(
            "dcproto_tasks_reissued",
            "Tasks sent back to the queue to run again (failed attempts retried; lost, expired, "
            "overdue or handed-back leases)",
            registry=registry,
        )
        self.tasks_recalled = Counter(
            "dcproto_tasks_recalled",
            "Unstarted tasks taken back from a busy worker for an idle one",
            registry=registry,
        )
        self.projects_finished = Counter(
            "dcproto_projects_finished",
            "Projects finished, by status",
            ["status"],
            registry=registry,
        )
        for status in p.PROJECT_STATUSES:
            self.projects_finished.labels(status)
        self.queue_wait = Histogram(
            "dcproto_task_queue_wait_seconds",
            "Push latency: from the server taking a task from its creator to sending its first "
            "attempt to a worker",
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        self.round_trip = Histogram(
            "dcproto_task_round_trip_seconds",
            "From sending a task's winning attempt to a worker to its result arriving",
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        self.service = Histogram(
            "dcproto_task_service_seconds",
            "A task's run time on its worker, as the worker reports it",
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        self.commit = Histogram(
            "dcproto_store_commit_seconds",
            "One group commit of the state database",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        registry.register(_LiveCollector(self))
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, open fds
        # the counters' values, for the dashboard (a Counter's value is private)
        self.done_count = 0
        self.failure_count = 0
        self.reissue_count = 0
        # per second: (wall time, tasks done per second, tasks done, busy slots, slots)
        self.history: deque[tuple[float, float, int, int, int]] = deque(maxlen=HISTORY)
        self._last_sample: tuple[float, int] | None = None  # (monotonic time, done_count)
        self._projects: dict[str, _ProjectSeries] = {}
        self._queued_at: dict[str, dict[int, float]] = {}  # project -> task id -> when queued
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_FINISHED)
        self._sampler: asyncio.Task[None] | None = None

    # lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.sample()
        self._sampler = asyncio.create_task(self._sample_every_second())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None

    async def _sample_every_second(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += SAMPLE_INTERVAL
            now = time.monotonic()
            if next_at < now:  # the loop was blocked: skip the missed beats
                next_at = now + SAMPLE_INTERVAL
            await asyncio.sleep(next_at - now)
            self.sample()

    # hooks the server calls --------------------------------------------------------------------

    def task_stored(self, project_id: str, tasks: list[tuple[int, int, bytes, int]]) -> None:
        """New tasks were taken from a creator (the scheduler's StoreTasks)."""
        now = time.monotonic()
        queued = self._queued_at.setdefault(project_id, {})
        for task_id, *_ in tasks:
            queued[task_id] = now

    def task_sent(self, task: p.Task) -> None:
        queued = self._queued_at.get(task.project_id)
        if queued is None:
            return
        when = queued.pop(task.task_id, None)
        if when is not None and task.attempt == 1:
            self.queue_wait.observe(max(0.0, time.monotonic() - when))
        if not queued:
            del self._queued_at[task.project_id]

    def result(self, conn: ServerConnection, result: p.Result) -> None:
        """A worker's Result, before the scheduler takes it: a failed attempt is counted when
        it comes from a worker that holds the task (the attempt it runs, or an error)."""
        if result.outcome not in FAILED_OUTCOMES:
            return
        task = self.server.scheduler.tasks.get(result.task_id)
        if task is None or conn.device_id not in task.holders:
            return  # forged, late or of a finished project: the scheduler drops it
        current = task.worker_id == conn.conn_id and task.attempt == result.attempt
        if not current and result.outcome != "error":
            return
        self.tasks_failed.labels(result.outcome).inc()
        self.failure_count += 1
        series = self._projects.setdefault(task.project_id, _ProjectSeries())
        series.failures += 1

    def task_done(self, done: p.TaskDone) -> None:
        self.tasks_done.inc()
        self.done_count += 1
        round_trip = _number(done.stats.get("round_trip"))
        if round_trip is None or round_trip < 0:
            return
        self.round_trip.observe(round_trip)
        service = _number(done.stats.get("service"))
        if service is not None and 0 <= service <= round_trip:
            self.service.observe(service)

    def commit_took(self, seconds: float) -> None:
        self.commit.observe(seconds)

    def project_finished(self, project: s.ProjectRecord, finished: p.Finished) -> None:
        """A project ended (before the scheduler forgets it): its last counts, and a line in
        the dashboard's list of finished projects."""
        series = self._projects.pop(project.project_id, None) or _ProjectSeries()
        self._count_reissues(project, series)
        self._queued_at.pop(project.project_id, None)
        self.projects_finished.labels(finished.status).inc()
        row = self._project_row(project, series, time.monotonic())
        row["status"] = finished.status
        row["finished_at"] = time.time()
        error = finished.error if isinstance(finished.error, dict) else {}
        row["reason"] = _text(error.get("reason"))
        row["message"] = _text(error.get("message"))
        self.recent.appendleft(row)

    # sampling ----------------------------------------------------------------------------------

    def sample(self) -> None:
        """Once a second: the throughput since the last sample, and each running project's
        count of tasks done (for its rate); re-issues and recalls become counter increments."""
        now = time.monotonic()
        last = self._last_sample
        self._last_sample = (now, self.done_count)
        scheduler = self.server.scheduler
        if last is not None and now > last[0]:
            done = self.done_count - last[1]
            workers = list(scheduler.workers.values())
            self.history.append(
                (
                    time.time(),
                    done / (now - last[0]),
                    done,
                    sum(min(worker.running, worker.slots) for worker in workers),
                    sum(worker.slots for worker in workers),
                )
            )
        for project_id, project in scheduler.projects.items():
            if project.status != "running":
                continue
            series = self._projects.get(project_id)
            if series is None:  # new, or restored: counts from here
                series = self._projects[project_id] = _ProjectSeries(
                    reissued=project.tasks_reissued, recalled=project.tasks_recalled
                )
            series.samples.append((now, project.tasks_done))
            self._count_reissues(project, series)
        for project_id in [pid for pid in self._projects if pid not in scheduler.projects]:
            del self._projects[project_id]

    def _count_reissues(self, project: s.ProjectRecord, series: _ProjectSeries) -> None:
        reissued = max(0, project.tasks_reissued - series.reissued)
        self.tasks_reissued.inc(reissued)
        self.reissue_count += reissued
        self.tasks_recalled.inc(max(0, project.tasks_recalled - series.recalled))
        series.reissued = max(series.reissued, project.tasks_reissued)
        series.recalled = max(series.recalled, project.tasks_recalled)

    # the dashboard's state ---------------------------------------------------------------------

    def _project_row(
        self, project: s.ProjectRecord, series: _ProjectSeries, now: float
    ) -> dict[str, Any]:
        samples = list(series.samples)
        rate: float | None = None
        if len(samples) >= 2:
            start = samples[max(0, len(samples) - 1 - RATE_WINDOW)]
            end = samples[-1]
            if end[0] > start[0]:
                rate = (end[1] - start[1]) / (end[0] - start[0])
        average: float | None = None
        if project.first_started_at is not None:
            ran = (project.finished_at or now) - project.first_started_at
            if ran > 0:
                average = project.tasks_done / ran
        total = project.total_tasks
        eta: float | None = None
        speed = rate if rate else average
        if total is not None and speed and project.status == "running":
            eta = max(0, total - project.tasks_done) / speed
        return {
            "project_id": project.project_id,
            "name": project.name,
            "owner": project.owner,
            "status": project.status,
            "tasks_done": project.tasks_done,
            "tasks_received": project.tasks_received,
            "total_tasks": total,
            "items_done": project.items_done,
            "items_received": project.items_received,
            "queued": len(project.queue) + len(project.retries),
            "in_flight": len(project.leased),
            "rate": rate,
            "average_rate": average,
            "eta": eta,
            "elapsed": now - project.submitted_at,
            "failures": series.failures,
            "reissued": project.tasks_reissued,
            "recalled": project.tasks_recalled,
            "overdue": project.tasks_overdue,
            "forged": project.forged_results_dropped,
            # tasks done per sample over the last two minutes, for the card's sparkline
            "spark": [b[1] - a[1] for a, b in itertools.pairwise(samples)],
        }

    def _worker_rows(self, now: float) -> list[dict[str, Any]]:
        server = self.server
        records = [
            (conn, server.scheduler.workers[conn.conn_id])
            for conn in server.workers.values()
            if conn.conn_id in server.scheduler.workers
        ]
        rows = server._worker_rows(None, now)  # the admin's view, as `dcproto workers` has it
        out = []
        for row, (conn, record) in zip(rows, records, strict=True):
            usage = row.get("usage") or {}
            if record.overdue:
                state = "overdue"
            elif record.suspect:
                state = "silent"
            elif record.paused:
                state = "paused"
            elif record.running > 0:
                state = "busy"
            else:
                state = "idle"
            out.append(
                {
                    "name": row["name"],
                    "identity": row.get("identity"),
                    "address": conn.peer,
                    "slots": row["slots"],
                    "running": min(row["running"], row["slots"]),
                    "held": row["held"],
                    "done": row["done"],
                    "paused": row["paused"],
                    "state": state,
                    "paused_by": _text(usage.get("paused_by")),
                    "sandbox": _text(usage.get("sandbox")),
                    "cpu_percent": _number(usage.get("cpu_percent")),
                    "rss_bytes": _number(usage.get("rss_bytes")),
                    "rtt": _number(row.get("rtt")),
                    "connected_for": row.get("connected_for"),
                    "trust": [_text(name) for name in row.get("trust", [])][:20],
                }
            )
        return out

    def state(self) -> dict[str, Any]:
        """Everything the dashboard shows, as JSON-ready values (``/api/state``)."""
        server = self.server
        now = time.monotonic()
        projects = [
            self._project_row(project, self._projects.get(pid) or _ProjectSeries(), now)
            for pid, project in server.scheduler.projects.items()
            if project.status == "running"
        ]
        projects.sort(key=lambda row: -row["elapsed"])  # the oldest first
        workers = self._worker_rows(now)
        workers.sort(key=lambda row: (row["name"], row["identity"] or ""))
        history = list(self.history)
        recent = history[-NOW_WINDOW:]
        address = server.address
        return {
            "server": {
                "address": None if address is None else f"{address[0]}:{address[1]}",
                "tls": server.identity is not None,
                "fingerprint": None if server.identity is None else server.identity.fingerprint,
                "uptime": now - self.started,
                "started_at": self.started_wall,
                "time": time.time(),
            },
            "totals": {
                "workers": len(workers),
                "workers_paused": sum(row["paused"] for row in workers),
                "slots": sum(row["slots"] for row in workers),
                "slots_busy": sum(row["running"] for row in workers),
                "creators": len(server.creators),
                "projects_running": len(projects),
                "tasks_done": self.done_count,
                "tasks_per_second": (
                    sum(sample[1] for sample in recent) / len(recent) if recent else 0.0
                ),
                "queued": sum(row["queued"] for row in projects),
                "failures": self.failure_count,
                "reissued": self.reissue_count,
                "refused": sum(server.refusals.values()),
            },
            "projects": projects,
            "finished": list(self.recent),
            "workers": workers,
            "throughput": {
                "interval": SAMPLE_INTERVAL,
                "time": [round(sample[0], 3) for sample in history],
                "tasks_per_second": [round(sample[1], 3) for sample in history],
                "tasks_done": [sample[2] for sample in history],
                "slots_busy": [sample[3] for sample in history],
                "slots": [sample[4] for sample in history],
            },
        }
