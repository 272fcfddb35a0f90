"""Starting every account (risk manager + broker) and feeding the paper brokers bars.

``start_accounts(settings)`` opens each account of ``settings.accounts``
(``actors.risk.open_account``) and starts one ``BarPump`` (``pump:bars``): it
follows the feed router (``actors.follow.BarFollower``) and hands each new bar
to every paper broker's ``on_bars``, which fills orders at the next bar's open.
A batch moves the cursor only once every broker took it; a failed round sends
the whole batch again, and a broker skips the bars it already marked.

The pump needs no caller to run. Ray runs an async actor's constructor on the
actor's event loop (checked on Ray 2.60: ``asyncio.get_running_loop()`` works
in ``__init__``), so the constructor starts the loop, and an incarnation that
Ray restarted after a crash or a SIGKILL (``max_restarts=-1``) pumps again at
once. ``health()`` says how far it got and whether it is keeping up.

A restarted pump starts at the oldest bar the router still holds (cursor 0),
not at the router's present: the brokers ignore every bar at or before the
last one they marked, so the bars they saw cost one read of the router's
buffer (bounded by ``feeds.buffer``) and fill nothing twice, while the bars
delivered during the outage still reach them, in order, so a stop or a
take-profit crossed meanwhile fills at the bar that crossed it and the ledger
is the one an uninterrupted pump would have written. Starting at the present
would drop those bars for good.

``ledger_clock(settings)`` reads how far the paper ledgers got (their last bar
per symbol), read-only, for ``raytrade.system`` to resume the replay from there.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import ray
from ray._private.state import actors as gcs_actors

from actors.broker import ledger_dir
from actors.follow import BarFollower
from actors.risk import open_accounts
from cluster import names
from cluster.logs import configure_logging, get_logger
from cluster.runtime import actor_options
from cluster.settings import Settings

log = get_logger("accounts")

ROUTER = names.router()
BAR_FIELDS = ("symbol", "ts", "open", "high", "low", "close", "volume")


def _restarts_so_far() -> int | None:
    """How many times Ray has restarted this actor, from the GCS; None when it cannot say.

    Ray's own ``RuntimeContext.was_current_actor_reconstructed`` reads this
    same field (``NumRestarts``) with this same call; it gives only a yes or no.
    """
    try:
        info = gcs_actors(actor_id=ray.get_runtime_context().get_actor_id())
        return int(info["NumRestarts"])
    except Exception:  # noqa: BLE001 - only a figure for health
        return None


@ray.remote
class BarPump:
    """Router -> paper brokers, from its constructor on; ``health()`` for its state."""

    def __init__(self, settings: Settings, brokers: list[str]):
        self.settings = settings
        configure_logging(settings)
        self.brokers = list(brokers)
        self.forwarded = 0
        self.fills = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_forward_at: float | None = None
        self.started_at = time.time()
        self.restarts = _restarts_so_far()
        self._handles: dict[str, Any] = {}
        # A failed round (the router or a broker restarting) drops every handle: all are looked up again.
        self.follower = BarFollower(lambda: self._handle(ROUTER), self._handles.clear, self._forward,
                                    name="bar pump", log=log, on_error=self._record_error)
        self._task: asyncio.Task | None = None
        self._ensure_running()
        if self.restarts:
            log.warning("bar pump restarted by Ray (restart %d); resuming from the router's oldest bar", self.restarts)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            if self._task is not None and not self._task.cancelled() and self._task.exception() is not None:
                self._record_error(self._task.exception())
            # Keep the reference: the event loop holds only a weak one to its tasks.
            self._task = asyncio.get_running_loop().create_task(self.follower.run())

    def _record_error(self, e: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{e.__class__.__name__}: {e}"[:300]

    def _handle(self, name: str) -> Any:
        h = self._handles.get(name)
        if h is None:
            h = self._handles[name] = ray.get_actor(name, namespace=self.settings.ray.namespace)
        return h

    async def _forward(self, bars: list[dict[str, Any]]) -> None:
        payload = [{k: b[k] for k in BAR_FIELDS} for b in bars]
        for name in self.brokers:
            out = await self._handle(name).on_bars.remote(payload)
            self.fills += int(out.get("fills", 0)) if isinstance(out, dict) else 0
        self.forwarded += len(bars)
        self.last_forward_at = time.time()

    async def start(self) -> bool:
        """Not needed (the constructor starts the loop); kept so older callers still work."""
        self._ensure_running()
        return True

    async def health(self) -> dict[str, Any]:
        self._ensure_running()
        now = time.time()
        return {
            "running": not self._task.done(), "pid": os.getpid(), "started_at": self.started_at,
            "restarts": self.restarts, "cursor": self.follower.cursor, "forwarded": self.forwarded,
            "fills": self.fills,
            "last_forward_at": self.last_forward_at,
            "seconds_since_forward": None if self.last_forward_at is None else round(now - self.last_forward_at, 3),
            "errors": self.errors, "last_error": self.last_error, "brokers": self.brokers,
        }


def ledger_marks(path: str | Path) -> dict[str, int]:
    """The last bar time (ns) per symbol marked in one ledger file; {} when there is no such file.

    Read-only (``mode=ro``): the broker that owns the file may be running, and
    a second writer must never open it. WAL lets this reader see the last
    committed marks without blocking the writer.
    """
    path = Path(path)
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        return {str(sym): int(ts) for sym, ts in conn.execute("SELECT symbol, ts FROM marks")}
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return {}
        raise
    finally:
        conn.close()


def ledger_clock(settings: Settings) -> dict[str, int]:
    """How far the paper ledgers got: per symbol, the latest bar time (ns) any of them marked.

    Every paper broker is fed the same bars by the one pump, so their marks
    agree to within a batch; the latest is the point the system had reached.
    """
    clock: dict[str, int] = {}
    for account, spec in settings.accounts.items():
        if spec.kind != "paper":
            continue
        path = Path(ledger_dir(settings, account)).expanduser() / "ledger.sqlite"
        for sym, ts in ledger_marks(path).items():
            clock[sym] = max(ts, clock.get(sym, 0))
    return clock


def start_accounts(settings: Settings) -> list[str]:
    """Open every account and start the bar pump over the paper brokers; lines for ``up`` to show."""
    open_accounts(settings)
    paper = [names.broker(a) for a, spec in settings.accounts.items() if spec.kind == "paper"]
    if paper:
        # The brokers first: a pump that started before them would wait on their workers' start.
        ns = settings.ray.namespace
        ray.get([ray.get_actor(name, namespace=ns).health.remote() for name in paper], timeout=120)
        pump = BarPump.options(**actor_options("broker", settings, names.BAR_PUMP)).remote(settings, paper)
        ray.get(pump.health.remote(), timeout=60)  # up and pumping (its constructor started the loop)
    return [f"{a} ({spec.kind})" for a, spec in settings.accounts.items()]
