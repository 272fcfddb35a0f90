"""How the running system is, as this ingress replica sees it: the one component view.

``HealthView.components()`` asks each component once (the feed router, the
ensemble, the registry, the learner, each account's risk manager and broker,
the store) and says of each ``ok``, ``degraded``, ``down`` or ``idle``, with
its detail. The health routes (``/health/*``) and the dashboard
(``serve.dashboard``) both read it; without a key the routes show only each
component's status (``status_only``).

Alerts are kept here too, newest first, in bounded memory: ``Alerts`` is the
one place their text is written, whether the event was seen by a health
page, by the background watch (``HealthView.watch``, which also counts feed
failovers and broker errors as metrics when nobody asks), or by an operator's
action through a route. An event is raised once however often it is seen.

``ActorHandles`` is the replica's one cache of handles to raytrade's named
actors (names from ``cluster.names``); every part of the ingress looks actors
up through it, and a dead actor's handle is dropped there.

Not here: the routes (``serve.app``), what a risk state means (``actors.risk``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Awaitable, Callable

from cluster import names
from cluster.settings import Settings
from core.store import BarStore
from serve.metrics import ServeMetrics

# Polls of the background watch (failovers, broker errors, stalled fills).
WATCH_EVERY_S = 2.0
STATUS_ONLY = "status only; send a read key (X-API-Key) for each component's detail"
# Events in a risk manager's state that are alerts in their own right.
RISK_ALERT_KINDS = ("kill_switch", "daily_halt", "broker_error")


def account_names(settings: Settings) -> list[str]:
    return list(settings.accounts)


async def safe(ref: Any, timeout: float = 5.0) -> Any:
    """An actor call's answer, or ``{"error": <exception class>}``: health shows a failure, never raises."""
    try:
        return await asyncio.wait_for(ref, timeout)
    except Exception as e:  # noqa: BLE001 - health shows it, never raises
        return {"error": e.__class__.__name__}


def status_only(component: dict[str, Any]) -> dict[str, Any]:
    return {"status": component.get("status", "down")}


def overall_status(components: dict[str, dict[str, Any]]) -> str:
    """``down`` when any component is down, else ``degraded`` when any is, else ``ok``."""
    statuses = {c.get("status") for c in components.values()}
    return "down" if "down" in statuses else ("degraded" if "degraded" in statuses else "ok")


class ActorHandles:
    """Handles to raytrade's named actors, looked up once and kept.

    Looking a name up is a blocking call to the GCS (about a millisecond);
    a handle whose actor has gone is dropped (``forget``, or ``clear`` after
    an actor died under a request) and looked up again next time.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._handles: dict[str, Any] = {}

    def get(self, name: str) -> Any | None:
        h = self._handles.get(name)
        if h is None:
            h = names.lookup(name, self.settings)
            if h is not None:
                self._handles[name] = h
        return h

    def forget(self, name: str) -> None:
        self._handles.pop(name, None)

    def clear(self) -> None:
        self._handles.clear()


class Alerts:
    """The replica's alerts, newest first; every alert's text is written by a method here."""

    def __init__(self, maxlen: int = 200):
        self._alerts: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._seen: set[tuple] = set()

    def add(self, source: str, message: str, at: float | None = None, key: tuple | None = None) -> None:
        """Raise an alert; one with a ``key`` already raised is not raised again."""
        if key is not None:
            if key in self._seen:
                return
            self._seen.add(key)
        self._alerts.appendleft({"at": at or time.time(), "source": source, "message": message})

    def recent(self, n: int) -> list[dict[str, Any]]:
        return list(self._alerts)[:n]

    def feed_switch(self, e: dict[str, Any]) -> None:
        """One of the feed router's events (a failover, a failback)."""
        self.add("feeds", f"{e['kind']}: {e['from']} -> {e['to']} ({e['reason']})", e.get("wall"),
                 key=("feed", e.get("wall"), e["kind"]))

    def stale_data(self, symbol: str, age_s: float, since: float) -> None:
        """Decisions on ``symbol`` hold: its last bar is stale (one alert per episode)."""
        self.add("feeds", f"stale data: {symbol}'s last bar is {age_s:.1f} s old; its decisions HOLD until bars "
                 "flow again", since, key=("stale", symbol, since))

    def halted(self, account: str, why: str) -> None:
        self.add("risk", f"{account}: {why}", key=("halt", account, why))

    def risk_event(self, account: str, ev: dict[str, Any]) -> None:
        """A kill switch, daily halt or broker error in an account's risk state."""
        self.add("risk", f"{account}: {ev.get('kind')}: {ev.get('reason') or ev.get('error') or ''}", ev.get("at"),
                 key=("riskev", account, ev.get("kind"), ev.get("at")))

    def broker_error(self, account: str, ev: dict[str, Any]) -> None:
        self.add("broker", f"{account}: {ev.get('kind')}: {ev.get('error') or ev.get('reason') or ''}", ev.get("at"),
                 key=("brokererr", account, ev.get("at"), ev.get("kind")))

    def fills_stalled(self, account: str, fills: dict[str, Any]) -> None:
        """Orders waiting past ``broker.fill_stall_s``: one alert per stalled order, not per poll."""
        self.add("broker", f"{account}: {fills['error']}", key=("fills", account, fills["oldest"]["client_order_id"]))

    # An operator's actions through the admin routes.
    def trading_halted(self, who: str, reason: str) -> None:
        self.add("risk", f"trading halted by {who}: {reason}")

    def trading_resumed(self, who: str) -> None:
        self.add("risk", f"trading resumed by {who}")

    def model_promoted(self, name: str, version: Any, who: str) -> None:
        self.add("registry", f"{name} v{version} promoted to production by {who}")

    def model_rolled_back(self, name: str, version: Any, who: str) -> None:
        self.add("registry", f"{name} rolled back to v{version} by {who}")

