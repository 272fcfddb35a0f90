"""Bringing the whole raytrade system up and down on a connected Ray cluster.

``start_system(settings)`` creates raytrade's named actors (names from
``cluster.names``) with their resources from the table (``cluster.resources``)
and returns a handle that the ``up`` command polls for what to show;
``stop_system`` kills every named actor in raytrade's namespace. Each part
(feeds, router, scheduler, registry, ensemble, accounts, Serve) is added here,
so ``raytrade up`` is always the whole system. This is the top of the import
graph: it may import every package, and nothing of ours imports it but the CLI
(and tests).

The embedded default runs two sources for the same symbols: ``feed:replay``
(the store's history, primary) and ``feed:synthetic`` (the synthetic market
with the seed that wrote that history, so it produces the same bars, and
carries on when the history ends). ``raytrade feeds kill feed:replay`` shows a
failover in ``raytrade status``.
"""

from __future__ import annotations

import secrets
from typing import Any

import pandas as pd
import ray
from ray import serve

from actors.accounts import ledger_clock, start_accounts
from actors.alpaca_feed import AlpacaFeedActor
from actors.feeds import FeedActor, resume_start, warm_start
from actors.registry import get_or_create_registry
from actors.router import FeedRouter
from actors.scheduler import start_scheduler
from cluster import names
from cluster.logs import add_secrets, get_logger
from cluster.runtime import actor_options
from cluster.settings import ApiKey, Settings
from core.baselines import train_direction_model
from core.store import BarStore
from serve.app import build_app_from_settings

log = get_logger("system")


