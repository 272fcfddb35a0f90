"""The CVaR-PPO learner as a Ray actor: one training run at a time, its progress readable meanwhile.

A run (train on the store's bars, checkpoint to the store, export to ONNX, evaluate
out of sample, register as a candidate) is Ray-free: ``core.rl.run.run_training``,
over ``core.rl.data`` (the held-out split, one env over every symbol),
``core.rl.export`` (the member ONNX) and ``core.rl.evaluate`` (the backtest on
held-out bars). Here:

- ``Learner`` (run as ``LearnerActor``, threaded): ``train`` holds one thread for the
  length of a run, ``progress`` and ``stop`` are answered by the others; the candidate
  goes to the named registry actor;
- ``get_or_create_learner``: the named actor with the ``learner`` role's resources;
- ``train_workflow``: the scheduler's ``model_training`` target.

Restarts. The actor runs with ``max_restarts=-1``. ``train(run_id, ...)`` on a run with a
checkpoint in the store continues from it (same settings and data required, else it
refuses); on a finished run it returns the stored result without training again.

GPU. When Ray gives the actor a GPU, the env and policy run on CUDA and torch's
per-process memory fraction is set to the learner's share (``cluster.resources.limit_torch_gpu_memory``).

Not here: the PPO maths (``core.rl``), the registry's own bookkeeping (``core.models.registry``),
promoting a candidate, or serving it (the ensemble serves production models of the tasks
in ``ensemble.tasks``; add ``policy`` there).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors.registry import RegistryHandle, get_or_create_registry
from cluster import names
from cluster.logs import configure_logging, get_logger
from cluster.resources import gpu_share, limit_torch_gpu_memory, resolve
from cluster.runtime import actor_options, current_profile
from cluster.settings import Settings, load_settings
from core.models.client import OnFirstUse
from core.rl.cvar_ppo import CVaRPPOSettings
from core.rl.run import RunRequest, ppo_settings_for, run_path, run_training
from core.store import BarStore

log = get_logger("learner")

LEARNER_ACTOR = names.LEARNER
# Seconds the learner waits for the registry to register a candidate (an artefact written and read back).
REGISTRY_TIMEOUT_S = 120.0


class LearnerBusy(RuntimeError):
    """The learner is training another run; one run at a time per learner."""


def select_device(profile: str, overrides: dict | None = None) -> tuple[str, float | None]:
    """("cuda", fraction) when the ``learner`` role holds a GPU share in ``profile`` and this
    process sees a GPU, with torch's per-process memory fraction set to that share
    (``cluster.resources.limit_torch_gpu_memory``); else ("cpu", None). A role the table
    gives no GPU stays off the GPU even where one is visible."""
    if gpu_share("learner", profile, overrides) > 0 and torch.cuda.is_available():
        return "cuda", limit_torch_gpu_memory("learner", profile, 0, overrides).torch_fraction
    return "cpu", None


@dataclass
class _Job:
    request: RunRequest
    done: threading.Event
    stop: threading.Event
    result: dict[str, Any] | None = None
    error: BaseException | None = None


class Learner:
    """Runs one training run at a time; ``progress()`` answers while it trains.

    Run as a threaded Ray actor (``LearnerActor``, ``max_concurrency`` > 1): ``train`` holds
    one thread for the length of a run, ``progress`` and ``stop`` are served by the others.
    Settings arrive pickled (secrets intact, in memory only).
    """

    def __init__(self, settings: Settings, profile: str = "cpu") -> None:
        self.settings = settings
        configure_logging(settings)
        overrides = settings.ray.resource_overrides
        # Torch would otherwise start a thread per core, on cores that belong to other actors.
        torch.set_num_threads(max(1, int(resolve("learner", profile, overrides).num_cpus)))
        self.device, self.memory_fraction = select_device(profile, overrides)
        self.store = BarStore.from_settings(settings.store, settings.resilience)
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._progress: dict[str, Any] = {"state": "idle"}
        self._started = time.time()

    def train(self, run_id: str, symbols: list[str], ppo: CVaRPPOSettings, eval_alpha: float | None = None) -> dict[str, Any]:
        """Train run ``run_id`` to the end (resuming it from the store if it was begun) and return
        its result. A second call for the run in progress waits for it and returns the same
        result; a call for another run while one trains raises ``LearnerBusy``."""
        request = RunRequest(run_id, tuple(s.upper() for s in symbols), ppo, eval_alpha)
        run_path(run_id, "")  # validates the id before anything starts
        with self._lock:
            job = self._job
            if job is not None and not job.done.is_set():
                if job.request != request:
                    raise LearnerBusy(f"the learner is training run {job.request.run_id}; wait for it or stop it")
                owner = False
            else:
                job = self._job = _Job(request, threading.Event(), threading.Event())
                owner = True
        if owner:
            self._progress = {"state": "running", "run_id": run_id, "phase": "starting"}
            try:
                job.result = run_training(self.settings, self.store, request, device=self.device,
                                          on_progress=lambda r: self._update(run_id, r), stop=job.stop,
                                          registry=self._registry())
                state = job.result.get("state", "done")
                self._progress = {**self._progress, "state": state}
            except BaseException as e:  # noqa: BLE001 - reported to every waiter, then re-raised
                job.error = e
                self._progress = {**self._progress, "state": "failed", "error": f"{type(e).__name__}: {e}"}
                log.error("run %s failed: %s", run_id, e)
            finally:
                job.done.set()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _registry(self) -> OnFirstUse:
        """The named registry actor, looked up (created if absent) when this run registers its
        candidate: each run asks anew, as a registry actor may have been replaced meanwhile."""
        return OnFirstUse(lambda: RegistryHandle(get_or_create_registry(self.settings), REGISTRY_TIMEOUT_S))

    def _update(self, run_id: str, record: dict[str, Any]) -> None:
        self._progress = {**self._progress, **record, "state": "running", "run_id": run_id,
                          "updated_at": time.time()}

    def progress(self) -> dict[str, Any]:
        """The current or last run: state (idle, running, done, stopped, failed), phase, global_step of
        total_timesteps, and the last iteration's mean_return, cvar, approx_kl, lambda_ and alpha; plus
        resumed_from_step, checkpoint_step, this process's pid, device and GPU memory fraction."""
        return {**self._progress, "pid": os.getpid(), "device": self.device,
                "memory_fraction": self.memory_fraction, "actor_started_at": self._started}

    def stop(self) -> bool:
        """Stop the run in progress after its current iteration (it checkpoints first)."""
        job = self._job
        if job is None or job.done.is_set():
            return False
        job.stop.set()
        return True


