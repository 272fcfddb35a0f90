"""One learner run, start to end, without Ray: train, checkpoint, export, evaluate, register.

``run_training`` (the ``actors.learner.Learner`` actor runs it; tests call it in-process)::

    bars (store) -> train / held-out split -> MultiSymbolEnv        (core.rl.data)
        -> core.rl.cvar_ppo.train
        -> checkpoints to models/learner/<run>/ckpt.pt        (every few iterations, atomic)
        -> policy.onnx  (core's export, parity-checked)       the full policy, for analysis
        -> member ONNX  (the ensemble's member contract)      parity-checked (core.rl.export)
        -> core.engine.backtest on each symbol's held-out bars -> metrics (core.rl.evaluate)
        -> register_candidate(...)  the model registry: a candidate of task "policy", with metadata
                                    and metrics                -> models/learner/<run>/result.json

Restarts. A run with a checkpoint in the store continues from it (same settings and
data required, else it refuses); a finished run returns the stored result without
training again. Setting ``stop`` ends training after the current iteration, with a
checkpoint.

``settings`` is the application's settings (``cluster.settings.Settings``; ``learner``
is read) and ``ls`` its ``learner`` section.

Not here: the PPO maths (``core.rl.cvar_ppo``), the registry's own bookkeeping
(``core.models.registry``), the device a run trains on and the actor
(``actors.learner``), promoting a candidate, or serving it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core.features import FEATURE_NAMES, feature_spec_hash
from core.models.client import RegistryClient
from core.rl.cvar_ppo import CVaRPPOSettings, export_onnx, train
from core.rl.data import MultiSymbolEnv, load_data
from core.rl.evaluate import evaluate
from core.rl.export import export_member_onnx
from core.store import BarStore

# The logger cluster.logs.get_logger("learner") names; core does not import cluster.
log = logging.getLogger("raytrade.learner")

RUNS_DIR = "models/learner"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def run_path(run_id: str, name: str) -> str:
    """Where a run's artefacts live in the store: ``models/learner/<run>/<name>``."""
    if not _RUN_ID.match(run_id or ""):
        raise ValueError(f"run id {run_id!r}: use letters, digits, '_', '-', '.' (at most 64)")
    return f"{RUNS_DIR}/{run_id}/{name}"


@dataclass(frozen=True)
class RunRequest:
    """What one training run is: its id, symbols, PPO settings and evaluation level."""

    run_id: str
    symbols: tuple[str, ...]
    ppo: CVaRPPOSettings
    eval_alpha: float | None = None
    """CVaR level of the evaluation; default the run's alpha, or learner.eval_alpha when that is 1"""

    def alpha_for_eval(self, ls: Any) -> float:
        if self.eval_alpha is not None:
            return self.eval_alpha
        return self.ppo.alpha if self.ppo.alpha < 1.0 else ls.eval_alpha


def ppo_settings_for(ls: Any, steps: int, alpha: float = 1.0, beta: float | None = None, *,
                     seed: int = 1, soft_risk: float = 0.2, lambda_lr: float = 10.0) -> CVaRPPOSettings:
    """The PPO settings the CLI and the scheduler train with. alpha = 1: the risk-neutral
    baseline (plain PPO). alpha < 1 without ``beta``: maximise CVaR_alpha. With ``beta``:
    maximise the mean subject to CVaR_alpha >= beta (Lagrangian, ``lambda_lr`` per iteration).
    Rollouts hold one episode per copy, so every episode is whole and the pure-CVaR
    gradient loses none."""
    common = dict(seed=seed, total_timesteps=steps, num_steps=ls.episode_length)
    if alpha >= 1.0 and beta is None:
        return CVaRPPOSettings(**common)
    if beta is None:
        return CVaRPPOSettings(**common, risk_mode="cvar", alpha=alpha, soft_risk_fraction=soft_risk)
    return CVaRPPOSettings(**common, risk_mode="mean_cvar", alpha=alpha, beta=beta, lambda_lr=lambda_lr,
                           soft_risk_fraction=soft_risk)


def _ppo_dict(ppo: CVaRPPOSettings) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(ppo)))


