"""How the command line ends: a user's mistake is one line on stderr and exit code 2.

A bad flag, a bad setting or a bad file raises ``UserError`` (or the parser
does, through ``ArgParser``); ``raytrade.cli.main`` prints it as one line,
never a traceback, and exits 2. A cluster that cannot be reached is one line
and exit code 1 (``unavailable``); a cluster that ``raytrade up`` recorded and
that is gone is the user's to fix (start it, or remove the record): exit 2. An
error raised inside an actor reaches the user as its own message
(``cause_of``), never as Ray's wrapper with the remote traceback, and no line
carries terminal colour codes.
"""

from __future__ import annotations

import argparse
import re
import sys

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 1


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit 2."""


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a ``UserError`` of one line instead of the usage dump."""

    def error(self, message: str) -> None:
        # `main` says "raytrade: error:" once; the verb's own --help is named at the end.
        raise UserError(f"{message} (see `{self.prog} --help`)")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line(e: BaseException | str) -> str:
    """The message on one line, without terminal colour codes (Ray colours what it wraps)."""
    text = _ANSI.sub("", str(e)).strip()
    return " ".join(text.split())[:2000]


def cause_of(e: BaseException) -> BaseException:
    """The error an actor or task raised, out of the wrapper Ray puts around it (and its traceback)."""
    seen = 0
    while getattr(e, "cause", None) is not None and e.cause is not e and seen < 8:
        e, seen = e.cause, seen + 1
    return e


def unavailable(e: BaseException) -> int:
    """No cluster where one was expected: one line; exit code 1, or the error's own (a stale record: 2)."""
    print(f"raytrade: error: {one_line(e)}", file=sys.stderr)
    return getattr(e, "exit_code", EXIT_UNAVAILABLE)
