"""``raytrade data import|generate|ls|verify``: history in the store.

The store (``core.store``, pyarrow), the importer and the synthetic market are
imported inside ``run``, which runs the verb: `raytrade --help` does not pay
for pyarrow and pandas.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cluster.settings import Settings
from raytrade.cli.errors import EXIT_USAGE, ArgParser, UserError


def add_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="history in the store")
    data_sub = data.add_subparsers(dest="data_cmd", metavar="ACTION", parser_class=ArgParser)
    imp = data_sub.add_parser("import", help="import a CSV or Parquet file of OHLCV bars")
    imp.add_argument("file")
    imp.add_argument("--symbol", required=True)
    gen = data_sub.add_parser("generate", help="write synthetic history")
    gen.add_argument("--symbols", nargs="+", default=None, help="default: feeds.symbols")
    gen.add_argument("--bars", type=int, default=2000, help="bars per symbol")
    gen.add_argument("--seed", type=int, default=None, help="default: feeds.seed")
    gen.add_argument("--interval", default="1min", help="bar spacing, e.g. 1min, 1h, 1D")
    gen.add_argument("--start", default="2024-01-02 14:30", help="first bar's time (UTC)")
    dls = data_sub.add_parser("ls", help="symbols and time ranges in the store, each part checked as `data verify` does")
    dls.add_argument("--quick", action="store_true", help="names only: do not read and check the parts")
    dver = data_sub.add_parser("verify", help="check every part against its checksum and the bar rules; exit 2 if any is bad")
    dver.add_argument("--adopt", action="store_true",
                      help="record checksums for good parts written before the store kept them")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from core.store import BarStore  # pyarrow: loaded when the verb runs, not for --help

    if args.data_cmd is None:
        raise UserError("raytrade data: choose an action: import, generate, ls, verify")
    store = BarStore.from_settings(settings.store, settings.resilience)
    if args.data_cmd == "import":
        return _import(args, store)
    if args.data_cmd == "generate":
        return _generate(args, settings, store)
    if args.data_cmd == "ls":
        return _ls(args, store)
    if args.data_cmd == "verify":
        return _verify(store, args.adopt)
    raise UserError(f"unknown data action {args.data_cmd}")


def _import(args: argparse.Namespace, store: Any) -> int:
    from core.ingest import ImportRefused, read_bars_file  # pandas: when the verb runs

    sym = args.symbol.strip().upper()
    if not sym or not sym.replace(".", "").replace("-", "").isalnum():
        raise UserError(f"--symbol {args.symbol!r}: use letters and digits, e.g. SPY")
    try:
        bars = read_bars_file(args.file, sym)
    except ImportRefused as e:
        raise UserError(str(e)) from None
    res = store.append(bars)
    print(f"imported {res.written} bars of {sym} into {store.uri}" + (
        f" ({res.skipped_existing} at or before the stored end were skipped)" if res.skipped_existing else ""))
    return 0


def _generate(args: argparse.Namespace, settings: Settings, store: Any) -> int:
    import pandas as pd  # when the verb runs

    from core.synthetic import SyntheticMarket

    if args.bars < 1 or args.bars > 10_000_000:
        raise UserError(f"--bars {args.bars}: must be between 1 and 10,000,000")
    try:
        interval = pd.Timedelta(args.interval)
        start = pd.Timestamp(args.start)
    except (ValueError, TypeError):
        raise UserError(f"--interval {args.interval!r} / --start {args.start!r}: not a time span / time") from None
    if interval <= pd.Timedelta(0):
        raise UserError(f"--interval {args.interval!r}: must be positive")
    symbols = [s.upper() for s in (args.symbols or settings.feeds.symbols)]
    market = SyntheticMarket(symbols, seed=settings.feeds.seed if args.seed is None else args.seed,
                             start=start, interval=interval)
    chunk = 100_000
    done = 0
    while done < args.bars:
        n = min(chunk, args.bars - done)
        res = store.append(market.generate(n))
        done += n
        print(f"  generated {done}/{args.bars} bars per symbol", file=sys.stderr)
    print(f"wrote synthetic history for {', '.join(symbols)} to {store.uri}"
          + (f" ({res.skipped_existing} bars at or before the stored end skipped)" if res.skipped_existing else ""))
    return 0


def _ls(args: argparse.Namespace, store: Any) -> int:
    ranges = store.ranges()
    check = None if args.quick else store.verify()
    if not ranges and not (check and check.bad):
        print(f"the store at {store.uri} is empty; `raytrade data generate` writes synthetic history")
        return 0
    bad_by_symbol: dict[str, int] = {}
    for b in check.bad if check else []:
        bad_by_symbol[b.symbol] = bad_by_symbol.get(b.symbol, 0) + 1
    print(f"{'symbol':<8} {'first':<26} {'last':<26} {'bars':>9} {'files':>6}" + ("" if check is None else "  check"))
    for r in ranges:
        mark = "" if check is None else "  " + (f"BAD ({bad_by_symbol[r.symbol]} part(s))"
                                                 if r.symbol in bad_by_symbol else "ok")
        print(f"{r.symbol:<8} {str(r.first):<26} {str(r.last):<26} {r.rows:>9} {r.files:>6}{mark}")
    if check is not None and check.bad:
        # The ranges above come from file names; the bad parts' bars cannot be read.
        print(f"raytrade: warning: {len(check.bad)} bad part(s) in {', '.join(sorted(bad_by_symbol))}: "
              "reads of them are refused; `raytrade data verify` names each part and why", file=sys.stderr)
    elif check is not None and check.unchecked:
        print(f"note: {check.unchecked} part(s) were written before the store kept checksums (bar rules checked); "
              "`raytrade data verify --adopt` records them", file=sys.stderr)
    return 0


def _verify(store: Any, adopt: bool) -> int:
    """One line per bad part (its path and why), then a one-line summary; exit 2 if any part is bad."""
    check = store.verify(adopt=adopt)
    for b in check.bad:
        print(f"bad part {b.path}: {b.reason}")
    if check.parts == 0 and not check.bad:
        print(f"the store at {store.uri} is empty: nothing to verify")
        return 0
    notes = []
    if check.unchecked:
        notes.append(f"{check.unchecked} written before the store kept checksums, bar rules checked"
                     + (f", checksums now recorded for {check.adopted}" if check.adopted else
                        " (`raytrade data verify --adopt` records them)"))
    if check.interrupted:
        notes.append(f"{check.interrupted} interrupted write(s) left hidden files that no read sees")
    tail = f" ({'; '.join(notes)})" if notes else ""
    if check.bad:
        print(f"{len(check.bad)} bad part(s) of {check.parts} in {store.uri}{tail}: restore each from a backup, or "
              "delete it (and its entry under _manifest/) and write its bars again")
        return EXIT_USAGE
    print(f"all {check.parts} part(s) ({check.bars} bars) in {store.uri} verified{tail}")
    return 0


COMMANDS = {"data": run}
