"""The ensemble: member positions fused into one signal per symbol, with its confidence.

``Ensemble`` is one plain class with async methods, used three ways:

- as a Ray actor (``EnsembleActor``, named ``ensemble``, resources from the
  table's ``ensemble`` role) whose ``predict_one`` batches concurrent callers
  itself (``_Batcher``: requests that arrive while a batch runs form the next);
  a process with many concurrent callers can batch before the Ray call too
  (``BatchingHandle``: one call per batch instead of one per request);
- as the body of the Serve deployment ``EnsembleDeployment``, where Serve's
  ``@serve.batch`` batches and ``reconfigure(user_config)`` applies changes;
- in-process (tests, benchmarks), calling ``predict(requests)`` directly.

A request is one symbol's latest window::

    {"symbol": "SPY",
     "bars": {"open": [...], "high": [...], "low": [...], "close": [...], "volume": [...], "ts": [...]},
     "features": [[...], ...]}     # optional: core.features rows; computed from bars if absent

Members: every production model in the registry (or those named in
``ensemble.models``) run by ONNX Runtime from the model cache, the rule
members of ``ensemble.rules`` and the Python members of
``ensemble.python_members``. Each member runs in its own thread pool with its
timeout; one that raises, returns NaN or out-of-range values, or runs past its
timeout is left out of that call (``failed`` in the answer says why) and the
confidence falls; if all fail the answer is flat with a reason (HOLD).

Hot reload: a poller asks the registry for its generation every
``ensemble.reload_poll_s``; when it changed, the new production versions are
loaded beside the old ones (checked sha256, then a session) and swapped in
with one assignment, so a request runs wholly on the old set or wholly on the
new one and none fails. ``refresh()`` does the same at once.

Feedback: a prediction is kept per symbol until a later request brings the
next bar; then each member's call is scored (``core.fusion.outcome_loss``)
to adapt the weights, and hits per model version go to the registry, which
flags a production version that degrades.

Not here: turning the signal into an order (the risk manager), or the HTTP
route (``serve/``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import ray
from ray import serve

from actors.model_cache import DeviceConfig, ModelCache, OnnxModel, detect_device
from actors.registry import REGISTRY_ACTOR, ArtefactStore
from cluster.logs import configure_logging, get_logger
from cluster.resources import resolve
from core.features import FEATURE_NAMES, WARMUP, compute_features, feature_spec_hash, latest_features
from core.fusion import FusedSignal, MultiplicativeWeights, RegimeWeights, fuse, normal_cvar, outcome_loss
from core.members import Member, MemberBatch, OnnxMember, PythonMember, RuleMember
from core.regime import VOL_FEATURE, detect_regime

log = get_logger("ensemble")

ENSEMBLE_ACTOR = "ensemble"
# Feature rows a request must yield when no learned member says otherwise.
DEFAULT_WINDOW = 1
# Threads per member: enough for overlapping batches, bounded so a member
# that hangs past its timeout cannot take the process's threads with it.
THREADS_PER_MEMBER = 4
# Batches this small run their rule and ONNX members on the event loop, one
# after another: a member there takes tens of microseconds, a hand-off to a
# thread and back more than that (much more on a busy machine). Python
# members (users' code, which may block) always run in their threads.
INLINE_MAX_ROWS = 8
INLINE_KINDS = ("rule", "onnx")
OUTCOME_FLUSH = 50


class RequestError(ValueError):
    """A request the ensemble cannot read; the message says what to fix."""


@dataclass
class _Slot:
    """A member with what the ensemble needs to call it."""

    member: Member
    timeout_s: float
    kind: str  # "onnx" | "rule" | "python"


@dataclass
class _Pending:
    ts: int | None
    close: float
    regime: str
    positions: dict[str, tuple[float, str, str]]  # member -> (position, version, kind)


class Ensemble:
    """Members, their weights and the model cache of one replica."""

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
        self.settings = settings
        configure_logging(settings)
        cfg = settings.ensemble
        self.cfg = cfg
        if profile is None:
            from cluster.runtime import current_profile

            profile = current_profile(settings)
        role = resolve("ensemble", profile, settings.ray.resource_overrides)
        if gpu_ids is None:
            gpu_ids = _assigned_gpus()
        threads = cfg.intra_op_threads or max(1, int(round(role.num_cpus)))
        self.device: DeviceConfig = detect_device(role.num_gpus, threads, gpu_ids)
        budget = cfg.cache_budget_bytes or int(role.memory * cfg.cache_budget_fraction)
        self.cache = ModelCache(budget, cfg.max_versions_per_model, device=self.device, n_features=len(FEATURE_NAMES))
        self.artefacts = artefacts
        self._registry = registry
        self._use_registry = use_registry
        self._feature_hash = feature_spec_hash()
        self.weights = RegimeWeights(
            # Learned members not named in ensemble.weights weigh 1.
            base={**{r.name: r.weight for r in cfg.rules}, **{p.name: p.weight for p in cfg.python_members},
                  **cfg.weights},
            regime_multipliers={r: dict(m) for r, m in cfg.regime_weights.items()},
            adaptive=MultiplicativeWeights(cfg.adapt_eta),
        )
        self.member_timeout_s = cfg.member_timeout_s
        self._static: list[_Slot] = []
        for r in cfg.rules:
            self._static.append(_Slot(RuleMember(r.name, r.strategy, r.params), r.timeout_s or cfg.member_timeout_s, "rule"))
        for p in cfg.python_members:
            self._static.append(_Slot(PythonMember(p.name, p.import_path), p.timeout_s or cfg.member_timeout_s, "python"))
        self._learned: dict[str, _Slot] = {}
        self._slots: tuple[_Slot, ...] = tuple(self._static)
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._inflight: dict[str, int] = defaultdict(int)
        self._pinned_versions: dict[str, int] = {}
        self.generation = -1
        self.load_errors: dict[str, str] = {}
        self._pending: dict[str, _Pending] = {}
        self._outcomes: dict[tuple[str, int], list[bool]] = defaultdict(list)
        self._poller: asyncio.Task | None = None
        self._sync_lock: asyncio.Lock | None = None
        # batch_wait_s overrides the settings' (the ingress, which must not hold a lone decision back).
        self._batcher = _Batcher(self.predict, cfg.max_batch_size,
                                 cfg.batch_wait_s if batch_wait_s is None else batch_wait_s)
        self.requests = 0
        self.started_at = time.time()
        self._warm_up()
        if use_registry:
            try:
                self._sync_blocking()
            except Exception as e:  # noqa: BLE001 - serve the rule members; the poller retries
                self.load_errors["registry"] = f"{type(e).__name__}: {e}"
                log.warning("registry unavailable at start (%s); serving rule and Python members until it answers", e)

    def _warm_up(self) -> None:
        """Call each rule and Python member once, so a JIT compile is not taken for a timeout."""
        from core.synthetic import generate_bars

        bars = generate_bars(["WARM"], WARMUP + 64, seed=0)
        arrays = {k: bars[k].to_numpy() for k in ("open", "high", "low", "close", "volume")}
        feats = compute_features(arrays)[-DEFAULT_WINDOW:][None]
        batch = MemberBatch(np.ascontiguousarray(feats, dtype=np.float32), (arrays,), ("WARM",))
        for slot in self._static:
            try:
                slot.member.predict(batch)
            except Exception as e:  # noqa: BLE001 - reported on every call that fails the same way
                log.warning("member %s failed its warm-up call: %s", slot.member.name, e)

    # -- registry ---------------------------------------------------------------------
    def _reg(self) -> Any:
        if self._registry is None:
            self._registry = ray.get_actor(REGISTRY_ACTOR, namespace=self.settings.ray.namespace)
        elif self._registry == "store":
            # No registry actor (Serve's local testing mode, a notebook): read the
            # index from the store in this process. It sees promotions only on refresh(force=True).
            from actors.registry import ModelRegistry

            self._registry = ModelRegistry(self.settings)
        return self._registry

    async def _ask(self, method: str, *args: Any) -> Any:
        fn = getattr(self._reg(), method)
        if hasattr(fn, "remote"):
            return await fn.remote(*args)
        return fn(*args)

    def _ask_blocking(self, method: str, *args: Any) -> Any:
        fn = getattr(self._reg(), method)
        if hasattr(fn, "remote"):
            return ray.get(fn.remote(*args), timeout=60)
        return fn(*args)

    def _artefacts(self) -> ArtefactStore:
        if self.artefacts is None:
            self.artefacts = ArtefactStore.from_settings(self.settings)
        return self.artefacts

    def _wanted(self, production: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        models = dict(production["models"])
        if self.cfg.models:
            models = {n: r for n, r in models.items() if n in self.cfg.models}
        return models

    def _build_learned(self, production: Mapping[str, Any]) -> dict[str, _Slot]:
        """Load the wanted versions (blocking; run in a thread by the async path)."""
        out: dict[str, _Slot] = {}
        wanted = self._wanted(production)
        for name, rec in wanted.items():
            version = self._pinned_versions.get(name, rec["version"])
            try:
                if version != rec["version"]:
                    rec = self._ask_blocking("get", name, version)
                spec = rec.get("metadata", {}).get("feature_spec_hash")
                if spec is not None and spec != self._feature_hash:
                    raise ValueError(
                        f"{name} v{version} was trained on feature spec {spec[:12]}..., this build computes "
                        f"{self._feature_hash[:12]}...; retrain it or pin an older build"
                    )
                model = self.cache.get(name, version, lambda r=rec: self._artefacts().load_verified(r))
                out[name] = _Slot(OnnxMember(name, version, model), self.member_timeout_s, "onnx")
                self.load_errors.pop(name, None)
            except Exception as e:  # noqa: BLE001 - one bad model must not stop the others
                self.load_errors[name] = f"{type(e).__name__}: {e}"
                old = self._learned.get(name)
                if old is not None:
                    out[name] = old  # keep serving what worked
                log.error("could not load %s v%s: %s%s", name, version, e, "; keeping the version in service" if old else "")
        return out

    def _install(self, learned: dict[str, _Slot], generation: int) -> None:
        self.cache.pin({(s.member.name, s.member.model_version) for s in learned.values()})  # type: ignore[attr-defined]
        self._learned = learned
        # One assignment: a request sees the old tuple or the new one, never a mix.
        self._slots = tuple(self._static) + tuple(learned[n] for n in sorted(learned))
        self.generation = generation

    def _sync_blocking(self) -> None:
        production = self._ask_blocking("production", list(self.cfg.tasks))
        self._install(self._build_learned(production), production["generation"])

    async def refresh(self, force: bool = False) -> int:
        """Follow the registry's production versions now; returns the generation served."""
        if not self._use_registry:
            return self.generation
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            gen = await self._ask("generation")
            if gen == self.generation and not force:
                return gen
            production = await self._ask("production", list(self.cfg.tasks))
            loop = asyncio.get_running_loop()
            learned = await loop.run_in_executor(None, self._build_learned, production)
            self._install(learned, production["generation"])
            self.load_errors.pop("registry", None)
            log.info("serving generation %d: %s", self.generation, self.model_versions())
            return self.generation

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_poll_s)
            try:
                await self.refresh()
                await self._flush_outcomes()
            except Exception as e:  # noqa: BLE001 - the registry restarting is not our failure
                log.warning("registry poll failed: %s", e)

    def _ensure_poller(self) -> None:
        if self._use_registry and (self._poller is None or self._poller.done()):
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def start(self) -> bool:
        self._ensure_poller()
        return True

    async def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Serve's hook (and the actor's): pin versions, change weights or timeouts, then reload.

        Keys: ``pinned_versions`` {model: version} (others follow production),
        ``weights`` {member: base weight}, ``member_timeout_s``,
        ``max_batch_size``, ``batch_wait_s``.
        """
        cfg = dict(user_config or {})
        unknown = set(cfg) - {"pinned_versions", "weights", "member_timeout_s", "max_batch_size", "batch_wait_s"}
        if unknown:
            raise ValueError(f"unknown ensemble user_config keys: {', '.join(sorted(unknown))}")
        if "pinned_versions" in cfg:
            self._pinned_versions = {k: int(v) for k, v in cfg["pinned_versions"].items()}
        if "weights" in cfg:
            for name, w in cfg["weights"].items():
                if not (isinstance(w, (int, float)) and w >= 0):
                    raise ValueError(f"weight of {name} must be a number >= 0, got {w!r}")
            self.weights.base.update({k: float(v) for k, v in cfg["weights"].items()})
        if "member_timeout_s" in cfg:
            self.member_timeout_s = float(cfg["member_timeout_s"])
            for s in self._static:
                s.timeout_s = self.member_timeout_s
        if "max_batch_size" in cfg:
            self._batcher.max_batch = int(cfg["max_batch_size"])
        if "batch_wait_s" in cfg:
            self._batcher.wait_s = float(cfg["batch_wait_s"])
        await self.refresh(force=True)

    # -- requests ---------------------------------------------------------------------
    def window(self) -> int:
        learned = [s.member.window for s in self._slots if s.kind == "onnx"]  # type: ignore[attr-defined]
        return max([DEFAULT_WINDOW, *learned])

    def _prepare(self, requests: Sequence[Mapping[str, Any]]) -> tuple[MemberBatch, list[str | None], list[dict]]:
        L = self.window()
        F = len(FEATURE_NAMES)
        feats = np.zeros((len(requests), L, F), dtype=np.float32)
        bars_out: list[dict[str, np.ndarray] | None] = []
        row_errors: list[str | None] = []
        metas: list[dict] = []
        from_bars: list[int] = []  # rows whose features are computed below, all together
        for i, req in enumerate(requests):
            err = None
            is_map = isinstance(req, dict) or isinstance(req, Mapping)  # dict first: Mapping's check is slow
            symbol = str(req.get("symbol", "")).upper() if is_map else ""
            bars = None
            try:
                if not symbol:
                    raise RequestError("each request needs a symbol")
                bars = _read_bars(req.get("bars"))
                if req.get("features") is not None:
                    f = np.asarray(req["features"], dtype=np.float32)
                    if f.ndim != 2 or f.shape[1] != F:
                        raise RequestError(f"features must be [rows, {F}] ({', '.join(FEATURE_NAMES)}), got {f.shape}")
                elif bars is not None:
                    if len(bars["close"]) >= WARMUP + L:
                        from_bars.append(i)
                        f = None
                    else:  # too short for latest_features: the row's own error message, as computed alone
                        f = compute_features(bars)
                else:
                    raise RequestError("a request needs bars or features")
                if f is not None:
                    if f.shape[0] < L:
                        raise RequestError(f"need {L} finite feature rows (at least {WARMUP + L} bars); got {f.shape[0]} rows")
                    feats[i] = f[-L:]
            except (RequestError, ValueError, KeyError, TypeError) as e:
                err = str(e)
                feats[i] = np.nan
            bars_out.append(bars)
            row_errors.append(err)
            meta = {"symbol": symbol}
            if bars is not None and "ts" in bars and len(bars["ts"]):
                meta["last_ts"] = int(bars["ts"][-1])
            if bars is not None and len(bars["close"]):
                meta["last_close"] = float(bars["close"][-1])
            if is_map and req.get("seq") is not None:
                meta["seq"] = req["seq"]
            metas.append(meta)
        if from_bars:
            self._features_from_bars(from_bars, bars_out, feats, row_errors, L)
        finite = np.isfinite(feats).all(axis=(1, 2)).tolist()  # one check for the whole batch
        for i, ok in enumerate(finite):
            if not ok and row_errors[i] is None:
                row_errors[i] = f"need {L} finite feature rows (at least {WARMUP + L} bars); the last {L} are not all finite"
        batch = MemberBatch(feats, tuple(bars_out), tuple(m["symbol"] for m in metas))
        return batch, row_errors, metas

    @staticmethod
    def _features_from_bars(rows: list[int], bars: list[Any], feats: np.ndarray, row_errors: list[str | None],
                            L: int) -> None:
        """The last ``L`` feature rows of ``rows`` in one batched pass (``latest_features``).

        A row with bad bars (a close <= 0, say) would fail the whole pass, so
        then each row is computed alone and only the bad ones carry an error.
        """
        try:
            feats[rows] = latest_features([bars[i] for i in rows], L)
            return
        except ValueError:
            pass
        for i in rows:
            try:
                feats[i] = compute_features(bars[i])[-L:]
            except ValueError as e:
                row_errors[i] = str(e)
                feats[i] = np.nan

    async def _call_member(self, slot: _Slot, batch: MemberBatch) -> np.ndarray:
        name = slot.member.name
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ThreadPoolExecutor(THREADS_PER_MEMBER, thread_name_prefix=f"member-{name}")
        if self._inflight[name] >= THREADS_PER_MEMBER:
            raise TimeoutError(f"{self._inflight[name]} earlier calls still running past the timeout")
        self._inflight[name] += 1
        fut = asyncio.get_running_loop().run_in_executor(pool, slot.member.predict, batch)
        fut.add_done_callback(lambda _f, n=name: self._inflight.__setitem__(n, self._inflight[n] - 1))
        try:
            out = await asyncio.wait_for(asyncio.shield(fut), slot.timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer within {slot.timeout_s:g}s") from None
        return _checked(out, batch)

    def _call_inline(self, slot: _Slot, batch: MemberBatch) -> np.ndarray:
        """A member called on the event loop; one that answered past its timeout is left out all the same."""
        t0 = time.perf_counter()
        out = slot.member.predict(batch)
        took = time.perf_counter() - t0
        if took > slot.timeout_s:
            raise TimeoutError(f"answered after {took:.3g}s, past {slot.timeout_s:g}s")
        return _checked(out, batch)

    async def predict(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One answer per request, in order. Never raises for a member's failure."""
        self._ensure_poller()
        if not requests:
            return []
        self.requests += len(requests)
        slots = self._slots  # this call's members, whatever a reload does meanwhile
        batch, row_errors, metas = self._prepare(requests)
        B, M = len(batch), len(slots)
        names = [s.member.name for s in slots]
        failures: list[dict[str, str]] = [{} for _ in range(B)]
        positions = np.full((B, M), np.nan)
        inline = [len(batch) <= INLINE_MAX_ROWS and s.kind in INLINE_KINDS for s in slots]
        threaded = asyncio.gather(*(self._call_member(s, batch) for s, i in zip(slots, inline) if not i),
                                  return_exceptions=True)
        here: dict[int, Any] = {}
        for j, (slot, i) in enumerate(zip(slots, inline)):
            if i:
                try:
                    here[j] = self._call_inline(slot, batch)
                except Exception as e:  # noqa: BLE001 - one member's failure is that member's
                    here[j] = e
        others = iter(await threaded)
        results = [here[j] if i else next(others) for j, i in enumerate(inline)]
        for j, (slot, res) in enumerate(zip(slots, results)):
            if isinstance(res, BaseException):
                why = f"{type(res).__name__}: {res}" if not isinstance(res, TimeoutError) else f"timeout: {res}"
                for i in range(B):
                    failures[i][slot.member.name] = why
                continue
            positions[:, j] = res
            if slot.kind == "onnx":
                for i in range(B):
                    if row_errors[i] is not None:
                        failures[i][slot.member.name] = f"no features: {row_errors[i]}"
        last = batch.features[:, -1, :]
        regimes = detect_regime(last, FEATURE_NAMES)
        vol = last[:, list(FEATURE_NAMES).index(VOL_FEATURE)].astype(np.float64)
        signals = fuse(positions, names, regimes, self.weights, normal_cvar(vol), self.cfg.max_tail_risk, failures)
        versions = {s.member.name: s.member.version for s in slots}
        kinds = {s.member.name: (s.member.version, s.kind) for s in slots}
        out = []
        for i, sig in enumerate(signals):
            self._learn(metas[i], batch.bars[i], sig, kinds)
            out.append(_answer(sig, metas[i], versions, row_errors[i], self.generation))
        return out

    async def predict_one(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """One request, batched with whatever else is waiting (the actor path)."""
        return await self._batcher.submit(request)

    async def predict_unbatched(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """One request as its own batch (for measuring what batching buys)."""
        return (await self.predict([request]))[0]

    # -- feedback ---------------------------------------------------------------------
    def _learn(self, meta: dict, bars: Mapping[str, np.ndarray] | None, sig: FusedSignal,
               kinds: Mapping[str, tuple[str, str]]) -> None:
        """Score the symbol's previous prediction against the bar that followed it; keep this one."""
        symbol = meta.get("symbol")
        if not symbol or "last_close" not in meta:
            return
        prev = self._pending.get(symbol)
        bars = bars or {}
        if prev is not None and prev.ts is not None and "ts" in bars:
            ts, close = bars["ts"], bars["close"]  # already int64 / float64 arrays (_read_bars)
            idx = np.searchsorted(ts, prev.ts)
            if idx < len(ts) - 1 and ts[idx] == prev.ts:
                realised = close[idx + 1] / close[idx] - 1.0
                losses = {}
                for name, (p, version, kind) in prev.positions.items():
                    losses[name] = float(outcome_loss(p, realised))
                    if kind == "onnx" and p != 0 and realised != 0:
                        self._outcomes[(name, int(version[1:]))].append(bool(np.sign(p) == np.sign(realised)))
                self.weights.adaptive.update(prev.regime, losses)
        if "last_ts" in meta and not sig.hold:
            self._pending[symbol] = _Pending(
                meta["last_ts"], meta["last_close"], sig.regime,
                {n: (p, *kinds[n]) for n, p in sig.positions.items() if n in kinds},
            )

    async def _flush_outcomes(self) -> None:
        ready = {k: v for k, v in self._outcomes.items() if v}
        for (name, version), hits in ready.items():
            if len(hits) < OUTCOME_FLUSH and self._poller is not None:
                continue
            self._outcomes[(name, version)] = []
            try:
                await self._ask("record_outcomes", name, version, hits)
            except Exception as e:  # noqa: BLE001
                log.warning("could not record outcomes of %s v%d: %s", name, version, e)

    async def flush_outcomes(self) -> None:
        poller, self._poller = self._poller, None
        try:
            await self._flush_outcomes()
        finally:
            self._poller = poller

    # -- status -------------------------------------------------------------------------
    def model_versions(self) -> dict[str, str]:
        return {s.member.name: s.member.version for s in self._slots}

    async def memory_snapshot(self) -> dict[str, Any]:
        return self.cache.snapshot()

    async def status(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "members": self.model_versions(),
            "load_errors": dict(self.load_errors),
            "providers": {
                s.member.name: s.member.model.providers for s in self._slots if s.kind == "onnx"  # type: ignore[attr-defined]
            },
            "device": {"cuda": self.device.use_cuda, "gpu_mem_limit": self.device.gpu_mem_limit,
                       "intra_op_threads": self.device.intra_op_threads},
            "weights": self.weights.adaptive.state(),
            "requests": self.requests,
            "largest_batch": max(self._batcher.batch_sizes, default=0),
            "window": self.window(),
        }


def _assigned_gpus() -> list[int]:
    try:
        if ray.is_initialized():
            return [int(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - not in a worker
        pass
    return []


def _checked(out: Any, batch: MemberBatch) -> np.ndarray:
    out = np.asarray(out, dtype=np.float64).reshape(-1)
    if out.shape[0] != len(batch):
        raise ValueError(f"returned {out.shape[0]} positions for {len(batch)} rows")
    return out


def _read_bars(raw: Any) -> dict[str, np.ndarray] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise RequestError("bars must be an object of arrays: open, high, low, close, volume (and ts)")
    out = {}
    for k in ("open", "high", "low", "close", "volume"):
        if k not in raw:
            raise RequestError(f"bars are missing {k!r}")
        out[k] = np.asarray(raw[k], dtype=np.float64)
    if len({len(v) for v in out.values()}) != 1:
        raise RequestError("bars arrays must all have the same length")
    if "ts" in raw:
        out["ts"] = np.asarray(raw["ts"], dtype=np.int64)
        if len(out["ts"]) != len(out["close"]):
            raise RequestError("bars.ts must have one entry per bar")
    return out


def _answer(sig: FusedSignal, meta: dict, versions: dict[str, str], row_error: str | None, generation: int) -> dict[str, Any]:
    members = {
        n: {"position": p, "contribution": sig.contributions.get(n, 0.0), "weight": sig.weights.get(n, 0.0),
            "version": versions.get(n)}
        for n, p in sig.positions.items()
    }
    reason = sig.reason
    if reason is not None and row_error is not None:
        reason = f"{reason} (request: {row_error})"
    return {
        **meta,
        "position": sig.position,
        "confidence": sig.confidence,
        "action_hint": "HOLD" if sig.hold or sig.position == 0 else ("BUY" if sig.position > 0 else "SELL"),
        "hold": sig.hold,
        "reason": reason,
        "regime": sig.regime,
        "coverage": sig.coverage,
        "agreement": sig.agreement,
        "tail_risk": None if math.isnan(sig.tail_risk) else sig.tail_risk,
        "members": members,
        "failed": sig.failed,
        "model_versions": versions,
        "generation": generation,
    }


class _Batcher:
    """Concurrent callers' requests run as one batch; those arriving meanwhile form the next."""

    def __init__(self, fn: Any, max_batch: int, wait_s: float):
        self.fn, self.max_batch, self.wait_s = fn, max_batch, wait_s
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        # Only the first batch of a burst waits for company; later ones are
        # whatever queued while the previous batch ran, so a busy replica never sleeps.
        if len(self._queue) < self.max_batch and self.wait_s > 0:
            await asyncio.sleep(self.wait_s)
        while True:
            if not self._queue:
                # Callers answered by the last batch resubmit as soon as they
                # run: let them (one turn of the loop) and take their requests
                # now, rather than end the burst and make them wait wait_s.
                await asyncio.sleep(0)
                if not self._queue:
                    break
            take, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            self.batch_sizes.append(len(take))
            self.batch_sizes = self.batch_sizes[-1000:]
            try:
                results = await self.fn([item for item, _ in take])
            except Exception as e:  # noqa: BLE001 - each caller gets the error
                for _, fut in take:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), res in zip(take, results):
                if not fut.done():
                    fut.set_result(res)


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
        self._batcher = _Batcher(lambda requests: handle.predict.remote(list(requests)), max_batch, 0.0)

    @property
    def batch_sizes(self) -> list[int]:
        return self._batcher.batch_sizes

    async def predict_one(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return await self._batcher.submit(request)


# Decorators carry no numbers: resources come from the table via actor_options.
EnsembleActor = ray.remote(Ensemble)


def get_or_create_ensemble(settings: Any) -> Any:
    from cluster.runtime import actor_options

    return EnsembleActor.options(**actor_options("ensemble", settings, ENSEMBLE_ACTOR)).remote(settings)


class EnsembleDeployment:
    """The ensemble as a Serve deployment: Serve's batching in front of ``Ensemble.predict``.

    Build with ``ensemble_app(settings)``; its ``ray_actor_options`` come from the
    resource table and batching from ``ensemble.max_batch_size`` / ``batch_wait_s``.
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
    from cluster.resources import ray_options
    from cluster.runtime import current_profile

    opts = ray_options("ensemble", profile or current_profile(settings), settings.ray.resource_overrides)
    return serve.deployment(EnsembleDeployment, name="Ensemble").options(ray_actor_options=opts)
