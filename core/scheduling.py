"""The workflow scheduler's rules: priority workflows that hold named resource locks. No Ray.

A *workflow* is a named kind of work in settings (``scheduler.workflows``): its
priority (lower runs first: critical trading 1 ... data collection 25), the
locks it needs (``trading_decision``, ``portfolio_data``, ...) and the callable
that does it (``"package.module:function"``). A *job* is one submission of a
workflow with its arguments.

Rules, all in ``WorkflowQueue`` (no Ray, so they are tested fast and exactly):

* Two jobs that need the same lock never run at once.
* The queue is ordered by priority with ageing: a job waiting ``m`` minutes
  counts as ``priority - ageing_per_minute * m``, so the lowest priority still
  runs. A job that cannot start because a lock is held *reserves* its locks
  against jobs behind it, so a stream of small jobs cannot starve a big one.
* A failed or timed-out attempt is retried with exponential backoff
  (``core.resilience.RetryPolicy``) up to ``max_attempts``; its locks are free
  while it waits. A cancelled job is not retried.
* A job's locks are released only when its owner says the attempt has ended,
  never on a timer: a timed-out or cancelled attempt is killed first.

The queue runs nothing itself: ``actors.scheduler.WorkflowScheduler`` is the
Ray actor that runs each attempt, kills the ones that must stop and journals
the queue (``to_state``) so a restarted scheduler picks up where it was.
Settings come as any object with ``SchedulerSettings``' fields
(``QueueSettings``), so this module needs nothing above ``core``.
"""

from __future__ import annotations

import importlib
import json
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Protocol

from core.resilience import RetryPolicy

QUEUED = "queued"  # waiting for its turn (or for a retry's backoff to pass)
RUNNING = "running"
STOPPING = "stopping"  # timed out or cancelled; the attempt is being killed, locks still held
RECOVERING = "recovering"  # was running when the scheduler died; locks held until known to be over
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"
ACTIVE = (RUNNING, STOPPING, RECOVERING)
FINAL = (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED)

ERROR_CHARS = 2000


class WorkflowSpecLike(Protocol):
    """One named workflow (``cluster.settings.WorkflowSpec``)."""

    priority: int
    locks: list[str]
    target: str | None
    timeout_s: float | None
    max_attempts: int | None


class QueueSettings(Protocol):
    """What the queue reads of ``cluster.settings.SchedulerSettings``."""

    workflows: Mapping[str, WorkflowSpecLike]
    ageing_per_minute: float
    max_running: int
    max_attempts: int
    retry_base_delay_s: float
    retry_multiplier: float
    retry_max_delay_s: float
    timeout_s: float
    history: int



class WorkflowError(ValueError):
    """A submission the scheduler refuses; the message says what to fix."""


