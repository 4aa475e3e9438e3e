"""The server's decisions as a pure state machine: projects, tasks, leases, worker credit, fairness.

Theory of operation
-------------------
The server feeds events in (a worker joined or granted credit, a result arrived, a creator sent
tasks, ``tick(now)``) and executes the actions that come back (send this task to that worker,
forward this result to its creator, ask the creator for more tasks, finish the project). Nothing
here touches a socket or reads a clock: time is always the ``now`` argument.

A task's life (see ``TASK_TRANSITIONS``): it is *queued* when the creator sends it, *leased* when
pushed to a worker with credit, and then *done* on its first valid result, or back to *queued*
when its worker disconnects, its lease expires (no sign of life from the worker for
``lease_timeout`` seconds), the worker holds it past its time limit (see below), the worker
rejects the project, or its child process crashed or timed out -- the last two count as failed
attempts, capped by ``max_attempts``, after which the project fails with the reason. Every send
carries an attempt number. The first ok, stop or error result from a leaseholder wins, whichever
attempt it answers (a worker that came back after its lease expired, or on a new connection,
still delivers), and whoever holds the task then is told to abandon it; crashes, timeouts and
abandons count only for the current attempt; results for a finished task are late duplicates and
are dropped.

Only a worker that holds or held the task may answer it. Each open task keeps the device ids
it was leased to, in any attempt (a device id survives a reconnect and is bound to the token
that got it, so nobody else can claim it). What was taken from a device before it answered (an
expired lease, a lost connection, Abandon, Recall) is remembered as (task, attempt) -> project,
per device and bounded, so its late answer is a counted duplicate; nothing is kept per finished
task, so memory does not grow with the tasks done. A result from any other worker, or a second
answer to the same attempt, is dropped and counted -- per project while the task is open
(``forged_results_dropped``), and per worker, for the server's log -- and touches nothing: no
take-back, no failure, no stop. After a server restart the restored tasks have no leaseholders
yet, so a result computed before the restart is dropped too and the task simply runs again.

Each return of a task to the queue unanswered (its worker disconnected, fell silent past the
lease, held it past its time limit, or gave it back) counts; at the project's ``max_reissues``
the project fails with the last cause, so a livelock ends.

Who gets which task. Free slots are served first, one task per worker per pass. The task comes
from a project whose whole rest fits in one round of the workers (it then ends at once), else
from the project with the fewest tasks in flight, ties to the one served least recently: every
project gets an even share of the workers whatever its size. Beyond its slots a worker holds
tasks only to hide its round trip: the server measures the round trip (less the ``held`` time
the worker reports) and each project's time per task (the ``service`` times reported), and a
busy worker gets a task of a project ahead only when the work in its hands would run out within
PREFETCH_MARGIN round trips (the bandwidth-delay product; at most MAX_PREFETCH_PER_SLOT per
slot). It is woken for that (``WakeAt``), so a task is held ahead just in time and a project
submitted meanwhile is not queued behind it. Nothing is held ahead of a task of unknown length,
and a project not measured yet is held at most one per slot. A free slot with nothing queued
takes the last unstarted task of the worker holding the most (``RecallTasks``), unless it would
start there before it could reach the idle worker; if the holder had started it after all, the
first result wins.

What clients say is bounded here too. A worker's slots are capped at ``max_slots``, and the
tasks it holds plus its unused credit at ``slots * (1 + MAX_PREFETCH_PER_SLOT)``: credit beyond
that is ignored (an honest worker never asks for more). A creator may send only as many new
tasks (seq >= ``tasks_received``) as it holds credit for; a frame with more raises
:class:`CreditExceeded` before anything changes, and the server closes that connection. Resends
of stored seqs are free. Counts that sum client integers saturate at ``protocol.MAX_INT``.

Liveness is not progress. A worker is modelled as running its tasks in the order they were sent,
``slots`` at a time: a task *starts* when it is leased to a worker with a free slot, or when one
of the worker's earlier tasks leaves it. From then on it must be answered within the project's
``task_timeout`` plus ``TASK_TIME_GRACE`` (the worker's own kill and the answer's way back), or
within ``max_task_time`` when it has none (a longer task_timeout is cut to ``max_task_time``),
however often the worker heartbeats. A worker that misses that is *overdue*: every task it holds
is re-issued as if its lease had expired (it is told to abandon them), uncounted as a failure;
the overdue ones are counted (``tasks_overdue``), and the worker gets no new task until it
answers one it holds.

Creators stream tasks under a credit window so the server never holds more than a bounded
number of queued tasks per project.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from .. import protocol as p
from ..options import normalize_options


class TaskState(enum.Enum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


#: (state, event) -> next state: every transition a task may take.
TASK_TRANSITIONS: dict[tuple[TaskState, str], TaskState] = {
    (TaskState.QUEUED, "lease"): TaskState.LEASED,
    (TaskState.LEASED, "result_ok"): TaskState.DONE,
    (TaskState.LEASED, "worker_lost"): TaskState.QUEUED,
    (TaskState.LEASED, "lease_expired"): TaskState.QUEUED,
    (TaskState.LEASED, "rejected"): TaskState.QUEUED,
    # an idle worker takes it before its holder started it (then leased to the idle one)
    (TaskState.LEASED, "recalled"): TaskState.QUEUED,
    (TaskState.LEASED, "attempt_failed"): TaskState.QUEUED,
    (TaskState.LEASED, "attempts_exhausted"): TaskState.FAILED,
    # an earlier attempt's result arrives while the task waits for another go
    (TaskState.QUEUED, "earlier_result_ok"): TaskState.DONE,
    (TaskState.QUEUED, "earlier_result_error"): TaskState.FAILED,
}

MIN_WINDOW = p.INITIAL_CREDIT  # queued tasks per project accepted even with no worker yet
# A worker holds, per slot, the tasks it runs in about PREFETCH_MARGIN of its round trips
# (the bandwidth-delay product): enough that a slot never waits for its next task to travel.
PREFETCH_MARGIN = 1.5
# Below this round trip / task time ratio a slot idles at most this share of its time between
# two tasks, and holds nothing beyond the task it runs: queued work stays free for any worker.
NO_PREFETCH_RATIO = 0.05
TASK_TIME_WEIGHT = 0.2  # of a new sample in a project's moving average of task time
RTT_RISE = 0.1  # a worker's round trip estimate falls to a lower sample at once, rises slowly
MAX_OWED = 1 << 16  # tasks taken from one device whose late answers are still recognised
STEAL_SCAN = 32  # workers looked at for the one holding the most unstarted tasks
DEFAULT_MAX_SLOTS = 256  # slots one worker is credited with, whatever it announces
DEFAULT_MAX_TASK_TIME = 24 * 3600.0  # seconds a started task may stay unanswered
TASK_TIME_GRACE = 5.0  # seconds past task_timeout for the worker's kill and its answer
MAX_HELD_PER_SLOT = 1 + p.MAX_PREFETCH_PER_SLOT  # tasks + unused credit per slot


class TasksRefused(ValueError):
    """A creator's Tasks frame that the server does not take: nothing was changed, and the
    server closes that creator's connection with an Error of code ``code``."""

    code = "tasks_refused"


