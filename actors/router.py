"""The FeedRouter actor: one per group of symbols, over feed actors in priority order.

It polls every source (``since(cursor)``) every few milliseconds, hands what
came to ``core.feedrouter.RouterState`` (health, failover, failback, the
quality gate, gap fill), serves consumers (``since(seq)``, ``window(symbol,
n)``, ``latest()``) and writes accepted bars to the store in batches.

A source whose actor is gone is marked dead at once (a failed call raises
``RayActorError``). Polls are never retried by Ray: a poll in flight when its
actor was killed would otherwise be retried and fail only after Ray's retry
path, 0.4 to 0.65 s later. A poll unanswered for ``SUSPECT_S`` makes its
source a suspect: the router asks the GCS whether an actor of that name still
exists (a killed actor's name is released at once); gone is dead, registered
is only slow, and a slow source is left to the stall limit, so a loaded
machine does not churn failovers. A source whose actor was restarted (a new
incarnation) is read again from its beginning, and its old bars are ignored
by time.

Restart: the router runs with ``max_restarts=-1``. It checkpoints its sequence
number, the last delivered time per symbol and the delivered bars not yet in
the store to ``router/<name>.json`` under the store root on every cycle that
delivers. A restarted router reloads that checkpoint, writes the pending bars
to the store, and continues numbering from where it was, so no bar is emitted
twice and consumers' cursors stay valid.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.loop import LoopActor
from cluster.logs import configure_logging, get_logger
from cluster.settings import Settings
from core.feedrouter import RouterConfig, RouterState
from core.store import BarStore

log = get_logger("router")

# A source that does not answer a poll within this (or the stall limit, if
# longer) is failed over from.
UNRESPONSIVE_S = 0.25
# A poll unanswered this long has the GCS asked whether its actor still exists.
# Ray's own death notice came within 41 ms in 40 kills on the shared 2-core
# machine (load up to 12), so this is the bound for when it is late: detection
# within a poll interval, SUSPECT_S and one GCS lookup, well under 250 ms.
SUSPECT_S = 0.1


class SourceGone(Exception):
    """A source's poll went unanswered and the GCS has no actor by its name."""


async def answer_or_gone(
    call: Awaitable[Any], registered: Callable[[], Awaitable[bool]], suspect_s: float, limit_s: float
) -> Any:
    """The answer to ``call`` (a poll), or why there is none.

    Unanswered after ``suspect_s``, ``registered()`` asks the GCS whether the
    actor still exists: no means it is dead (``SourceGone``), yes means it is
    only slow, and the call may take up to ``limit_s`` in all before
    ``asyncio.TimeoutError``. Ray's own errors (``RayActorError``) pass through.
    """
    t0 = time.monotonic()
    fut = asyncio.ensure_future(call)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), suspect_s)
    except asyncio.TimeoutError:
        pass
    try:
        gone = not await asyncio.wait_for(registered(), max(0.0, limit_s - suspect_s))
    except Exception:  # noqa: BLE001 - the GCS slow or failing too: no verdict, keep waiting for the answer
        gone = False
    if gone:
        fut.cancel()
        raise SourceGone(f"no answer for {(time.monotonic() - t0) * 1000:.0f} ms and no actor by that name")
    return await asyncio.wait_for(fut, max(0.0, limit_s - (time.monotonic() - t0)))


def poll_interval_s(bar_interval_s: float) -> float:
    """How often the router polls each source: 50 times a bar interval, within 2 to 100 ms."""
    return min(0.1, max(0.002, bar_interval_s / 50))


