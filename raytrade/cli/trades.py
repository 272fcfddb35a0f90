"""``raytrade trades stats|export``: trade analytics from an account's ledger, through its risk manager.

Ray and pandas are imported inside ``run``, which runs the verb: `raytrade
--help` does not pay for them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from cluster import names
from cluster.runtime import ClusterUnavailable, connect
from cluster.settings import Settings
from raytrade.cli.errors import EXIT_UNAVAILABLE, ArgParser, UserError, unavailable


def add_parser(sub: Any) -> None:
    tr = sub.add_parser("trades", help="trade analytics from an account's ledger")
    tr_sub = tr.add_subparsers(dest="trades_cmd", metavar="ACTION", parser_class=ArgParser)
    ts_ = tr_sub.add_parser("stats", help="win rate, average win and loss, P&L by symbol and by member")
    ts_.add_argument("--account", default="default")
    ts_.add_argument("--days", type=float, default=30.0)
    ts_.add_argument("--json", action="store_true")
    te = tr_sub.add_parser("export", help="filled orders as a fills file for `raytrade backtest compare`")
    te.add_argument("--account", default="default")
    te.add_argument("--out", required=True, help="a .csv path")
    te.add_argument("--limit", type=int, default=10_000)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import pandas as pd  # Ray and pandas: when the verb runs
    import ray

    if args.trades_cmd is None:
        raise UserError("raytrade trades: choose an action: stats, export")
    if args.account not in settings.accounts:
        raise UserError(f"no account named {args.account!r}; accounts: {', '.join(settings.accounts)}")
    if args.trades_cmd == "stats" and not 0 < args.days <= 3650:
        raise UserError(f"--days {args.days:g}: must be between 0 and 3650")
    if args.trades_cmd == "export" and not args.out.lower().endswith(".csv"):
        raise UserError(f"--out {args.out!r}: give a .csv path")
    try:
        connect(settings, start_local=False)
    except ClusterUnavailable as e:
        return unavailable(e)
    risk = names.lookup(names.risk(args.account), settings)
    if risk is None:
        print(f"raytrade: account {args.account!r} is not running; `raytrade up` starts it", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.trades_cmd == "stats":
        a = ray.get(risk.analytics.remote(args.days), timeout=60)
        if args.json:
            print(json.dumps(a, indent=2, default=str))
            return 0
        print(f"{args.account}, last {args.days:g} days: {a['trades']} closed trade(s), win rate "
              f"{a['win_rate'] if a['win_rate'] is None else round(a['win_rate'], 3)}, average win {a['avg_win']}, "
              f"average loss {a['avg_loss']}, P&L {a['total_pnl']}")
        for k in ("pnl_by_symbol", "pnl_by_member"):
            for name, pnl in sorted((a.get(k) or {}).items()):
                print(f"  {k.split('_')[-1]:<7} {name:<24} {pnl:>12.2f}")
        return 0
    orders = ray.get(risk.orders.remote(args.limit), timeout=60)
    rows = []
    for o in orders:
        legs = [o] + list(o.get("legs") or [])
        for x in legs:
            if x.get("status") == "filled" and x.get("fill_price"):
                ts = x.get("fill_ts")
                when = pd.Timestamp(int(ts), tz="UTC") if ts else pd.Timestamp(x.get("filled_at"), unit="s", tz="UTC")
                rows.append((when.isoformat(), x["symbol"], x["side"].lower(), x["qty"], x["fill_price"]))
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "symbol", "side", "qty", "price"])
        w.writerows(sorted(rows))
    print(f"wrote {len(rows)} fill(s) of account {args.account} to {args.out}")
    return 0


COMMANDS = {"trades": run}
