"""The ``raytrade`` command line.

    raytrade up [--detach] [--duration S]   start the system on this machine or a cluster
    raytrade down                           stop what `up` started
    raytrade status [--json]                nodes, resources, actors and their states
    raytrade config show                    effective settings, secrets as ***
    raytrade data generate|import|ls|verify history in the store; verify exits 2 on a bad part
    raytrade train --symbols ... --alpha A  CVaR-PPO against the risk-neutral baseline, out of sample
    raytrade workflows ls|run|cancel        the workflow scheduler's queue
    raytrade models ls|show|promote|rollback|import|train-baseline   the model registry
    raytrade backtest run|walk-forward|monte-carlo|compare   backtests, on Ray Tune where it pays

A user's mistake (a bad flag, a bad setting, a bad file) ends with one line on
stderr and exit code 2, never a traceback; a cluster that cannot be reached
ends with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any, Sequence

from cluster.settings import Settings, SettingsError, load_settings

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 1


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage dump
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="raytrade", description="raytrade: an algorithmic trading operation on one Ray cluster.")
    p.add_argument("--config", help="settings file (default: ./raytrade.toml if present)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    up = sub.add_parser("up", help="start raytrade (local Ray unless RAY_ADDRESS is set)")
    up.add_argument("--detach", action="store_true", help="start a detached local Ray head and return")
    up.add_argument("--duration", type=float, default=None, help="run for S seconds, then shut down")
    up.add_argument("--history-bars", type=int, default=2000, help="bars per symbol generated if the store is empty")
    up.add_argument("--no-serve", action="store_true", help="feeds, router and scheduler only: no models, accounts or HTTP")

    tr = sub.add_parser("trades", help="trade analytics from an account's ledger")
    tr_sub = tr.add_subparsers(dest="trades_cmd", metavar="ACTION", parser_class=_Parser)
    ts_ = tr_sub.add_parser("stats", help="win rate, average win and loss, P&L by symbol and by member")
    ts_.add_argument("--account", default="default")
    ts_.add_argument("--days", type=float, default=30.0)
    ts_.add_argument("--json", action="store_true")
    te = tr_sub.add_parser("export", help="filled orders as a fills file for `raytrade backtest compare`")
    te.add_argument("--account", default="default")
    te.add_argument("--out", required=True, help="a .csv path")
    te.add_argument("--limit", type=int, default=10_000)

    dec = sub.add_parser("decide", help="ask the running endpoint for a decision")
    dec.add_argument("symbol")
    dec.add_argument("--execute", action="store_true", help="trade it (needs a trade key)")
    dec.add_argument("--account", default="default")
    dec.add_argument("--key", default=None, help="API key (default: $RAYTRADE_API_KEY)")
    dec.add_argument("--url", default=None, help="default: http://serve.host:serve.port")

    sub.add_parser("down", help="stop what `raytrade up` started")

    st = sub.add_parser("status", help="the cluster's nodes, resources and raytrade actors")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    fd = sub.add_parser("feeds", help="market data feeds and the router")
    fd_sub = fd.add_subparsers(dest="feeds_cmd", metavar="ACTION", parser_class=_Parser)
    fd_sub.add_parser("ls", help="each source's health, the active one, failover events")
    for action, text in (("kill", "stop a feed actor for good (watch the router fail over)"),
                         ("pause", "stall a feed without killing it"), ("resume", "resume a paused feed")):
        a = fd_sub.add_parser(action, help=text)
        a.add_argument("source", help="e.g. feed:replay (see `raytrade feeds ls`)")
    fl = fd_sub.add_parser("fault", help="make a feed send one bad bar (chaos testing)")
    fl.add_argument("source")
    fl.add_argument("kind", help="nan, zero, negative, high_low, spike, duplicate, out_of_order")

    cfg = sub.add_parser("config", help="settings")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", metavar="ACTION", parser_class=_Parser)
    cfg_sub.add_parser("show", help="print the effective settings (secrets redacted)")

    data = sub.add_parser("data", help="history in the store")
    data_sub = data.add_subparsers(dest="data_cmd", metavar="ACTION", parser_class=_Parser)
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

    tr = sub.add_parser("train", help="train CVaR-PPO and the risk-neutral baseline; compare them on held-out bars")
    tr.add_argument("--symbols", nargs="+", default=None, help="symbols in the store to learn from (default: feeds.symbols)")
    tr.add_argument("--steps", type=int, default=200_000, help="environment steps per run")
    tr.add_argument("--alpha", type=float, default=0.1, help="CVaR level in (0, 1): the worst alpha share of episodes")
    tr.add_argument("--beta", type=float, default=None,
                    help="CVaR floor (log return per episode): maximise the mean subject to CVaR_alpha >= beta; "
                         "without it, maximise CVaR_alpha itself")
    tr.add_argument("--lambda-lr", type=float, default=10.0, help="with --beta: the Lagrange multiplier's step per iteration")
    tr.add_argument("--soft-risk", type=float, default=0.2, help="share of training over which alpha anneals from 1")
    tr.add_argument("--seed", type=int, default=1)
    tr.add_argument("--run", default=None, help="run id; giving an interrupted run's id resumes it (default: a new one)")

    wf = sub.add_parser("workflows", help="the workflow scheduler: priority workflows holding resource locks")
    wf_sub = wf.add_subparsers(dest="wf_cmd", metavar="ACTION", parser_class=_Parser)
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
    _models_parser(sub)
    _backtest_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except (UserError, SettingsError) as e:
        print(f"raytrade: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # A corrupt store part is the user's data to fix (the message names the part), not a
        # traceback, whichever command read it. Imported here: the store pulls in pyarrow,
        # which `raytrade --help` should not pay for.
        from core.store import CorruptPartError

        if isinstance(e, CorruptPartError):
            print(f"raytrade: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _one_line(e: BaseException) -> str:
    text = str(e).strip().replace("\n", " ")
    return text[:2000]


def _main(argv: Sequence[str] | None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.cmd is None:
        p.print_help()
        return 0
    settings = load_settings(args.config)
    if args.cmd == "config":
        if args.config_cmd != "show":
            raise UserError("raytrade config: choose an action: show")
        print(settings.show())
        return 0
    if args.cmd == "down":
        return _down(settings)
    if args.cmd == "models":
        from cluster.models_cli import run_models

        return run_models(args, settings, UserError)
    if args.cmd == "backtest":
        from cluster.cli_backtest import run_backtest_command

        return run_backtest_command(args, settings, UserError)
    commands = {"data": _data, "status": _status, "feeds": _feeds, "up": _up, "train": _train,
                "workflows": _workflows, "decide": _decide, "trades": _trades}
    if args.cmd in commands:
        return commands[args.cmd](args, settings)
    raise UserError(f"unknown command {args.cmd}")


def _models_parser(sub: Any) -> None:
    m = sub.add_parser("models", help="the model registry: versions, stages, metrics")
    ms = m.add_subparsers(dest="models_cmd", metavar="ACTION", parser_class=_Parser)
    ls = ms.add_parser("ls", help="models and their versions")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true")
    show = ms.add_parser("show", help="one version's record and tracked metrics")
    show.add_argument("name")
    show.add_argument("--version", type=int, default=None, help="default: production, else the latest")
    pr = ms.add_parser("promote", help="make a version production (the ensemble follows)")
    pr.add_argument("name")
    pr.add_argument("version", type=int)
    rb = ms.add_parser("rollback", help="put back the previous production version")
    rb.add_argument("name")
    imp = ms.add_parser("import", help="register your own ONNX file (local path or s3://bucket/key)")
    imp.add_argument("source")
    imp.add_argument("--name", required=True)
    imp.add_argument("--task", default="forecasting")
    imp.add_argument("--tag", action="append", default=[])
    imp.add_argument("--promote", action="store_true", help="make it production at once")
    tb = ms.add_parser("train-baseline", help="train the MLP/LSTM baselines on the store's history and register them")
    tb.add_argument("--symbols", nargs="+", default=None, help="default: feeds.symbols")
    tb.add_argument("--kind", choices=["mlp", "lstm", "both"], default="both")
    tb.add_argument("--epochs", type=int, default=5)
    tb.add_argument("--max-samples", type=int, default=200_000)
    tb.add_argument("--promote", action="store_true", help="make the new versions production")


def _backtest_parser(sub) -> None:
    bt = sub.add_parser("backtest", help="backtests: one run, walk-forward and Monte Carlo on Ray Tune, live vs backtest")
    bt_sub = bt.add_subparsers(dest="backtest_cmd", metavar="ACTION", parser_class=_Parser)
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


# -- data ---------------------------------------------------------------------------
def _store(settings: Settings):
    from core.store import BarStore

    return BarStore.from_settings(settings.store, settings.resilience)


def _data(args: argparse.Namespace, settings: Settings) -> int:
    from core.ingest import ImportRefused, read_bars_file

    if args.data_cmd is None:
        raise UserError("raytrade data: choose an action: import, generate, ls, verify")
    store = _store(settings)
    if args.data_cmd == "import":
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
    if args.data_cmd == "generate":
        import pandas as pd

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
    if args.data_cmd == "ls":
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
    if args.data_cmd == "verify":
        return _data_verify(store, args.adopt)
    raise UserError(f"unknown data action {args.data_cmd}")


def _data_verify(store: Any, adopt: bool) -> int:
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


# -- cluster ------------------------------------------------------------------------
def _status(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.runtime import ClusterUnavailable, connect, status

    try:
        connect(settings, start_local=False)
    except ClusterUnavailable as e:
        print(f"raytrade: {_one_line(e)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    st = status(settings)
    from cluster.scheduler import scheduler_summary

    st["scheduler"] = scheduler_summary(settings)
    if args.json:
        st["feeds"] = _router_health(settings)
        st["fills"] = _broker_health(settings)
        print(json.dumps(st, indent=2, default=str))
        return 0
    print(f"namespace {st['namespace']}  profile {st['profile']}")
    print("nodes:")
    for n in st["nodes"]:
        res = ", ".join(f"{k}={_fmt_res(k, v)}" for k, v in sorted(n["resources"].items()))
        print(f"  {n['node_id']} {n['address']} {'alive' if n['alive'] else 'dead'}: {res}")
    print("actors:")
    if not st["actors"]:
        print("  (none)")
    for a in st["actors"]:
        extra = f" waiting for {a['waiting_for']}" if a.get("waiting_for") else ""
        print(f"  {a['name']:<32} {a['state']}{extra}")
    h = _router_health(settings)
    if h is not None:
        _print_feeds(h)
    for acct, health in _broker_health(settings).items():
        fills = health.get("fills") or {}
        if health.get("error"):
            print(f"fills {acct}: {health['error']}")
        elif fills:
            print(f"fills {acct}: flowing ({fills['working']} market order(s) waiting for their bar)")
    sch = st["scheduler"]
    if sch is None:
        print("scheduler: not running")
    elif "error" in sch:
        print(f"scheduler: {sch['error']}")
    else:
        held = "; ".join(f"{j['id']} holds {','.join(j['locks_held'])}" for j in sch["running"]) or "nothing running"
        print(f"scheduler: {len(sch['running'])} running, {sch['queued']} queued ({held})")
    return 0


def _broker_health(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each running broker's health by account (fills flowing or stalled); accounts not running are left out."""
    import ray

    from actors.broker import broker_actor_name

    out = {}
    for acct in settings.accounts:
        try:
            broker = ray.get_actor(broker_actor_name(acct), namespace=settings.ray.namespace)
            out[acct] = ray.get(broker.health.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - not running, or not answering: say which
            if not isinstance(e, ValueError):
                out[acct] = {"error": f"broker:{acct} did not answer: {_one_line(e)}"}
    return out


def _router_health(settings: Settings) -> dict[str, Any] | None:
    import ray

    from actors.router import router_actor_name

    try:
        router = ray.get_actor(router_actor_name("default"), namespace=settings.ray.namespace)
        return ray.get(router.health.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - no router running
        return None


def _print_feeds(h: dict[str, Any]) -> None:
    print(f"feeds (router {h['group']}): active {h['active']}, delivered {h['delivered']} bars, "
          f"{h['failovers']} failover(s), {h['failbacks']} failback(s)")
    for s in h["sources"]:
        state = "healthy" if s["healthy"] else f"UNHEALTHY ({s['why_unhealthy']})"
        mark = "*" if s["name"] == h["active"] else " "
        print(f"  {mark} {s['name']:<20} {state}; received {s['received']}, rejected {s['rejected']}, "
              f"quality {s['quality']:.2f}")
    for e in h["events"][-10:]:
        print(f"    {e['kind']}: {e['from']} -> {e['to']}: {e['reason']}")


def _feeds(args: argparse.Namespace, settings: Settings) -> int:
    import ray

    from cluster.runtime import ClusterUnavailable, connect

    if args.feeds_cmd is None:
        raise UserError("raytrade feeds: choose an action: ls, kill, pause, resume, fault")
    if args.feeds_cmd == "fault":
        from actors.feeds import FAULTS

        if args.kind not in FAULTS:
            raise UserError(f"unknown fault {args.kind!r}; use one of {', '.join(FAULTS)}")
    try:
        connect(settings, start_local=False)
    except ClusterUnavailable as e:
        print(f"raytrade: {_one_line(e)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.feeds_cmd == "ls":
        h = _router_health(settings)
        if h is None:
            print("no feed router is running; `raytrade up` starts one")
            return EXIT_UNAVAILABLE
        _print_feeds(h)
        return 0
    try:
        actor = ray.get_actor(args.source, namespace=settings.ray.namespace)
    except ValueError:
        raise UserError(f"no feed named {args.source!r}; `raytrade feeds ls` lists them") from None
    if args.feeds_cmd == "kill":
        ray.kill(actor, no_restart=True)
        print(f"killed {args.source}; `raytrade status` shows the router's failover")
    elif args.feeds_cmd in ("pause", "resume"):
        ray.get(actor.pause.remote(args.feeds_cmd == "pause"), timeout=10)
        print(f"{args.source} {'paused' if args.feeds_cmd == 'pause' else 'resumed'}")
    elif args.feeds_cmd == "fault":
        ray.get(actor.inject_fault.remote(args.kind), timeout=10)
        print(f"{args.source} will send one {args.kind} bar")
    return 0


def _workflows(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.runtime import ClusterUnavailable, connect
    from cluster.scheduler import FINAL, get_scheduler, start_scheduler

    if args.wf_cmd is None:
        raise UserError("raytrade workflows: choose an action: ls, run, cancel")
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
        print(f"raytrade: {_one_line(e)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    import ray

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
            if args.wf_cmd == "cancel":
                raise UserError(f"no job {args.id!r}: the scheduler is not running") from None
            print("the scheduler is not running; `raytrade workflows run NAME` starts it")
            return 0
        if args.wf_cmd == "cancel":
            job = ray.get(sched.cancel.remote(args.id), timeout=60)
            print(f"{job['id']} {job['state']}" + (" (killing the running attempt)" if job["state"] == "stopping" else ""))
            return 0
        st = ray.get(sched.status.remote(args.history), timeout=60)
    except ray.exceptions.RayTaskError as e:
        from cluster.scheduler import WorkflowError

        if isinstance(e.cause, WorkflowError):
            raise UserError(str(e.cause)) from None
        raise
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
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
    return 0


def _fmt_res(k: str, v: float) -> str:
    if "memory" in k:
        return f"{v / 1024**3:.1f}GiB"
    return f"{v:g}"


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from cluster.runtime import ClusterUnavailable, connect, record_up, start_head
    from core.store import BarStore

    store = BarStore.from_settings(settings.store, settings.resilience)
    missing = [s for s in settings.feeds.symbols if store.last_ts(s) is None]
    if missing:
        from core.synthetic import SyntheticMarket

        print(f"store {store.uri} has no history for {', '.join(missing)}: writing {args.history_bars} synthetic bars each")
        store.append(SyntheticMarket(missing, seed=settings.feeds.seed).generate(args.history_bars))

    head_pgid = None
    try:
        if args.detach:
            import os

            if not os.environ.get("RAY_ADDRESS") and not settings.ray.address:
                address, head_pgid = start_head(settings)
                os.environ["RAY_ADDRESS"] = address
        info = connect(settings)
    except ClusterUnavailable as e:
        print(f"raytrade: {_one_line(e)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    record_up(info.address, head_pgid is not None, head_pgid)

    from cluster.system import demo_settings, start_system

    settings, demo_key = demo_settings(settings)
    system = start_system(settings, serve_app=not args.no_serve)
    print("raytrade is up")
    print(f"  ray address     {info.address}")
    print(f"  ray dashboard   {info.dashboard_url or 'off'}")
    print(f"  namespace       {info.namespace} (profile {info.profile})")
    print(f"  store           {store.root if store.is_local else store.uri}")
    for line in system.describe():
        print(f"  {line}")
    if not args.no_serve:
        url = f"http://{settings.serve.host}:{settings.serve.port}"
        if demo_key:
            print(f"  demo API key    {demo_key}   (admin, this run only; set api_keys in settings for your own)")
        key = demo_key or "$RAYTRADE_API_KEY"
        sym = settings.feeds.symbols[0]
        print("try:")
        print(f"  curl -s -H 'X-API-Key: {key}' {url}/v1/signal/{sym}")
        print(f"  curl -s -H 'X-API-Key: {key}' -H 'Content-Type: application/json' "
              f"-d '{{\"symbol\": \"{sym}\", \"execute\": true}}' {url}/v1/decisions")
        print(f"  RAYTRADE_API_KEY={key} raytrade decide {sym}")
    sys.stdout.flush()
    if args.detach:
        print("detached; `raytrade status` to look, `raytrade down` to stop")
        return 0

    stop = {"now": False}

    def _on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    deadline = None if args.duration is None else time.time() + args.duration
    print("streaming (Ctrl-C to stop)")
    try:
        while not stop["now"] and (deadline is None or time.time() < deadline):
            for line in system.poll():
                print(line)
            sys.stdout.flush()
            time.sleep(0.5)
    finally:
        print("shutting down")
        system.stop()
        import ray

        ray.shutdown()
        from cluster.runtime import UP_STATE

        UP_STATE.unlink(missing_ok=True)
        print("stopped cleanly")
    return 0


def _trades(args: argparse.Namespace, settings: Settings) -> int:
    import ray

    from cluster.runtime import ClusterUnavailable, connect

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
        print(f"raytrade: {_one_line(e)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        risk = ray.get_actor(f"risk:{args.account}", namespace=settings.ray.namespace)
    except ValueError:
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
                import pandas as pd

                when = pd.Timestamp(int(ts), tz="UTC") if ts else pd.Timestamp(x.get("filled_at"), unit="s", tz="UTC")
                rows.append((when.isoformat(), x["symbol"], x["side"].lower(), x["qty"], x["fill_price"]))
    import csv

    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "symbol", "side", "qty", "price"])
        w.writerows(sorted(rows))
    print(f"wrote {len(rows)} fill(s) of account {args.account} to {args.out}")
    return 0


def _decide(args: argparse.Namespace, settings: Settings) -> int:
    import os
    import urllib.error
    import urllib.request

    key = args.key or os.environ.get("RAYTRADE_API_KEY")
    if not key:
        raise UserError("no API key: pass --key or set RAYTRADE_API_KEY (`raytrade up` prints a demo key)")
    url = (args.url or f"http://{settings.serve.host}:{settings.serve.port}").rstrip("/") + "/v1/decisions"
    body = json.dumps({"symbol": args.symbol, "execute": args.execute, "account": args.account}).encode()
    req = urllib.request.Request(url, data=body, headers={"X-API-Key": key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            d = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail", "")
        except ValueError:
            detail = ""
        print(f"raytrade: {e.code} from the endpoint: {detail}", file=sys.stderr)
        return EXIT_USAGE if 400 <= e.code < 500 else EXIT_UNAVAILABLE
    except (urllib.error.URLError, OSError) as e:
        print(f"raytrade: cannot reach {url} ({getattr(e, 'reason', e)}); is `raytrade up` running?", file=sys.stderr)
        return EXIT_UNAVAILABLE
    verdict = "approved" if d["risk"]["approved"] else "refused"
    print(f"{d['symbol']}: {d['action']} target {d['target_position']:+.2f} (now {d['current_position']:+.2f}), "
          f"quantity {d['quantity']:g}, confidence {d['confidence']:.2f}, regime {d.get('regime')}")
    print(f"  risk {verdict}: {'; '.join(d['risk']['reasons']) or '-'}")
    for name, m in sorted(d["members"].items()):
        print(f"  {name:<22} position {m.get('position') if m.get('position') is None else round(m['position'], 3)}"
              f"  contribution {m.get('contribution', 0):+.3f}  version {m.get('version')}")
    if d.get("executed"):
        print(f"  order {d['order']}")
    print(f"  decision {d['decision_id']}, last bar seq {d['last_bar']['seq']} at {d['last_bar']['ts']}")
    return 0


def _down(settings: Settings) -> int:
    from cluster.runtime import UP_STATE, ClusterUnavailable, connect, recorded_up, stop_head

    rec = recorded_up()
    try:
        connect(settings, start_local=False)
    except ClusterUnavailable as e:
        UP_STATE.unlink(missing_ok=True)
        print(f"raytrade: nothing to stop ({_one_line(e)})")
        return 0
    from cluster.system import stop_system

    n = stop_system(settings)
    import ray

    ray.shutdown()
    if rec and rec.get("head_pgid"):
        stop_head(int(rec["head_pgid"]))
    UP_STATE.unlink(missing_ok=True)
    print(f"stopped {n} raytrade actor(s)" + (" and the local Ray head" if rec and rec.get("started_head") else ""))
    return 0


# -- train --------------------------------------------------------------------------
def _train_requests(args: argparse.Namespace, settings: Settings) -> tuple[str, list[str], list[tuple[str, str, Any]]]:
    """Check the arguments and the data, before any cluster is touched; (run, symbols, runs)."""
    import math
    import re

    from actors.learner import MultiSymbolEnv, load_data, ppo_settings_for

    if not 0.0 < args.alpha < 1.0:
        raise UserError(f"--alpha {args.alpha}: must be in (0, 1); the baseline is alpha = 1")
    if not 0.0 <= args.soft_risk <= 1.0:
        raise UserError(f"--soft-risk {args.soft_risk}: must be in [0, 1]")
    if not args.lambda_lr > 0 or not math.isfinite(args.lambda_lr):  # NaN passes a plain "<= 0" check
        raise UserError(f"--lambda-lr {args.lambda_lr}: must be a positive number")
    if args.beta is not None and not math.isfinite(args.beta):
        # A NaN floor would silently train plain PPO: max(0, lambda + NaN) keeps lambda at 0.
        raise UserError(f"--beta {args.beta}: must be a finite log return, e.g. -0.02")
    symbols = [s.upper() for s in (args.symbols or settings.feeds.symbols)]
    for sym in symbols:
        if not sym.replace(".", "").replace("-", "").isalnum():
            raise UserError(f"--symbols {sym!r}: use letters and digits, e.g. SPY")
    if len(set(symbols)) != len(symbols):
        raise UserError(f"--symbols {' '.join(symbols)}: a symbol is repeated")
    ls = settings.learner
    batch = ls.num_envs * ls.episode_length
    if args.steps < batch:
        raise UserError(f"--steps {args.steps}: one rollout is learner.num_envs x learner.episode_length = {batch} "
                        f"steps; give at least that")
    run = args.run or time.strftime("run-%Y%m%d-%H%M%S")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,54}$", run):
        raise UserError(f"--run {run!r}: use letters, digits, '_', '-', '.' (at most 55)")
    try:
        MultiSymbolEnv.from_data(load_data(_store(settings), symbols, ls), ls, args.seed, "cpu")
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.steps % batch:
        print(f"training {args.steps // batch * batch} steps per run: whole rollouts of {batch}", file=sys.stderr)
    kw = dict(seed=args.seed, soft_risk=args.soft_risk, lambda_lr=args.lambda_lr)
    baseline = ppo_settings_for(ls, args.steps, **kw)
    risky = ppo_settings_for(ls, args.steps, args.alpha, args.beta, **kw)
    label = f"CVaR-PPO (alpha={args.alpha:g}" + ("" if args.beta is None else f", beta={args.beta:g}") + ")"
    return run, symbols, [("risk-neutral PPO (alpha=1)", f"{run}-baseline", baseline), (label, f"{run}-cvar", risky)]


def _progress_line(label: str, p: dict[str, Any]) -> str:
    total = p.get("total_timesteps") or 0
    step = p.get("global_step") or 0
    frac = min(1.0, step / total) if total else 0.0
    bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
    line = f"\r{label:<34} [{bar}] {frac:4.0%} {int(step):>9}/{int(total)} {p.get('phase', ''):<11}"
    if p.get("phase") == "training":
        line += (f" return {p.get('mean_return', float('nan')):+.4f} CVaR {p.get('cvar', float('nan')):+.4f}"
                 f" KL {p.get('approx_kl', float('nan')):.4f} lambda {p.get('lambda_', 0.0):.3f}")
    return line.ljust(140)  # a shorter line must cover the longer one it overwrites


def _train(args: argparse.Namespace, settings: Settings) -> int:
    import ray

    from actors.learner import LEARNER_ACTOR, get_or_create_learner
    from cluster.runtime import ClusterUnavailable, connect

    run, symbols, runs = _train_requests(args, settings)
    try:
        connect(settings)
    except ClusterUnavailable as e:
        print(f"raytrade: {_one_line(e)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        ray.get_actor(LEARNER_ACTOR, namespace=settings.ray.namespace)
        ours = False  # a learner the system runs: use it, leave it running
    except ValueError:
        ours = True
    learner = get_or_create_learner(settings, detached=not ours)
    results = []
    try:
        for label, run_id, ppo in runs:
            ref = learner.train.remote(run_id, symbols, ppo, args.alpha)
            while True:
                ready, _ = ray.wait([ref], timeout=0.5)
                try:
                    p = ray.get(learner.progress.remote(), timeout=10)
                    if p.get("run_id") == run_id:
                        print(_progress_line(label, p), end="", file=sys.stderr, flush=True)
                except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                    pass  # restarting: the retried call resumes from the checkpoint
                if ready:
                    break
            print(file=sys.stderr)
            try:
                results.append((label, ray.get(ref)))
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                cause = getattr(e, "cause", None) or e
                print(f"raytrade: training {run_id} failed: {_one_line(cause)}", file=sys.stderr)
                return EXIT_UNAVAILABLE
    finally:
        if ours:
            ray.kill(learner, no_restart=True)
    _print_train_table(results, settings, args.alpha)
    return 0


def _num(x: float | None, width: int, fmt: str) -> str:
    # Results come back as JSON, where a metric that could not be measured is null.
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def _print_train_table(results: list[tuple[str, dict[str, Any]]], settings: Settings, alpha: float) -> None:
    ls = settings.learner
    first = results[0][1]["evaluation"]
    print(f"held-out bars (never trained on), fills at the {'next open' if ls.eval_fill == 'open' else 'close'}, "
          f"costs {ls.commission:.4%} + {ls.slippage:.4%} of notional:")
    for sym, m in first["symbols"].items():
        print(f"  {sym:<8} {m['first']} .. {m['last']} ({m['bars']} bars)")
    head = f"CVaR_{alpha:g}"
    print(f"{'':<34} {'mean/bar':>11} {'Sharpe':>8} {head:>11} {'max DD':>8} {'exposure':>9} {'lambda':>7}")
    for label, r in results:
        a = r["evaluation"]["aggregate"]
        lam = r["history"][-1].get("lambda_", 0.0) if r["history"] else 0.0
        print(f"{label:<34} {_num(a['mean'], 11, '.6f')} {_num(a['sharpe'], 8, '.3f')} {_num(a['cvar'], 11, '.6f')} "
              f"{_num(a['max_drawdown'], 8, '.2%')} {_num(a['exposure'], 9, '.2f')} {_num(lam or 0.0, 7, '.3f')}")
    print("over symbols: mean of mean and Sharpe, worst CVaR and drawdown. Registered as candidates "
          "(`raytrade models ls`):")
    for label, r in results:
        c = r["candidate"]
        print(f"  {c['name']} v{c['version']} ({label}, run {r['run_id']}): {c['path']} (sha256 {c['sha256'][:12]})")


if __name__ == "__main__":
    sys.exit(main())