@ray.remote
class FeedRouter(LoopActor):
    def __init__(self, group: str, source_names: list[str], symbols: list[str], settings: Settings,
                 write_store: bool = True):
        self.settings = settings
        configure_logging(settings)
        self.group = group
        self.source_names = list(source_names)
        self.symbols = [s.upper() for s in symbols]
        self.cfg = RouterConfig.from_settings(settings.feeds)
        self.store = BarStore.from_settings(settings.store, settings.resilience)
        self.write_store = write_store
        self._ckpt_path = f"router/{group}.json"
        ckpt = self._load_checkpoint()
        self.state = RouterState(
            self.source_names, self.symbols, self.cfg,
            start_seq=ckpt.get("seq", 0), last_delivered=ckpt.get("last_delivered"),
        )
        self._last_flush = time.monotonic()
        self._pending_store: list[dict[str, Any]] = list(ckpt.get("pending", []))
        if self._pending_store:
            # Delivered before the crash, maybe not stored: make them readable again and store them.
            for b in self._pending_store:
                self.state.delivered.append(b)
            self._flush_store(force=True)
        self._warm_from_store()
        self._cursors: dict[str, int] = {n: 0 for n in self.source_names}
        self._incarnation: dict[str, str | None] = {n: None for n in self.source_names}
        self._handles: dict[str, Any] = {}
        self._task: asyncio.Task | None = None
        self._restarted = bool(ckpt)
        self.poll_s = poll_interval_s(self.cfg.interval_s)
        # A dead actor's call fails fast (RayActorError, or the GCS lookup after
        # suspect_s); this deadline only catches a registered actor that hangs,
        # which is a stall: give it the stall limit, so a loaded machine's slow
        # answers do not read as deaths.
        self.unresponsive_s = max(UNRESPONSIVE_S, self.cfg.stall_intervals * self.cfg.interval_s)
        self.suspect_s = min(SUSPECT_S, self.unresponsive_s / 2)

    # -- state across restarts ---------------------------------------------------------
    def _load_checkpoint(self) -> dict[str, Any]:
        try:
            if self.store.exists(self._ckpt_path):
                return json.loads(self.store.get_bytes(self._ckpt_path))
        except Exception as e:  # noqa: BLE001 - a bad checkpoint must not stop the feed
            log.warning("router %s: checkpoint unreadable (%s); starting from the store", self.group, e)
        return {}

    def _checkpoint(self) -> None:
        data = {
            "seq": self.state.seq,
            "last_delivered": self.state.last_delivered,
            "pending": self._pending_store,
            "at": time.time(),
        }
        self.store.put_bytes(self._ckpt_path, json.dumps(data).encode())

    def _warm_from_store(self) -> None:
        # After a restart the spike filter and the windows need the history up
        # to the last delivered bar; the store has it. A fresh router has no
        # such point (a replay may start anywhere in the stored history).
        for sym in self.symbols:
            last = self.state.last_delivered.get(sym)
            if last is None:
                continue
            try:
                df = self.store.read(sym)
            except Exception as e:  # noqa: BLE001
                log.warning("router %s: cannot warm %s from the store: %s", self.group, sym, e)
                continue
            if last is not None:
                df = df[df["ts"].astype("int64") <= last]
            if len(df) == 0:
                continue
            df = df.tail(self.cfg.window)
            recs = df.assign(ts=df["ts"].astype("int64")).to_dict("records")
            self.state.seed_history(recs)

    def _flush_store(self, force: bool = False) -> None:
        if not self.write_store or not self._pending_store:
            return
        due = len(self._pending_store) >= self.settings.feeds.store_batch or time.monotonic() - self._last_flush > 10
        if not (force or due):
            return
        import pandas as pd

        df = pd.DataFrame.from_records(self._pending_store)
        df["ts"] = pd.to_datetime(df["ts"], utc=True)
        try:
            self.store.append(df[["symbol", "ts", "open", "high", "low", "close", "volume", "source", "seq"]])
            self._pending_store = []
            self._last_flush = time.monotonic()
        except Exception as e:  # noqa: BLE001 - kept pending, retried next cycle
            log.warning("router %s: store write failed, will retry: %s", self.group, e)

    # -- the loop -----------------------------------------------------------------------
    async def _lookup(self, name: str) -> Any | None:
        """The named actor's handle from the GCS, or None when no actor has that name.

        Off the event loop: a GCS call on a loaded machine can take tens of
        milliseconds, and the loop also polls the other sources and serves consumers.
        """
        try:
            return await asyncio.to_thread(ray.get_actor, name, namespace=self.settings.ray.namespace)
        except ValueError:
            return None

    async def _handle(self, name: str) -> Any | None:
        h = self._handles.get(name)
        if h is None:
            h = await self._lookup(name)
            if h is not None:
                self._handles[name] = h
        return h

    async def _ask(self, name: str, h: Any, cursor: int) -> tuple[list[dict[str, Any]], str]:
        """One poll of ``name``: its bars after ``cursor`` and its incarnation."""

        async def registered() -> bool:
            return await self._lookup(name) is not None

        # No retries: the next poll follows within milliseconds, and a retried
        # poll reports its actor's death only after Ray's retry path (0.4-0.65 s).
        call = h.since_with_incarnation.options(max_task_retries=0).remote(cursor)
        return await answer_or_gone(call, registered, self.suspect_s, self.unresponsive_s)

    async def _poll_source(self, name: str) -> None:
        h = await self._handle(name)
        if h is None:
            self.state.mark_dead(name, "no such actor")
            await asyncio.sleep(self.unresponsive_s)
            return
        try:
            recs, inc = await self._ask(name, h, self._cursors[name])
            if self._incarnation[name] is not None and inc != self._incarnation[name]:
                log.info("router %s: source %s restarted; reading it from its start", self.group, name)
                self._cursors[name] = 0
                recs, inc = await self._ask(name, h, 0)
        except RayActorError as e:
            await self._dead(name, f"actor died ({e.__class__.__name__})")
            return
        except SourceGone as e:
            await self._dead(name, f"actor died: {e}")
            return
        except (asyncio.TimeoutError, GetTimeoutError):
            # Registered but silent up to the stall limit: treated as death, undone by the next answer.
            self.state.mark_dead(name, f"no answer within {self.unresponsive_s * 1000:.0f} ms")
            return
        except Exception as e:  # noqa: BLE001
            self.state.mark_error(name, f"poll failed: {e}")
            await asyncio.sleep(self.unresponsive_s)
            return
        self._incarnation[name] = inc
        self.state.mark_alive(name)
        if recs:
            self._cursors[name] = recs[-1]["seq"]
            self.state.ingest(name, recs)

    async def _dead(self, name: str, reason: str) -> None:
        self._handles.pop(name, None)
        self.state.mark_dead(name, reason)
        await asyncio.sleep(self.unresponsive_s)

    async def _poll_forever(self, name: str) -> None:
        # One loop per source: a slow or dead source never delays the others.
        while True:
            try:
                await self._poll_source(name)
            except Exception as e:  # noqa: BLE001 - e.g. the GCS failing a lookup: this loop must go on
                self.state.mark_error(name, f"poll failed: {e}")
                await asyncio.sleep(self.unresponsive_s)
            await asyncio.sleep(self.poll_s)

    async def _run(self) -> None:
        pollers = [asyncio.get_running_loop().create_task(self._poll_forever(n)) for n in self.source_names]
        try:
            while True:
                new = self.state.step()
                if new and self.write_store:
                    self._pending_store.extend(new)
                    self._flush_store()
                    try:
                        self._checkpoint()
                    except Exception as e:  # noqa: BLE001
                        log.warning("router %s: checkpoint failed: %s", self.group, e)
                await asyncio.sleep(self.poll_s)
        finally:
            for p in pollers:
                p.cancel()

    # -- consumers ----------------------------------------------------------------------
    async def since(self, seq: int, limit: int = 10_000) -> list[dict[str, Any]]:
        self._ensure_running()
        return self.state.since(seq, limit)

    async def window(self, symbol: str, n: int = 256) -> list[dict[str, Any]]:
        return self.state.window(symbol, n)

    async def latest(self) -> dict[str, dict[str, Any]]:
        return {s: w[-1] for s in self.symbols if (w := self.state.window(s, 1))}

    async def health(self) -> dict[str, Any]:
        self._ensure_running()
        h = self.state.health()
        h["group"] = self.group
        h["restarted"] = self._restarted
        h["pending_store"] = len(self._pending_store)
        return h

    async def flush(self) -> int:
        n = len(self._pending_store)
        self._flush_store(force=True)
        self._checkpoint()
        return n