def run_training(settings: Any, store: BarStore, request: RunRequest, *, device: str = "cpu",
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 stop: threading.Event | None = None, registry: RegistryClient | None = None) -> dict[str, Any]:
    """Train, checkpoint, export, evaluate and register one run; returns its result.

    Resumes from ``models/learner/<run>/ckpt.pt`` if the store has it; returns the stored
    ``result.json`` if the run already finished. ``on_progress(record)`` gets phase changes
    and one record per PPO iteration. Setting ``stop`` ends training after the current
    iteration, with a checkpoint; the run is then left unfinished (state ``stopped``).
    ``registry``: the model registry the candidate is registered with, a ``RegistryClient`` (a
    ``ModelRegistry``, or ``actors.registry.RegistryHandle`` for the actor); a request it
    refuses before training needs none.
    """
    ls, ppo = settings.learner, request.ppo
    bad = {k: getattr(ppo, k) for k in ("beta", "lambda_lr", "lambda_init", "learning_rate")
           if not math.isfinite(getattr(ppo, k))}
    if bad:
        # NaN passes CVaRPPOSettings' range checks, and a NaN beta would quietly train plain PPO.
        raise ValueError(f"PPO settings must be finite numbers: {bad}")
    symbols = [s.upper() for s in request.symbols]
    if not symbols:
        raise ValueError("give at least one symbol")
    if len(set(symbols)) != len(symbols):
        raise ValueError(f"symbols repeat: {symbols}")
    if ppo.num_steps % ls.episode_length:
        # Otherwise episodes straddle rollouts, and pure CVaR leaves their steps out of the policy loss.
        raise ValueError(f"num_steps {ppo.num_steps} must be a multiple of learner.episode_length "
                         f"{ls.episode_length}, so rollouts hold whole episodes")
    alpha = request.alpha_for_eval(ls)
    report = on_progress or (lambda record: None)

    if store.exists(run_path(request.run_id, "result.json")):
        result = json.loads(store.get_bytes(run_path(request.run_id, "result.json")))
        if result["symbols"] != symbols or result["ppo"] != _ppo_dict(ppo) or result["evaluation"]["alpha"] != alpha:
            raise ValueError(f"run {request.run_id} finished with other symbols, settings or evaluation alpha; "
                             "use a new run id")
        report({"phase": "done", "global_step": result["global_step"], "total_timesteps": ppo.total_timesteps})
        return result

    report({"phase": "loading", "global_step": 0, "total_timesteps": ppo.total_timesteps})
    run_json = run_path(request.run_id, "run.json")
    learner_cfg = ls.model_dump(mode="json")
    pinned = None
    if store.exists(run_json):
        meta = json.loads(store.get_bytes(run_json))
        if meta["symbols"] != symbols or meta["ppo"] != _ppo_dict(ppo) or meta["learner"] != learner_cfg:
            raise ValueError(f"run {request.run_id} was started with other symbols or settings (see {run_json}); "
                             "resume it with the same ones or use a new run id")
        pinned = meta["data"]
    data = load_data(store, symbols, ls, pinned)
    if pinned is None:
        meta = {"run_id": request.run_id, "symbols": symbols, "ppo": _ppo_dict(ppo), "learner": learner_cfg,
                "data": {d.symbol: d.pin() for d in data}, "created_at": time.time()}
        store.put_bytes(run_json, json.dumps(meta, indent=1).encode())

    env = MultiSymbolEnv.from_data(data, ls, ppo.seed, device)
    batch = env.num_envs * ppo.num_steps
    if ppo.total_timesteps < batch:
        raise ValueError(f"{ppo.total_timesteps} steps do not cover one rollout of {env.num_envs} envs x "
                         f"{ppo.num_steps} steps = {batch}; give at least {batch}")
    if registry is None:
        raise ValueError("no model registry to register the run's candidate with: pass registry=")
    ckpt_rel = run_path(request.run_id, "ckpt.pt")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="raytrade-learner-") as tmp:
        local = Path(tmp) / "ckpt.pt"
        resume_from, resumed_from_step = None, 0
        if store.exists(ckpt_rel):
            local.write_bytes(store.get_bytes(ckpt_rel))
            resume_from = local
            resumed_from_step = int(torch.load(local, map_location="cpu", weights_only=True)["global_step"])
            log.info("run %s: resuming from the checkpoint at step %d", request.run_id, resumed_from_step)
        uploaded = {"key": _file_key(local), "step": resumed_from_step}

        def upload_if_new() -> None:
            # core's train writes the local checkpoint (atomically, by rename); copy each new one to the store.
            key = _file_key(local)
            if key is not None and key != uploaded["key"]:
                blob = local.read_bytes()
                store.put_bytes(ckpt_rel, blob)
                uploaded["key"] = key
                uploaded["step"] = int(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)["global_step"])

        steps_here = {"n": 0}

        def on_iteration(record: dict[str, float]) -> bool:
            upload_if_new()
            steps_here["n"] += batch
            report({"phase": "training", **{k: float(v) for k, v in record.items()},
                    "total_timesteps": ppo.total_timesteps, "resumed_from_step": resumed_from_step,
                    "checkpoint_step": uploaded["step"], "steps_this_process": steps_here["n"]})
            return not (stop is not None and stop.is_set())

        history, policy = train(ppo, env, on_iteration, resume_from=resume_from, checkpoint_path=local,
                                checkpoint_every=ls.checkpoint_every)
        upload_if_new()
        global_step = int(history[-1]["global_step"]) if history else 0
        if stop is not None and stop.is_set() and global_step < (ppo.total_timesteps // batch) * batch:
            report({"phase": "stopped", "global_step": global_step, "checkpoint_step": uploaded["step"]})
            return {"run_id": request.run_id, "state": "stopped", "global_step": global_step,
                    "checkpoint_step": uploaded["step"]}

        report({"phase": "exporting", "global_step": global_step, "total_timesteps": ppo.total_timesteps})
        policy = policy.cpu().eval()
        heldout = np.concatenate([d.heldout_windows(ls.window) for d in data])
        model_meta = {
            "run_id": request.run_id, "window": ls.window, "feature_names": list(FEATURE_NAMES),
            "feature_spec_hash": feature_spec_hash(), "obs_dim": env.obs_dim,
        }
        policy_onnx = Path(tmp) / "policy.onnx"
        policy_diff = export_onnx(policy, policy_onnx, env.obs_dim, metadata=model_meta)
        store.put_bytes(run_path(request.run_id, "policy.onnx"), policy_onnx.read_bytes())
        member, member_diff = export_member_onnx(policy, ls.window, len(FEATURE_NAMES), heldout, model_meta)

    report({"phase": "evaluating", "global_step": global_step, "total_timesteps": ppo.total_timesteps})
    evaluation = evaluate(member, data, ls, alpha)
    last = history[-1] if history else {}
    # Plain PPO (alpha 1, no multiplier) is registered under its own name, so promoting
    # "the CVaR-PPO model" can never put the risk-neutral baseline into production.
    baseline = ppo.alpha == 1.0 and ppo.lambda_init == 0 and ppo.lambda_lr == 0
    model_name = f"{ls.model_name}-baseline" if baseline else ls.model_name
    metadata = {
        **model_meta,
        "algorithm": "cvar-ppo",
        "risk_mode": ppo.risk_mode, "alpha": ppo.alpha, "beta": ppo.beta,
        "ppo": _ppo_dict(ppo), "learner": learner_cfg,
        "training_data": {d.symbol: {"first": str(d.bars["ts"].iloc[0]),
                                     "last": str(d.bars["ts"].iloc[d.cut - 1])} for d in data},
        "heldout_data": {d.symbol: {"first": str(d.bars["ts"].iloc[d.cut]),
                                    "last": str(d.bars["ts"].iloc[-1])} for d in data},
        "global_step": global_step, "iterations": len(history),
        "final_training": {k: last.get(k) for k in ("mean_return", "cvar", "lambda_", "approx_kl", "alpha")},
        "onnx_torch_max_abs_diff": {"policy": policy_diff, "member": member_diff},
        "evaluation": {"alpha": alpha, "fill": ls.eval_fill, **evaluation["aggregate"]},
        "tags": ["cvar-ppo", "baseline" if baseline else "risk-averse"],
    }
    agg = evaluation["aggregate"]
    # The registry refuses a non-finite metric; one that could not be measured is left out, not faked.
    metrics = {k: agg[k] for k in ("sharpe", "max_drawdown", "cvar") if math.isfinite(agg[k])}
    report({"phase": "registering", "global_step": global_step, "total_timesteps": ppo.total_timesteps})
    record = register_candidate(registry, model_name, request.run_id, member, _json_safe(metadata), metrics)

    result = _json_safe({
        "run_id": request.run_id, "state": "done", "symbols": symbols, "ppo": _ppo_dict(ppo),
        "global_step": global_step, "iterations": len(history), "resumed_from_step": resumed_from_step,
        "steps_this_process": steps_here["n"], "device": device, "train_seconds": time.monotonic() - t0,
        "history": history, "evaluation": evaluation, "candidate": record,
        "artefacts": {"checkpoint": ckpt_rel, "policy_onnx": run_path(request.run_id, "policy.onnx"),
                      "member_onnx": record["path"], "member_sha256": hashlib.sha256(member).hexdigest()},
    })
    store.put_bytes(run_path(request.run_id, "result.json"), json.dumps(result).encode())
    report({"phase": "done", "global_step": global_step, "total_timesteps": ppo.total_timesteps})
    return result


def _file_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def register_candidate(registry: RegistryClient, name: str, run_id: str, artefact: bytes, metadata: dict[str, Any],
                       metrics: dict[str, float]) -> dict[str, Any]:
    """Register a trained member with the model registry (``core.models.registry``) as a *candidate*
    of task ``policy``, with its training metadata and held-out metrics; returns the record.

    ``registry`` is a ``RegistryClient``: a ``ModelRegistry`` in this process, or the actor's
    (``actors.registry.RegistryHandle``). The
    registry writes the artefact, reads it back and checks its sha256 before it indexes
    it; ``track_performance`` then records ``metrics`` (``sharpe``, ``max_drawdown``,
    ``cvar``: the registry's names and conventions). Idempotent per run: a version of
    ``name`` already registered by ``run_id`` with the same bytes is returned, not
    registered again (a run retried after a crash between registering and writing its
    result must not leave two candidates).
    """
    digest = hashlib.sha256(artefact).hexdigest()
    existing = [r for r in registry.call("list")
                if r["name"] == name and r["metadata"].get("run_id") == run_id and r["sha256"] == digest]
    record = existing[-1] if existing else registry.call("register", name, artefact, "policy",
                                                         {**metadata, "run_id": run_id})
    if metrics and {k: record["metrics"].get(k) for k in metrics} != metrics:
        record = registry.call("track_performance", name, record["version"], metrics)
    return record


def _json_safe(x: Any) -> Any:
    """NaN and inf as None, numpy scalars as Python numbers: strict JSON."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
