"""Following the feed router: one consumer's cursor in its delivered bars, and the loop that moves it.

Every reader of the router's bars (the bar pump, which feeds the paper
brokers; each Serve replica's bar windows) runs a ``BarFollower``. Each round
it asks the router for the bars after its cursor (``since(cursor, limit)``, at
most ``limit`` a round), hands them to the consumer's ``on_bars``, and moves
the cursor past them only once ``on_bars`` has returned. So a failure anywhere
in a round (the router restarting or gone, the consumer's own calls) leaves
the cursor where it was, and after ``retry_s`` the whole batch goes again: a
consumer whose ``on_bars`` can fail half-way must take a batch twice without
harm (the paper brokers skip every bar at or before the last one they marked).
A failed round also drops the router's handle (``forget``), so the next one
looks the router up again.

Why a loop with a callback, not an async generator: a generator cannot tell
whether the consumer's loop body, which runs between its ``yield``\\ s, went
through, and so cannot know whether to move the cursor.

A router that Ray restarted reloads its checkpoint and goes on numbering, so
cursors stay valid. A router made anew, without its checkpoint, numbers from 1
again, and a cursor past its newest bar would wait for ever: after
``idle_check_s`` with nothing new the follower asks the router's ``health()``
for its ``seq`` and, if it is behind the cursor, reads the router from its
start.

Not here: what a consumer does with the bars (``actors.accounts.BarPump``,
``serve.live.BarWindows``), the router itself (``actors.router``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from cluster.logs import get_logger

POLL_S = 0.05  # between rounds that went through
RETRY_S = 0.5  # after a failed round
ABSENT_S = 1.0  # after a round that found no router running
# Idle this long with nothing new, the follower asks whether the router's
# numbering went back (a router made anew, without its checkpoint).
IDLE_CHECK_S = 5.0
BATCH_LIMIT = 10_000  # bars a round at most (the router's own default)


class BarFollower:
    """A cursor in the feed router's delivered bars, moved by ``run()`` as ``on_bars`` takes them.

    ``router()`` gives the router's handle, or None when none is running (the
    round waits ``absent_s``), or raises (a failed round); ``forget()`` drops
    the handle after a failed round. ``on_error`` hears of each failed round.
    """

    def __init__(
        self,
        router: Callable[[], Any | None],
        forget: Callable[[], None],
        on_bars: Callable[[list[dict[str, Any]]], Awaitable[None]],
        *,
        cursor: int = 0,
        name: str = "bar follower",
        log: logging.Logger | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        poll_s: float = POLL_S,
        retry_s: float = RETRY_S,
        absent_s: float = ABSENT_S,
        idle_check_s: float = IDLE_CHECK_S,
        limit: int = BATCH_LIMIT,
    ):
        self.cursor = cursor
        self.name = name
        self._router, self._forget, self._on_bars, self._on_error = router, forget, on_bars, on_error
        self.log = log or get_logger("follow")
        self.poll_s, self.retry_s, self.absent_s = poll_s, retry_s, absent_s
        self.idle_check_s, self.limit = idle_check_s, limit
        self.failing = False  # in a streak of failed rounds: only its first is logged as a warning

    async def run(self) -> None:
        """Follow the router for as long as the task runs."""
        idle_since = time.monotonic()
        while True:
            try:
                router = self._router()
                if router is None:
                    await asyncio.sleep(self.absent_s)
                    continue
                bars = await router.since.remote(self.cursor, self.limit)
                if bars and bars[0]["seq"] <= self.cursor:
                    bars = [b for b in bars if b["seq"] > self.cursor]
                if bars:
                    await self._on_bars(bars)
                    self.cursor = bars[-1]["seq"]
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.idle_check_s:
                    await self._check_numbering(router)
                    idle_since = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the router or the consumer restarts; try again
                # The cursor stays: the whole batch goes again.
                (self.log.debug if self.failing else self.log.warning)("%s: %s; retrying", self.name, e)
                self.failing = True
                if self._on_error is not None:
                    self._on_error(e)
                self._forget()
                await asyncio.sleep(self.retry_s)
                continue
            self.failing = False
            await asyncio.sleep(self.poll_s)

    async def _check_numbering(self, router: Any) -> None:
        seq = (await router.health.remote())["seq"]
        if seq < self.cursor:
            self.log.warning("%s: the router's numbering went back (%d < %d); reading it from its start",
                             self.name, seq, self.cursor)
            self.cursor = 0