def import_target(path: str) -> Callable[..., Any]:
    """``"package.module:function"`` to the function."""
    mod, sep, name = path.partition(":")
    if not sep or not mod or not name:
        raise WorkflowError(f"target {path!r} must be 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise WorkflowError(f"target {path!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise WorkflowError(f"target {path!r} is not callable")
    return fn


@dataclass
class Job:
    id: str
    workflow: str
    target: str
    args: list[Any]
    kwargs: dict[str, Any]
    priority: int
    locks: list[str]
    timeout_s: float
    max_attempts: int
    seq: int
    submitted_at: float
    state: str = QUEUED
    attempts: int = 0
    not_before: float = 0.0  # a retry waits for its backoff
    started_at: float | None = None
    finished_at: float | None = None
    stop_reason: str | None = None  # "timeout" | "cancelled" while STOPPING
    run_ref: str | None = None  # Ray task id of the running attempt
    error: str | None = None
    attempt_log: list[dict[str, Any]] = field(default_factory=list)

    def effective_priority(self, now: float, ageing_per_minute: float) -> float:
        return self.priority - ageing_per_minute * max(0.0, now - self.submitted_at) / 60.0

    def public(self, now: float, ageing_per_minute: float) -> dict[str, Any]:
        d = asdict(self)
        d["effective_priority"] = round(self.effective_priority(now, ageing_per_minute), 3)
        return d


class WorkflowQueue:
    """The scheduler's state and rules: queue, locks, ageing, retries, timeouts. No Ray.

    Time comes from ``clock`` (wall-clock seconds: the journal outlives the process).
    Every change sets ``dirty`` so the owner knows to journal it.
    """

    def __init__(
        self,
        settings: QueueSettings,
        *,
        clock: Callable[[], float] = time.time,
        check_target: Callable[[str], Any] | None = import_target,
        state: dict[str, Any] | None = None,
    ):
        self.settings = settings
        self.clock = clock
        self.check_target = check_target
        self.retry = RetryPolicy(
            attempts=settings.max_attempts,
            base_delay_s=settings.retry_base_delay_s,
            multiplier=settings.retry_multiplier,
            max_delay_s=settings.retry_max_delay_s,
        )
        self.jobs: dict[str, Job] = {}
        self._seq = 0
        # Ids of finished jobs beyond the kept history: a resubmission under one of
        # these ids is refused, so a finished job never runs again.
        self._finished_ids: deque[str] = deque(maxlen=max(10_000, 10 * settings.history))
        self.dirty = False
        if state:
            self._load(state)

    # -- submitting ---------------------------------------------------------------
    def submit(
        self,
        workflow: str,
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        job_id: str | None = None,
        target: str | None = None,
        priority: int | None = None,
        locks: list[str] | None = None,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
    ) -> Job:
        """Queue one job. With ``job_id``, submitting again returns the same job (idempotent)."""
        if job_id is not None:
            if job_id in self.jobs:
                return self.jobs[job_id]
            if job_id in self._finished_ids:
                raise WorkflowError(f"job {job_id!r} already finished; submit under a new id to run it again")
        spec = self.settings.workflows.get(workflow)
        if spec is None:
            raise WorkflowError(f"unknown workflow {workflow!r}; known: {', '.join(sorted(self.settings.workflows))}")
        target = target or spec.target
        if not target:
            raise WorkflowError(
                f"workflow {workflow!r} has no target; set scheduler.workflows.{workflow}.target = 'package.module:function'"
            )
        if self.check_target is not None:
            self.check_target(target)
        args = list(args)
        kwargs = dict(kwargs or {})
        try:
            json.dumps([args, kwargs])
        except (TypeError, ValueError) as e:
            raise WorkflowError(f"arguments of {workflow!r} must be JSON (they are journalled): {e}") from None
        if priority is not None and priority < 0:
            raise WorkflowError(f"priority {priority}: must be >= 0")
        lock_list = sorted(set(spec.locks if locks is None else locks))
        timeout = float(timeout_s if timeout_s is not None else spec.timeout_s or self.settings.timeout_s)
        attempts = int(max_attempts if max_attempts is not None else spec.max_attempts or self.settings.max_attempts)
        if timeout <= 0 or attempts < 1:
            raise WorkflowError(f"timeout_s must be > 0 and max_attempts >= 1 (got {timeout}, {attempts})")
        self._seq += 1
        job = Job(
            id=job_id or f"{workflow}-{uuid.uuid4().hex[:12]}",
            workflow=workflow,
            target=target,
            args=args,
            kwargs=kwargs,
            priority=spec.priority if priority is None else int(priority),
            locks=lock_list,
            timeout_s=timeout,
            max_attempts=attempts,
            seq=self._seq,
            submitted_at=self.clock(),
        )
        self.jobs[job.id] = job
        self.dirty = True
        return job

    # -- choosing what runs -----------------------------------------------------------
    def held_locks(self) -> dict[str, str]:
        """lock -> id of the job holding it."""
        out: dict[str, str] = {}
        for j in self.jobs.values():
            if j.state in ACTIVE:
                for lock in j.locks:
                    if lock in out:  # the one invariant everything else rests on
                        raise AssertionError(f"lock {lock} held by {out[lock]} and {j.id}")
                    out[lock] = j.id
        return out

    def queued(self, now: float | None = None) -> list[Job]:
        """Queued jobs, most urgent first (effective priority, then submission order)."""
        now = self.clock() if now is None else now
        q = [j for j in self.jobs.values() if j.state == QUEUED]
        rate = self.settings.ageing_per_minute
        return sorted(q, key=lambda j: (j.effective_priority(now, rate), j.seq))

    def take_next(self) -> list[Job]:
        """Start what may start now; each returned job is RUNNING and holds its locks."""
        now = self.clock()
        held = set(self.held_locks())
        slots = self.settings.max_running - sum(1 for j in self.jobs.values() if j.state in ACTIVE)
        reserved: set[str] = set()
        started: list[Job] = []
        for j in self.queued(now):
            if slots <= 0:
                break
            if j.not_before > now:
                continue  # backing off; its locks stay free for others
            if any(lock in held or lock in reserved for lock in j.locks):
                reserved.update(j.locks)  # nobody behind it may take what it waits for
                continue
            j.state, j.attempts, j.started_at = RUNNING, j.attempts + 1, now
            j.run_ref, j.stop_reason = None, None
            held.update(j.locks)
            slots -= 1
            started.append(j)
        if started:
            self.dirty = True
        return started

    def set_run_ref(self, job_id: str, ref: str) -> None:
        self.jobs[job_id].run_ref = ref
        self.dirty = True

    # -- attempts ending --------------------------------------------------------------
    def expired(self) -> list[Job]:
        """Running jobs past their time limit, now STOPPING (the owner kills them)."""
        now = self.clock()
        out = []
        for j in self.jobs.values():
            if j.state == RUNNING and j.started_at is not None and now - j.started_at > j.timeout_s:
                j.state, j.stop_reason = STOPPING, "timeout"
                out.append(j)
        if out:
            self.dirty = True
        return out

    def attempt_ended(self, job_id: str, ok: bool, error: str | None = None) -> Job:
        """Ray says the attempt is over: release the locks and decide what follows."""
        j = self.jobs[job_id]
        if j.state not in ACTIVE:
            raise ValueError(f"job {job_id} is {j.state}, not running")
        now = self.clock()
        reason = j.stop_reason
        if ok:
            outcome = SUCCEEDED
        elif reason == "cancelled":
            outcome = CANCELLED
        elif reason == "timeout":
            outcome = TIMED_OUT
            error = f"timed out after {j.timeout_s:g}s"
        else:
            outcome = FAILED
        j.attempt_log.append(
            {"attempt": j.attempts, "started_at": j.started_at, "ended_at": now, "outcome": outcome,
             "error": (error or "")[-ERROR_CHARS:] or None}
        )
        j.error = (error or "")[-ERROR_CHARS:] or None
        j.run_ref, j.stop_reason = None, None
        if outcome in (FAILED, TIMED_OUT) and j.attempts < j.max_attempts:
            j.state = QUEUED
            j.not_before = now + self.retry.delay(j.attempts)
        else:
            self._finish(j, outcome, now)
        self.dirty = True
        return j

    def cancel(self, job_id: str) -> Job:
        """Queued: cancelled now. Running: STOPPING until the attempt is killed. Finished: unchanged."""
        j = self.jobs.get(job_id)
        if j is None:
            raise WorkflowError(f"no job {job_id!r} (see `raytrade workflows ls`)")
        if j.state == QUEUED:
            self._finish(j, CANCELLED, self.clock())
            self.dirty = True
        elif j.state in (RUNNING, RECOVERING, STOPPING):
            if j.state == RUNNING or j.stop_reason != "cancelled":
                j.stop_reason = "cancelled"
                if j.state == RUNNING:
                    j.state = STOPPING
                self.dirty = True
        return j

    def _finish(self, j: Job, outcome: str, now: float) -> None:
        j.state, j.finished_at = outcome, now
        self._prune()

    def _prune(self) -> None:
        done = sorted((j for j in self.jobs.values() if j.state in FINAL), key=lambda j: j.finished_at or 0)
        for j in done[: max(0, len(done) - self.settings.history)]:
            self._finished_ids.append(j.id)
            del self.jobs[j.id]

    # -- after a restart ----------------------------------------------------------------
    def recovering(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == RECOVERING]

    def recovered(self, job_id: str, completed: bool) -> Job:
        """A job that was running when the scheduler died is now known to be over.

        ``completed``: its attempt left its completion marker, so it succeeded and
        is not run again. Otherwise it was interrupted: it goes back to the queue
        (the scheduler's death is not the workflow's fault, so the attempt is not
        counted), unless it was being cancelled.
        """
        j = self.jobs[job_id]
        if j.state != RECOVERING:
            raise ValueError(f"job {job_id} is {j.state}, not recovering")
        now = self.clock()
        if completed:
            j.attempt_log.append({"attempt": j.attempts, "started_at": j.started_at, "ended_at": now,
                                  "outcome": SUCCEEDED, "error": None, "recovered": True})
            j.run_ref, j.stop_reason = None, None
            self._finish(j, SUCCEEDED, now)
        elif j.stop_reason == "cancelled":
            j.run_ref = None
            self._finish(j, CANCELLED, now)
        else:
            j.attempt_log.append({"attempt": j.attempts, "started_at": j.started_at, "ended_at": now,
                                  "outcome": "interrupted", "error": "the scheduler restarted during the attempt"})
            j.attempts -= 1
            j.state, j.run_ref, j.stop_reason, j.not_before = QUEUED, None, None, 0.0
        self.dirty = True
        return j

    # -- the journal --------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "seq": self._seq,
            "jobs": [asdict(j) for j in sorted(self.jobs.values(), key=lambda j: j.seq)],
            "finished_ids": list(self._finished_ids),
        }

    def _load(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"scheduler journal version {state.get('version')!r} is not 1")
        self._seq = int(state["seq"])
        self._finished_ids.extend(state.get("finished_ids", []))
        for d in state["jobs"]:
            j = Job(**d)
            if j.state in (RUNNING, STOPPING):
                j.state = RECOVERING  # locks stay held until the old attempt is known to be over
            self.jobs[j.id] = j

    # -- looking ------------------------------------------------------------------------
    def status(self, history: int | None = None) -> dict[str, Any]:
        now = self.clock()
        rate = self.settings.ageing_per_minute
        held = self.held_locks()
        active = sorted((j for j in self.jobs.values() if j.state in ACTIVE), key=lambda j: j.started_at or 0)
        done = sorted((j for j in self.jobs.values() if j.state in FINAL), key=lambda j: -(j.finished_at or 0))
        queued = []
        for j in self.queued(now):
            d = _brief(j, now, rate)
            d["waiting_for"] = [lock for lock in j.locks if lock in held]
            if j.not_before > now:
                d["retry_in_s"] = round(j.not_before - now, 3)
            queued.append(d)
        return {
            "running": [{**_brief(j, now, rate), "locks_held": j.locks} for j in active],
            "queued": queued,
            "history": [_brief(j, now, rate) for j in done[: history or self.settings.history]],
            "locks": held,
        }


def _brief(j: Job, now: float, rate: float) -> dict[str, Any]:
    d = {
        "id": j.id, "workflow": j.workflow, "state": j.state, "priority": j.priority,
        "effective_priority": round(j.effective_priority(now, rate), 3), "attempts": j.attempts,
        "max_attempts": j.max_attempts, "locks": j.locks, "submitted_at": j.submitted_at,
        "started_at": j.started_at, "finished_at": j.finished_at,
    }
    if j.error:
        d["error"] = j.error.strip().splitlines()[-1][:300]
    if j.stop_reason:
        d["stopping_because"] = j.stop_reason
    return d


def completion_marker(journal_path: str, job_id: str, attempt: int) -> str:
    """Where a succeeded attempt leaves its marker: beside the journal, under ``done/``."""
    base = journal_path.rsplit("/", 1)[0] if "/" in journal_path else ""
    return f"{base}/done/{job_id}.{attempt}.json" if base else f"done/{job_id}.{attempt}.json"

