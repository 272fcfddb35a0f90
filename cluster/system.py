"""Bringing the whole raytrade system up and down on a connected Ray cluster.

``start_system(settings)`` creates raytrade's named actors with their
resources from the table (``cluster.resources``) and returns a handle that
the ``up`` command polls for what to show; ``stop_system`` kills every named
actor in raytrade's namespace. Each later part (router, registry, ensemble,
Serve) is added here, so ``raytrade up`` is always the whole system.
"""

from __future__ import annotations

from typing import Any

import ray

from cluster.logs import get_logger
from cluster.runtime import actor_options
from cluster.settings import Settings

log = get_logger("system")


def feed_actor_name(source: str) -> str:
    return f"feed:{source}"


class System:
    def __init__(self, settings: Settings, feeds: dict[str, Any]):
        self.settings = settings
        self.feeds = feeds
        self._seq: dict[str, int] = {name: 0 for name in feeds}

    def describe(self) -> list[str]:
        return [f"feed            {name} ({', '.join(self.settings.feeds.symbols)})" for name in self.feeds]

    def poll(self) -> list[str]:
        """Lines describing what arrived since the last poll (from the primary feed)."""
        lines = []
        name = next(iter(self.feeds))
        try:
            bars = ray.get(self.feeds[name].since.remote(self._seq[name]), timeout=10)
        except Exception as e:  # noqa: BLE001 - shown, not fatal: the feed restarts
            return [f"feed {name} unavailable: {e.__class__.__name__}"]
        if bars:
            self._seq[name] = bars[-1]["seq"]
            by_ts: dict[int, list[dict]] = {}
            for b in bars:
                by_ts.setdefault(b["ts"], []).append(b)
            for ts, group in list(by_ts.items())[-5:]:
                import pandas as pd

                quotes = "  ".join(f"{b['symbol']} {b['close']:.2f}" for b in group)
                lines.append(f"{pd.Timestamp(ts, tz='UTC'):%Y-%m-%d %H:%M} seq {group[-1]['seq']:>6}  {quotes}")
        return lines

    def stop(self) -> int:
        return stop_system(self.settings)


def start_system(settings: Settings) -> System:
    from actors.feeds import FeedActor

    feeds: dict[str, Any] = {}
    symbols = settings.feeds.symbols
    for source in settings.feeds.sources:
        if source == "alpaca":
            continue  # added with the Alpaca feed actor
        name = feed_actor_name(source)
        actor = FeedActor.options(**actor_options("feed", settings, name)).remote(name, source, symbols, settings)
        feeds[name] = actor
        # Only the primary streams for now; the router takes over failover.
        break
    ray.get([a.start.remote() for a in feeds.values()], timeout=120)
    return System(settings, feeds)


def stop_system(settings: Settings) -> int:
    n = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != settings.ray.namespace:
            continue
        try:
            ray.kill(ray.get_actor(entry["name"], namespace=settings.ray.namespace), no_restart=True)
            n += 1
        except ValueError:
            pass
    return n
