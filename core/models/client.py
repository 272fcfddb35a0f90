"""How callers reach the model registry, wherever it runs: ``RegistryClient`` and ``OnFirstUse``.

A ``core.models.registry.ModelRegistry`` in this process is its own client;
``actors.registry.RegistryHandle`` is the client of the registry actor;
``OnFirstUse`` makes either when it is first called (the registry may not be
reachable yet), and makes it again after a failure.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class RegistryClient(Protocol):
    """The model registry as its users call it, wherever it runs: ``ModelRegistry``'s methods by name."""

    def call(self, method: str, *args: Any) -> Any:
        """``method(*args)``, blocking until the registry answers."""
        ...

    async def acall(self, method: str, *args: Any) -> Any:
        """``method(*args)``, awaited."""
        ...


class OnFirstUse:
    """A ``RegistryClient`` made by ``make()`` on its first call; a ``make`` that fails is tried again
    on the next call (a registry actor not started yet, a store not reachable yet)."""

    def __init__(self, make: Callable[[], RegistryClient]) -> None:
        self._make = make
        self._client: RegistryClient | None = None
        self._lock = threading.Lock()

    def client(self) -> RegistryClient:
        with self._lock:
            if self._client is None:
                self._client = self._make()
            return self._client

    def call(self, method: str, *args: Any) -> Any:
        return self.client().call(method, *args)

    async def acall(self, method: str, *args: Any) -> Any:
        return await self.client().acall(method, *args)
