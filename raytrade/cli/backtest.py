"""``raytrade backtest run|walk-forward|monte-carlo|compare``: backtests, on Ray Tune where it pays.

Bars come from the store in settings; each action prints progress on stderr,
a summary table and the report's path on stdout (``--json``: one JSON object
instead). Bad input is a ``UserError``: one line, exit 2. Walk-forward and
Monte Carlo check their input first, then join Ray here (``tune/`` never
connects by itself); beside a running system they run as its ``backtest``
workflow (``raytrade.jobs``), followed here or, with ``--detach``, not.

pandas, numba, Ray Tune and matplotlib (``core.engine``, ``tune``) are
imported inside the functions that run the verb: `raytrade --help` does not
pay for them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.settings import Settings
from raytrade.cli.errors import ArgParser, UserError
from raytrade.jobs import join, running_scheduler, submit


def add_parser(sub: Any) -> None:
    bt = sub.add_parser("backtest", help="backtests: one run, walk-forward and Monte Carlo on Ray Tune, live vs backtest")
    bt_sub = bt.add_subparsers(dest="backtest_cmd", metavar="ACTION", parser_class=ArgParser)
    texts = {
        "run": "backtest one parameter set on a symbol's stored bars",
        "walk-forward": "walk-forward optimisation as a Tune experiment",
        "monte-carlo": "Monte Carlo robustness as a Tune experiment",
        "compare": "backtest the bars a paper account traded and list where its fills differ, and why",
    }
    for action, text in texts.items():
        a = bt_sub.add_parser(action, help=text)
        a.add_argument("--symbol", required=True)
        a.add_argument("--strategy", required=True, help="sma_crossover, atr_breakout, rsi_reversion, or model:NAME@VERSION")
        a.add_argument("--params", nargs="+", default=None, metavar="NAME=VALUES",
                       help="fast=10 slow=50 (walk-forward: fast=5,10,20 or fast=5:50:5, stop included)")
        a.add_argument("--start", default=None, help="first bar's time (UTC)")
        a.add_argument("--end", default=None, help="last bar's time (UTC)")
        a.add_argument("--cash", type=float, default=10_000.0)
        a.add_argument("--commission", type=float, default=0.0, help="fraction of traded value, e.g. 0.001")
        a.add_argument("--slippage", type=float, default=0.0, help="fraction of the price, e.g. 0.0005")
        a.add_argument("--fill", choices=("open", "close"), default="open", help="next bar's open or this bar's close")
        a.add_argument("--whole-units", action="store_true", help="trade whole units only")
        a.add_argument("--out", default=None, help="report directory (default reports/<symbol>-<strategy>-<action>)")
        a.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
        if action in ("walk-forward", "monte-carlo"):
            a.add_argument("--detach", action="store_true",
                           help="beside a running system: submit the backtest job and return its id at once")
            a.add_argument("--storage", default=None, help="Tune storage: a directory or s3://bucket/prefix (default var/tune)")
        if action == "walk-forward":
            a.add_argument("--train", type=int, required=True, help="in-sample bars per fold")
            a.add_argument("--test", type=int, required=True, help="out-of-sample bars per fold")
            a.add_argument("--step", type=int, default=None, help="bars between folds (default: --test)")
            a.add_argument("--anchored", action="store_true", help="every train window starts at the first bar")
            a.add_argument("--objective", default="sharpe", help="sharpe or cvar_ratio")
            a.add_argument("--search", choices=("grid", "random"), default="grid")
            a.add_argument("--samples", type=int, default=200, help="parameter sets drawn by --search random")
        if action == "monte-carlo":
            a.add_argument("--paths", type=int, default=1000, help="paths per method")
            a.add_argument("--methods", default="trades,blocks,synthetic")
            a.add_argument("--block", type=int, default=20, help="block length of the bar bootstrap")
            a.add_argument("--horizon", type=int, default=None, help="bars per path (default: as many as the data)")
            a.add_argument("--generator", choices=("regimes", "gbm"), default="regimes")
            a.add_argument("--ruin", type=float, default=0.5, help="equity fraction that counts as ruin")
            a.add_argument("--seed", type=int, default=0)
        if action == "compare":
            a.add_argument("--fills", required=True, help="CSV or Parquet of the account's fills: ts, symbol, side, qty, price")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _number(text: str) -> int | float:
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)


def parse_params(items: list[str] | None, *, many: bool) -> dict[str, Any]:
    """``["fast=10", "slow=50"]`` -> {fast: 10, slow: 50}; with ``many``, ``fast=5,10`` and ``fast=5:50:5``
    (stop included) give lists."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier() or not text:
            raise UserError(f"--params {item!r}: write NAME=VALUE, e.g. fast=10")
        if "=" in text:
            raise UserError(f"--params {item!r}: separate parameters with spaces, e.g. --params fast=10 slow=50")
        try:
            if ":" in text:
                a, b, *c = text.split(":")
                lo, hi, step = _number(a), _number(b), _number(c[0]) if c else 1
                if step <= 0 or hi < lo:
                    raise ValueError
                values = list(np.arange(lo, hi + step / 2, step).round(10))
                values = [int(v) if float(v).is_integer() and isinstance(step, int) else float(v) for v in values]
            else:
                values = [_number(v) for v in text.split(",")]
        except (ValueError, IndexError):
            raise UserError(f"--params {item!r}: values must be numbers, a,b,c or start:stop:step") from None
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"--params {item!r}: values must be finite numbers")
        if not many and len(values) != 1:
            raise UserError(f"--params {item!r}: this action takes one value per parameter")
        out[name] = values if many else values[0]
    return out


