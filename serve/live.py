"""The live state a decision reads without a hop: each symbol's bar window, and each account's risk snapshot.

``BarWindows`` keeps each symbol's latest ``WINDOW_BARS`` bars in the
replica: a background task (``follow``) follows the feed router
(``actors.follow.BarFollower``), and a symbol's first live bar starts its
window with the stored bars before it. The window's arrays and ATR are built
once per new bar (``columns``), not per decision.

``RiskSnapshots`` keeps a copy of each account's risk state
(``RiskManager.snapshot``), which a decision that is not executed judges its
*preview* verdict from: ``core.risk.evaluate``, the risk manager's own rule,
over the snapshot. A background task (``follow``) keeps the snapshots of
accounts in use at most ``RISK_REFRESH_S`` old, a decision never judges from
one older than ``RISK_MAX_AGE_S`` (it waits for a fresh one), and an order
or an admin's halt through this replica drops the account's at once
(``drop``). An order is never judged from the snapshot: it goes to the risk
manager (``call``), the only way to a broker.

Not here: the decision itself (``serve.decide``), the risk rules (``core.risk``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import numpy as np
import pandas as pd
from ray.exceptions import RayActorError

from actors.follow import BarFollower
from cluster import names
from cluster.logs import get_logger
from cluster.settings import Settings
from core.features import atr
from core.risk import OrderRequest as RiskOrderRequest
from core.risk import OrderRequestError, bad_request_verdict, book_from_snapshot
from core.risk import evaluate as evaluate_risk
from core.store import BarStore
from serve.errors import ApiError
from serve.health import ActorHandles

log = get_logger("serve")

WINDOW_BARS = 256
# The replica's copy of each account's risk snapshot: refreshed in the
# background this often while decisions come in; a decision never judges
# from one older than RISK_MAX_AGE_S (it waits for a fresh one instead).
RISK_REFRESH_S = 0.2
RISK_MAX_AGE_S = 1.0
RISK_IDLE_S = 30.0  # accounts not decided on for this long are not refreshed


def bar_columns(rows: list[Any], get: Any, ts: Any = None) -> dict[str, np.ndarray]:
    """Bars (records or request models, read with ``get(row, field)``) as the ensemble's arrays."""
    cols = {"ts": np.fromiter((ts(r) if ts else get(r, "ts") for r in rows), np.int64, len(rows))}
    for k in ("open", "high", "low", "close", "volume"):
        cols[k] = np.fromiter((get(r, k) for r in rows), np.float64, len(rows))
    return cols


def sizing_atr(cols: dict[str, np.ndarray], n: int = 14) -> float:
    """The ATR the risk manager sizes with: ``core.features.atr`` on the window's last bars."""
    hi, lo, cl = (cols[k][-(n + 1):] for k in ("high", "low", "close"))
    value = atr(hi, lo, cl, n)[-1] if len(cl) > n else float("nan")
    # Too short a window for n true ranges: the last bar's range is the best guess there is.
    return float(value) if np.isfinite(value) else float(hi[-1] - lo[-1])


