"""The CVaR-PPO learner: trains a trading policy on the store's bars, checkpoints it to the
store, exports it to ONNX, evaluates it out of sample and registers it as a candidate.

One run, start to end (``run_training``, Ray-free; the ``Learner`` actor runs it)::

    bars (store) -> train / held-out split -> MultiSymbolEnv -> core.rl.cvar_ppo.train
        -> checkpoints to models/learner/<run>/ckpt.pt        (every few iterations, atomic)
        -> policy.onnx  (core's export, parity-checked)       the full policy, for analysis
        -> member ONNX  (the ensemble's member contract)      parity-checked, evaluated, registered
        -> core.engine.backtest on each symbol's held-out bars -> metrics
        -> register_candidate(...)  the model registry: a candidate of task "policy", with metadata
                                    and metrics                -> models/learner/<run>/result.json

Data. Each symbol's bars are split in time: the first ``1 - learner.holdout_fraction``
train the policy, the rest are never seen in training and are where it is judged.
Features come from ``core.features.compute_features`` (causal, finite memory), so a
held-out decision at bar ``t`` uses feature rows ``t - W + 1 .. t`` and nothing later.
A run pins its data in ``run.json`` (each symbol's last bar and row count), so a run
resumed after new bars reached the store trains on exactly the bars it started on.

What is served, and so what is evaluated. The ensemble's member contract is one input
``features [batch, window, F]`` and a first output ``position [batch]``: it carries no
position and no episode clock. The trained policy also sees its position, the episode's
log wealth and the time left (``core.rl.env``). The member ONNX therefore feeds the policy
the observation of an episode's first decision (flat, log wealth 0, the whole episode
ahead), which every training episode starts with, and returns the greedy target
position. The evaluation runs exactly those bytes through ONNX Runtime, so the metrics
registered are those of the model registered, not of a cousin of it.

Evaluation. The member's target for held-out bar ``t`` goes to ``core.engine.backtest``
with the training costs, filling at the next bar's open by default (``learner.eval_fill``:
a decision made from bar t's close cannot trade at that close live) and fractional
units. Per symbol: mean per-bar return, Sharpe, CVaR at the run's alpha (the engine's
per-bar CVaR), max drawdown, total return, and the CVaR of consecutive held-out
episodes' log returns. Across symbols, conservatively: mean of means, mean Sharpe, the
worst CVaR and the worst drawdown.

Restarts. The actor runs with ``max_restarts=-1``. ``train(run_id, ...)`` on a run with a
checkpoint in the store continues from it (same settings and data required, else it
refuses); on a finished run it returns the stored result without training again.

GPU. When Ray gives the actor a GPU, the env and policy run on CUDA and torch's
per-process memory fraction is set to the learner's share (``cluster.resources.limit_torch_gpu_memory``).

Not here: the PPO maths (``core.rl``), the registry's own bookkeeping (``actors.registry``),
promoting a candidate, or serving it (the ensemble serves production models of the tasks
in ``ensemble.tasks``; add ``policy`` there).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import ray
import torch
from torch import nn

from cluster.logs import configure_logging, get_logger
from cluster.settings import LearnerSettings, Settings
from core.features import FEATURE_NAMES, WARMUP, compute_features, feature_spec_hash
from core.rl.cvar_ppo import ActorCritic, CVaRPPOSettings, export_onnx, train
from core.rl.env import TradingEnv
from core.store import BarStore

log = get_logger("learner")

LEARNER_ACTOR = "learner"
RUNS_DIR = "models/learner"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PARITY_TOLERANCE = 1e-5
EVAL_CASH = 10_000.0


class LearnerBusy(RuntimeError):
    """The learner is training another run; one run at a time per learner."""


def run_path(run_id: str, name: str) -> str:
    """Where a run's artefacts live in the store: ``models/learner/<run>/<name>``."""
    if not _RUN_ID.match(run_id or ""):
        raise ValueError(f"run id {run_id!r}: use letters, digits, '_', '-', '.' (at most 64)")
    return f"{RUNS_DIR}/{run_id}/{name}"


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class SymbolData:
    """One symbol's bars, its features over all of them, and where the held-out part starts."""

    symbol: str
    bars: pd.DataFrame
    features: np.ndarray  # [T, F], NaN in warm-up rows
    cut: int  # first held-out row

    @property
    def train_bars(self) -> pd.DataFrame:
        return self.bars.iloc[: self.cut].reset_index(drop=True)

    @property
    def heldout_bars(self) -> pd.DataFrame:
        return self.bars.iloc[self.cut :].reset_index(drop=True)

    def heldout_windows(self, window: int) -> np.ndarray:
        """``[T - cut, window, F]``: for each held-out bar t, feature rows t-window+1 .. t."""
        rows = np.arange(self.cut, len(self.bars))[:, None] + np.arange(-window + 1, 1)[None, :]
        return self.features[rows]

    def pin(self) -> dict[str, Any]:
        ts = self.bars["ts"]
        return {"first": str(ts.iloc[0]), "last": str(ts.iloc[-1]), "rows": len(self.bars),
                "heldout_first": str(ts.iloc[self.cut])}


