"""The ensemble as the Ray actor ``ensemble``, and a handle that batches before calling it.

The ensemble itself (members, fusion, hot reload, feedback) is Ray-free:
``core.ensemble.SignalEnsemble``. Here:

- ``Ensemble``: ``SignalEnsemble`` built from settings in a Ray process: logging
  configured, the model cache sized from the GPUs Ray assigned and the
  ``ensemble`` role (``actors.model_cache``), and the registry named as callers
  name it turned into one ``RegistryClient`` (``actors.registry.registry_client``).
  Used in-process (tests, benchmarks, the ingress's local fallback), as the
  actor below, and as the body of the Serve deployment (``serve.ensemble``);
- ``EnsembleActor`` / ``get_or_create_ensemble``: the named actor, with the
  ``ensemble`` role's resources from the table; its ``predict_one`` batches
  concurrent callers inside the replica;
- ``BatchingHandle``: batches a process's concurrent callers before the Ray
  call, one call per batch instead of one per request.

Not here: the Serve deployment (``serve.ensemble``), or the HTTP route (``serve/``).
"""

from __future__ import annotations

from typing import Any, Mapping

import ray

from actors.model_cache import replica_cache
from actors.registry import registry_client
from cluster import names
from cluster.logs import configure_logging
from cluster.runtime import actor_options, current_profile
from core.batching import Batcher
from core.ensemble import SignalEnsemble
from core.models.artefacts import ArtefactStore

ENSEMBLE_ACTOR = names.ENSEMBLE


class Ensemble(SignalEnsemble):
    """``SignalEnsemble`` of one replica, built from settings.

    ``registry``: None for the named registry actor (looked up on first use), ``"store"``
    for a registry read from the store in this process (no actor: Serve's local testing
    mode, a notebook), a registry actor's handle, or a ``RegistryClient`` such as a
    ``ModelRegistry``; ``use_registry=False`` serves the rule and Python members only.
    ``gpu_ids`` and ``profile`` default to what Ray assigned and the running profile.
    """

    def __init__(
        self,
        settings: Any,
        registry: Any | None = None,
        *,
        artefacts: ArtefactStore | None = None,
        gpu_ids: list[int] | None = None,
        profile: str | None = None,
        use_registry: bool = True,
        batch_wait_s: float | None = None,
    ):
        # Settings travel pickled (secrets intact, in memory only).
        configure_logging(settings)
        if profile is None:
            profile = current_profile(settings)
        cache = replica_cache(settings, profile, gpu_ids)
        client = registry_client(registry, settings) if use_registry else None
        super().__init__(settings, cache, client, artefacts=artefacts, batch_wait_s=batch_wait_s)


class BatchingHandle:
    """A handle to the ensemble through which a process's concurrent callers share Ray calls.

    ``predict_one`` through the actor batches inside the replica, but every
    request is still one Ray call, and on the development machine a no-op
    actor call with the same payloads costs more than the ensemble's work on
    one request (``bench/bench_ensemble.py`` prints both): batching in the
    replica cannot share that. Here the requests that arrive while a call is
    out go together as the next ``predict(list)``, one call per batch, so the
    per-call cost is shared too. Answers are those of ``predict_one``, in the
    callers' order; if the call fails, every caller in its batch gets the
    error.

    ``handle`` is the ensemble actor (or anything whose ``predict.remote(list)``
    can be awaited). One batch is out at a time, which suits one replica.
    """

    def __init__(self, handle: Any, max_batch: int = 256):
        self.handle = handle
        self._batcher = Batcher(lambda requests: handle.predict.remote(list(requests)), max_batch, 0.0)

    @property
    def batch_sizes(self) -> list[int]:
        return self._batcher.batch_sizes

    async def predict_one(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return await self._batcher.submit(request)


# Decorators carry no numbers: resources come from the table via actor_options.
EnsembleActor = ray.remote(Ensemble)


def get_or_create_ensemble(settings: Any) -> Any:
    return EnsembleActor.options(**actor_options("ensemble", settings, ENSEMBLE_ACTOR)).remote(settings)
