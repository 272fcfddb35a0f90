"""The one loop a long-running actor runs, and how it survives a restart.

A feed reads its source and a router polls its feeds in one asyncio task
each (``_run``). ``start()`` starts it; every read calls ``_ensure_running()``
too, because an actor that Ray restarted gets no ``start()`` call: the first
caller after a restart starts the loop again.
"""

from __future__ import annotations

import asyncio


class LoopActor:
    _task: asyncio.Task | None = None

    async def _run(self) -> None:  # pragma: no cover - each actor has its own
        raise NotImplementedError

    async def start(self) -> bool:
        self._ensure_running()
        return True

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