def load_data(store: BarStore, symbols: list[str], ls: LearnerSettings,
              pinned: dict[str, dict[str, Any]] | None = None) -> list[SymbolData]:
    """Each symbol's bars from the store, split into training and held-out parts.

    ``pinned`` (from a run's ``run.json``) fixes the last bar and the row count, so a
    resumed run reads the bars it started on; a store that no longer holds them is refused.
    """
    out = []
    need_train = WARMUP + ls.window + ls.episode_length + 1
    for sym in symbols:
        end = pd.Timestamp(pinned[sym]["last"]) if pinned else None
        bars = store.read(sym, end=end)
        if pinned and len(bars) != pinned[sym]["rows"]:
            raise ValueError(f"{sym}: the run was started on {pinned[sym]['rows']} bars up to {pinned[sym]['last']}; "
                             f"the store now has {len(bars)} there. Start a new run id.")
        if len(bars) == 0:
            raise ValueError(f"no bars of {sym} in the store; `raytrade data generate --symbols {sym}` writes some")
        cut = int(len(bars) * (1.0 - ls.holdout_fraction))
        if cut < need_train or len(bars) - cut < 2:
            raise ValueError(
                f"{sym}: {len(bars)} bars are too few: the training part ({1 - ls.holdout_fraction:.0%}) needs "
                f">= {need_train} (warm-up {WARMUP} + window {ls.window} + episode {ls.episode_length} + 1) and the "
                f"held-out part >= 2; need about {math.ceil(need_train / (1 - ls.holdout_fraction)) + 2} bars")
        out.append(SymbolData(sym, bars, compute_features(bars), cut))
    return out


