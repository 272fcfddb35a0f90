"""``raytrade workflows ls|run|cancel|wait|logs``: the workflow scheduler's queue and its jobs' output.

Ray and the scheduler actor (``actors.scheduler``) are imported inside
``run``, which runs the verb: `raytrade --help` does not pay for them.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from cluster.runtime import ClusterUnavailable, connect
from cluster.settings import Settings
from core.scheduling import FINAL, WorkflowError
from raytrade.cli.errors import EXIT_UNAVAILABLE, ArgParser, UserError, unavailable


def add_parser(sub: Any) -> None:
    wf = sub.add_parser("workflows", help="the workflow scheduler: priority workflows holding resource locks")
    wf_sub = wf.add_subparsers(dest="wf_cmd", metavar="ACTION", parser_class=ArgParser)
    wls = wf_sub.add_parser("ls", help="running (with the locks they hold), queued, and recent history")
    wls.add_argument("--json", action="store_true", help="machine-readable output")
    wls.add_argument("--history", type=int, default=20, help="finished workflows to show")
    wls.add_argument("--defined", action="store_true", help="list the workflows settings define instead")
    wrun = wf_sub.add_parser("run", help="queue a workflow")
    wrun.add_argument("workflow", help="a name from scheduler.workflows (`raytrade workflows ls --defined`)")
    wrun.add_argument("--args", default="[]", help="positional arguments, a JSON list")
    wrun.add_argument("--kwargs", default="{}", help="keyword arguments, a JSON object")
    wrun.add_argument("--id", default=None, help="job id; running the same id again returns the same job")
    wrun.add_argument("--target", default=None, help="override the callable, 'package.module:function'")
    wrun.add_argument("--priority", type=int, default=None, help="override the priority (lower runs first)")
    wrun.add_argument("--timeout", type=float, default=None, help="seconds per attempt")
    wrun.add_argument("--wait", type=float, default=None, metavar="S", help="wait up to S seconds for the outcome")
    wcan = wf_sub.add_parser("cancel", help="cancel a queued or running workflow")
    wcan.add_argument("id")
    wwait = wf_sub.add_parser("wait", help="follow a job's output until it ends; the exit code says how it ended")
    wwait.add_argument("id")
    wwait.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds (exit 124)")
    wlogs = wf_sub.add_parser("logs", help="what a job printed (the newest lines the scheduler keeps)")
    wlogs.add_argument("id")
    wlogs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.wf_cmd is None:
        raise UserError("raytrade workflows: choose an action: ls, run, cancel, wait, logs")
    if args.wf_cmd == "ls" and args.defined:
        for name, spec in sorted(settings.scheduler.workflows.items(), key=lambda kv: (kv[1].priority, kv[0])):
            print(f"{spec.priority:>4}  {name:<26} locks {','.join(spec.locks) or '-':<40} {spec.target or '(no target set)'}")
        return 0
    if args.wf_cmd == "run":
        try:
            wf_args, wf_kwargs = json.loads(args.args), json.loads(args.kwargs)
        except json.JSONDecodeError as e:
            raise UserError(f"--args/--kwargs must be JSON: {e}") from None
        if not isinstance(wf_args, list) or not isinstance(wf_kwargs, dict):
            raise UserError("--args must be a JSON list and --kwargs a JSON object")
    try:
        connect(settings, start_local=False)
    except ClusterUnavailable as e:
        return unavailable(e)
    # Ray and the scheduler actor: imported once the cluster is there.
    import ray

    from actors.scheduler import get_scheduler, start_scheduler

    try:
        if args.wf_cmd == "run":
            sched = start_scheduler(settings)  # the running one, or a new one
            options = {k: v for k, v in (("job_id", args.id), ("target", args.target), ("priority", args.priority),
                                         ("timeout_s", args.timeout)) if v is not None}
            job = ray.get(sched.submit.remote(args.workflow, wf_args, wf_kwargs, **options), timeout=60)
            print(f"queued {job['id']} ({job['workflow']}, priority {job['priority']}, locks {','.join(job['locks']) or '-'})")
            if args.wait is None:
                return 0
            deadline = time.time() + args.wait
            while time.time() < deadline and job["state"] not in FINAL:
                time.sleep(0.2)
                job = ray.get(sched.job.remote(job["id"]), timeout=60)
            print(f"{job['id']} {job['state']}" + (f": {job['error'].strip().splitlines()[-1]}" if job.get("error") else ""))
            return 0 if job["state"] == "succeeded" else EXIT_UNAVAILABLE
        try:
            sched = get_scheduler(settings)
        except LookupError:
            if args.wf_cmd in ("cancel", "wait", "logs"):
                raise UserError(f"no job {args.id!r}: the scheduler is not running") from None
            print("the scheduler is not running; `raytrade workflows run NAME` starts it")
            return 0
        if args.wf_cmd in ("wait", "logs"):
            return _follow(sched, args)
        if args.wf_cmd == "cancel":
            job = ray.get(sched.cancel.remote(args.id), timeout=60)
            print(f"{job['id']} {job['state']}" + (" (killing the running attempt)" if job["state"] == "stopping" else ""))
            return 0
        st = ray.get(sched.status.remote(args.history), timeout=60)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, WorkflowError):
            raise UserError(str(e.cause)) from None
        raise
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    _print_status(st)
    return 0


def _follow(sched: Any, args: argparse.Namespace) -> int:
    import sys

    import ray

    from raytrade.jobs import follow

    if args.wf_cmd == "wait" or args.follow:
        return follow(sched, args.id, interactive=sys.stdin.isatty(), timeout_s=getattr(args, "timeout", None))
    st = ray.get(sched.follow.remote(args.id, 0), timeout=60)
    if st["job"] is None:
        raise UserError(f"no job {args.id!r}; `raytrade workflows ls` lists them")
    if st["skipped"]:
        print(f"({st['skipped']} earlier line(s) no longer kept)", file=sys.stderr)
    for stream, line in st["lines"]:
        print(line, file=sys.stdout if stream == "out" else sys.stderr)
    return 0


def _print_status(st: dict[str, Any]) -> None:
    print(f"running ({len(st['running'])}):")
    for j in st["running"]:
        print(f"  {j['id']:<40} {j['workflow']:<24} {j['state']:<10} attempt {j['attempts']}/{j['max_attempts']}"
              f"  holds {','.join(j['locks_held']) or '-'}")
    print(f"queued ({len(st['queued'])}):")
    for j in st["queued"]:
        why = f"waiting for {','.join(j['waiting_for'])}" if j["waiting_for"] else ""
        if "retry_in_s" in j:
            why = f"retry in {j['retry_in_s']:.1f}s"
        print(f"  {j['id']:<40} {j['workflow']:<24} priority {j['priority']} (now {j['effective_priority']:g}) {why}")
    print(f"history ({len(st['history'])}):")
    for j in st["history"]:
        err = f"  {j['error']}" if j.get("error") else ""
        print(f"  {j['id']:<40} {j['workflow']:<24} {j['state']:<10} attempts {j['attempts']}{err}")


COMMANDS = {"workflows": run}
