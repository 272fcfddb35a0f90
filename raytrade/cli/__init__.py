"""The ``raytrade`` command line.

    raytrade up [--detach] [--duration S]   start the system on this machine or a cluster
    raytrade down                           stop what `up` started
    raytrade status [--json]                nodes, resources, actors and their states
    raytrade config show                    effective settings, secrets as ***
    raytrade data generate|import|ls|verify history in the store; verify exits 2 on a bad part
    raytrade feeds ls|kill|pause|resume|fault   the feeds and the router (chaos testing)
    raytrade train --symbols ... --alpha A  CVaR-PPO against the risk-neutral baseline, out of sample
    raytrade models ls|show|promote|rollback|import|train-baseline|gc   the model registry
    raytrade backtest run|walk-forward|monte-carlo|compare   backtests, on Ray Tune where it pays
    raytrade workflows ls|run|cancel|wait|logs   the workflow scheduler's queue and its jobs
    raytrade trades stats|export            trade analytics from an account's ledger
    raytrade decide SYMBOL [--execute]      a decision from the running endpoint

Each verb group is one module here that owns its flags (``add_parser``) and
its commands (``COMMANDS``); this one only builds the parser and dispatches.
A user's mistake (a bad flag, a bad setting, a bad file) ends with one line on
stderr and exit code 2, never a traceback; a cluster that cannot be reached
ends with one line and exit code 1 (``raytrade.cli.errors``).

The verb modules import Ray, pandas, the store, ``actors``, ``tune`` and
``raytrade.system`` inside the functions that run a verb, so that building
the parser (`raytrade --help`, a mistyped flag) stays well under a second.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from cluster.runtime import ClusterUnavailable
from cluster.settings import SettingsError, load_settings
from raytrade.cli import backtest, config, data, decide, feeds, models, trades, train, up, workflows
from raytrade.cli.errors import EXIT_USAGE, ArgParser, UserError, cause_of, one_line, unavailable

# In the order `raytrade --help` lists them.
GROUPS = (up, config, data, feeds, train, models, backtest, workflows, trades, decide)
COMMANDS = {name: run for group in GROUPS for name, run in group.COMMANDS.items()}


def build_parser() -> ArgParser:
    p = ArgParser(prog="raytrade", description="raytrade: an algorithmic trading operation on one Ray cluster.")
    p.add_argument("--config", help="settings file (default: ./raytrade.toml if present)")
    p.add_argument("--address", default=None,
                   help="the Ray cluster to join (default: RAY_ADDRESS, ray.address, or the one `raytrade up` recorded)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=ArgParser)
    for group in GROUPS:
        group.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except (UserError, SettingsError) as e:
        print(f"raytrade: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except ClusterUnavailable as e:
        return unavailable(e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `raytrade ... | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        return _user_error_or_raise(e)


def _user_error_or_raise(e: Exception) -> int:
    """A user's mistake found deep down (inside an actor, in a corrupt part) is one line and exit 2;
    anything else is a bug and keeps its traceback."""
    # Imported here: the store pulls in pyarrow, which `raytrade --help` should not pay for.
    from core.models.errors import RegistryError
    from core.scheduling import WorkflowError
    from core.store import CorruptPartError

    cause = cause_of(e)
    if isinstance(cause, (UserError, SettingsError, RegistryError, WorkflowError, CorruptPartError)):
        print(f"raytrade: error: {one_line(cause)}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(cause, ClusterUnavailable):
        return unavailable(cause)
    raise e


def _main(argv: Sequence[str] | None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmd is None:
        p.print_help()
        return 0
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a job beside a running system runs it again
    settings = load_settings(args.config)
    if args.address:
        settings.ray.address = args.address
    return COMMANDS[args.cmd](args, settings)
