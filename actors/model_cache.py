"""The model cache of a Ray process: its device from the GPUs Ray assigned, its budget from the table.

The cache itself (ONNX Runtime sessions under a byte budget, LRU eviction,
pinned versions, the CUDA and CPU paths) is Ray-free: ``core.models.cache``.
Here a replica's cache is sized from what Ray gave it:

- the device: CUDA when Ray assigned this process a GPU (``ray.get_gpu_ids()``)
  and the ``ensemble`` role holds a GPU share, with ``gpu_mem_limit`` that
  share of the GPU; the CPU provider otherwise, even on a machine with a GPU
  (it belongs to someone else's share);
- ``intra_op_num_threads``: ``ensemble.intra_op_threads``, or the role's CPUs;
- the byte budget: ``ensemble.cache_budget_bytes``, or
  ``ensemble.cache_budget_fraction`` of the role's ``memory`` (Ray's
  ``memory`` is a reservation, not a cap, so the cache enforces its own).

Not here: loading, evicting or running models (``core.models.cache``).
"""

from __future__ import annotations

from typing import Any

import ray

from cluster.resources import resolve
from core.features import FEATURE_NAMES
from core.models.cache import ModelCache, detect_device


def assigned_gpus() -> list[int]:
    """The GPUs Ray assigned this process; none outside a Ray worker."""
    try:
        if ray.is_initialized():
            return [int(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - not in a worker
        pass
    return []


def replica_cache(settings: Any, profile: str, gpu_ids: list[int] | None = None) -> ModelCache:
    """The ensemble replica's model cache: device, threads and budget from the ``ensemble`` role
    in ``profile`` and the GPUs assigned (``gpu_ids``; default those Ray gave this process)."""
    cfg = settings.ensemble
    role = resolve("ensemble", profile, settings.ray.resource_overrides)
    if gpu_ids is None:
        gpu_ids = assigned_gpus()
    threads = cfg.intra_op_threads or max(1, int(round(role.num_cpus)))
    device = detect_device(role.num_gpus, threads, gpu_ids)
    budget = cfg.cache_budget_bytes or int(role.memory * cfg.cache_budget_fraction)
    return ModelCache(budget, cfg.max_versions_per_model, device=device, n_features=len(FEATURE_NAMES))
