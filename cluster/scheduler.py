"""The workflow scheduler: priority workflows that hold named resource locks.

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
* A job's locks are released only when Ray says the attempt has ended, never
  on a timer: a timed-out or cancelled attempt is killed first.

``WorkflowScheduler`` is the Ray actor around it (named ``scheduler`` in
raytrade's namespace, resources of the ``scheduler`` role): it runs each
attempt as a Ray task (resources of the ``workflow`` role), and journals the
queue to the store (``scheduler.journal``) before it starts anything. A
restarted scheduler reloads the journal: queued jobs keep their place;
finished jobs are never run again; an attempt that was running when the
scheduler died keeps its locks until it is known to be over (Ray kills tasks
whose owner died), then counts as succeeded if it left its completion marker,
and otherwise goes back to the queue. A workflow therefore runs at least once
and, past a crash at the wrong moment, possibly twice: workflows that change
money must be idempotent per job id (the broker's client order ids are).

This module does not decide *what* a workflow does; the parts that own the work
(risk, report, learner) provide the callables.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import ray

from cluster.logs import get_logger
from cluster.resources import ray_options
from cluster.settings import SchedulerSettings, Settings
from core.resilience import RetryPolicy

log = get_logger("scheduler")

SCHEDULER_ACTOR = "scheduler"

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
        settings: SchedulerSettings,
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


# =====================================================================================
# The Ray side: a thin actor around WorkflowQueue.
# =====================================================================================

def completion_marker(journal_path: str, job_id: str, attempt: int) -> str:
    base = journal_path.rsplit("/", 1)[0] if "/" in journal_path else ""
    return f"{base}/done/{job_id}.{attempt}.json" if base else f"done/{job_id}.{attempt}.json"


def load_journal(store: Any, path: str) -> dict[str, Any] | None:
    """The journalled queue, or None for a first start. An unreadable journal stops
    the scheduler: starting empty would silently drop queued work or rerun finished work."""
    if not store.exists(path):
        return None
    raw = store.get_bytes(path)
    try:
        state = json.loads(raw)
        WorkflowQueue(SchedulerSettings(), check_target=None, state=state)  # the shape is checked, not just the JSON
        return state
    except (ValueError, TypeError, KeyError) as e:
        raise RuntimeError(
            f"the scheduler journal {path} in the store is unreadable ({type(e).__name__}: {str(e)[:200]}); "
            "move it aside to start with an empty queue"
        ) from None


def _store(settings: Settings):
    from core.store import BarStore

    return BarStore.from_settings(settings.store, settings.resilience)


@ray.remote(max_retries=0)
def _run_attempt(job_id: str, attempt: int, target: str, args: list, kwargs: dict, settings: Settings) -> str:
    """One attempt of a job, in its own Ray task; leaves a completion marker when it succeeds."""
    fn = import_target(target)
    result = fn(*args, **kwargs)
    marker = completion_marker(settings.scheduler.journal, job_id, attempt)
    _store(settings).put_bytes(marker, json.dumps({"job": job_id, "attempt": attempt, "at": time.time()}).encode())
    return repr(result)[:500]


@ray.remote
class WorkflowScheduler:
    """Named ``scheduler`` actor. Submit with ``submit``; look with ``status``."""

    def __init__(self, settings: Settings):
        from cluster.logs import configure_logging

        configure_logging(settings)
        self.settings = settings
        self.cfg = settings.scheduler
        self.store = _store(settings)
        self._lock = threading.RLock()
        self.queue = WorkflowQueue(self.cfg, state=load_journal(self.store, self.cfg.journal))
        self.refs: dict[str, Any] = {}
        self.started_at = time.time()
        self.restored = len(self.queue.jobs)
        if self.queue.recovering():
            log.warning("scheduler restarted with %d attempt(s) that were running", len(self.queue.recovering()))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="workflow-scheduler", daemon=True)
        self._thread.start()

    # -- the loop -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._tick()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad tick; it is logged
                log.error("scheduler tick failed: %s", traceback.format_exc()[-2000:])
            self._stop.wait(self.cfg.tick_s)

    def _tick(self) -> None:
        self._reap()
        self._recover()
        for j in self.queue.expired():
            self._kill(j.id)
        self._save()
        starting = self.queue.take_next()
        if starting:
            # Journalled as running *before* any attempt starts: a crash from here on
            # finds them RECOVERING, never QUEUED with an attempt alive somewhere.
            self._save()
            opts = ray_options("workflow", "cpu", self.settings.ray.resource_overrides)
            for j in starting:
                ref = _run_attempt.options(**opts, name=f"workflow:{j.workflow}").remote(
                    j.id, j.attempts, j.target, j.args, j.kwargs, self.settings
                )
                self.refs[j.id] = ref
                self.queue.set_run_ref(j.id, ref.task_id().hex())
            self._save()

    def _reap(self) -> None:
        if not self.refs:
            return
        ready, _ = ray.wait(list(self.refs.values()), num_returns=len(self.refs), timeout=0)
        by_ref = {r: jid for jid, r in self.refs.items()}
        for ref in ready:
            jid = by_ref[ref]
            del self.refs[jid]
            try:
                ray.get(ref)
                self.queue.attempt_ended(jid, ok=True)
            except Exception as e:  # noqa: BLE001 - the workflow's own error is its outcome
                self.queue.attempt_ended(jid, ok=False, error=_error_text(e))

    def _kill(self, job_id: str) -> None:
        ref = self.refs.get(job_id)
        if ref is not None:
            ray.cancel(ref, force=True)  # the lock is released when the ref resolves, in _reap

    def _recover(self) -> None:
        for j in self.queue.recovering():
            if self.store.exists(completion_marker(self.cfg.journal, j.id, j.attempts)):
                self.queue.recovered(j.id, completed=True)
                continue
            over = _attempt_over(j.run_ref)
            waited = time.time() - self.started_at
            if over is True or (over is None and waited >= self.cfg.recovery_grace_s) or \
                    waited >= 10 * max(self.cfg.recovery_grace_s, 1.0):
                # Its completion marker is written before the task returns: check once more.
                done = self.store.exists(completion_marker(self.cfg.journal, j.id, j.attempts))
                self.queue.recovered(j.id, completed=done)

    def _save(self) -> None:
        if self.queue.dirty:
            self.store.put_bytes(self.cfg.journal, json.dumps(self.queue.to_state()).encode())
            self.queue.dirty = False

    # -- the API ---------------------------------------------------------------------
    def submit(self, workflow: str, args: list | None = None, kwargs: dict | None = None, **options: Any) -> dict:
        with self._lock:
            job = self.queue.submit(workflow, args or [], kwargs, **options)
            self._save()
            return job.public(time.time(), self.cfg.ageing_per_minute)

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            job = self.queue.cancel(job_id)
            if job.state == STOPPING:
                self._kill(job_id)
            self._save()
            return job.public(time.time(), self.cfg.ageing_per_minute)

    def job(self, job_id: str) -> dict | None:
        with self._lock:
            j = self.queue.jobs.get(job_id)
            return None if j is None else j.public(time.time(), self.cfg.ageing_per_minute)

    def status(self, history: int | None = None) -> dict:
        with self._lock:
            st = self.queue.status(history)
            st["scheduler"] = {"up_since": self.started_at, "restored_jobs": self.restored,
                               "max_running": self.cfg.max_running}
            return st

    def workflows(self) -> dict:
        return {name: spec.model_dump() for name, spec in self.cfg.workflows.items()}

    def stop(self) -> None:
        self._stop.set()


def _attempt_over(task_id: str | None) -> bool | None:
    """Whether Ray says the task has ended: True, False (still running), None (Ray cannot say)."""
    if task_id is None:
        return None  # journalled as starting; it may have been launched before the crash
    try:
        from ray.util.state import get_task

        # The address is explicit: with several Ray instances on one machine "auto" is ambiguous.
        t = get_task(task_id, timeout=5, address=ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - no dashboard / state API: fall back to the grace period
        return None
    if not t:
        return None  # its events may never have reached the GCS (an owner killed within a second)
    states = [x.state for x in t] if isinstance(t, list) else [t.state]
    return all(s in ("FINISHED", "FAILED") for s in states)


def _error_text(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(e, ray.exceptions.TaskCancelledError):
        return "the attempt was killed"
    if isinstance(e, ray.exceptions.RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {e}"


def scheduler_options(settings: Settings, *, detached: bool = True) -> dict[str, Any]:
    from cluster.runtime import actor_options

    # max_task_retries=0: a submit that reached the old actor is not replayed on the new one.
    return actor_options("scheduler", settings, SCHEDULER_ACTOR, detached=detached, max_task_retries=0)


def start_scheduler(settings: Settings, *, detached: bool = True) -> Any:
    """The scheduler actor, created if it is not running (it restarts itself after a crash)."""
    return WorkflowScheduler.options(**scheduler_options(settings, detached=detached)).remote(settings)


def get_scheduler(settings: Settings) -> Any:
    from cluster.runtime import get_actor

    return get_actor(SCHEDULER_ACTOR, settings)


def scheduler_summary(settings: Settings, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The scheduler's queue for the health view: None when it is not running."""
    try:
        sched = get_scheduler(settings)
        st = ray.get(sched.status.remote(10), timeout=timeout_s)
    except LookupError:
        return None
    except (ray.exceptions.RayError, TimeoutError) as e:
        return {"error": f"{type(e).__name__}: the scheduler did not answer"}
    return {
        "running": [{"id": j["id"], "workflow": j["workflow"], "locks_held": j["locks_held"]} for j in st["running"]],
        "queued": len(st["queued"]),
        "recent": [{"id": j["id"], "workflow": j["workflow"], "state": j["state"]} for j in st["history"]],
    }