class CreditExceeded(TasksRefused):
    """More new tasks than the creator holds credit for."""

    code = "credit_exceeded"


class TooManyItems(TasksRefused):
    """The project's item count would pass ``protocol.MAX_INT``."""

    code = "too_many_items"


def _seconds_within(value: Any, limit: float) -> float | None:
    """A worker's figure as seconds in 0 .. ``limit`` (what the server saw), else None: not a
    number, a bool, a NaN or out of range."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= limit:
        return float(value)
    return None


def _saturating_add(a: int, b: int) -> int:
    """``a + b``, but at most ``protocol.MAX_INT``: it stays storable and encodable."""
    return min(p.MAX_INT, a + b)


# ---- actions: what the I/O layer must do ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendProject:
    worker_id: str
    message: p.Project


@dataclass(frozen=True, slots=True)
class SendTask:
    worker_id: str
    message: p.Task


@dataclass(frozen=True, slots=True)
class AbandonTasks:
    worker_id: str
    task_ids: list[int]


@dataclass(frozen=True, slots=True)
class RecallTasks:
    """Give these tasks back if not started yet: another worker got them."""

    worker_id: str
    task_ids: list[int]


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Call ``tick`` at ``when`` (on the ``now`` clock): a worker is due a task held ahead."""

    when: float


@dataclass(frozen=True, slots=True)
class StoreTasks:
    """Tasks the creator sent, to be made durable: (task_id, seq, items, n_items)."""

    project_id: str
    tasks: list[tuple[int, int, bytes, int]]


@dataclass(frozen=True, slots=True)
class ToCreator:
    """A message for the creator connection ``creator_id`` (TaskDone, More, Notice, Finished).

    ``creator_id`` is None while the project has no creator attached; the server still keeps
    what must be durable (TaskDone, Finished) and drops the rest."""

    creator_id: str | None
    message: p.Message


Action = SendProject | SendTask | AbandonTasks | RecallTasks | WakeAt | StoreTasks | ToCreator


@dataclass(frozen=True, slots=True)
class Incident:
    """Something a worker did wrong ``count`` times since the last report, for the server's
    log (see :meth:`Scheduler.take_incidents`). ``kind`` is ``forged_results`` (results for
    tasks it does not hold, dropped), ``overdue_tasks`` (tasks held past their time limit,
    re-issued) or ``expired_leases`` (tasks re-issued after lease_timeout of silence)."""

    worker_id: str
    name: str
    kind: str
    count: int


# ---- records ---------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class TaskRecord:
    task_id: int
    project_id: str
    seq: int
    items: bytes
    n_items: int
    state: TaskState = TaskState.QUEUED
    attempt: int = 0  # attempts sent so far; failures count only for the current one
    failures: int = 0  # crashes and timeouts
    failed_on: set[str] = field(default_factory=set)
    worker_id: str | None = None
    sent: list[float] = field(default_factory=list)  # when each attempt was sent
    holders: tuple[str, ...] = ()  # device ids it was leased to, in any attempt
    run_deadline: float | None = None  # the current attempt has started: answer by then
    started_at: float = 0.0  # when the current attempt started (if it has)
    reissues: int = 0  # times it went back to the queue unanswered (see max_reissues)
    reissued_because: str = ""  # the latest of those reasons, for the error if they run out

    @property
    def sent_at(self) -> float:
        """When the current attempt was sent."""
        return self.sent[-1] if self.sent else 0.0


@dataclass(slots=True, eq=False)
class ProjectRecord:
    project_id: str
    creator_id: str | None
    name: str
    message: p.Project  # what each worker is sent before its first task
    options: dict[str, Any]
    submitted_at: float
    status: str = "running"
    queue: deque[int] = field(default_factory=deque)
    retries: deque[int] = field(default_factory=deque)  # failed attempts, served first
    leased: set[int] = field(default_factory=set)
    credit_outstanding: int = 0  # tasks the creator may still send without asking
    total_tasks: int | None = None  # known once the creator sent End
    tasks_received: int = 0  # also the next seq expected: tasks arrive in seq order
    items_received: int = 0
    tasks_done: int = 0
    items_done: int = 0
    items_kept: int = 0
    tasks_reissued: int = 0
    tasks_recalled: int = 0  # unstarted tasks moved from a busy worker to an idle one
    duplicates_dropped: int = 0
    forged_results_dropped: int = 0  # results from workers that never held the task
    tasks_overdue: int = 0  # started tasks not answered within task_time_limit
    task_time_limit: float = math.inf  # seconds a started task may stay unanswered
    rejected_by: set[str] = field(default_factory=set)
    per_worker: Counter[str] = field(default_factory=Counter)
    first_started_at: float | None = None
    finished_at: float | None = None
    unrunnable_noticed: bool = False
    owner: str = ""  # the token name that submitted it (see WorkerRecord.trust)
    task_seconds: float | None = None  # moving average of a slot's time per task
    served: int = 0  # when it last got a worker (a counter; 0: never), for ties

    def has_queued(self) -> bool:
        return bool(self.queue or self.retries)


@dataclass(slots=True, eq=False)
class WorkerRecord:
    worker_id: str
    device_id: str
    name: str
    slots: int
    last_seen: float
    credit: int = 0
    leased: set[int] = field(default_factory=set)
    # leased tasks not started yet (all slots busy), in the order they were sent, each with
    # its expected seconds (None: its project's task time was not known)
    waiting: dict[int, float | None] = field(default_factory=dict)
    waiting_work: float = 0.0  # the sum of the known expected seconds in ``waiting``
    waiting_unknown: int = 0  # tasks in ``waiting`` of unknown length
    started: set[int] = field(default_factory=set)  # leased tasks not waiting (<= slots)
    loaded: set[str] = field(default_factory=set)
    suspect: bool = False  # a lease expired: no new tasks until the worker shows life
    overdue: bool = False  # held a task too long: no new tasks until it answers one
    capacity: int = 0  # the most tasks it has held at once
    rtt: float | None = None  # round trip to it, without the time it held a task
    prefetch: int = 0  # tasks it may hold beyond its slots, from its latest result
    wake_at: float | None = None  # when it is next due a task held ahead
    paused: bool = False  # its volunteer paused it: no new task until resumed
    done: int = 0  # tasks it completed on this connection
    trust: frozenset[str] = frozenset()  # owners whose projects it runs; empty: every one

    @property
    def blocked(self) -> bool:
        return self.suspect or self.overdue or self.paused

    def may_run(self, project: ProjectRecord) -> bool:
        """Whether it runs ``project``: not rejected, and of a creator it trusts."""
        return self.worker_id not in project.rejected_by and (
            not self.trust or project.owner in self.trust
        )

    @property
    def running(self) -> int:
        return len(self.leased) - len(self.waiting)


