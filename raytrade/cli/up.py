"""``raytrade up``, ``raytrade down``, ``raytrade status``: the running system.

``up`` joins the cluster (or starts a local Ray) and starts the whole system
(``raytrade.system``); ``down`` stops what it started; ``status`` shows the
nodes, resources, raytrade's actors, the feeds, the fills and the scheduler.
Ray, the store and ``raytrade.system`` (which imports every actor, Serve and
torch) are imported inside the functions that run a verb: `raytrade --help`
does not pay for them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from cluster import names
from cluster.runtime import (
    ClusterUnavailable, connect, forget_up, record_up, recorded_up, start_head, status, stop_head,
)
from cluster.settings import Settings
from raytrade.cli.errors import one_line, unavailable
from raytrade.cli.feeds import print_feeds, router_health


def add_parser(sub: Any) -> None:
    up = sub.add_parser("up", help="start raytrade (local Ray unless RAY_ADDRESS is set)")
    up.add_argument("--detach", action="store_true", help="start a detached local Ray head and return")
    up.add_argument("--duration", type=float, default=None, help="run for S seconds, then shut down")
    up.add_argument("--history-bars", type=int, default=2000, help="bars per symbol generated if the store is empty")
    up.add_argument("--no-serve", action="store_true", help="feeds, router and scheduler only: no models, accounts or HTTP")
    sub.add_parser("down", help="stop what `raytrade up` started")
    st = sub.add_parser("status", help="the cluster's nodes, resources and raytrade actors")
    st.add_argument("--json", action="store_true", help="machine-readable output")


# -- up -----------------------------------------------------------------------------
def run_up(args: argparse.Namespace, settings: Settings) -> int:
    # Ray, pyarrow and pandas: imported when the verb runs.
    import ray

    from core.store import BarStore
    from core.synthetic import SyntheticMarket

    store = BarStore.from_settings(settings.store, settings.resilience)
    missing = [s for s in settings.feeds.symbols if store.last_ts(s) is None]
    if missing:
        print(f"store {store.uri} has no history for {', '.join(missing)}: writing {args.history_bars} synthetic bars each")
        store.append(SyntheticMarket(missing, seed=settings.feeds.seed).generate(args.history_bars))

    head_pgid = None
    try:
        if args.detach:
            if not os.environ.get("RAY_ADDRESS") and not settings.ray.address:
                address, head_pgid = start_head(settings)
                os.environ["RAY_ADDRESS"] = address
        info = connect(settings, use_record=False)  # `up` is one of the two ways out of a stale record
    except ClusterUnavailable as e:
        return unavailable(e)
    record_up(info.address, head_pgid is not None, head_pgid)
    # Every actor, Serve and torch: imported once the cluster is there, so a cluster that
    # cannot be reached is said at once.
    from raytrade.system import demo_settings, serve_url, start_system

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
        url = serve_url(settings)
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
        ray.shutdown()
        forget_up()
        print("stopped cleanly")
    return 0


# -- down ---------------------------------------------------------------------------
def run_down(args: argparse.Namespace, settings: Settings) -> int:
    import ray  # when the verb runs

    rec = recorded_up()
    try:
        connect(settings, start_local=False)
    except ClusterUnavailable as e:
        forget_up()
        print(f"raytrade: nothing to stop ({one_line(e)})")
        return 0
    from raytrade.system import stop_system  # every actor, Serve and torch: only once connected

    n = stop_system(settings)
    ray.shutdown()
    if rec and rec.get("head_pgid"):
        stop_head(int(rec["head_pgid"]))
    forget_up()
    print(f"stopped {n} raytrade actor(s)" + (" and the local Ray head" if rec and rec.get("started_head") else ""))
    return 0


# -- status -------------------------------------------------------------------------
def run_status(args: argparse.Namespace, settings: Settings) -> int:
    try:
        connect(settings, start_local=False)
    except ClusterUnavailable as e:
        return unavailable(e)
    st = status(settings)
    from actors.scheduler import scheduler_summary  # Ray and the store: once the cluster is there

    st["scheduler"] = scheduler_summary(settings)
    if args.json:
        st["feeds"] = router_health(settings)
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
    h = router_health(settings)
    if h is not None:
        print_feeds(h)
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
    import ray  # when the verb runs

    out = {}
    for acct in settings.accounts:
        try:
            broker = names.lookup(names.broker(acct), settings)
            if broker is not None:
                out[acct] = ray.get(broker.health.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - not answering: say which
            out[acct] = {"error": f"{names.broker(acct)} did not answer: {one_line(e)}"}
    return out


def _fmt_res(k: str, v: float) -> str:
    if "memory" in k:
        return f"{v / 1024**3:.1f}GiB"
    return f"{v:g}"


COMMANDS = {"up": run_up, "down": run_down, "status": run_status}
