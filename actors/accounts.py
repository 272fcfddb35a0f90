"""Starting every account (risk manager + broker) and feeding the paper brokers bars.

``start_accounts(settings)`` opens each account of ``settings.accounts``
(``actors.risk.open_account``) and starts one ``BarPump``: it follows the feed
router (``since(seq)``) and hands each new bar to every paper broker's
``on_bars``, which fills orders at the next bar's open. The pump keeps its
own cursor; a broker skips bars it has already seen, so a restarted pump or
broker neither loses nor doubles a fill.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from cluster.logs import configure_logging, get_logger
from cluster.settings import Settings

log = get_logger("accounts")

PUMP_ACTOR = "pump:bars"


@ray.remote
class BarPump:
    def __init__(self, settings: Settings, brokers: list[str]):
        self.settings = settings
        configure_logging(settings)
        self.brokers = brokers
        self.cursor = 0
        self.forwarded = 0
        self.errors = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> bool:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return True

    async def _run(self) -> None:
        ns = self.settings.ray.namespace
        while True:
            try:
                router = ray.get_actor("router:default", namespace=ns)
                bars = await router.since.remote(self.cursor)
                if bars:
                    payload = [{k: b[k] for k in ("symbol", "ts", "open", "high", "low", "close", "volume")} for b in bars]
                    for name in self.brokers:
                        await ray.get_actor(name, namespace=ns).on_bars.remote(payload)
                    self.cursor = bars[-1]["seq"]
                    self.forwarded += len(bars)
            except Exception as e:  # noqa: BLE001 - the router or a broker restarts; try again
                self.errors += 1
                log.debug("bar pump: %s", e)
                await asyncio.sleep(0.5)
            await asyncio.sleep(0.05)

    async def health(self) -> dict[str, Any]:
        await self.start()
        return {"cursor": self.cursor, "forwarded": self.forwarded, "errors": self.errors, "brokers": self.brokers}


def start_accounts(settings: Settings) -> list[str]:
    from actors.broker import broker_actor_name
    from actors.risk import open_accounts
    from cluster.runtime import actor_options

    open_accounts(settings)
    paper = [broker_actor_name(a) for a, spec in settings.accounts.items() if spec.kind == "paper"]
    if paper:
        pump = BarPump.options(**actor_options("broker", settings, PUMP_ACTOR)).remote(settings, paper)
        ray.get(pump.start.remote(), timeout=60)
    return [f"{a} ({spec.kind})" for a, spec in settings.accounts.items()]
