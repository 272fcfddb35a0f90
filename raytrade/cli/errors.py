"""How the command line ends: a user's mistake is one line on stderr and exit code 2.

A bad flag, a bad setting or a bad file raises ``UserError`` (or the parser
does, through ``ArgParser``); ``raytrade.cli.main`` prints it as one line,
never a traceback, and exits 2. A cluster that cannot be reached is one line
and exit code 1 (``unavailable``).
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 1


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit 2."""


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a ``UserError`` of one line instead of the usage dump."""

    def error(self, message: str) -> None:
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def one_line(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ")
    return text[:2000]


def unavailable(e: BaseException) -> int:
    """No cluster where one was expected: say so on one line; the exit code is 1."""
    print(f"raytrade: {one_line(e)}", file=sys.stderr)
    return EXIT_UNAVAILABLE
