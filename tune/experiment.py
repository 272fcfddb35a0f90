"""The Tune plumbing walk-forward and Monte Carlo share: storage, resources, one experiment run.

::

    from tune.experiment import chunks, experiment_name, run_experiment
    results, path = run_experiment(trial, {"fold": tune.grid_search([0, 1])}, name="wf", storage_path="var/tune")

A driver cuts its work into trials (``chunks``), names the experiment
(``experiment_name``) and hands a trial function and its grid to
``run_experiment``, which gives each trial ``cluster.resources`` role
``backtest_trial`` and writes to Tune's storage (``storage_options``: a local
directory or ``s3://bucket/prefix`` through the store's endpoint and keys).

**The caller connects to Ray** (``cluster.runtime.connect``: the CLI, a
test's ``ray_session``) before calling a driver; nothing in ``tune/`` starts
or joins Ray by itself, so a library call never picks a cluster or reads
settings behind its caller's back.

Not here: what a trial computes (``tune.walk_forward``, ``tune.monte_carlo``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
import ray
from ray import tune

from cluster.resources import choose_profile, tune_resources
from core.store_fs import open_filesystem


def chunks(n: int, per: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into ``ceil(n / per)`` near-equal ``(lo, hi)`` ranges (at least one): one per trial."""
    count = max(1, -(-n // per))
    edges = np.linspace(0, n, count + 1).astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(count)]


def experiment_name(kind: str, strategy: str) -> str:
    """``kind-strategy-YYYYmmdd-HHMMSS``, the strategy's name made safe for a path."""
    return f"{kind}-{strategy.replace(':', '_').replace('@', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_options(storage_path: str | None, settings=None) -> dict[str, Any]:
    """``RunConfig`` keywords for Tune's storage: a local directory, or ``s3://bucket/prefix``
    through the store's endpoint and keys (MinIO or S3)."""
    if storage_path is None:
        storage_path = os.path.abspath(os.path.join("var", "tune"))
    if not storage_path.startswith("s3://"):
        return {"storage_path": os.path.abspath(storage_path)}
    st = settings.store if settings is not None else None
    secret = (lambda s: s.get_secret_value() if s is not None else None)
    fs, root = open_filesystem(storage_path, st.endpoint if st else None, secret(st.access_key) if st else None,
                               secret(st.secret_key) if st else None, st.region if st else "us-east-1")
    return {"storage_path": root, "storage_filesystem": fs}


def run_experiment(trial: Callable, param_space: dict[str, Any], *, name: str, storage_path: str | None = None,
                   settings=None, profile: str | None = None, progress: Callable[[str], None] | None = None,
                   ) -> tuple[list[dict[str, Any]], str]:
    """Run ``trial`` over a grid as one Tune experiment; returns each trial's last result and the
    experiment's path in storage. Raises when Ray is not connected, and when a trial failed, naming
    its error."""
    if not ray.is_initialized():
        raise RuntimeError(f"{name}: connect to Ray first (cluster.runtime.connect(settings)); "
                           "tune/ does not start or join a cluster by itself")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    profile = profile or choose_profile(ray.cluster_resources(), settings.ray.profile if settings else "auto")
    overrides = settings.ray.resource_overrides if settings else None
    resources = tune_resources("backtest_trial", profile, overrides)

    callbacks = []
    if progress is not None:
        total = int(np.prod([len(v["grid_search"]) for v in param_space.values()
                             if isinstance(v, dict) and "grid_search" in v]))
        callbacks.append(_Progress(progress, total))

    tuner = tune.Tuner(
        tune.with_resources(trial, resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name=name, verbose=0, callbacks=callbacks, **storage_options(storage_path, settings)),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} Tune trial(s) of {name} failed: {grid.errors[0]}")
    path = grid.experiment_path  # inside the storage filesystem: "bucket/prefix/name" on S3
    if storage_path is not None and storage_path.startswith("s3://") and not path.startswith("s3://"):
        path = "s3://" + path.lstrip("/")
    return [dict(r.metrics) for r in grid], path


class _Progress(tune.Callback):
    """One progress line per finished trial."""

    def __init__(self, progress: Callable[[str], None], total: int):
        self.progress, self.total, self.done = progress, total, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        self.progress(f"  trial {self.done}/{self.total} done")
