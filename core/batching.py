"""Concurrent callers' requests run as one batch; those arriving meanwhile form the next.

Used by the ensemble for its own callers (``core.ensemble``) and by a process
that batches before it calls the ensemble actor (``actors.ensemble.BatchingHandle``).

Not here: what a batch computes (the ``fn`` given), or Serve's ``@serve.batch``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Sequence


class Batcher:
    """``submit(item)`` waits for ``fn([...items])``'s answer to its item; every caller in a failed
    batch gets its error. ``batch_sizes`` keeps the last 1,000 batches' sizes."""

    def __init__(self, fn: Callable[[Sequence[Any]], Awaitable[Sequence[Any]]], max_batch: int, wait_s: float):
        self.fn, self.max_batch, self.wait_s = fn, max_batch, wait_s
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        # Only the first batch of a burst waits for company; later ones are
        # whatever queued while the previous batch ran, so a busy replica never sleeps.
        if len(self._queue) < self.max_batch and self.wait_s > 0:
            await asyncio.sleep(self.wait_s)
        while True:
            if not self._queue:
                # Callers answered by the last batch resubmit as soon as they
                # run: let them (one turn of the loop) and take their requests
                # now, rather than end the burst and make them wait wait_s.
                await asyncio.sleep(0)
                if not self._queue:
                    break
            take, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            self.batch_sizes.append(len(take))
            self.batch_sizes = self.batch_sizes[-1000:]
            try:
                results = await self.fn([item for item, _ in take])
            except Exception as e:  # noqa: BLE001 - each caller gets the error
                for _, fut in take:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), res in zip(take, results):
                if not fut.done():
                    fut.set_result(res)