class Scheduler:
    """All of the server's scheduling state. Every event method returns the actions to run."""

    def __init__(
        self,
        *,
        max_slots: int = DEFAULT_MAX_SLOTS,
        max_task_time: float = DEFAULT_MAX_TASK_TIME,
    ) -> None:
        """``max_slots``: the most slots a worker is credited with (1 .. protocol.MAX_SLOTS);
        ``max_task_time``: seconds a started task may stay unanswered, whatever its project's
        task_timeout. Raises ValueError for values out of range."""
        if type(max_slots) is not int or not 1 <= max_slots <= p.MAX_SLOTS:
            raise ValueError(f"max_slots must be an integer in 1..{p.MAX_SLOTS}")
        if (
            type(max_task_time) not in (int, float)
            or not math.isfinite(max_task_time)
            or max_task_time <= 0
        ):
            raise ValueError("max_task_time must be a positive number of seconds")
        self.max_slots = max_slots
        self.max_task_time = float(max_task_time)
        self.projects: dict[str, ProjectRecord] = {}
        self.tasks: dict[int, TaskRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        # device id -> (task, attempt) taken from it unanswered -> project: its late answers are
        # recognised (and told apart from forged results) whatever became of the task, in
        # memory that grows with tasks in flight, never with tasks finished
        self._owed: dict[str, OrderedDict[tuple[int, int], str]] = {}
        self._waiting_workers: dict[str, None] = {}  # workers holding unstarted tasks
        self._exhausted: list[TaskRecord] = []  # tasks past max_reissues, failed at _flush
        self._wakes: list[tuple[float, str]] = []  # heap of (when, worker): see _hold_later
        # server-wide counts, and what the server has not logged yet: (worker, kind) -> Incident
        self.forged_results_dropped = 0
        self.tasks_overdue = 0
        self._incidents: dict[tuple[str, str], Incident] = {}
        self._freed: set[str] = set()  # workers that may start a waiting task
        # workers that may take a task now: not blocked, with credit, under their holding limit
        self._ready: OrderedDict[str, None] = OrderedDict()
        self._active: deque[str] = deque()  # running projects with queued tasks, in turn
        self._next_task_id = 1
        self._now = 0.0  # the latest event's time
        self._served = 0  # counts leases, to order projects that have as many in flight
        self._total_slots = 0
        self._total_capacity = 0  # sum of the workers' capacities
        self._actions: list[Action] = []

    # ---- workers -----------------------------------------------------------------------------

    def add_worker(
        self, worker_id: str, *, device_id: str, name: str, slots: int, now: float
    ) -> list[Action]:
        """A worker joined. ``slots`` is taken as 1 .. ``max_slots`` whatever it says."""
        if worker_id in self.workers:
            raise ValueError(f"worker {worker_id} is already connected")
        slots = max(1, min(slots, self.max_slots))
        self.workers[worker_id] = WorkerRecord(worker_id, device_id, name, slots, now)
        self._total_slots += slots
        for project in self.projects.values():
            project.unrunnable_noticed = False
        self._grant_creators()
        return self._flush(now)

    def worker_seen(self, worker_id: str, now: float) -> list[Action]:
        """Any frame from the worker: it is alive, so its leases are renewed."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return []
        worker.last_seen = now
        if not worker.suspect:
            return []
        self._revive(worker)
        return self._flush(now)

    def _revive(self, worker: WorkerRecord) -> None:
        """A sign of life from a suspect worker: it may take tasks again (unless overdue)."""
        worker.suspect = False
        self._refresh(worker)

    def _answered(self, worker: WorkerRecord) -> None:
        """An answer to a task it holds or held: an overdue worker may take tasks again."""
        worker.overdue = False
        self._refresh(worker)

    def _refresh(self, worker: WorkerRecord) -> None:
        """Whether the worker may be offered a task now."""
        if (
            worker.blocked
            or worker.credit <= 0
            or len(worker.leased) >= worker.slots + worker.prefetch
        ):
            self._ready.pop(worker.worker_id, None)
        elif worker.worker_id in self.workers:
            self._ready[worker.worker_id] = None

    def worker_credit(self, worker_id: str, credit: int, now: float) -> list[Action]:
        worker = self.workers[worker_id]
        worker.last_seen = now
        self._revive(worker)
        self._add_credit(worker, credit)
        return self._flush(now)

    def remove_worker(self, worker_id: str, now: float) -> list[Action]:
        """The worker's connection closed: its tasks go back to the front of their queues."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return []
        self._ready.pop(worker_id, None)
        self._waiting_workers.pop(worker_id, None)
        self._total_slots -= worker.slots
        self._total_capacity -= worker.capacity
        for task_id in list(worker.leased):
            task = self.tasks[task_id]
            self._owe(worker, task)  # it may deliver after it reconnects
            self._requeue(task, reissue="its worker disconnected")
        worker.leased.clear()
        worker.waiting.clear()
        worker.started.clear()
        for project in list(self.projects.values()):
            self._check_runnable(project, now)
        return self._flush(now)

    def worker_state(
        self, worker_id: str, *, paused: bool, trust: list[str], now: float
    ) -> list[Action]:
        """The volunteer paused or resumed the worker, or chose whose projects it runs. A
        paused worker gets no task, and what it holds unstarted goes to other workers; its
        running tasks stay with it (paused, not killed). A project it no longer trusts is
        treated as rejected by it."""
        worker = self.workers[worker_id]
        worker.last_seen = now
        worker.paused = paused
        worker.trust = frozenset(trust)
        if paused:
            recalled = list(worker.waiting)
            for task_id in reversed(recalled):  # each goes to the front: keep their order
                self._requeue(self.tasks[task_id])
            if recalled:
                self._actions.append(RecallTasks(worker.worker_id, recalled))
        for task_id in list(worker.leased):
            task = self.tasks[task_id]
            if not worker.may_run(self.projects[task.project_id]) and task_id in worker.waiting:
                self._requeue(task)
                self._actions.append(RecallTasks(worker.worker_id, [task_id]))
        self._refresh(worker)
        for project in list(self.projects.values()):
            project.unrunnable_noticed = False
            self._check_runnable(project, now)
        return self._flush(now)

    def worker_rejects(
        self, worker_id: str, project_id: str, reason: str, now: float
    ) -> list[Action]:
        """The worker cannot run the project; its tasks of it move on, uncounted as failures."""
        worker = self.workers[worker_id]
        worker.last_seen = now
        self._revive(worker)
        project = self.projects.get(project_id)
        if project is None or project.status != "running":
            return self._flush(now)
        project.rejected_by.add(worker.worker_id)
        for task_id in [t for t in worker.leased if self.tasks[t].project_id == project_id]:
            self._requeue(self.tasks[task_id])
            # the worker still answers each task (outcome abandoned), which returns its credit
        self._check_runnable(project, now, reason=reason)
        return self._flush(now)

    def task_result(self, worker_id: str, result: p.Result, now: float) -> list[Action]:
        """A task attempt's outcome. Only a worker the task was leased to (by device id, in any
        attempt) may answer it: anything else is dropped and counted, and changes nothing but
        the sender's credit. The first ok, stop or error result from a leaseholder wins, even
        from an earlier attempt (a worker that came back); failures and abandons count only
        for the current attempt; anything else is a late duplicate and is dropped."""
        worker = self.workers[worker_id]
        worker.last_seen = now
        self._revive(worker)
        self._take_result(worker, result, now)
        # only now, with the answered task off its lease: the credit handed back replaces it
        self._add_credit(worker, result.credit)
        return self._flush(now)

    def _take_result(self, worker: WorkerRecord, result: p.Result, now: float) -> None:
        owed = self._owed.get(worker.device_id)
        key = (result.task_id, result.attempt)
        owed_project = None if owed is None else owed.pop(key, None)
        if owed is not None and not owed:
            del self._owed[worker.device_id]
        task = self.tasks.get(result.task_id)
        if task is None:
            if owed_project is None:
                # never held by this device (or so long ago it was forgotten): forged
                if 0 < result.task_id <= self.last_task_id:
                    self._drop_forged(worker, None)
                return
            project = self.projects.get(owed_project)
            if project is None:
                return  # of a forgotten project: nothing to tell
            self._answered(worker)
            if result.outcome != "abandoned":
                project.duplicates_dropped += 1
            return
        project = self.projects[task.project_id]
        if worker.device_id not in task.holders:
            self._drop_forged(worker, project)
            return
        self._answered(worker)
        worker_id = worker.worker_id
        current = (
            task.state is TaskState.LEASED
            and task.worker_id == worker_id
            and task.attempt == result.attempt
        )
        if current:
            self._unlease(worker, task.task_id)
            if result.outcome in ("ok", "stop"):
                self._learn_times(worker, project, task, result, now)
        elif result.outcome in ("ok", "stop", "error"):
            self._take_back(task)
        else:
            return
        outcome = result.outcome
        if outcome == "ok":
            self._complete(project, task, worker, result, now)
        elif outcome == "stop":
            items = task.items  # the creator maps the stopping value to its item with them
            self._complete(project, task, worker, result, now, forward=False)
            # a stopped project's result is the stopping value alone
            project.items_kept = result.n_kept
            self._finish(project, "stopped", now, stop=[task.seq, items, result.payload])
        elif outcome == "error":
            error = dict(result.error or {})
            error.setdefault("reason", "exception")
            error["attempts"] = task.attempt
            self._task_over(project, task, TaskState.FAILED)
            self._finish(project, "failed", now, error=error)
        elif outcome == "load_error":
            message = (result.error or {}).get("message", "the project could not be loaded")
            self._requeue(task)
            project.rejected_by.add(worker_id)
            self._check_runnable(project, now, reason=message)
        elif outcome == "abandoned":
            # the worker gave the task back on its own (shutting down: counted; paused by its
            # volunteer: not a fault)
            self._requeue(task, reissue="" if worker.paused else "its worker gave it back")
        else:  # crash, timeout or a volunteer's cap (memory, cpu_time, disk): failed attempt
            task.failures += 1
            task.failed_on.add(worker_id)
            if task.failures >= project.options["max_attempts"]:
                self._task_over(project, task, TaskState.FAILED)
                error = dict(result.error or {})
                error["reason"] = outcome
                error["attempts"] = task.attempt
                error.setdefault("message", f"task failed {task.failures} times ({outcome})")
                self._finish(project, "failed", now, error=error)
            else:
                self._requeue(task, retry=True)

    def _drop_forged(self, worker: WorkerRecord, project: ProjectRecord | None) -> None:
        """A result for a task this worker never held: count it, change nothing else. The
        project is known while the task is open; a finished task's is not kept."""
        if project is not None:
            project.forged_results_dropped += 1
        self.forged_results_dropped += 1
        self._incident(worker, "forged_results")

    def _learn_times(
        self,
        worker: WorkerRecord,
        project: ProjectRecord,
        task: TaskRecord,
        result: p.Result,
        now: float,
    ) -> None:
        """Update the project's time per task and the worker's round trip from a result of
        the current attempt, and so how many tasks the worker should hold. The worker's own
        figures are bounded by what the server saw: a lie only changes its own share."""
        round_trip = now - task.sent_at
        held = _seconds_within(result.stats.get("held"), round_trip)
        service = _seconds_within(result.stats.get("service"), round_trip)
        if held is not None:
            sample = round_trip - held
            previous = worker.rtt
            worker.rtt = (
                sample
                if previous is None or sample < previous
                else previous + RTT_RISE * (sample - previous)
            )
        if service is not None:
            previous = project.task_seconds
            project.task_seconds = (
                service if previous is None else previous + TASK_TIME_WEIGHT * (service - previous)
            )
        worker.prefetch = worker.slots * self._prefetch_per_slot(worker, project)

    def _may_hold_ahead(self, worker: WorkerRecord, project: ProjectRecord) -> bool:
        """Whether the busy ``worker`` should take one more task of ``project`` now: it holds
        fewer than the bandwidth-delay product, and the work in its hands (what is left of
        its running tasks, and its waiting ones) would run out within PREFETCH_MARGIN round
        trips. Otherwise it is woken when that happens: a task is held ahead only just in
        time, so a project that comes meanwhile is not queued behind it."""
        # a project not measured yet: one per slot at most, so it is served as soon as a
        # slot frees, not after what was held ahead of it (an idle worker takes it back)
        unknown = project.task_seconds is None
        per_slot = 1 if unknown else self._prefetch_per_slot(worker, project)
        if len(worker.waiting) >= worker.slots * per_slot or worker.waiting_unknown:
            return False
        if worker.rtt is None:
            return False
        now = self._now
        work = worker.waiting_work
        for task_id in worker.started:
            task = self.tasks[task_id]
            running = self.projects[task.project_id].task_seconds
            if running is None:
                return False  # it may run for hours: nothing is held ahead of it
            work += max(0.0, task.started_at + running - now)
        threshold = worker.slots * PREFETCH_MARGIN * worker.rtt
        due = now + (work - threshold) / worker.slots
        if due <= now + 1e-6:
            return True
        self._hold_later(worker, due)
        return False

    def _hold_later(self, worker: WorkerRecord, when: float) -> None:
        if worker.wake_at is not None and worker.wake_at <= when:
            return
        worker.wake_at = when
        if not self._wakes or when < self._wakes[0][0]:
            self._actions.append(WakeAt(when))
        heapq.heappush(self._wakes, (when, worker.worker_id))

    def _prefetch_per_slot(self, worker: WorkerRecord, project: ProjectRecord) -> int:
        """Tasks of ``project`` the worker should hold per slot beyond the one it runs: what
        the slot gets through in PREFETCH_MARGIN round trips. None until both are measured:
        an unknown task may be long, and a task held is a task no idle worker can start."""
        seconds, rtt = project.task_seconds, worker.rtt
        if seconds is None or rtt is None:
            return 0
        ratio = rtt / max(seconds, 1e-6)
        if ratio < NO_PREFETCH_RATIO:
            return 0
        return min(p.MAX_PREFETCH_PER_SLOT, math.ceil(PREFETCH_MARGIN * ratio))

    def _incident(self, worker: WorkerRecord, kind: str, count: int = 1) -> None:
        key = (worker.worker_id, kind)
        known = self._incidents.get(key)
        total = count if known is None else known.count + count
        self._incidents[key] = Incident(worker.worker_id, worker.name, kind, total)

    def take_incidents(self) -> list[Incident]:
        """What workers did wrong since the last call (one Incident per worker and kind), for
        the log; the server calls this at most once per logging interval."""
        incidents, self._incidents = list(self._incidents.values()), {}
        return incidents

    # ---- creators ----------------------------------------------------------------------------

    def submit(
        self, creator_id: str | None, submit: p.Submit, now: float, *, owner: str = ""
    ) -> list[Action]:
        """Register a project of ``owner`` (a token name). Its creator came with
        ``INITIAL_CREDIT`` and is granted the rest of its window. Raises ValueError (bad
        options, an id in use)."""
        project = self._register(creator_id, submit.project_id, submit, now, owner)
        project.credit_outstanding = max(self._window(), p.INITIAL_CREDIT)
        self._actions.append(
            ToCreator(
                creator_id,
                p.Accepted(
                    project_id=project.project_id,
                    credit=project.credit_outstanding - p.INITIAL_CREDIT,
                ),
            )
        )
        if not self.workers:
            text = "no worker is connected yet; the project waits for one"
            self._actions.append(
                ToCreator(
                    creator_id, p.Notice(project_id=project.project_id, level="info", text=text)
                )
            )
        return self._flush(now)

    def _register(
        self, creator_id: str | None, project_id: str, submit: p.Submit, now: float, owner: str
    ) -> ProjectRecord:
        if project_id in self.projects:
            raise ValueError(f"project {project_id} exists")
        options = normalize_options(submit.options)
        timeout = options["task_timeout"]
        if timeout is not None and timeout > self.max_task_time:
            # the worker's own limit then ends the task first, as a counted timeout
            options["task_timeout"] = timeout = self.max_task_time
        message = p.Project(
            project_id=project_id,
            code=submit.code,
            modules=list(submit.modules),
            parallel=submit.parallel,
            stop=submit.stop,
            only_if=submit.only_if,
            options=options,
            owner=owner,
        )
        project = ProjectRecord(project_id, creator_id, submit.name, message, options, now)
        project.owner = owner
        # a worker kills a task at its task_timeout and says so: the grace is for that
        project.task_time_limit = (
            self.max_task_time if timeout is None else timeout + TASK_TIME_GRACE
        )
        self.projects[project_id] = project
        return project

    def add_tasks(self, creator_id: str, message: p.Tasks, now: float) -> list[Action]:
        """The creator's next tasks. Each new one (seq >= ``tasks_received``) takes a unit of
        the creator's credit; resends of stored seqs are free. Raises :class:`CreditExceeded`
        (or another :class:`TasksRefused`) before changing anything when the frame asks for
        more than that: the caller closes the creator's connection."""
        project = self._own_project(creator_id, message.project_id)
        if project is None or project.status != "running":
            return self._flush(now)  # tasks racing a stop or cancel are simply dropped
        new = [entry for entry in message.tasks if entry[0] >= project.tasks_received]
        if len(new) > project.credit_outstanding:
            raise CreditExceeded(
                f"project {project.project_id}: {len(new)} new tasks sent with credit for "
                f"{project.credit_outstanding}"
            )
        if project.items_received + sum(entry[2] for entry in new) > p.MAX_INT:
            raise TooManyItems(f"project {project.project_id}: more than {p.MAX_INT} items in all")
        stored: list[tuple[int, int, bytes, int]] = []
        had_queued = project.has_queued()
        for seq, items, n_items in message.tasks:
            if seq != project.tasks_received:
                continue  # a resend of a task already stored (or a gap): not taken twice
            task = TaskRecord(self._next_task_id, project.project_id, seq, items, n_items)
            self._next_task_id += 1
            self.tasks[task.task_id] = task
            project.queue.append(task.task_id)
            project.tasks_received += 1
            project.items_received += n_items
            stored.append((task.task_id, seq, items, n_items))
        if stored:
            self._actions.append(StoreTasks(project.project_id, stored))
            if not had_queued:
                self._active.append(project.project_id)
        project.credit_outstanding -= len(new)
        self._check_runnable(project, now)
        return self._flush(now)

    def end_tasks(self, creator_id: str, message: p.End, now: float) -> list[Action]:
        project = self._own_project(creator_id, message.project_id)
        if project is None or project.status != "running":
            return self._flush(now)
        project.total_tasks = message.total_tasks
        project.credit_outstanding = 0
        self._maybe_done(project, now)
        return self._flush(now)

    def cancel(self, creator_id: str | None, project_id: str, now: float) -> list[Action]:
        project = self._own_project(creator_id, project_id)
        if project is not None and project.status == "running":
            self._finish(project, "cancelled", now)
        return self._flush(now)

    def fail(self, project_id: str, error: dict[str, Any], now: float) -> list[Action]:
        """End a running project as ``failed`` for a reason of the server's (a quota, a write
        that could not be stored): Finished carries ``error``. No-op if it is not running."""
        project = self.projects.get(project_id)
        if project is not None and project.status == "running":
            self._finish(project, "failed", now, error=error)
        return self._flush(now)

    def remove_creator(self, creator_id: str, now: float) -> list[Action]:
        """The creator's connection closed: its projects go on without it, results are kept,
        and it (or another creator) may attach again."""
        for project in self.projects.values():
            if project.creator_id == creator_id:
                project.creator_id = None
                project.credit_outstanding = 0
        return self._flush(now)

    def attach(self, creator_id: str, ref: int, project_id: str, now: float) -> list[Action]:
        """Bind a running project to ``creator_id``; answers Attached with fresh credit.
        Returns [] for a project the scheduler does not hold (finished or unknown)."""
        project = self.projects.get(project_id)
        if project is None or project.status != "running":
            return []
        project.creator_id = creator_id
        ended = project.total_tasks is not None
        pending = len(project.queue) + len(project.retries)
        project.credit_outstanding = 0 if ended else max(0, self._window() - pending)
        self._actions.append(
            ToCreator(
                creator_id,
                p.Attached(
                    ref=ref,
                    project_id=project_id,
                    status="running",
                    stored=project.tasks_received,
                    items_stored=project.items_received,
                    ended=ended,
                    credit=project.credit_outstanding,
                ),
            )
        )
        return self._flush(now)

    def restore(
        self,
        project_id: str,
        submit: p.Submit,
        *,
        submitted_at: float,
        tasks: list[tuple[int, int, bytes, int]],
        tasks_received: int,
        items_received: int,
        total_tasks: int | None,
        done: tuple[int, int, int],
        now: float,
        owner: str = "",
    ) -> list[Action]:
        """Take back a running project from durable state after a restart, with no creator
        attached. ``tasks`` are its unfinished (task_id, seq, items, n_items); ``done`` the
        (tasks, items, kept) counts of its stored results. The tasks have no leaseholders:
        a result a worker computed before the restart is dropped, and the task runs again."""
        project = self._register(None, project_id, submit, submitted_at, owner)
        project.tasks_received = tasks_received
        project.items_received = items_received
        project.total_tasks = total_tasks
        project.tasks_done = done[0]
        project.items_done = min(p.MAX_INT, done[1])
        project.items_kept = min(p.MAX_INT, done[2])
        for task_id, seq, items, n_items in tasks:
            self.tasks[task_id] = TaskRecord(task_id, project_id, seq, items, n_items)
            project.queue.append(task_id)
            self._next_task_id = max(self._next_task_id, task_id + 1)
        if project.has_queued():
            self._active.append(project_id)
        self._maybe_done(project, now)
        return self._flush(now)

    @property
    def last_task_id(self) -> int:
        """The highest task id handed out so far (0 if none)."""
        return self._next_task_id - 1

    def reserve_task_ids(self, after: int) -> None:
        """Never hand out a task id at or below ``after`` (ids stored before a restart)."""
        self._next_task_id = max(self._next_task_id, after + 1)

    def forget_project(self, project_id: str) -> None:
        """Drop a finished project's record (its results were delivered)."""
        project = self.projects.get(project_id)
        if project is not None and project.status != "running":
            self._forget(project_id)

    # ---- time --------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Expire leases of workers not heard from within their projects' lease_timeout, and
        take every task back from a worker that left a started task unanswered past its
        project's task_time_limit (heartbeats or not)."""
        for worker in list(self.workers.values()):
            overdue = [
                task_id
                for task_id in worker.leased
                if (deadline := self.tasks[task_id].run_deadline) is not None and now > deadline
            ]
            if overdue:
                # an honest worker kills a task at its time limit and answers: this one is
                # stuck or stalling, so none of its tasks is left with it
                lost = sorted(worker.leased)
                reason = f"worker {worker.name!r} held a started task past its time limit"
                for task_id in overdue:
                    self.projects[self.tasks[task_id].project_id].tasks_overdue += 1
                self.tasks_overdue += len(overdue)
                self._incident(worker, "overdue_tasks", len(overdue))
                worker.overdue = True
            else:
                lost = [
                    task_id
                    for task_id in worker.leased
                    if now - max(worker.last_seen, self.tasks[task_id].sent_at)
                    > self.projects[self.tasks[task_id].project_id].options["lease_timeout"]
                ]
                if lost:
                    # the worker may be frozen, not dead: if it wakes it must drop these
                    # tasks, and it gets no new ones until it shows a sign of life
                    worker.suspect = True
                    self._incident(worker, "expired_leases", len(lost))
                reason = f"worker {worker.name!r} gave no sign of life within lease_timeout"
            for task_id in lost:
                self._requeue(self.tasks[task_id], reissue=reason)
            if lost:
                self._actions.append(AbandonTasks(worker.worker_id, lost))
                self._ready.pop(worker.worker_id, None)
        return self._flush(now)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do (a lease expiry or a started task's time
        limit), or None if no task is leased."""
        deadline: float | None = self._wakes[0][0] if self._wakes else None
        for worker in self.workers.values():
            for task_id in worker.leased:
                task = self.tasks[task_id]
                expires = (
                    max(worker.last_seen, task.sent_at)
                    + (self.projects[task.project_id].options["lease_timeout"])
                )
                if task.run_deadline is not None and task.run_deadline < expires:
                    expires = task.run_deadline
                if deadline is None or expires < deadline:
                    deadline = expires
        return deadline

    # ---- internals ---------------------------------------------------------------------------

    def _own_project(self, creator_id: str | None, project_id: str) -> ProjectRecord | None:
        project = self.projects.get(project_id)
        if project is None or project.creator_id != creator_id:
            return None
        return project

    def _add_credit(self, worker: WorkerRecord, credit: int) -> None:
        # tasks held plus unused credit stay within what the worker's slots can use: an
        # honest worker never asks for more, and the rest is ignored
        credit = min(credit, worker.slots * MAX_HELD_PER_SLOT - worker.credit - len(worker.leased))
        if credit > 0:
            worker.credit += credit
            self._refresh(worker)

    def _window(self) -> int:
        """Queued tasks a project may have: between them, the projects still being fed hold
        enough to refill every worker twice over what it has held at most (which grows with
        the window while far workers ask for more). More would only add queueing delay."""
        feeding = sum(
            1
            for p in self.projects.values()
            if p.status == "running" and p.total_tasks is None and p.creator_id is not None
        )
        total = max(4 * self._total_slots, 2 * self._total_capacity)
        return max(MIN_WINDOW, total // max(1, feeding))

    def _unlease(self, worker: WorkerRecord, task_id: int) -> None:
        """``task_id`` leaves ``worker``: if it was running, a waiting task starts in its slot
        (at the end of this event, see ``_flush``)."""
        worker.leased.discard(task_id)
        worker.started.discard(task_id)
        if task_id in worker.waiting:
            self._leave_waiting(worker, task_id)
        task = self.tasks.get(task_id)
        if task is not None:
            task.run_deadline = None
        if worker.waiting:
            self._freed.add(worker.worker_id)
        else:
            self._waiting_workers.pop(worker.worker_id, None)
        self._refresh(worker)

    @staticmethod
    def _leave_waiting(worker: WorkerRecord, task_id: int) -> None:
        expected = worker.waiting.pop(task_id)
        if expected is None:
            worker.waiting_unknown -= 1
        else:
            worker.waiting_work -= expected
        if not worker.waiting:
            worker.waiting_work = 0.0  # no drift from float sums

    def _owe(self, worker: WorkerRecord, task: TaskRecord) -> None:
        """``task`` was taken from ``worker`` before it answered: its answer may still come."""
        owed = self._owed.setdefault(worker.device_id, OrderedDict())
        owed[(task.task_id, task.attempt)] = task.project_id
        if len(owed) > MAX_OWED:
            owed.popitem(last=False)

    def _start_waiting(self, worker: WorkerRecord, now: float) -> None:
        """Start the worker's waiting tasks, oldest first, while it has free slots."""
        while worker.waiting and len(worker.leased) - len(worker.waiting) < worker.slots:
            task_id = next(iter(worker.waiting))
            self._leave_waiting(worker, task_id)
            worker.started.add(task_id)
            task = self.tasks[task_id]
            task.run_deadline = now + self.projects[task.project_id].task_time_limit
            task.started_at = now
        if worker.waiting:
            self._waiting_workers[worker.worker_id] = None
        else:
            self._waiting_workers.pop(worker.worker_id, None)

    def _requeue(self, task: TaskRecord, *, reissue: str = "", retry: bool = False) -> None:
        """Back to the queue. ``reissue``: why it went back unanswered (its worker vanished,
        fell silent, held it too long or gave it back), which counts towards max_reissues."""
        project = self.projects[task.project_id]
        worker = self.workers.get(task.worker_id or "")
        if worker is not None:
            if task.task_id in worker.leased:  # not answered: the answer may still come
                self._owe(worker, task)
            self._unlease(worker, task.task_id)
        task.run_deadline = None
        project.leased.discard(task.task_id)
        task.state = TaskState.QUEUED
        task.worker_id = None
        if project.status != "running":
            return
        if reissue or retry:
            project.tasks_reissued += 1
        if reissue:
            task.reissues += 1
            task.reissued_because = reissue
            if task.reissues >= project.options["max_reissues"]:
                self._exhausted.append(task)
        if not project.has_queued():
            self._active.append(project.project_id)
        if retry:
            project.retries.append(task.task_id)
        else:
            project.queue.appendleft(task.task_id)

    def _complete(
        self,
        project: ProjectRecord,
        task: TaskRecord,
        worker: WorkerRecord,
        result: p.Result,
        now: float,
        *,
        forward: bool = True,
    ) -> None:
        items = task.items  # travels back with the result: the creator maps values to items
        self._task_over(project, task, TaskState.DONE)
        project.tasks_done += 1
        project.items_done = _saturating_add(project.items_done, result.n_items)
        project.items_kept = _saturating_add(project.items_kept, result.n_kept)
        project.per_worker[worker.name] += 1
        worker.done += 1
        if forward:
            stats = dict(result.stats)
            # the attempt that won may be an earlier one than the task's latest
            attempt = result.attempt if 1 <= result.attempt <= len(task.sent) else task.attempt
            sent_at = task.sent[attempt - 1] if task.sent else now
            stats.update(worker=worker.name, attempt=attempt, round_trip=now - sent_at)
            self._actions.append(
                ToCreator(
                    project.creator_id,
                    p.TaskDone(
                        project_id=project.project_id,
                        seq=task.seq,
                        items=items,
                        payload=result.payload,
                        n_items=result.n_items,
                        n_kept=result.n_kept,
                        files=result.files,
                        stats=stats,
                    ),
                )
            )
            self._maybe_done(project, now)

    def _task_over(self, project: ProjectRecord, task: TaskRecord, state: TaskState) -> None:
        task.state = state
        project.leased.discard(task.task_id)
        task.items = b""  # the payload is no longer needed; keep memory flat
        del self.tasks[task.task_id]

    def _take_back(self, task: TaskRecord) -> None:
        """Withdraw a task from wherever it is (queue or another worker's lease), because a
        result from an earlier attempt arrived first."""
        project = self.projects[task.project_id]
        if task.state is TaskState.LEASED:
            holder = self.workers.get(task.worker_id or "")
            if holder is not None:
                self._owe(holder, task)
                self._unlease(holder, task.task_id)
                self._actions.append(AbandonTasks(holder.worker_id, [task.task_id]))
            project.leased.discard(task.task_id)
        else:
            for queue in (project.queue, project.retries):
                if task.task_id in queue:
                    queue.remove(task.task_id)
            if not project.has_queued() and project.project_id in self._active:
                self._active.remove(project.project_id)  # keep one turn per project
        task.state = TaskState.LEASED  # so that the outcome below completes it

    def _maybe_done(self, project: ProjectRecord, now: float) -> None:
        if (
            project.status == "running"
            and project.total_tasks is not None
            and project.tasks_done >= project.total_tasks
        ):
            self._finish(project, "done", now)

    def _finish(
        self,
        project: ProjectRecord,
        status: str,
        now: float,
        *,
        error: dict[str, Any] | None = None,
        stop: list[Any] | None = None,
    ) -> None:
        project.status = status
        project.finished_at = now
        by_worker: dict[str, list[int]] = {}
        for task_id in project.leased:
            task = self.tasks[task_id]
            worker = self.workers.get(task.worker_id or "")
            if worker is not None:
                self._owe(worker, task)
                self._unlease(worker, task_id)
                by_worker.setdefault(worker.worker_id, []).append(task_id)
        for worker_id, task_ids in by_worker.items():
            self._actions.append(AbandonTasks(worker_id, sorted(task_ids)))
        for task_id in [*project.leased, *project.queue, *project.retries]:
            self.tasks.pop(task_id, None)
        project.leased.clear()
        project.queue.clear()
        project.retries.clear()
        self._actions.append(
            ToCreator(
                project.creator_id,
                p.Finished(
                    project_id=project.project_id,
                    status=status,
                    error=error,
                    stop=stop,
                    stats=self.project_stats(project),
                ),
            )
        )

    def _forget(self, project_id: str) -> None:
        self.projects.pop(project_id, None)
        for device_id, owed in list(self._owed.items()):
            for key in [k for k, owner in owed.items() if owner == project_id]:
                del owed[key]
            if not owed:
                del self._owed[device_id]
        for worker in self.workers.values():
            worker.loaded.discard(project_id)

    def project_stats(self, project: ProjectRecord) -> dict[str, Any]:
        return {
            "submitted_at": project.submitted_at,
            "first_started_at": project.first_started_at,
            "finished_at": project.finished_at,
            "tasks_done": project.tasks_done,
            "items_done": project.items_done,
            "items_kept": project.items_kept,
            "tasks_reissued": project.tasks_reissued,
            "tasks_recalled": project.tasks_recalled,
            "duplicates_dropped": project.duplicates_dropped,
            "forged_results_dropped": project.forged_results_dropped,
            "tasks_overdue": project.tasks_overdue,
            "per_worker": dict(project.per_worker),
        }

    def _check_runnable(self, project: ProjectRecord, now: float, reason: str = "") -> None:
        """Say so (or fail) when every connected worker has rejected a project with work."""
        if project.status != "running" or not self.workers or not project.has_queued():
            return
        if any(w.may_run(project) for w in self.workers.values()):
            return
        text = f"no connected worker can run project {project.name!r}"
        if reason:
            text += f": {reason}"
        text = text[: p.MAX_TEXT]  # a worker's reason may fill a Notice on its own
        if project.options["fail_when_unrunnable"]:
            error = {"reason": "unrunnable", "message": text}
            self._finish(project, "failed", now, error=error)
        elif not project.unrunnable_noticed:
            project.unrunnable_noticed = True
            self._actions.append(
                ToCreator(
                    project.creator_id,
                    p.Notice(project_id=project.project_id, level="warning", text=text),
                )
            )

    def _grant_creators(self) -> None:
        """Top up each running project's creator credit to the window, in batches."""
        window = self._window()
        for project in self.projects.values():
            if (
                project.status != "running"
                or project.total_tasks is not None
                or project.creator_id is None
            ):
                continue
            pending = len(project.queue) + len(project.retries) + project.credit_outstanding
            want = window - pending
            if want >= max(1, window // 4):
                project.credit_outstanding += want
                self._actions.append(
                    ToCreator(
                        project.creator_id,
                        p.More(
                            project_id=project.project_id,
                            credit=want,
                            stored=project.tasks_received,
                        ),
                    )
                )

    def _next_task_for(self, worker: WorkerRecord, *, prefetch: bool) -> TaskRecord | None:
        """The next queued task for ``worker``: from a project in its last round first (see
        below), else from the project with the fewest tasks in flight, ties to the one
        served least recently: every project gets an even share of the workers, and a
        small one that comes late is served at the next free place. ``prefetch``: the
        worker's slots are busy, so only a project whose task it should hold ahead now (see
        ``_may_hold_ahead``) may give it one."""
        chosen: ProjectRecord | None = None
        best: tuple[bool, int, int] | None = None
        stale = False
        for project_id in self._active:
            project = self.projects.get(project_id)
            if project is None or project.status != "running" or not project.has_queued():
                stale = True
                continue
            if not worker.may_run(project):
                continue
            # a project whose whole rest fits in one round of the workers goes first: it
            # ends at once, and the others lose one task's time
            last_round = (
                project.total_tasks is not None
                and len(project.queue) + len(project.retries) <= self._total_slots
            )
            key = (not last_round, len(project.leased), project.served)
            if best is not None and key >= best:
                continue
            if prefetch and not self._may_hold_ahead(worker, project):
                continue
            chosen, best = project, key
        if stale:
            self._active = deque(
                dict.fromkeys(
                    project_id
                    for project_id in self._active
                    if (project := self.projects.get(project_id)) is not None
                    and project.status == "running"
                    and project.has_queued()
                )
            )
        if chosen is None:
            return None
        self._served += 1
        chosen.served = self._served  # behind its equals next time
        task_id = self._pick(chosen, worker)
        if not chosen.has_queued():
            self._active.remove(chosen.project_id)
        return self.tasks[task_id]

    def _pick(self, project: ProjectRecord, worker: WorkerRecord) -> int:
        # A retried task goes to a worker it has not failed on when one is asking; it goes to
        # any worker only when nothing else is queued, so a one-worker setup still progresses.
        for index, task_id in enumerate(project.retries):
            if worker.worker_id not in self.tasks[task_id].failed_on:
                del project.retries[index]
                return task_id
        if project.queue:
            return project.queue.popleft()
        return project.retries.popleft()

    def _lease(self, task: TaskRecord, worker: WorkerRecord, now: float) -> None:
        project = self.projects[task.project_id]
        if project.project_id not in worker.loaded:
            worker.loaded.add(project.project_id)
            self._actions.append(SendProject(worker.worker_id, project.message))
        task.state = TaskState.LEASED
        task.attempt += 1
        task.worker_id = worker.worker_id
        task.sent.append(now)
        if worker.device_id not in task.holders:
            task.holders += (worker.device_id,)
        worker.leased.add(task.task_id)
        expected = project.task_seconds
        worker.waiting[task.task_id] = expected
        if expected is None:
            worker.waiting_unknown += 1
        else:
            worker.waiting_work += expected
        self._start_waiting(worker, now)
        worker.credit -= 1
        if len(worker.leased) > worker.capacity:
            self._total_capacity += len(worker.leased) - worker.capacity
            worker.capacity = len(worker.leased)
        self._refresh(worker)
        project.leased.add(task.task_id)
        if project.first_started_at is None:
            project.first_started_at = now
        self._actions.append(
            SendTask(
                worker.worker_id,
                p.Task(
                    task_id=task.task_id,
                    project_id=task.project_id,
                    attempt=task.attempt,
                    items=task.items,
                ),
            )
        )

    def _dispatch(self, now: float) -> None:
        """Free slots first, then what workers hold ahead; one task per worker per pass, so
        no worker hogs the queue. A free slot with nothing queued takes an unstarted task
        from the worker holding the most (prefetch hides a round trip; it does not claim
        work). A worker with no project to prefetch from leaves the ready set until its next
        event, so a pass costs only what can change."""
        while self._ready and (self._active or self._waiting_workers):
            progressed = False
            ready = [self.workers[w] for w in self._ready]
            free = [w for w in ready if w.running < w.slots]
            busy = [w for w in ready if w.running >= w.slots]
            for worker in free:
                if not worker.credit or worker.worker_id not in self._ready:
                    continue
                task = self._next_task_for(worker, prefetch=False) if self._active else None
                if task is None:
                    task = self._steal_for(worker)
                if task is not None:
                    self._lease(task, worker, now)
                    progressed = True
            for worker in busy:
                if not worker.credit or worker.worker_id not in self._ready:
                    continue
                task = self._next_task_for(worker, prefetch=True) if self._active else None
                if task is None:
                    self._ready.pop(worker.worker_id, None)  # back at its next event
                    continue
                self._lease(task, worker, now)
                progressed = True
            if not progressed:
                break

    def _steal_for(self, idle: WorkerRecord) -> TaskRecord | None:
        """Take the last unstarted task (the one it would run last) from the worker holding
        the most, for ``idle``'s free slot. The holder is told to give it back; if it had
        started it after all, the first result wins and the other copy is abandoned."""
        victim: WorkerRecord | None = None
        for index, worker_id in enumerate(self._waiting_workers):
            if index >= STEAL_SCAN:
                break
            worker = self.workers[worker_id]
            if worker is not idle and (victim is None or len(worker.waiting) > len(victim.waiting)):
                victim = worker
        if victim is None:
            return None
        for position, task_id in enumerate(reversed(victim.waiting)):
            task = self.tasks[task_id]
            project = self.projects[task.project_id]
            if not idle.may_run(project) or idle.worker_id in task.failed_on:
                continue
            seconds = project.task_seconds
            starts_in = (len(victim.waiting) - position) / victim.slots * (seconds or 0.0)
            if seconds is not None and starts_in <= (idle.rtt or 0.0):
                return None  # it starts where it is before it could reach the idle worker
            self._owe(victim, task)
            self._unlease(victim, task_id)
            task.state = TaskState.QUEUED
            task.worker_id = None
            project.tasks_recalled += 1
            self._actions.append(RecallTasks(victim.worker_id, [task_id]))
            return task
        return None

    def _flush(self, now: float) -> list[Action]:
        self._now = now
        while self._wakes and self._wakes[0][0] <= now:
            _, worker_id = heapq.heappop(self._wakes)
            worker = self.workers.get(worker_id)
            if worker is not None and worker.wake_at is not None and worker.wake_at <= now:
                worker.wake_at = None
                self._refresh(worker)
        freed, self._freed = self._freed, set()
        for worker_id in freed:
            worker = self.workers.get(worker_id)
            if worker is not None:
                self._start_waiting(worker, now)
        exhausted, self._exhausted = self._exhausted, []
        for task in exhausted:
            project = self.projects.get(task.project_id)
            if project is not None and project.status == "running":
                error = {
                    "reason": "reissued",
                    "message": (
                        f"a task went back to the queue {task.reissues} times without an "
                        f"answer (max_reissues); the last time because {task.reissued_because}"
                    ),
                    "attempts": task.attempt,
                }
                self._finish(project, "failed", now, error=error)
        self._dispatch(now)
        self._grant_creators()
        actions, self._actions = self._actions, []
        return actions