# --------------------------------------------------------------------------- env over symbols
class MultiSymbolEnv:
    """One ``TradingEnv`` per symbol behind the ``BatchedEnv`` interface, so one policy
    learns from every symbol. ``num_envs`` copies are split as evenly as possible; every
    copy has the same episode length and starts together, so episodes stay aligned."""

    def __init__(self, envs: list[TradingEnv]) -> None:
        if not envs:
            raise ValueError("need at least one env")
        first = envs[0]
        for e in envs[1:]:
            if e.obs_dim != first.obs_dim or e.episode_length != first.episode_length or not torch.equal(
                e.action_values, first.action_values
            ):
                raise ValueError("every symbol's env must have the same window, features, episode length and actions")
        self.envs = envs
        self.sizes = [e.num_envs for e in envs]
        self.num_envs = sum(self.sizes)
        self.obs_dim, self.num_actions, self.device = first.obs_dim, first.num_actions, first.device
        self.action_values = first.action_values
        self.episode_length = first.episode_length

    @classmethod
    def from_data(cls, data: list[SymbolData], ls: LearnerSettings, seed: int, device: str) -> "MultiSymbolEnv":
        if ls.num_envs < len(data):
            raise ValueError(f"learner.num_envs {ls.num_envs} must be at least the number of symbols, {len(data)}")
        base, extra = divmod(ls.num_envs, len(data))
        envs = []
        for i, d in enumerate(data):
            try:
                envs.append(TradingEnv.from_bars(
                    d.train_bars, window=ls.window, episode_length=ls.episode_length, num_envs=base + (i < extra),
                    positions=tuple(ls.positions), commission=ls.commission, slippage=ls.slippage, device=device,
                    seed=seed * 7919 + i))
            except ValueError as e:
                raise ValueError(f"{d.symbol}: {e}") from None
        return cls(envs)

    def reset(self) -> torch.Tensor:
        return torch.cat([e.reset() for e in self.envs])

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = [e.step(a) for e, a in zip(self.envs, torch.split(actions, self.sizes))]
        return tuple(torch.cat(x) for x in zip(*parts))  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        return {"envs": [e.state_dict() for e in self.envs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["envs"]) != len(self.envs):
            raise ValueError("checkpoint was taken with a different number of symbols")
        for e, s in zip(self.envs, state["envs"]):
            e.load_state_dict(s)


# --------------------------------------------------------------------------- the served member
class MemberPolicy(nn.Module):
    """The policy under the ensemble's member contract: feature windows ``[B, W, F]`` in,
    target positions ``[B]`` (and action probabilities) out. The observation is that of an
    episode's first decision (see the module docstring), laid out as ``core.rl.env`` does."""

    def __init__(self, policy: ActorCritic) -> None:
        super().__init__()
        self.actor = copy.deepcopy(policy.actor).cpu().eval()
        self.register_buffer("action_values", policy.action_values.detach().cpu().clone())

    @staticmethod
    def observation(features: torch.Tensor) -> torch.Tensor:
        """Flat window, then position 0, log wealth 0, time left 1: ``TradingEnv``'s first observation."""
        b = features.shape[0]
        zeros = torch.zeros(b, 2, dtype=features.dtype, device=features.device)
        ones = torch.ones(b, 1, dtype=features.dtype, device=features.device)
        return torch.cat([features.reshape(b, -1), zeros, ones], dim=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.actor(self.observation(features))
        return self.action_values[logits.argmax(dim=-1)], torch.softmax(logits, dim=-1)


def export_member_onnx(policy: ActorCritic, window: int, n_features: int, check_windows: np.ndarray,
                       metadata: dict[str, Any] | None = None) -> tuple[bytes, float]:
    """ONNX bytes of ``MemberPolicy`` with a dynamic batch axis, and the largest probability
    difference from torch. Checked on ``check_windows`` (the held-out windows: the inputs that
    will be judged) and on random rows; raises if any position differs or a probability is
    off by ``PARITY_TOLERANCE`` or more."""
    import warnings

    import onnx
    import onnxruntime as ort

    module = MemberPolicy(policy)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # As in core.rl.cvar_ppo.export_onnx: the TorchScript exporter, deprecated but supported.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(module, (torch.zeros(2, window, n_features),), buf, dynamo=False, opset_version=17,
                          input_names=["features"], output_names=["position", "probs"],
                          dynamic_axes={"features": {0: "batch"}, "position": {0: "batch"}, "probs": {0: "batch"}})
    model = onnx.load_model_from_string(buf.getvalue())
    props = {"window": str(window), "n_features": str(n_features),
             "action_values": json.dumps(policy.action_values.tolist())}
    props.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    data = model.SerializeToString()

    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.as_tensor(np.asarray(check_windows, np.float32)),
                      torch.randn(64, window, n_features, generator=g)])
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got_pos, got_probs = session.run(None, {"features": rows.numpy()})
    with torch.no_grad():
        want_pos, want_probs = (t.numpy() for t in module(rows))
    max_diff = float(np.abs(got_probs - want_probs).max())
    if not max_diff < PARITY_TOLERANCE or not np.array_equal(got_pos, want_pos):
        raise RuntimeError(f"member ONNX disagrees with torch: max prob diff {max_diff:.3g}, "
                           f"{int((got_pos != want_pos).sum())} of {len(rows)} positions differ")
    return data, max_diff