class System:
    def __init__(self, settings: Settings, feeds: dict[str, Any], router: Any):
        self.settings = settings
        self.feeds = feeds
        self.router = router
        self._seq = 0
        self._active: str | None = None
        self._events_seen = 0
        self.extra: list[str] = []

    def describe(self) -> list[str]:
        lines = [f"feed            {name}" for name in self.feeds]
        lines.append(f"router          {names.router()} over {', '.join(self.feeds)} ({', '.join(self.settings.feeds.symbols)})")
        lines.append("scheduler       workflows (`raytrade workflows ls`)")
        return lines + self.extra

    def poll(self) -> list[str]:
        """Lines describing what the router delivered since the last poll, and any failover."""
        lines = []
        try:
            bars = ray.get(self.router.since.remote(self._seq), timeout=10)
            health = ray.get(self.router.health.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - shown, not fatal: the router restarts
            return [f"router unavailable: {e.__class__.__name__}"]
        events = health["events"]
        for ev in events[self._events_seen:] if len(events) >= self._events_seen else events:
            lines.append(f"*** {ev['kind']}: {ev['from']} -> {ev['to']} ({ev['reason']})")
        self._events_seen = len(events)
        if bars:
            self._seq = bars[-1]["seq"]
            by_ts: dict[int, list[dict]] = {}
            for b in bars:
                by_ts.setdefault(b["ts"], []).append(b)
            for ts, group in list(by_ts.items())[-5:]:
                quotes = "  ".join(f"{b['symbol']} {b['close']:.2f}" for b in group)
                lines.append(
                    f"{pd.Timestamp(ts, tz='UTC'):%Y-%m-%d %H:%M} seq {group[-1]['seq']:>6} "
                    f"[{group[-1]['source']}]  {quotes}"
                )
        return lines

    def stop(self) -> int:
        return stop_system(self.settings)


def start_system(settings: Settings, fresh: bool = True, serve_app: bool = True, progress: Any = print) -> System:
    feeds, router = start_feeds(settings, fresh)
    start_scheduler(settings)
    system = System(settings, feeds, router)
    if serve_app:
        system.extra += start_trading(settings, progress=progress)
    return system


def start_feeds(settings: Settings, fresh: bool = True) -> tuple[dict[str, Any], Any]:
    """The feed actors and the router over them, started. Returns (feeds by name, router).

    On an existing ledger the replay (and the synthetic backup) resume just
    after the paper ledgers' last bar (``actors.accounts.ledger_clock``), not
    at ``feeds.replay_start``: bars at or before it can fill nothing there.
    """
    symbols = settings.feeds.symbols
    clock = ledger_clock(settings)
    start = resume_start(settings, clock)
    if start is None:  # a first start: stored bars before the replay warm the live windows
        start = warm_start(settings, BarStore.from_settings(settings.store, settings.resilience))
    if clock:
        log.info("the ledgers reached %s; the replay resumes after it",
                 pd.Timestamp(max(clock.values()), unit="ns", tz="UTC"))
    feeds: dict[str, Any] = {}
    for source in settings.feeds.sources:
        name = names.feed(source)
        if source == "alpaca":
            actor = AlpacaFeedActor.options(**actor_options("feed", settings, name)).remote(name, symbols, settings)
        else:
            actor = FeedActor.options(**actor_options("feed", settings, name)).remote(
                name, source, symbols, settings, start)
        feeds[name] = actor
    rname = names.router()
    if fresh:
        # A new `up` starts a new stream; the checkpoint is for a router that crashed.
        store = BarStore.from_settings(settings.store, settings.resilience)
        if store.exists(f"router/default.json"):
            store.fs.delete_file(store.path("router/default.json"))
    router = FeedRouter.options(**actor_options("feed_router", settings, rname)).remote(
        names.DEFAULT_ROUTER_GROUP, list(feeds), symbols, settings
    )
    ray.get([a.start.remote() for a in feeds.values()], timeout=120)
    ray.get(router.start.remote(), timeout=120)
    return feeds, router


def ensure_baselines(settings: Settings, progress: Any = print) -> list[str]:
    """Train and promote the baseline members when the registry has no production model."""
    reg = get_or_create_registry(settings)
    if ray.get(reg.production.remote(), timeout=120)["models"]:
        return []
    store = BarStore.from_settings(settings.store, settings.resilience)
    bars = {s: store.read(s) for s in settings.feeds.symbols}
    bars = {s: b for s, b in bars.items() if len(b)}
    out = []
    for kind in ("mlp", "lstm"):
        progress(f"training the baseline {kind.upper()} on {sum(len(b) for b in bars.values())} stored bars (first start only)")
        res = train_direction_model(bars, kind, epochs=2, max_samples=20_000)
        name = f"baseline_{kind}"
        rec = ray.get(reg.register.remote(name, res.onnx, "classification", res.metadata), timeout=300)
        ray.get(reg.promote.remote(name, rec["version"]), timeout=120)
        out.append(f"{name} v{rec['version']}")
    return out


def demo_settings(settings: Settings) -> tuple[Settings, str | None]:
    """With no API keys configured, add a one-off admin key for this run (printed once, never logged)."""
    if settings.api_keys:
        return settings, None
    key = "rt-demo-" + secrets.token_urlsafe(18)
    add_secrets([key])
    return settings.model_copy(update={"api_keys": [ApiKey(name="demo", key=key, role="admin")]}), key


def start_trading(settings: Settings, progress: Any = print) -> list[str]:
    """Registry, baseline members, accounts (risk manager + broker) and the Serve app."""
    trained = ensure_baselines(settings, progress)
    accounts = start_accounts(settings)
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    serve.run(build_app_from_settings(settings), name=names.SERVE_APP, route_prefix="/", blocking=False)
    lines = [f"models          {', '.join(trained)} trained and promoted"] if trained else []
    lines.append(f"accounts        {', '.join(accounts)}")
    lines.append(f"serve           {serve_url(settings)}")
    return lines


def serve_url(settings: Settings) -> str:
    """The endpoint's URL as a client can reach it: a wildcard ``serve.host`` (0.0.0.0, ::, on a
    cluster) is printed as this node's address, which is where the HTTP port listens."""
    host = settings.serve.host
    if host in ("0.0.0.0", "::", ""):
        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.serve.port}"


def stop_system(settings: Settings) -> int:
    """Shut Serve down and kill every named actor in raytrade's namespace; returns how many."""
    n = 0
    try:
        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve was not running
        pass
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != settings.ray.namespace:
            continue
        try:
            ray.kill(ray.get_actor(entry["name"], namespace=settings.ray.namespace), no_restart=True)
            n += 1
        except ValueError:
            pass
    return n
