"""The workflow scheduler actor: runs the queue of ``core.scheduling`` on Ray.

``WorkflowScheduler`` is a thin Ray actor around ``core.scheduling.WorkflowQueue``
(which holds every rule: priorities, ageing, locks, retries, timeouts). It is
named ``scheduler`` in raytrade's namespace (``cluster.names.SCHEDULER``), with
the resources of the ``scheduler`` role: it runs each attempt as a Ray task
(resources of the ``workflow`` role), and journals the queue to the store
(``scheduler.journal``) before it starts anything. A restarted scheduler
reloads the journal: queued jobs keep their place; finished jobs are never run
again; an attempt that was running when the scheduler died keeps its locks
until it is known to be over (Ray kills tasks whose owner died), then counts
as succeeded if it left its completion marker, and otherwise goes back to the
queue. A workflow therefore runs at least once and, past a crash at the wrong
moment, possibly twice: workflows that change money must be idempotent per job
id (the broker's client order ids are).

This module does not decide *what* a workflow does; the parts that own the work
(risk, report, learner) provide the callables.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
import traceback
from collections import deque
from typing import Any

import ray

from cluster import names
from cluster.logs import configure_logging, get_logger
from cluster.resources import ray_options
from cluster.runtime import actor_options
from cluster.settings import SchedulerSettings, Settings
from core.scheduling import STOPPING, WorkflowQueue, completion_marker, import_target
from core.store import BarStore

log = get_logger("scheduler")

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


def _store(settings: Settings) -> BarStore:
    return BarStore.from_settings(settings.store, settings.resilience)


# The job an attempt runs, and the scheduler's settings, for the code inside it (``current_job``).
_ATTEMPT: dict[str, Any] = {}
JOB_LOG_LINES = 5000  # lines of output kept per job (the newest)
JOB_LOGS_KEPT = 200  # jobs whose output is kept (the newest)


def current_job() -> tuple[str | None, Settings | None]:
    """Inside a workflow attempt: its job id and the scheduler's settings (secrets included,
    in memory only). Elsewhere ``(None, None)``."""
    return _ATTEMPT.get("job_id"), _ATTEMPT.get("settings")


def job_output(job_id: str, lines: list[tuple[str, str]], settings: Settings | None = None) -> None:
    """Append ``(stream, line)`` pairs to a job's output, kept by the scheduler for
    ``raytrade workflows logs|wait`` and for a CLI attached to the job. Best effort: a
    scheduler that is restarting loses the lines, never the job."""
    try:
        namespace = settings.ray.namespace if settings is not None else None
        ray.get_actor(names.SCHEDULER, namespace=namespace).output.remote(job_id, lines)
    except Exception:  # noqa: BLE001 - output is a courtesy; the job's outcome is journalled
        pass


@ray.remote(max_retries=0)
def _run_attempt(job_id: str, attempt: int, target: str, args: list, kwargs: dict, settings: Settings) -> str:
    """One attempt of a job, in its own Ray task; leaves a completion marker when it succeeds."""
    fn = import_target(target)
    # Ray ships this function by value, with its own copy of the module's globals: the state
    # ``current_job`` reads is the imported module's.
    attempt = importlib.import_module("actors.scheduler")._ATTEMPT
    attempt.update(job_id=job_id, settings=settings)
    try:
        result = fn(*args, **kwargs)
    finally:
        attempt.clear()
    marker = completion_marker(settings.scheduler.journal, job_id, attempt)
    _store(settings).put_bytes(marker, json.dumps({"job": job_id, "attempt": attempt, "at": time.time()}).encode())
    return repr(result)[:500]


@ray.remote
class WorkflowScheduler:
    """The named ``scheduler`` actor (``names.SCHEDULER``). Submit with ``submit``; look with ``status``."""

    def __init__(self, settings: Settings):
        configure_logging(settings)
        self.settings = settings
        self.cfg = settings.scheduler
        self.store = _store(settings)
        self._lock = threading.RLock()
        self.queue = WorkflowQueue(self.cfg, state=load_journal(self.store, self.cfg.journal))
        self.refs: dict[str, Any] = {}
        self.outputs: dict[str, deque] = {}
        self.output_counts: dict[str, int] = {}
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
                ref = _run_attempt.options(**opts, name=names.workflow_task(j.workflow)).remote(
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

    def output(self, job_id: str, lines: list) -> None:
        """Lines a job printed (``job_output``); the newest ``JOB_LOG_LINES`` are kept, in memory."""
        with self._lock:
            buf = self.outputs.get(job_id)
            if buf is None:
                buf = self.outputs[job_id] = deque(maxlen=JOB_LOG_LINES)
                while len(self.outputs) > JOB_LOGS_KEPT:
                    old = next(iter(self.outputs))
                    del self.outputs[old]
                    self.output_counts.pop(old, None)
            buf.extend((str(stream), str(line)) for stream, line in lines)
            self.output_counts[job_id] = self.output_counts.get(job_id, 0) + len(lines)

    def follow(self, job_id: str, since: int = 0) -> dict:
        """The job's state and its output lines numbered ``since`` onwards: ``{"job", "lines", "next"}``
        (lines that fell out of the kept window are skipped, and ``skipped`` says how many)."""
        with self._lock:
            j = self.queue.jobs.get(job_id)
            buf = self.outputs.get(job_id, deque())
            total = self.output_counts.get(job_id, 0)
            first = total - len(buf)
            start = max(since, first)
            lines = list(buf)[start - first:]
            return {"job": None if j is None else j.public(time.time(), self.cfg.ageing_per_minute),
                    "lines": lines, "next": total, "skipped": max(0, first - since)}

    def workflows(self) -> dict:
        return {name: spec.model_dump() for name, spec in self.cfg.workflows.items()}

    def stop(self) -> None:
        self._stop.set()


def _attempt_over(task_id: str | None) -> bool | None:
    """Whether Ray says the task has ended: True, False (still running), None (Ray cannot say)."""
    if task_id is None:
        return None  # journalled as starting; it may have been launched before the crash
    try:
        # Imported here, inside the try: the state API needs the dashboard's packages, and
        # without them this falls back to the grace period like any other failure.
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
    # max_task_retries=0: a submit that reached the old actor is not replayed on the new one.
    return actor_options("scheduler", settings, names.SCHEDULER, detached=detached, max_task_retries=0)


def start_scheduler(settings: Settings, *, detached: bool = True) -> Any:
    """The scheduler actor, created if it is not running (it restarts itself after a crash)."""
    return WorkflowScheduler.options(**scheduler_options(settings, detached=detached)).remote(settings)


def get_scheduler(settings: Settings) -> Any:
    """The running scheduler; ``LookupError`` when there is none."""
    return names.require(names.SCHEDULER, settings)


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