# --------------------------------------------------------------------------- evaluation
def member_positions(onnx_bytes: bytes, windows: np.ndarray) -> np.ndarray:
    """Run a member ONNX on ``[B, W, F]`` windows with ONNX Runtime (CPU); positions ``[B]``."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["position"], {"features": np.ascontiguousarray(windows, np.float32)})[0],
                      dtype=np.float64)


def evaluate(onnx_bytes: bytes, data: list[SymbolData], ls: LearnerSettings, alpha: float) -> dict[str, Any]:
    """Backtest the member on every symbol's held-out bars with core's engine (see the module
    docstring). Returns ``{"symbols": {sym: metrics}, "aggregate": metrics, "alpha": alpha}``;
    each symbol's entry also holds its ``targets`` as a list."""
    from core.engine import backtest
    from core.metrics import cvar as cvar_of

    per: dict[str, dict[str, Any]] = {}
    for d in data:
        targets = member_positions(onnx_bytes, d.heldout_windows(ls.window))
        bars = d.heldout_bars
        res = backtest(bars, targets, cash=EVAL_CASH, commission=ls.commission, slippage=ls.slippage,
                       fill=ls.eval_fill, whole_units=False, periods_per_year=ls.periods_per_year, alpha=alpha)
        # Consecutive held-out episodes of the training length, as the objective saw them.
        L = ls.episode_length
        equity = np.concatenate(([EVAL_CASH], res.equity))
        ends = np.arange(0, len(equity), L)
        ep = np.log(equity[ends[1:]] / equity[ends[:-1]]) if len(ends) > 1 else np.empty(0)
        sharpe = float(res.metrics["sharpe"])
        if not math.isfinite(sharpe) and not np.any(res.returns):
            sharpe = 0.0  # never in the market and nothing paid: a Sharpe of 0, not 0/0
        per[d.symbol] = {
            "bars": len(bars),
            "first": str(bars["ts"].iloc[0]),
            "last": str(bars["ts"].iloc[-1]),
            "mean": float(np.mean(res.returns)),
            "sharpe": sharpe,
            "cvar": float(res.metrics["cvar"]),
            "max_drawdown": float(res.metrics["max_drawdown"]),
            "total_return": float(res.metrics["total_return"]),
            "exposure": float(np.mean(np.abs(targets))),
            "n_trades": int(res.metrics["n_trades"]),
            "episodes": int(len(ep)),
            "episode_cvar": float(cvar_of(ep, alpha)) if len(ep) else math.nan,
            "targets": targets.tolist(),
        }
    vals = list(per.values())
    aggregate = {
        "mean": float(np.mean([v["mean"] for v in vals])),
        "sharpe": float(np.mean([v["sharpe"] for v in vals])),
        "cvar": float(np.min([v["cvar"] for v in vals])),
        "max_drawdown": float(np.max([v["max_drawdown"] for v in vals])),
        "total_return": float(np.mean([v["total_return"] for v in vals])),
        "exposure": float(np.mean([v["exposure"] for v in vals])),
    }
    return {"alpha": alpha, "fill": ls.eval_fill, "symbols": per, "aggregate": aggregate}


# --------------------------------------------------------------------------- registration
def register_candidate(registry: Any, name: str, run_id: str, artefact: bytes, metadata: dict[str, Any],
                       metrics: dict[str, float]) -> dict[str, Any]:
    """Register a trained member with the model registry (``actors.registry``) as a *candidate*
    of task ``policy``, with its training metadata and held-out metrics; returns the record.

    ``registry`` is the registry actor's handle or a ``ModelRegistry`` in this process. The
    registry writes the artefact, reads it back and checks its sha256 before it indexes
    it; ``track_performance`` then records ``metrics`` (``sharpe``, ``max_drawdown``,
    ``cvar``: the registry's names and conventions). Idempotent per run: a version of
    ``name`` already registered by ``run_id`` with the same bytes is returned, not
    registered again (a run retried after a crash between registering and writing its
    result must not leave two candidates).
    """
    digest = hashlib.sha256(artefact).hexdigest()
    existing = [r for r in _registry_call(registry, "list")
                if r["name"] == name and r["metadata"].get("run_id") == run_id and r["sha256"] == digest]
    record = existing[-1] if existing else _registry_call(registry, "register", name, artefact, "policy",
                                                          {**metadata, "run_id": run_id})
    if metrics and {k: record["metrics"].get(k) for k in metrics} != metrics:
        record = _registry_call(registry, "track_performance", name, record["version"], metrics)
    return record


