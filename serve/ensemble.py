"""The ensemble as a Serve deployment: Serve's batching in front of ``Ensemble.predict``.

``ensemble_deployment(settings)`` gives the deployment with the ensemble role's
``ray_actor_options`` from the resource table; batching comes from
``ensemble.max_batch_size`` / ``ensemble.batch_wait_s``, and
``reconfigure(user_config)`` pins versions or changes weights, timeouts and
batching without a restart (``core.ensemble.SignalEnsemble.reconfigure``).

Not here: the ensemble itself (``actors.ensemble.Ensemble`` over
``core.ensemble``), or the routes that call it (``serve.app``).
"""

from __future__ import annotations

from typing import Any, Mapping

from ray import serve

from actors.ensemble import Ensemble
from cluster.resources import ray_options
from cluster.runtime import current_profile


class EnsembleDeployment:
    """The ensemble as a Serve deployment: Serve's batching in front of ``Ensemble.predict``.

    Build with ``ensemble_deployment(settings)``; its ``ray_actor_options`` come from the
    resource table and batching from ``ensemble.max_batch_size`` / ``batch_wait_s``.
    ``registry`` is named as ``actors.ensemble.Ensemble`` takes it (``"store"`` needs no actor).
    """

    def __init__(self, settings: Any, registry: Any | None = None):
        self.ensemble = Ensemble(settings, registry)
        self.predict_one.set_max_batch_size(settings.ensemble.max_batch_size)
        self.predict_one.set_batch_wait_timeout_s(settings.ensemble.batch_wait_s)

    async def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        await self.ensemble.reconfigure(user_config)
        if "max_batch_size" in (user_config or {}):
            self.predict_one.set_max_batch_size(int(user_config["max_batch_size"]))

    @serve.batch
    async def predict_one(self, requests: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        self.ensemble._batcher.batch_sizes.append(len(requests))  # status() reports the largest
        return await self.ensemble.predict(requests)

    async def predict(self, requests: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return await self.ensemble.predict(requests)

    async def memory_snapshot(self) -> dict[str, Any]:
        return await self.ensemble.memory_snapshot()

    async def status(self) -> dict[str, Any]:
        return await self.ensemble.status()


def ensemble_deployment(settings: Any, profile: str | None = None) -> Any:
    """``EnsembleDeployment`` as a Serve deployment with the ensemble role's resources."""
    opts = ray_options("ensemble", profile or current_profile(settings), settings.ray.resource_overrides)
    return serve.deployment(EnsembleDeployment, name="Ensemble").options(ray_actor_options=opts)
