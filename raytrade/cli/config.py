"""``raytrade config show``: the effective settings, secrets redacted."""

from __future__ import annotations

import argparse
from typing import Any

from cluster.settings import Settings
from raytrade.cli.errors import ArgParser, UserError


def add_parser(sub: Any) -> None:
    cfg = sub.add_parser("config", help="settings")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", metavar="ACTION", parser_class=ArgParser)
    cfg_sub.add_parser("show", help="print the effective settings (secrets redacted)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.config_cmd != "show":
        raise UserError("raytrade config: choose an action: show")
    print(settings.show())
    return 0


COMMANDS = {"config": run}
