"""The model registry: versions, stages, metrics and checked artefacts in the store.

``ModelRegistry`` (a plain class; ``actors.registry`` runs it as the named Ray
actor ``model-registry``) owns everything under ``models/`` in the store (the
layout is ``core.models.index``'s).

A ``register`` writes the artefact, reads it back and checks its sha256, and
only then writes the index, so the index never names an artefact that is not
whole; an artefact left behind by a crash in between is never listed. The
index itself is one object replaced whole (atomic on both backends). Every load
checks the sha256 again; a corrupted artefact is refused with ``CorruptArtefact``.

A restarted registry holds nothing it did not read back: its state is the
index in the store, so killing the actor loses nothing that was acknowledged.

Stages: a new version is a *candidate*; ``promote`` makes it *production* and
archives the previous production; ``rollback`` archives the current
production and puts back the one before it. The ensemble follows the
production versions (``production()`` with a generation number that changes
on every write).

Callers reach a registry through one type, ``RegistryClient``: ``call(method,
*args)`` blocking, ``acall`` awaited. A ``ModelRegistry`` in this process is its
own client; ``actors.registry.RegistryHandle`` is the client of the actor;
``OnFirstUse`` makes either when first called (the registry may not be
reachable yet), and makes it again after a failure.

Not here: loading models into memory (``core.models.cache``), training, or Ray.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from core.models.artefacts import ArtefactStore, check_onnx, sha256
from core.models.errors import CorruptArtefact, RegistryError, UnknownModel
from core.models.index import (
    INDEX,
    INDEX_FORMAT,
    MAX_HISTORY,
    METRICS,
    MODELS_DIR,
    NAME,
    TASKS,
    empty_index,
    index_problem,
)

# The logger cluster.logs.get_logger("registry") names; core does not import cluster.
log = logging.getLogger("raytrade.registry")


@runtime_checkable
class RegistryClient(Protocol):
    """The model registry as its users call it, wherever it runs: ``ModelRegistry``'s methods by name."""

    def call(self, method: str, *args: Any) -> Any:
        """``method(*args)``, blocking until the registry answers."""
        ...

    async def acall(self, method: str, *args: Any) -> Any:
        """``method(*args)``, awaited."""
        ...


class OnFirstUse:
    """A ``RegistryClient`` made by ``make()`` on its first call; a ``make`` that fails is tried again
    on the next call (a registry actor not started yet, a store not reachable yet)."""

    def __init__(self, make: Callable[[], RegistryClient]) -> None:
        self._make = make
        self._client: RegistryClient | None = None
        self._lock = threading.Lock()

    def client(self) -> RegistryClient:
        with self._lock:
            if self._client is None:
                self._client = self._make()
            return self._client

    def call(self, method: str, *args: Any) -> Any:
        return self.client().call(method, *args)

    async def acall(self, method: str, *args: Any) -> Any:
        return await self.client().acall(method, *args)


@dataclass
class _Outcomes:
    hits: deque
    total: int = 0


