"""The model registry as the named Ray actor ``model-registry``, and the client of that actor.

The registry itself, its index and its artefacts are Ray-free and live in
``core.models`` (``ModelRegistry``, ``core.models.index``,
``core.models.artefacts``). Here:

- ``RegistryActor``: ``ModelRegistry`` run as a Ray actor, logging configured
  from settings in its own process; ``get_or_create_registry`` gives the
  named one, with the ``registry`` role's resources from the table;
- ``RegistryHandle``: the ``RegistryClient`` of that actor (``call`` blocks on
  ``ray.get``, ``acall`` awaits the reference);
- ``registry_client``: the one ``RegistryClient`` for each way a caller names
  a registry (the named actor, the store read in this process, an object, a
  handle).

A restarted registry actor holds nothing it did not read back from the store,
so killing it loses nothing that was acknowledged.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.actor import ActorHandle

from cluster import names
from cluster.logs import configure_logging
from cluster.runtime import actor_options
from core.models.client import OnFirstUse, RegistryClient
from core.models.registry import ModelRegistry

REGISTRY_ACTOR = names.REGISTRY
# Seconds a blocking call waits for the actor before it gives up.
CALL_TIMEOUT_S = 60.0


class RegistryService(ModelRegistry):
    """``ModelRegistry`` in its own process: this process's logging configured from settings first."""

    def __init__(self, settings: Any, artefacts: Any = None, announce: bool = True):
        # Settings travel pickled (secrets intact, in memory only).
        configure_logging(settings)
        super().__init__(settings, artefacts, announce)


# Decorators carry no numbers: resources come from the table via actor_options.
RegistryActor = ray.remote(RegistryService)


def get_or_create_registry(settings: Any) -> Any:
    """The named registry actor, created with the registry role's resources if absent."""
    return RegistryActor.options(**actor_options("registry", settings, REGISTRY_ACTOR)).remote(settings)


class RegistryHandle:
    """The ``RegistryClient`` of a registry actor: its methods called through the handle."""

    def __init__(self, handle: Any, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.handle, self.timeout_s = handle, timeout_s

    def call(self, method: str, *args: Any) -> Any:
        return ray.get(getattr(self.handle, method).remote(*args), timeout=self.timeout_s)

    async def acall(self, method: str, *args: Any) -> Any:
        return await getattr(self.handle, method).remote(*args)


def registry_client(registry: Any, settings: Any, timeout_s: float = CALL_TIMEOUT_S) -> RegistryClient:
    """One ``RegistryClient`` for each way a caller names the registry:

    - ``None``: the named actor in ``settings.ray.namespace``, looked up on first use
      (and again on the next call while it is not there);
    - ``"store"``: no registry actor (Serve's local testing mode, a notebook): a
      ``ModelRegistry`` in this process, reading the index from the store on first use
      (an ensemble on it sees promotions only on ``refresh(force=True)``);
    - a registry actor's handle (``get_or_create_registry``'s);
    - a ``RegistryClient`` (a ``ModelRegistry`` in this process is one) as it is.
    """
    if registry is None:
        namespace = settings.ray.namespace
        return OnFirstUse(lambda: RegistryHandle(ray.get_actor(REGISTRY_ACTOR, namespace=namespace), timeout_s))
    if isinstance(registry, str):
        if registry != "store":
            raise ValueError(f"registry {registry!r}: give None (the named actor), 'store', a handle or a client")
        return OnFirstUse(lambda: ModelRegistry(settings))
    if isinstance(registry, ActorHandle):
        return RegistryHandle(registry, timeout_s)
    if isinstance(registry, RegistryClient):
        return registry
    raise TypeError(f"registry: {type(registry).__name__} is neither a registry actor's handle nor a RegistryClient")
