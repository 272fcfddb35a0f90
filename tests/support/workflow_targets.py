"""Workflows the scheduler tests run in Ray tasks: they write what they did to a log file.

Each line is JSON: ``{"job", "event" (start|beat|end), "pid", "t"}``. Appends of
one short line are atomic on Linux, so concurrent attempts never interleave a line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _log(path: str, job: str, event: str, **extra) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"job": job, "event": event, "pid": os.getpid(), "t": time.time(), **extra}) + "\n")


def work(path: str, job: str, seconds: float) -> str:
    """Run for ``seconds``, beating every 50 ms, so the log shows when the process was alive."""
    _log(path, job, "start")
    end = time.time() + seconds
    while time.time() < end:
        time.sleep(min(0.05, max(0.0, end - time.time())))
        _log(path, job, "beat")
    _log(path, job, "end")
    return job


def flaky(path: str, job: str, fail_times: int) -> str:
    """Fail on the first ``fail_times`` attempts (counted in the log), then succeed."""
    _log(path, job, "start")
    starts = sum(1 for line in Path(path).read_text().splitlines() if json.loads(line)["job"] == job
                 and json.loads(line)["event"] == "start")
    if starts <= fail_times:
        _log(path, job, "fail")
        raise RuntimeError(f"{job}: planned failure {starts} of {fail_times}")
    _log(path, job, "end")
    return job


def read_log(path: str) -> list[dict]:
    p = Path(path)
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def intervals(events: list[dict]) -> list[tuple[str, int, float, float]]:
    """(job, pid, first event, last event) per attempt process: when it was certainly alive."""
    spans: dict[tuple[str, int, int], list[float]] = {}
    n_start: dict[tuple[str, int], int] = {}
    for e in events:
        key = (e["job"], e["pid"])
        if e["event"] == "start":
            n_start[key] = n_start.get(key, 0) + 1
        k = (e["job"], e["pid"], n_start.get(key, 0))
        spans.setdefault(k, []).append(e["t"])
    return [(job, pid, min(ts), max(ts)) for (job, pid, _), ts in spans.items()]