class ModelRegistry:
    """Versions, stages and metrics of every model; the store holds the truth."""

    def __init__(self, settings: Any, artefacts: ArtefactStore | None = None, announce: bool = True):
        # Settings travel pickled (secrets intact, in memory only). ``announce``: log what was read
        # (the actor does; a CLI that only reads a model keeps its stderr to its own lines).
        self.settings = settings
        self.artefacts = artefacts or ArtefactStore.from_settings(settings)
        self._index = self._read_index()
        self._outcomes: dict[tuple[str, int], _Outcomes] = {}
        self._retrain: list[dict[str, Any]] = list(self._index.get("retraining_requests", []))
        n = sum(len(m["versions"]) for m in self._index["models"].values())
        log.log(logging.INFO if announce else logging.DEBUG, "registry: %d models, %d versions read from %s",
                len(self._index["models"]), n, self.artefacts.uri)

    # -- index ---------------------------------------------------------------------
    def _read_index(self) -> dict[str, Any]:
        try:
            raw = self.artefacts.get(INDEX)
        except FileNotFoundError:
            return empty_index()
        where = f"the registry index {INDEX} in {self.artefacts.uri}"
        fix = ("restore it from a backup, or move it aside to start an empty registry "
               f"(the artefacts under {MODELS_DIR}/ stay; register them again)")
        try:
            index = json.loads(raw)
        except ValueError as e:  # bad JSON, or bytes that are not UTF-8
            raise RegistryError(f"{where} is not valid JSON ({e}); {fix}") from None
        fmt = index.get("format") if isinstance(index, dict) else None
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt != INDEX_FORMAT:  # another build's index
            raise RegistryError(f"{where} has format {fmt}; this build reads format {INDEX_FORMAT}")
        problem = index_problem(index)
        if problem is not None:
            raise RegistryError(f"{where} is malformed: {problem}; {fix}")
        return index

    def _commit(self, index: dict[str, Any]) -> None:
        """Replace the index whole; in memory only once the store has it."""
        index = json.loads(json.dumps(index))  # a copy, and proof it serialises
        index["generation"] = self._index["generation"] + 1
        index["retraining_requests"] = self._retrain[-100:]
        self.artefacts.put(INDEX, json.dumps(index, indent=1, sort_keys=True).encode())
        self._index = index

    def _model(self, name: str) -> dict[str, Any]:
        try:
            return self._index["models"][name]
        except KeyError:
            known = ", ".join(sorted(self._index["models"])) or "none"
            raise UnknownModel(f"no model named {name!r}; registered models: {known}") from None

    def _version(self, name: str, version: int | str | None = None, stage: str | None = None) -> dict[str, Any]:
        m = self._model(name)
        if version is None:
            if stage == "production" or stage is None and m.get("production") is not None:
                if m.get("production") is None:
                    raise RegistryError(f"{name} has no production version; promote one first")
                version = m["production"]
            else:
                pool = [int(v) for v, r in m["versions"].items() if stage is None or r["stage"] == stage]
                if not pool:
                    raise UnknownModel(f"{name} has no {stage} version")
                version = max(pool)
        rec = m["versions"].get(str(int(version)))
        if rec is None:
            raise UnknownModel(f"{name} has no version {version}; versions: {', '.join(sorted(m['versions'], key=int))}")
        return rec

    # -- writes ----------------------------------------------------------------------
    def register(
        self,
        name: str,
        artefact: bytes,
        task: str,
        metadata: dict[str, Any] | None = None,
        kind: str = "onnx",
    ) -> dict[str, Any]:
        """Store a new version (a candidate) and return its record."""
        if not NAME.match(name or ""):
            raise RegistryError(f"model name {name!r}: use letters, digits, '_', '-', '.' (at most 64)")
        if task not in TASKS:
            raise RegistryError(f"task {task!r}: must be one of {', '.join(TASKS)}")
        if not isinstance(artefact, (bytes, bytearray)) or not artefact:
            raise RegistryError("the artefact is empty")
        metadata = dict(metadata or {})
        if kind == "onnx":
            check_onnx(bytes(artefact))
        m = self._index["models"].get(name)
        if m is not None and m["task"] != task:
            raise RegistryError(f"{name} is a {m['task']} model; a new version cannot be a {task} model")
        parent = metadata.get("parent_version")
        if parent is not None and (m is None or str(int(parent)) not in m["versions"]):
            raise RegistryError(f"parent_version {parent} of {name} does not exist")
        version = 1 + max((int(v) for v in (m or {}).get("versions", {})), default=0)
        path = f"{MODELS_DIR}/{name}/v{version}/model.{kind}"
        digest = sha256(bytes(artefact))
        self.artefacts.put(path, bytes(artefact))
        back = self.artefacts.get(path)
        if sha256(back) != digest:
            raise CorruptArtefact(f"{path}: the store returned different bytes than were written; not registered")
        record = {
            "name": name,
            "version": version,
            "task": task,
            "kind": kind,
            "path": path,
            "sha256": digest,
            "size": len(artefact),
            "stage": "candidate",
            "created_at": time.time(),
            "metadata": metadata,
            "metrics": {},
            "flags": [],
        }
        index = json.loads(json.dumps(self._index))
        entry = index["models"].setdefault(name, {"task": task, "versions": {}, "production": None, "history": []})
        entry["versions"][str(version)] = record
        self._commit(index)
        log.info("registered %s v%d (%s, %d bytes, sha256 %s)", name, version, task, len(artefact), digest[:12])
        return record

    def promote(self, name: str, version: int) -> dict[str, Any]:
        """Make ``version`` production; the previous production is archived."""
        rec = self._version(name, version)
        index = json.loads(json.dumps(self._index))
        m = index["models"][name]
        prev = m.get("production")
        if prev == rec["version"]:
            return rec
        if prev is not None:
            m["versions"][str(prev)]["stage"] = "archived"
        m["versions"][str(rec["version"])]["stage"] = "production"
        m["versions"][str(rec["version"])]["flags"] = []
        m["production"] = rec["version"]
        m["history"].append(rec["version"])
        self._commit(index)
        log.info("promoted %s v%d to production (was %s)", name, rec["version"], prev)
        return self._version(name, rec["version"])

    def rollback(self, name: str) -> dict[str, Any]:
        """Archive the production version and restore the one promoted before it."""
        m = self._model(name)
        cur = m.get("production")
        if cur is None:
            raise RegistryError(f"{name} has no production version to roll back")
        earlier = [v for v in m["history"][:-1] if v != cur]
        if not earlier:
            raise RegistryError(f"{name} v{cur} has no earlier production version; nothing to roll back to")
        target = earlier[-1]
        index = json.loads(json.dumps(self._index))
        mi = index["models"][name]
        mi["versions"][str(cur)]["stage"] = "archived"
        mi["versions"][str(target)]["stage"] = "production"
        mi["production"] = target
        # Drop the rolled-back version from the history, so a second rollback goes further back.
        while mi["history"] and mi["history"][-1] == cur:
            mi["history"].pop()
        if not mi["history"] or mi["history"][-1] != target:
            mi["history"].append(target)
        self._commit(index)
        log.info("rolled back %s from v%d to v%d", name, cur, target)
        return self._version(name, target)

    def archive(self, name: str, version: int) -> dict[str, Any]:
        rec = self._version(name, version)
        if rec["stage"] == "production":
            raise RegistryError(f"{name} v{version} is in production; promote another version or roll back first")
        index = json.loads(json.dumps(self._index))
        index["models"][name]["versions"][str(rec["version"])]["stage"] = "archived"
        self._commit(index)
        return self._version(name, version)

    # -- metrics -----------------------------------------------------------------------
    def _perf_path(self, name: str, version: int) -> str:
        return f"{MODELS_DIR}/{name}/v{version}/performance.json"

    def _history(self, name: str, version: int) -> list[dict[str, Any]]:
        try:
            return json.loads(self.artefacts.get(self._perf_path(name, version)))
        except FileNotFoundError:
            return []

    def track_performance(self, name: str, version: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Append metrics (sharpe, max_drawdown, cvar, win_rate, hit_rate, latency_ms) to a version's history."""
        rec = self._version(name, version)
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise RegistryError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
        clean = {}
        for k, v in metrics.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise RegistryError(f"metric {k}={v!r} is not a number") from None
            if f != f or f in (float("inf"), float("-inf")):
                raise RegistryError(f"metric {k}={v!r} is not finite")
            clean[k] = f
        history = self._history(name, rec["version"])
        history.append({"at": time.time(), "metrics": clean})
        history = history[-MAX_HISTORY:]
        # The history first, then the index that summarises it.
        self.artefacts.put(self._perf_path(name, rec["version"]), json.dumps(history).encode())
        index = json.loads(json.dumps(self._index))
        index["models"][name]["versions"][str(rec["version"])]["metrics"].update(clean)
        self._commit(index)
        return self._version(name, rec["version"])

    def performance(self, name: str, version: int) -> list[dict[str, Any]]:
        rec = self._version(name, version)
        return self._history(name, rec["version"])

    def best(self, task: str, metric: str, stages: tuple[str, ...] = ("candidate", "production")) -> dict[str, Any]:
        """The version of any model of ``task`` with the best latest ``metric``."""
        if metric not in METRICS:
            raise RegistryError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        larger = METRICS[metric]
        pool = [
            r for m in self._index["models"].values() if m["task"] == task
            for r in m["versions"].values() if r["stage"] in stages and metric in r["metrics"]
        ]
        if not pool:
            raise RegistryError(f"no {task} model in {'/'.join(stages)} has a tracked {metric}")
        # Ties go to the newer version.
        return max(pool, key=lambda r: ((r["metrics"][metric] if larger else -r["metrics"][metric]), r["created_at"]))

    def record_outcomes(self, name: str, version: int, hits: list[bool]) -> dict[str, Any]:
        """Fold realised outcomes (was the predicted direction right?) into rolling accuracy.

        A production version whose rolling accuracy over
        ``ensemble.accuracy_window`` outcomes falls below
        ``ensemble.degradation_threshold`` (with at least
        ``degradation_min_samples``) is flagged ``degraded`` and a retraining
        request is raised.
        """
        rec = self._version(name, version)
        cfg = self.settings.ensemble
        key = (name, rec["version"])
        o = self._outcomes.get(key)
        if o is None:
            o = self._outcomes[key] = _Outcomes(deque(maxlen=cfg.accuracy_window))
        o.hits.extend(bool(h) for h in hits)
        o.total += len(hits)
        n = len(o.hits)
        acc = sum(o.hits) / n if n else float("nan")
        out = {"name": name, "version": rec["version"], "rolling_accuracy": acc, "samples": n, "degraded": False}
        if rec["stage"] == "production" and n >= cfg.degradation_min_samples and acc < cfg.degradation_threshold:
            out["degraded"] = True
            if "degraded" not in rec["flags"]:
                request = {
                    "model": name,
                    "version": rec["version"],
                    "reason": f"rolling accuracy {acc:.3f} over {n} outcomes is below {cfg.degradation_threshold}",
                    "at": time.time(),
                }
                self._retrain.append(request)
                index = json.loads(json.dumps(self._index))
                r = index["models"][name]["versions"][str(rec["version"])]
                r["flags"] = sorted(set(r["flags"]) | {"degraded"})
                r["metrics"]["hit_rate"] = acc
                self._commit(index)
                log.warning("%s v%d degraded: %s; retraining requested", name, rec["version"], request["reason"])
        return out

    def retraining_requests(self, clear: bool = False) -> list[dict[str, Any]]:
        out = list(self._retrain)
        if clear and out:
            self._retrain = []
            self._commit(json.loads(json.dumps(self._index)))
        return out

    # -- reads -------------------------------------------------------------------------
    def generation(self) -> int:
        return int(self._index["generation"])

    def get(self, name: str, version: int | None = None, stage: str | None = None) -> dict[str, Any]:
        return dict(self._version(name, version, stage))

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        models = [name] if name else sorted(self._index["models"])
        out = []
        for n in models:
            m = self._model(n)
            out.extend(m["versions"][v] for v in sorted(m["versions"], key=int))
        return out

    def production(self, tasks: list[str] | None = None) -> dict[str, Any]:
        """{"generation": g, "models": {name: record}} for every model with a production version."""
        models = {
            n: m["versions"][str(m["production"])]
            for n, m in self._index["models"].items()
            if m.get("production") is not None and (tasks is None or m["task"] in tasks)
        }
        return {"generation": self.generation(), "models": models}

    def load(self, name: str, version: int | None = None, stage: str | None = None) -> bytes:
        """An artefact's bytes, refused unless its sha256 matches the record."""
        return self.artefacts.load_verified(self._version(name, version, stage))

    def ping(self) -> bool:
        return True

    # -- as a RegistryClient --------------------------------------------------------------
    def call(self, method: str, *args: Any) -> Any:
        """``method(*args)`` in this process: an in-process registry is its own client."""
        return getattr(self, method)(*args)

    async def acall(self, method: str, *args: Any) -> Any:
        return self.call(method, *args)