def epoch_ns(t: Any) -> int:
    """A timestamp (naive means UTC) as epoch nanoseconds."""
    ts = pd.Timestamp(t)
    return int((ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")).value)


class BarWindows:
    """Each symbol's latest bars, following the feed router; ``windows[symbol]`` is a deque, oldest first."""

    def __init__(self, settings: Settings, handles: ActorHandles):
        self.settings, self.handles = settings, handles
        self.windows: dict[str, deque] = {}
        self.arrived: dict[str, float] = {}  # symbol -> when its last bar reached this replica (wall clock)
        self._columns: dict[str, tuple[int, dict[str, np.ndarray], float]] = {}
        router = names.router()
        self.follower = BarFollower(lambda: handles.get(router), lambda: handles.forget(router), self._take,
                                    name="bar windows", log=log)

    async def follow(self) -> None:
        """Keep each symbol's latest window here, so a decision needs no call to the router."""
        await self.follower.run()

    async def _take(self, bars: list[dict[str, Any]]) -> None:
        for b in bars:
            w = self.windows.get(b["symbol"])
            if w is None:
                # A symbol's first live bar: start its window with the stored bars before it.
                w = self.windows[b["symbol"]] = deque(await self._history_before(b["symbol"], b["ts"]),
                                                      maxlen=WINDOW_BARS)
            w.append(b)
            self.arrived[b["symbol"]] = time.time()

    def age_s(self, sym: str) -> float | None:
        """Seconds since ``sym``'s last bar reached this replica; None before its first."""
        at = self.arrived.get(sym)
        return None if at is None else time.time() - at

    async def _history_before(self, sym: str, ts_ns: int) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            store = BarStore.from_settings(self.settings.store, self.settings.resilience)
            df = store.read(sym, end=pd.Timestamp(ts_ns - 1, tz="UTC")).tail(WINDOW_BARS - 1)
            return df.assign(ts=df["ts"].astype("int64"), seq=None).to_dict("records")

        try:
            return await asyncio.to_thread(read)
        except Exception as e:  # noqa: BLE001 - live bars alone will fill the window
            log.warning("ingress: no stored history for %s: %s", sym, e)
            return []

    def columns(self, sym: str, w: deque) -> tuple[dict[str, np.ndarray], float]:
        """The window as arrays and its ATR, built once per new bar (its seq says which) rather than per decision."""
        last_seq = w[-1].get("seq")
        hit = self._columns.get(sym)
        if hit is not None and hit[0] == last_seq and last_seq is not None:
            return hit[1], hit[2]
        cols = bar_columns(list(w), dict.__getitem__)
        value = sizing_atr(cols)
        self._columns[sym] = (last_seq, cols, value)
        return cols, value


class RiskSnapshots:
    """Each account's risk snapshot, kept fresh while it is used; and the calls to the account's risk manager."""

    def __init__(self, settings: Settings, handles: ActorHandles):
        self.settings, self.handles = settings, handles
        self._snaps: dict[str, dict[str, Any]] = {}
        self._used: dict[str, float] = {}
        self._refreshing: dict[str, asyncio.Task] = {}

    async def call(self, account: str, method: str, *args: Any) -> Any:
        """A call to the account's risk manager; a handle to a dead actor is dropped and looked up again once."""
        name = names.risk(account)
        for attempt in (1, 2):
            risk = self.handles.get(name)
            if risk is None:
                raise ApiError(503, "risk manager unavailable", f"the risk manager of {account!r} is not running; "
                               "no order can be placed or judged until it is")
            try:
                return await getattr(risk, method).remote(*args)
            except RayActorError:
                self.handles.forget(name)
                if attempt == 2:
                    raise ApiError(503, "risk manager unavailable", f"the risk manager of {account!r} is restarting; "
                                   "retry shortly") from None
        raise AssertionError("unreachable")

    async def _refresh(self, account: str) -> dict[str, Any]:
        snap = await self.call(account, "snapshot")
        snap["_got"] = time.monotonic()
        self._snaps[account] = snap
        return snap

    def _refresh_task(self, account: str) -> asyncio.Task:
        """The refresh of ``account``'s snapshot under way, started if none is: one call however many wait."""
        task = self._refreshing.get(account)
        if task is None or task.done():
            task = self._refreshing[account] = asyncio.get_running_loop().create_task(self._refresh(account))
        return task

    async def get(self, account: str) -> dict[str, Any]:
        """The account's snapshot, at most ``RISK_MAX_AGE_S`` old (one call when it is older)."""
        self._used[account] = time.monotonic()
        snap = self._snaps.get(account)
        if snap is not None and time.monotonic() - snap["_got"] <= RISK_MAX_AGE_S:
            return snap
        return await asyncio.shield(self._refresh_task(account))

    def drop(self, account: str) -> None:
        """Forget the account's snapshot (an order or a halt changed it): the next decision waits for a fresh one."""
        self._snaps.pop(account, None)

    async def follow(self) -> None:
        """Keep the snapshots of accounts in use fresh, off the decisions' path."""
        while True:
            await asyncio.sleep(RISK_REFRESH_S)
            now = time.monotonic()
            for account, used in list(self._used.items()):
                if now - used > RISK_IDLE_S:
                    continue
                try:
                    await asyncio.shield(self._refresh_task(account))
                except Exception as e:  # noqa: BLE001 - a decision that needs it waits, and says why
                    log.debug("risk snapshot of %s: %s", account, e)

    def position_units(self, account: str, sym: str, price: float, snap: dict[str, Any]) -> float:
        """The account's book in ``sym`` (filled plus working orders, as the risk manager judges it) in
        target units (1 = the symbol's position limit)."""
        qty = float(snap["positions"].get(sym, 0.0)) + float((snap.get("pending") or {}).get(sym, 0.0))
        cap = float(snap["equity"]) * self.settings.risk_limits_for(account).max_position_for(sym)
        return max(-1.0, min(1.0, qty * price / cap)) if cap > 0 else 0.0

    def preview_verdict(self, account: str, order_req: dict[str, Any], snap: dict[str, Any]) -> dict[str, Any]:
        """The risk manager's verdict, judged here from its snapshot: the same rules, the same reading."""
        try:
            req = RiskOrderRequest.from_dict(order_req)
        except OrderRequestError as e:
            return bad_request_verdict(str(e), order_req)
        verdict = evaluate_risk(self.settings.risk_limits_for(account), req, book_from_snapshot(snap, req.symbol))
        verdict["preview"] = True
        verdict["state_age_ms"] = round((time.monotonic() - snap["_got"]) * 1000, 1)
        return verdict