def _costs(args):
    from tune.walk_forward import Costs

    if args.cash <= 0 or args.commission < 0 or not 0 <= args.slippage < 1:
        raise ValueError("--cash must be positive, --commission >= 0 and --slippage in [0, 1)")
    return Costs(cash=args.cash, commission=args.commission, slippage=args.slippage, fill=args.fill,
                 whole_units=args.whole_units)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if not np.isfinite(v) else f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.backtest_cmd is None:
        raise UserError("raytrade backtest: choose an action: run, walk-forward, monte-carlo, compare")
    # pandas, the store and the registry: imported when the verb runs.
    import pandas as pd

    from core.store import BarStore
    from core.strategies import get_strategy
    from tune.models import connect_registry, in_sample_warning

    try:  # model:NAME@VERSION names resolve through the registry in the store
        strategy = get_strategy(args.strategy, resolver=connect_registry(settings))
    except (LookupError, ValueError) as e:  # unknown name or version, or not a member: say which
        raise UserError(str(e.args[0]) if e.args else str(e)) from None
    symbol = args.symbol.strip().upper()
    many = args.backtest_cmd == "walk-forward"
    params = parse_params(args.params, many=many)
    unknown = sorted(set(params) - set(strategy.grid)) if strategy.grid else []
    if unknown:
        raise UserError(f"--params: {strategy.name} has no parameter {', '.join(unknown)}; "
                         f"it takes {', '.join(strategy.grid)}")
    try:
        costs = _costs(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    params = _whole_numbers(strategy, params)
    for flag, value in (("--start", args.start), ("--end", args.end)):
        if value is not None:
            try:
                pd.Timestamp(value)
            except (ValueError, TypeError):
                raise UserError(f"{flag} {value!r}: not a time; write e.g. 2024-01-31 or 2024-01-31T14:30:00Z") from None
    store = BarStore.from_settings(settings.store, settings.resilience)
    bars = store.read(symbol, args.start, args.end)
    if len(bars) < 3:
        raise UserError(f"the store at {store.uri} has {len(bars)} bars of {symbol} in that range; "
                         "`raytrade data generate` or `raytrade data import` first")
    warning = in_sample_warning(strategy, symbol, bars)
    if warning:
        _progress(f"warning: {warning}")
    action = args.backtest_cmd.replace("-", "_")
    out = Path(args.out or f"reports/{symbol}-{strategy.name.replace(':', '_')}-{args.backtest_cmd}")
    fresh = not out.exists()
    try:  # before the work, not after it
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write the report there ({e.strerror or e})") from None
    t0 = time.perf_counter()
    try:
        if action == "run":
            summary = _run(bars, strategy, params, costs, out, symbol)
        elif action == "walk_forward":
            summary = _walk_forward(args, bars, strategy, params, costs, out, symbol, settings)
        elif action == "monte_carlo":
            summary = _monte_carlo(args, bars, strategy, params, costs, out, symbol, settings)
        else:
            summary = _compare(args, bars, strategy, params, costs, out, symbol)
    except _Submitted as done:
        return done.code
    except ValueError as e:  # the library's own checks of what the user asked for
        if fresh and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # no report came of it: leave no empty folder behind
        raise UserError(str(e)) from None
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if warning:
        summary["warnings"] = [warning]
    text = summary.pop("_text")
    if args.json:
        print(json.dumps(summary, default=str, allow_nan=False))
    else:
        print(text)
        print(f"report: {summary['report']}")
    return 0


def _whole_numbers(strategy, params: dict[str, Any]) -> dict[str, Any]:
    """Values of a parameter the strategy counts in whole numbers (``Strategy.whole``: a window)
    must be whole: a window of 1.5 bars is a typo, not a request to round."""
    out = dict(params)
    for name, value in params.items():
        if name not in strategy.whole:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(float(v).is_integer() for v in values):
            raise UserError(f"--params {name}: {strategy.name}'s {name} takes whole numbers, got "
                             f"{', '.join(f'{v:g}' for v in values)}")
        out[name] = [int(v) for v in values] if isinstance(value, list) else int(value)
    return out


def _single(strategy, params):
    full = {k: v[0] for k, v in strategy.grid.items()}
    full.update(params)
    strategy.check({k: np.array([v]) for k, v in full.items()})  # a fast SMA not below the slow one: refused
    return full


class _Submitted(Exception):
    """The work went to the running system's scheduler; the command ends with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _join_or_submit(args, settings) -> None:
    """Join Ray; beside a running system, submit this command as its ``backtest`` workflow instead."""
    info = join(settings)
    sched = None if info.started_locally else running_scheduler(settings)
    if sched is not None:
        raise _Submitted(submit(settings, sched, "backtest", args.argv, args.detach))


def _run(bars, strategy, params, costs, out, symbol):
    from core.engine import backtest
    from tune.report import write_report
    from tune.walk_forward import _json_float, infer_periods_per_year

    params = _single(strategy, params)
    targets = strategy.targets(bars, {k: np.array([v]) for k, v in params.items()})[0]
    r = backtest(bars, targets, periods_per_year=infer_periods_per_year(bars), **costs.kwargs())
    path = write_report(out, title=f"{symbol} {strategy.name} {params}", backtest=r)
    rows = [{"metric": k, "value": float(v)} for k, v in r.metrics.items()]
    return {"action": "run", "symbol": symbol, "strategy": strategy.name, "params": params, "bars": len(bars),
            "metrics": {k: _json_float(v) for k, v in r.metrics.items()}, "report": str(path),
            "_text": _table(rows, ["metric", "value"])}


def _walk_forward(args, bars, strategy, params, costs, out, symbol, settings):
    from tune.report import write_report
    from tune.walk_forward import plan_walk_forward, run_walk_forward

    plan = plan_walk_forward(bars, strategy, train=args.train, test=args.test, step=args.step, anchored=args.anchored,
                             params=params or None, search=args.search, num_samples=args.samples,
                             objective=args.objective, costs=costs)  # bad input is refused before Ray starts
    _join_or_submit(args, settings)  # tune/ never joins Ray by itself
    wf = run_walk_forward(plan, storage_path=args.storage, settings=settings, progress=_progress)
    path = write_report(out, title=f"{symbol} {strategy.name} walk-forward", walk_forward=wf)
    cols = ["fold", *[c for c in wf.folds.columns if c.startswith("param_")], "is_objective", "oos_total_return",
            "oos_sharpe", "efficiency"]
    text = _table(wf.folds.to_dict("records"), cols) + (
        f"\nwalk-forward efficiency {wf.efficiency:.3g}; stitched out-of-sample return "
        f"{wf.oos_metrics['total_return']:.2%}, Sharpe {wf.oos_metrics['sharpe']:.3g}; "
        f"{wf.n_trials} trials, {wf.work_s:.1f} s of backtests in {wf.wall_s:.1f} s")
    return {"action": "walk-forward", "symbol": symbol, **wf.to_dict(), "report": str(path), "_text": text}


def _monte_carlo(args, bars, strategy, params, costs, out, symbol, settings):
    from tune.monte_carlo import plan_monte_carlo, run_monte_carlo
    from tune.report import write_report

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    plan = plan_monte_carlo(bars, strategy, _single(strategy, params), methods=methods, n_paths=args.paths,
                            block=args.block, horizon=args.horizon, generator=args.generator, ruin=args.ruin,
                            seed=args.seed, costs=costs)  # bad input is refused before Ray starts
    _join_or_submit(args, settings)  # tune/ never joins Ray by itself
    mc = run_monte_carlo(plan, storage_path=args.storage, settings=settings, progress=_progress)
    path = write_report(out, title=f"{symbol} {strategy.name} Monte Carlo", monte_carlo=mc)
    table = mc.table()
    text = _table(table.to_dict("records"), ["method", "paths", "wealth_p5", "wealth_p50", "wealth_p95",
                                             "sharpe_p50", "max_dd_p95", "prob_loss", "prob_ruin"])
    for m, why in mc.skipped.items():
        text += f"\n{m} skipped: {why}"
    return {"action": "monte-carlo", "symbol": symbol, **mc.to_dict(), "report": str(path), "_text": text}


def _compare(args, bars, strategy, params, costs, out, symbol):
    from core.engine import backtest
    from tune.report import compare_fills, read_fills, reason_counts, write_compare_report

    try:
        fills = read_fills(args.fills, symbol)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--fills {args.fills}: {e}") from None
    params = _single(strategy, params)
    targets = strategy.targets(bars, {k: np.array([v]) for k, v in params.items()})[0]
    r = backtest(bars, targets, **costs.kwargs())
    diff = compare_fills(bars, r, fills, costs)
    path = write_compare_report(out, f"{symbol} {strategy.name} {params}: paper fills vs backtest", diff)
    counts = reason_counts(diff.differences)
    text = (_table(diff.differences.head(30).to_dict("records"),
                   ["bar_ts", "paper_qty", "backtest_qty", "paper_price", "backtest_price", "why"])
            if len(diff.differences) else "paper fills and backtest agree on every bar")
    text += (f"\n{len(diff.differences)} difference(s): {counts}; final position paper {diff.paper_position:g} vs "
             f"backtest {diff.backtest_position:g}; P&L paper {diff.paper_pnl:.2f} vs backtest {diff.backtest_pnl:.2f}")
    return {"action": "compare", "symbol": symbol, "params": params, "differences": len(diff.differences),
            "by_reason": counts, "paper_pnl": diff.paper_pnl, "backtest_pnl": diff.backtest_pnl,
            "paper_position": diff.paper_position, "backtest_position": diff.backtest_position,
            "report": str(path), "_text": text}


COMMANDS = {"backtest": run}