# Decorators carry no numbers: resources come from the table via actor_options.
LearnerActor = ray.remote(Learner)


def get_or_create_learner(settings: Settings, name: str = LEARNER_ACTOR, *, detached: bool = True) -> Any:
    """The named learner actor with the ``learner`` role's resources (a GPU share when the
    cluster has GPUs), created if absent; restarted by Ray when its process dies."""
    opts = actor_options("learner", settings, name, detached=detached, max_concurrency=4)
    return LearnerActor.options(**opts).remote(settings, current_profile(settings))


def train_workflow(run_id: str, symbols: list[str], steps: int, alpha: float = 1.0, beta: float | None = None,
                   seed: int = 1) -> dict[str, Any]:
    """The scheduler's ``model_training`` target: train run ``run_id`` on the named learner
    actor and return its candidate and held-out metrics. Idempotent per run id (a finished
    run returns its stored result; an interrupted one resumes), as the scheduler asks of
    workflows it may run twice. Settings are this process's (``load_settings()``)."""
    settings = load_settings()
    ppo = ppo_settings_for(settings.learner, steps, alpha, beta, seed=seed)
    learner = get_or_create_learner(settings)
    result = ray.get(learner.train.remote(run_id, list(symbols), ppo))
    c = result["candidate"]
    return {"run_id": run_id, "model": c["name"], "version": c["version"], "sha256": c["sha256"],
            "metrics": result["evaluation"]["aggregate"], "global_step": result["global_step"]}
