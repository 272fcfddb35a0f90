"""``raytrade feeds ls|kill|pause|resume|fault``: the market data feeds and the router over them.

Ray and ``actors.feeds`` are imported inside the functions that run the verb:
`raytrade --help` does not pay for importing Ray.
"""

from __future__ import annotations

import argparse
from typing import Any

from cluster import names
from cluster.runtime import ClusterUnavailable, connect
from cluster.settings import Settings
from raytrade.cli.errors import EXIT_UNAVAILABLE, ArgParser, UserError, unavailable


def add_parser(sub: Any) -> None:
    fd = sub.add_parser("feeds", help="market data feeds and the router")
    fd_sub = fd.add_subparsers(dest="feeds_cmd", metavar="ACTION", parser_class=ArgParser)
    fd_sub.add_parser("ls", help="each source's health, the active one, failover events")
    for action, text in (("kill", "stop a feed actor for good (watch the router fail over)"),
                         ("pause", "stall a feed without killing it"), ("resume", "resume a paused feed")):
        a = fd_sub.add_parser(action, help=text)
        a.add_argument("source", help=f"e.g. {names.feed('replay')} (see `raytrade feeds ls`)")
    fl = fd_sub.add_parser("fault", help="make a feed send one bad bar (chaos testing)")
    fl.add_argument("source")
    fl.add_argument("kind", help="nan, zero, negative, high_low, spike, duplicate, out_of_order")


def router_health(settings: Settings) -> dict[str, Any] | None:
    """The default router's health, or None when no router is running (or it does not answer)."""
    import ray  # when the verb runs

    try:
        router = names.lookup(names.router(), settings)
        return None if router is None else ray.get(router.health.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - no router running
        return None


def print_feeds(h: dict[str, Any]) -> None:
    print(f"feeds (router {h['group']}): active {h['active']}, delivered {h['delivered']} bars, "
          f"{h['failovers']} failover(s), {h['failbacks']} failback(s)")
    for s in h["sources"]:
        state = "healthy" if s["healthy"] else f"UNHEALTHY ({s['why_unhealthy']})"
        mark = "*" if s["name"] == h["active"] else " "
        print(f"  {mark} {s['name']:<20} {state}; received {s['received']}, rejected {s['rejected']}, "
              f"quality {s['quality']:.2f}")
    for e in h["events"][-10:]:
        print(f"    {e['kind']}: {e['from']} -> {e['to']}: {e['reason']}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    import ray  # when the verb runs

    if args.feeds_cmd is None:
        raise UserError("raytrade feeds: choose an action: ls, kill, pause, resume, fault")
    if args.feeds_cmd == "fault":
        from actors.feeds import FAULTS  # Ray, pandas and the store: when the verb runs

        if args.kind not in FAULTS:
            raise UserError(f"unknown fault {args.kind!r}; use one of {', '.join(FAULTS)}")
    try:
        connect(settings, start_local=False)
    except ClusterUnavailable as e:
        return unavailable(e)
    if args.feeds_cmd == "ls":
        h = router_health(settings)
        if h is None:
            print("no feed router is running; `raytrade up` starts one")
            return EXIT_UNAVAILABLE
        print_feeds(h)
        return 0
    actor = names.lookup(args.source, settings)
    if actor is None:
        raise UserError(f"no feed named {args.source!r}; `raytrade feeds ls` lists them")
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


COMMANDS = {"feeds": run}
