"""The ensemble: member positions fused into one signal per symbol, with its confidence.

``SignalEnsemble`` is one plain class with async methods and no Ray in it.
``actors.ensemble.Ensemble`` builds it from settings in a Ray process (the
replica's device and cache budget, the registry client) and runs it as the
actor ``ensemble``; ``serve.ensemble`` runs it as a Serve deployment; tests
and benchmarks call ``predict(requests)`` in-process. ``predict_one`` batches
concurrent callers itself (``core.batching.Batcher``: requests that arrive
while a batch runs form the next).

A request is one symbol's latest window (``core.ensemble_requests``).

Members: every production model in the registry (or those named in
``ensemble.models``) run by ONNX Runtime from the model cache, the rule
members of ``ensemble.rules`` and the Python members of
``ensemble.python_members``. Each member runs in its own thread pool with its
timeout; one that raises, returns NaN or out-of-range values, or runs past its
timeout is left out of that call (``failed`` in the answer says why) and the
confidence falls; if all fail the answer is flat with a reason (HOLD).

Hot reload: a poller asks the registry (a ``RegistryClient``) for its generation every
``ensemble.reload_poll_s``; when it changed, the new production versions are
loaded beside the old ones (checked sha256, then a session) and swapped in
with one assignment, so a request runs wholly on the old set or wholly on the
new one and none fails. ``refresh()`` does the same at once.

Feedback: a prediction is kept per symbol until a later request brings the
next bar; then each member's call is scored (``core.fusion.outcome_loss``)
to adapt the weights, and hits per model version go to the registry, which
flags a production version that degrades.

Not here: turning the signal into an order (the risk manager), reading requests
(``core.ensemble_requests``), Ray, or the HTTP route (``serve/``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from core.batching import Batcher
from core.ensemble_requests import answer, prepare
from core.features import FEATURE_NAMES, WARMUP, compute_features, feature_spec_hash
from core.fusion import FusedSignal, MultiplicativeWeights, RegimeWeights, fuse, normal_cvar, outcome_loss
from core.members import Member, MemberBatch, OnnxMember, PythonMember, RuleMember
from core.models.artefacts import ArtefactStore
from core.models.cache import DeviceConfig, ModelCache
from core.models.client import RegistryClient
from core.regime import VOL_FEATURE, detect_regime
from core.synthetic import generate_bars

# The logger cluster.logs.get_logger("ensemble") names; core does not import cluster.
log = logging.getLogger("raytrade.ensemble")

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


class SignalEnsemble:
    """Members, their weights and the model cache of one replica.

    ``settings``: the application's settings (``ensemble`` is read, and ``store`` when artefacts
    are first fetched); ``cache``: where learned members are loaded (its device is the
    replica's); ``registry``: where production versions come from, or None to serve the rule
    and Python members only; ``artefacts``: where their bytes are read (default the store of
    ``settings``); ``batch_wait_s`` overrides the settings' (the ingress, which must not hold a
    lone decision back).
    """

    def __init__(
        self,
        settings: Any,
        cache: ModelCache,
        registry: RegistryClient | None,
        *,
        artefacts: ArtefactStore | None = None,
        batch_wait_s: float | None = None,
    ):
        self.settings = settings
        cfg = settings.ensemble
        self.cfg = cfg
        self.cache = cache
        self.device: DeviceConfig = cache.device
        self.artefacts = artefacts
        self._registry = registry
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
        self._batcher = Batcher(self.predict, cfg.max_batch_size,
                                cfg.batch_wait_s if batch_wait_s is None else batch_wait_s)
        self.requests = 0
        self.started_at = time.time()
        self._warm_up()
        if registry is not None:
            try:
                self._sync_blocking()
            except Exception as e:  # noqa: BLE001 - serve the rule members; the poller retries
                self.load_errors["registry"] = f"{type(e).__name__}: {e}"
                log.warning("registry unavailable at start (%s); serving rule and Python members until it answers", e)

    def _warm_up(self) -> None:
        """Call each rule and Python member once, so a JIT compile is not taken for a timeout."""
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
    def _client(self) -> RegistryClient:
        if self._registry is None:
            raise RuntimeError("this ensemble serves without a registry")
        return self._registry

    async def _ask(self, method: str, *args: Any) -> Any:
        return await self._client().acall(method, *args)

    def _ask_blocking(self, method: str, *args: Any) -> Any:
        return self._client().call(method, *args)

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
        if self._registry is None:
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
        if self._registry is not None and (self._poller is None or self._poller.done()):
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
        return prepare(requests, self.window())

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
            out.append(answer(sig, metas[i], versions, row_errors[i], self.generation))
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
            ts, close = bars["ts"], bars["close"]  # already int64 / float64 arrays (read_bars)
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


def _checked(out: Any, batch: MemberBatch) -> np.ndarray:
    out = np.asarray(out, dtype=np.float64).reshape(-1)
    if out.shape[0] != len(batch):
        raise ValueError(f"returned {out.shape[0]} positions for {len(batch)} rows")
    return out
