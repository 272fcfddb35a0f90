"""The workflow target that runs a ``raytrade`` verb inside a Ray task, for ``raytrade.jobs``.

``run_cli`` rebuilds the caller's settings (sent without secrets; the secrets
are the scheduler's), runs the verb with its stdout and stderr going line by
line to the scheduler (``actors.scheduler.job_output``), and fails the job when
the verb exits non-zero. Apart from ``raytrade.jobs`` so that the command line,
which imports that, is not imported back by it.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from typing import Any

from actors.scheduler import current_job, job_output
from cluster.settings import Settings, _deep_merge, load_settings
from raytrade.cli import COMMANDS, build_parser
from raytrade.jobs import ENV_IN_JOB, FLUSH_S


class _Lines(io.TextIOBase):
    """A text stream that sends whole lines (``\\n``; a progress bar's ``\\r`` too) to the job's output."""

    def __init__(self, stream: str, sink: "_Sink") -> None:
        self.stream, self.sink, self.buf = stream, sink, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.buf += s
        while True:
            cut = min((i for i in (self.buf.find("\n"), self.buf.find("\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            line, self.buf = self.buf[:cut], self.buf[cut + 1:]
            if line.strip():
                self.sink.add(self.stream, line.rstrip())
        return len(s)

    def flush(self) -> None:
        self.sink.flush()


class _Sink:
    """Batches lines to the scheduler every ``FLUSH_S``; a progress bar's many states keep only the newest."""

    def __init__(self, job_id: str, settings: Settings) -> None:
        self.job_id, self.settings = job_id, settings
        self.pending: list[tuple[str, str]] = []
        self.last = 0.0
        self.lock = threading.Lock()

    def add(self, stream: str, line: str) -> None:
        with self.lock:
            self.pending.append((stream, line))
        if time.monotonic() - self.last >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            lines, self.pending = self.pending, []
            self.last = time.monotonic()
        if lines:
            job_output(self.job_id, lines, self.settings)


def run_cli(argv: list[str], cwd: str, public_settings: dict[str, Any]) -> dict[str, Any]:
    """A workflow target: run ``raytrade <argv>`` in this Ray task with the caller's settings
    (secrets from the scheduler's), its output going to the job; a non-zero exit fails the job."""
    job_id, system = current_job()
    if job_id is None or system is None:
        raise RuntimeError("run_cli runs as a scheduler workflow's target, not by itself")
    base = system.model_dump()  # SecretStr values intact, in memory only
    _deep_merge(base, public_settings)  # the caller's values over the system's
    settings = load_settings(use_file=False, **base)
    args = build_parser().parse_args(argv)
    sink = _Sink(job_id, system)
    out, err = _Lines("out", sink), _Lines("err", sink)
    saved = sys.stdout, sys.stderr, os.getcwd(), os.environ.get(ENV_IN_JOB)
    os.environ[ENV_IN_JOB] = job_id
    try:
        os.chdir(cwd)
    except OSError:
        pass  # another node: paths in the report line are that node's
    sys.stdout, sys.stderr = out, err
    try:
        code = COMMANDS[args.cmd](args, settings)
    finally:
        for s in (out, err):
            if s.buf.strip():
                sink.add(s.stream, s.buf.rstrip())
        sink.flush()
        sys.stdout, sys.stderr = saved[0], saved[1]
        os.chdir(saved[2])
        if saved[3] is None:
            os.environ.pop(ENV_IN_JOB, None)
        else:
            os.environ[ENV_IN_JOB] = saved[3]
    if code:
        raise RuntimeError(f"raytrade {' '.join(argv[:2])} exited {code}")
    return {"exit": 0}