def _registry_call(registry: Any, method: str, *args: Any) -> Any:
    fn = getattr(registry, method)
    return ray.get(fn.remote(*args), timeout=120) if hasattr(fn, "remote") else fn(*args)


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


# --------------------------------------------------------------------------- device
def select_device(profile: str, overrides: dict | None = None) -> tuple[str, float | None]:
    """("cuda", fraction) when the ``learner`` role holds a GPU share in ``profile`` and this
    process sees a GPU, with torch's per-process memory fraction set to that share
    (``cluster.resources.limit_torch_gpu_memory``); else ("cpu", None). A role the table
    gives no GPU stays off the GPU even where one is visible."""
    from cluster.resources import gpu_share, limit_torch_gpu_memory

    if gpu_share("learner", profile, overrides) > 0 and torch.cuda.is_available():
        return "cuda", limit_torch_gpu_memory("learner", profile, 0, overrides).torch_fraction
    return "cpu", None


# --------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class RunRequest:
    """What one training run is: its id, symbols, PPO settings and evaluation level."""

    run_id: str
    symbols: tuple[str, ...]
    ppo: CVaRPPOSettings
    eval_alpha: float | None = None
    """CVaR level of the evaluation; default the run's alpha, or learner.eval_alpha when that is 1"""

    def alpha_for_eval(self, ls: LearnerSettings) -> float:
        if self.eval_alpha is not None:
            return self.eval_alpha
        return self.ppo.alpha if self.ppo.alpha < 1.0 else ls.eval_alpha


def ppo_settings_for(ls: LearnerSettings, steps: int, alpha: float = 1.0, beta: float | None = None, *,
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


def run_training(settings: Settings, store: BarStore, request: RunRequest, *, device: str = "cpu",
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 stop: threading.Event | None = None, registry: Any = None) -> dict[str, Any]:
    """Train, checkpoint, export, evaluate and register one run; returns its result.

    Resumes from ``models/learner/<run>/ckpt.pt`` if the store has it; returns the stored
    ``result.json`` if the run already finished. ``on_progress(record)`` gets phase changes
    and one record per PPO iteration. Setting ``stop`` ends training after the current
    iteration, with a checkpoint; the run is then left unfinished (state ``stopped``).
    ``registry``: the model registry (a ``ModelRegistry`` or its actor's handle); default
    the named registry actor, created if absent.
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
    if registry is None:
        from actors.registry import get_or_create_registry

        registry = get_or_create_registry(settings)
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


# --------------------------------------------------------------------------- the actor
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
        from cluster.resources import resolve

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
                                          on_progress=lambda r: self._update(run_id, r), stop=job.stop)
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
    from cluster.runtime import actor_options, current_profile

    opts = actor_options("learner", settings, name, detached=detached, max_concurrency=4)
    return LearnerActor.options(**opts).remote(settings, current_profile(settings))


def train_workflow(run_id: str, symbols: list[str], steps: int, alpha: float = 1.0, beta: float | None = None,
                   seed: int = 1) -> dict[str, Any]:
    """The scheduler's ``model_training`` target: train run ``run_id`` on the named learner
    actor and return its candidate and held-out metrics. Idempotent per run id (a finished
    run returns its stored result; an interrupted one resumes), as the scheduler asks of
    workflows it may run twice. Settings are this process's (``load_settings()``)."""
    from cluster.settings import load_settings

    settings = load_settings()
    ppo = ppo_settings_for(settings.learner, steps, alpha, beta, seed=seed)
    learner = get_or_create_learner(settings)
    result = ray.get(learner.train.remote(run_id, list(symbols), ppo))
    c = result["candidate"]
    return {"run_id": run_id, "model": c["name"], "version": c["version"], "sha256": c["sha256"],
            "metrics": result["evaluation"]["aggregate"], "global_step": result["global_step"]}
