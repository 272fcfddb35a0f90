"""Commands beside a running system run on it, as scheduler workflows.

When ``raytrade train`` or ``raytrade backtest walk-forward|monte-carlo`` finds
a running raytrade (its scheduler answers in the cluster the command joined),
it does not do the work in its own process: it submits itself as a job of the
matching workflow (``model_training``, ``backtest``), so the work takes that
workflow's locks, shows in ``raytrade workflows ls``, ``raytrade status`` and
the dashboard, runs on the cluster's resources, and writes through the one
registry. The job runs the same verb (``raytrade.job_runner.run_cli``, the
workflows' target for these jobs) inside a Ray task, and what the verb prints goes to the scheduler
(``actors.scheduler.job_output``); the command that submitted it follows that
output line by line (``follow``), so attached it looks as if it ran here.

- ``--detach`` returns at once with the job id: ``raytrade workflows wait ID``
  and ``raytrade workflows logs ID`` attach later.
- Ctrl-C while attached asks (at a terminal) whether to cancel the job or
  leave it running; elsewhere it leaves it running and says how to attach.
- The job carries the caller's settings without their secrets (the journal
  is in the store); secrets come from the running system's own settings.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from cluster.settings import Settings

RUN_CLI = "raytrade.job_runner:run_cli"
ENV_IN_JOB = "RAYTRADE_IN_JOB"  # set while a job runs a verb: the verb does the work, never submits again
FLUSH_S = 0.5
JOB_TIMEOUT_S = 86_400.0
_REDACTED = "**********"


def public_settings(settings: Settings) -> dict[str, Any]:
    """The settings as JSON with every secret left out (a list that holds one is left out whole)."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                c = clean(v)
                if c is not _DROP:
                    out[k] = c
            return out
        if isinstance(x, list):
            items = [clean(v) for v in x]
            return _DROP if any(i is _DROP or _has_secret(v) for i, v in zip(items, x)) else items
        return _DROP if x == _REDACTED else x

    return clean(settings.redacted())


_DROP = object()


def _has_secret(x: Any) -> bool:
    if isinstance(x, dict):
        return any(_has_secret(v) for v in x.values())
    if isinstance(x, list):
        return any(_has_secret(v) for v in x)
    return x == _REDACTED


# -- the caller's side ------------------------------------------------------------------
def join(settings: Settings) -> Any:
    """``cluster.runtime.connect``, saying in one line when no cluster was running and a local
    Ray was started for this command alone."""
    from cluster.runtime import connect

    info = connect(settings)
    if info.started_locally and not os.environ.get(ENV_IN_JOB):
        print("raytrade: no running cluster (`raytrade up` starts one that commands join): "
              "started a local Ray for this command", file=sys.stderr)
    return info


def running_scheduler(settings: Settings) -> Any | None:
    """The running system's scheduler, when this command should submit to it: not inside a job,
    and only in a cluster this process joined (a Ray it started itself has no system)."""
    if os.environ.get(ENV_IN_JOB):
        return None
    from cluster import names

    return names.lookup(names.SCHEDULER, settings)


def submit(settings: Settings, scheduler: Any, workflow: str, argv: list[str], detach: bool,
           job_id: str | None = None) -> int:
    """Submit ``raytrade <argv>`` as a job of ``workflow``; follow it unless ``detach``."""
    import ray

    # One attempt: a command that failed says why to the person who ran it, and is not rerun behind
    # their back. No time limit beyond a day: the person chose the size of the work.
    job = ray.get(scheduler.submit.remote(workflow, [list(argv), os.getcwd(), public_settings(settings)], {},
                                          target=RUN_CLI, max_attempts=1, timeout_s=JOB_TIMEOUT_S,
                                          **({"job_id": job_id} if job_id else {})), timeout=60)
    print(f"raytrade is running here: submitted as workflow {workflow}, job {job['id']} "
          f"(`raytrade workflows logs {job['id']}`)", file=sys.stderr)
    if detach:
        print(job["id"])
        return 0
    return follow(scheduler, job["id"], interactive=sys.stdin.isatty())


def follow(scheduler: Any, job_id: str, *, interactive: bool = False, timeout_s: float | None = None,
           since: int = 0) -> int:
    """Print a job's output as it comes (``out`` lines on stdout, ``err`` on stderr) until it ends;
    the exit code: 0 when it succeeded, 1 otherwise (124: still running at ``timeout_s``)."""
    import ray

    from core.scheduling import FINAL

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            st = ray.get(scheduler.follow.remote(job_id, since), timeout=60)
            for stream, line in st["lines"]:
                print(line, file=sys.stdout if stream == "out" else sys.stderr, flush=True)
            since = st["next"]
            job = st["job"]
            if job is None:
                print(f"raytrade: error: no job {job_id!r} in the scheduler", file=sys.stderr)
                return 2
            if job["state"] in FINAL:
                if job["state"] != "succeeded":
                    why = (job.get("error") or "").strip().splitlines()
                    print(f"raytrade: job {job_id} {job['state']}" + (f": {why[-1]}" if why else ""), file=sys.stderr)
                    return 1
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"raytrade: job {job_id} is still {job['state']}", file=sys.stderr)
                return 124
            time.sleep(FLUSH_S)
        except KeyboardInterrupt:
            return _interrupted(scheduler, job_id, interactive)


def _interrupted(scheduler: Any, job_id: str, interactive: bool) -> int:
    import ray

    answer = ""
    if interactive:
        try:
            answer = input(f"\njob {job_id} is still running: cancel it (c) or leave it running (l)? [l] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
    if answer.strip().lower() in ("c", "cancel"):
        job = ray.get(scheduler.cancel.remote(job_id), timeout=60)
        print(f"job {job_id} {job['state']}", file=sys.stderr)
        return 130
    print(f"\njob {job_id} left running: `raytrade workflows wait {job_id}` attaches again", file=sys.stderr)
    return 130