class HealthView:
    """Each component's status and detail, and the alerts they raise."""

    def __init__(self, settings: Settings, handles: ActorHandles, metrics: ServeMetrics,
                 ensemble_status: Callable[[], Awaitable[dict[str, Any]]]):
        self.settings, self.handles, self.metrics = settings, handles, metrics
        self.ensemble_status = ensemble_status
        self.alerts = Alerts()

    async def components(self) -> dict[str, dict[str, Any]]:
        """Every component's ``status`` and detail; raises the alerts they show as a side effect."""
        out: dict[str, dict[str, Any]] = {}
        router = self.handles.get(names.router())
        h = await safe(router.health.remote()) if router else None
        if h is None or "error" in (h or {}):
            out["feeds"] = {"status": "down", "detail": "no feed router running"}
        else:
            healthy = [s["name"] for s in h["sources"] if s["healthy"]]
            out["feeds"] = {"status": "ok" if h["active"] and len(healthy) == len(h["sources"]) else
                            ("degraded" if h["active"] else "down"),
                            "active": h["active"], "sources": h["sources"], "delivered": h["delivered"]}
            for e in h["events"]:
                self.alerts.feed_switch(e)
        try:
            st = await asyncio.wait_for(self.ensemble_status(), 5)
            failing = st.get("load_errors") or {}
            out["ensemble"] = {"status": "degraded" if failing else "ok", **st}
            for m, why in failing.items():
                self.alerts.add("ensemble", f"member {m} failing: {why}", key=("member", m, why))
        except Exception as e:  # noqa: BLE001
            out["ensemble"] = {"status": "down", "detail": e.__class__.__name__}
        reg = self.handles.get(names.REGISTRY)
        models = await safe(reg.list.remote()) if reg else None
        if isinstance(models, list):
            out["registry"] = {"status": "ok", "models": sorted({m.get("name") for m in models if isinstance(m, dict)}),
                               "versions": len(models)}
        else:
            out["registry"] = {"status": "down", "detail": (models or {}).get("error", "not running")}
        out["learner"] = {"status": "ok" if self.handles.get(names.LEARNER) else "idle"}
        for acct in account_names(self.settings):
            r = self.handles.get(names.risk(acct))
            rs = await safe(r.state.remote()) if r else None
            bs = await safe(r.broker_health.remote()) if r else None
            ok_rs = isinstance(rs, dict) and "error" not in rs
            halted = bool(ok_rs and (rs.get("halted") or rs.get("kill_switch") or rs.get("daily_halt")))
            out[names.risk(acct)] = {"status": "down" if not ok_rs else ("degraded" if halted else "ok"), **(rs or {})}
            out[names.broker(acct)] = {"status": "down" if not isinstance(bs, dict) or "error" in bs else "ok",
                                       **(bs or {})}
            if halted:
                self.alerts.halted(acct, "; ".join(rs.get("reasons") or []) or "halted")
            for ev in (rs or {}).get("events", []) if ok_rs else []:
                if isinstance(ev, dict) and ev.get("kind") in RISK_ALERT_KINDS:
                    self.alerts.risk_event(acct, ev)
        try:
            store = BarStore.from_settings(self.settings.store)
            await asyncio.to_thread(store.symbols)
            out["store"] = {"status": "ok", "uri": self.settings.store.uri}
        except Exception as e:  # noqa: BLE001
            out["store"] = {"status": "down", "detail": e.__class__.__name__}
        return out

    async def watch(self) -> None:
        """Failovers and broker errors become metrics (and alerts) even when nobody asks for health."""
        seen_switch: set[tuple] = set()
        seen_broker: set[tuple] = set()
        while True:
            router = self.handles.get(names.router())
            h = await safe(router.health.remote()) if router else None
            for e in (h or {}).get("events", []) if isinstance(h, dict) else []:
                key = (e.get("wall"), e.get("kind"), e.get("from"), e.get("to"))
                if key not in seen_switch and e.get("kind") in ("failover", "failback"):
                    seen_switch.add(key)
                    self.metrics.failovers.inc(tags={"kind": e["kind"]})
                    self.alerts.feed_switch(e)
            for acct in account_names(self.settings):
                r = self.handles.get(names.risk(acct))
                st = await safe(r.state.remote()) if r else None
                for ev in (st or {}).get("events", []) if isinstance(st, dict) else []:
                    if isinstance(ev, dict) and "error" in str(ev.get("kind", "")):
                        key = (acct, ev.get("at"), ev.get("kind"))
                        if key not in seen_broker:
                            seen_broker.add(key)
                            self.metrics.broker_errors.inc(tags={"account": acct})
                            self.alerts.broker_error(acct, ev)
                bh = await safe(r.broker_health.remote()) if r else None
                fills = bh.get("fills") if isinstance(bh, dict) else None
                if isinstance(fills, dict) and fills.get("stalled"):
                    self.alerts.fills_stalled(acct, fills)
            await asyncio.sleep(WATCH_EVERY_S)
