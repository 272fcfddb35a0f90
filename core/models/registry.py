"""The model registry: versions, stages, metrics and checked artefacts in the store.

``ModelRegistry`` (a plain class; ``actors.registry`` runs it as the named Ray
actor ``model-registry``) owns everything under ``models/`` in the store (the
layout is ``core.models.index``'s).

A ``register`` creates the artefact (never overwriting one), reads it back and
checks its sha256, writes its record beside it, and only then commits the
index, so the index never names an artefact that is not whole. Every load
checks the sha256 again; a corrupted artefact is refused with ``CorruptArtefact``.

No write is lost. The index has one commit path (``_mutate``): read the newest
index, apply the change, write it by compare-and-swap on what was read
(``ArtefactStore.put_if``: an ETag precondition on S3, a lock and an atomic
rename locally); a writer that loses the race applies its change again to the
winner's index. So the registry actor and a process writing the store directly
(a CLI with no cluster, a training job) never overwrite each other's
generation, and every read that matters first checks whether the index changed
outside this process (``_fresh``) and reloads it.

A crash between artefact and index leaves a version directory the index does
not name. With its ``record.json`` it is *adopted* at the next start (checked
against its sha256, then committed as a candidate); without one it is an
*orphan*, listed by ``orphans()`` (``raytrade models gc``) and removed by
``collect``. The version number it took is skipped, never reused.

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
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from core.models import leftovers
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
T = TypeVar("T")
# Compare-and-swap tries before a write gives up (each loses only to a write that landed).
COMMIT_TRIES = 200
# Version directories a register skips (taken by another writer or a crash's leftover) before it gives up.
MAX_SKIPPED_VERSIONS = 100


@dataclass
class _Outcomes:
    hits: deque
    total: int = 0


class ModelRegistry:
    """Versions, stages and metrics of every model; the store holds the truth."""

    def __init__(self, settings: Any, artefacts: ArtefactStore | None = None, announce: bool = True,
                 adopt: bool = True):
        # Settings travel pickled (secrets intact, in memory only). ``announce``: log what was read
        # (the actor does; a CLI that only reads a model keeps its stderr to its own lines).
        self.settings = settings
        self.artefacts = artefacts or ArtefactStore.from_settings(settings)
        self._index, self._tag = self._read_index()
        self._outcomes: dict[tuple[str, int], _Outcomes] = {}
        if adopt:
            self.adopt()
        n = sum(len(m["versions"]) for m in self._index["models"].values())
        log.log(logging.INFO if announce else logging.DEBUG, "registry: %d models, %d versions read from %s",
                len(self._index["models"]), n, self.artefacts.uri)

    # -- index ---------------------------------------------------------------------
    def _read_index(self) -> tuple[dict[str, Any], str | None]:
        raw, tag = self.artefacts.get_tagged(INDEX)
        if raw is None:
            return empty_index(), None
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
        return index, tag

    def _fresh(self) -> None:
        """Read the index again if anyone (another process, a CLI beside the system) has changed it."""
        if self.artefacts.tag(INDEX) != self._tag:
            self._index, self._tag = self._read_index()

    def _mutate(self, change: Callable[[dict[str, Any]], T]) -> T:
        """Apply ``change`` to the newest index and commit it by compare-and-swap.

        ``change`` edits its argument in place (raising to refuse) and returns the answer. The
        index is written only if nobody wrote since it was read (``ArtefactStore.put_if``); a
        writer that loses the race reads the winner's index, applies its change to that, and
        tries again, so no write ever replaces a newer generation. A change that edits nothing
        writes nothing.
        """
        for _ in range(COMMIT_TRIES):
            self._fresh()
            work = json.loads(json.dumps(self._index))  # a copy, and proof it serialises
            out = change(work)
            if work == self._index:
                return out
            work["generation"] = self._index["generation"] + 1
            work["retraining_requests"] = work.get("retraining_requests", [])[-100:]
            tag = self.artefacts.put_if(INDEX, json.dumps(work, indent=1, sort_keys=True).encode(), self._tag)
            if tag is not None:
                self._index, self._tag = work, tag
                return out
            time.sleep(random.uniform(0.0, 0.02))  # lost the race: the winner's index is read next
        raise RegistryError(f"the registry index {INDEX} changed under {COMMIT_TRIES} tries in a row; try again")

    def _model(self, name: str) -> dict[str, Any]:
        return _model_of(self._index, name)

    def _version(self, name: str, version: int | str | None = None, stage: str | None = None) -> dict[str, Any]:
        self._fresh()
        return _version_of(self._index, name, version, stage)

    # -- writes ----------------------------------------------------------------------
    def register(
        self,
        name: str,
        artefact: bytes,
        task: str,
        metadata: dict[str, Any] | None = None,
        kind: str = "onnx",
    ) -> dict[str, Any]:
        """Store a new version (a candidate) and return its record.

        Three writes, each whole: the artefact (created, never overwritten: a version whose
        directory is taken, by another writer or by a crash's leftover, is skipped), its record
        beside it (``record.json``, so a crash before the index commit is adopted at the next
        start), then the index by compare-and-swap.
        """
        if not NAME.match(name or ""):
            raise RegistryError(f"model name {name!r}: use letters, digits, '_', '-', '.' (at most 64)")
        if task not in TASKS:
            raise RegistryError(f"task {task!r}: must be one of {', '.join(TASKS)}")
        if not isinstance(artefact, (bytes, bytearray)) or not artefact:
            raise RegistryError("the artefact is empty")
        artefact = bytes(artefact)
        metadata = dict(metadata or {})
        if kind == "onnx":
            check_onnx(artefact)
        self._fresh()
        self._check_new_version(self._index, name, task, metadata)
        digest = sha256(artefact)
        version = 1 + max((int(v) for v in self._index["models"].get(name, {}).get("versions", {})), default=0)
        for _ in range(MAX_SKIPPED_VERSIONS):
            path = f"{MODELS_DIR}/{name}/v{version}/model.{kind}"
            if self.artefacts.put_if(path, artefact, None) is not None:
                break
            version += 1
        else:
            raise RegistryError(f"{name}: {MAX_SKIPPED_VERSIONS} version directories in a row are taken; "
                                "`raytrade models gc` lists leftovers")
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
        self.artefacts.put(leftovers.record_path(name, version), json.dumps(record, sort_keys=True).encode())
        out = self._mutate(lambda index: self._add_record(index, record))
        log.info("registered %s v%d (%s, %d bytes, sha256 %s)", name, version, task, len(artefact), digest[:12])
        return out

    @staticmethod
    def _check_new_version(index: dict[str, Any], name: str, task: str, metadata: dict[str, Any]) -> None:
        m = index["models"].get(name)
        if m is not None and m["task"] != task:
            raise RegistryError(f"{name} is a {m['task']} model; a new version cannot be a {task} model")
        parent = metadata.get("parent_version")
        if parent is not None and (m is None or str(int(parent)) not in m["versions"]):
            raise RegistryError(f"parent_version {parent} of {name} does not exist")

    def _add_record(self, index: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        name, key = record["name"], str(record["version"])
        self._check_new_version(index, name, record["task"], record["metadata"])
        entry = index["models"].setdefault(name, {"task": record["task"], "versions": {}, "production": None,
                                                  "history": []})
        have = entry["versions"].get(key)
        if have is not None:
            if have["sha256"] == record["sha256"] and have["created_at"] == record["created_at"]:
                return have  # adopted from its record.json while this writer was committing
            raise RegistryError(f"{name} v{key} is in the index but its directory was this writer's; "
                                "a writer that does not create artefacts once has written the index")
        entry["versions"][key] = dict(record)
        return dict(record)

    def promote(self, name: str, version: int) -> dict[str, Any]:
        """Make ``version`` production; the previous production is archived."""

        def change(index: dict[str, Any]) -> tuple[Any, int]:
            rec = _version_of(index, name, version)
            m = index["models"][name]
            prev = m.get("production")
            if prev != rec["version"]:
                if prev is not None:
                    m["versions"][str(prev)]["stage"] = "archived"
                rec["stage"], rec["flags"] = "production", []
                m["production"] = rec["version"]
                m["history"].append(rec["version"])
            return prev, rec["version"]

        prev, v = self._mutate(change)
        if prev != v:
            log.info("promoted %s v%d to production (was %s)", name, v, prev)
        return self._version(name, v)

    def rollback(self, name: str) -> dict[str, Any]:
        """Archive the production version and restore the one promoted before it."""

        def change(index: dict[str, Any]) -> tuple[int, int]:
            mi = _model_of(index, name)
            cur = mi.get("production")
            if cur is None:
                raise RegistryError(f"{name} has no production version to roll back")
            earlier = [v for v in mi["history"][:-1] if v != cur]
            if not earlier:
                raise RegistryError(f"{name} v{cur} has no earlier production version; nothing to roll back to")
            target = earlier[-1]
            mi["versions"][str(cur)]["stage"] = "archived"
            mi["versions"][str(target)]["stage"] = "production"
            mi["production"] = target
            # Drop the rolled-back version from the history, so a second rollback goes further back.
            while mi["history"] and mi["history"][-1] == cur:
                mi["history"].pop()
            if not mi["history"] or mi["history"][-1] != target:
                mi["history"].append(target)
            return cur, target

        cur, target = self._mutate(change)
        log.info("rolled back %s from v%d to v%d", name, cur, target)
        return self._version(name, target)

    def archive(self, name: str, version: int) -> dict[str, Any]:
        def change(index: dict[str, Any]) -> int:
            rec = _version_of(index, name, version)
            if rec["stage"] == "production":
                raise RegistryError(f"{name} v{version} is in production; promote another version or roll back first")
            rec["stage"] = "archived"
            return rec["version"]

        return self._version(name, self._mutate(change))

    # -- crash leftovers (core.models.leftovers) ------------------------------------------
    def adopt(self) -> list[dict[str, Any]]:
        """Versions a writer left between artefact and index commit, with their records: added."""
        return leftovers.adopt(self)

    def orphans(self) -> list[str]:
        """Files under ``models/`` that no version owns and no record can adopt."""
        return leftovers.orphans(self)

    def collect(self, paths: list[str]) -> list[str]:
        """Remove ``paths`` that are still orphans; the ones removed."""
        return leftovers.collect(self, paths)

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
        # The history first (compare-and-swap, like the index), then the index that summarises it.
        path = self._perf_path(name, rec["version"])
        entry = {"at": time.time(), "metrics": clean}
        for _ in range(COMMIT_TRIES):
            raw, tag = self.artefacts.get_tagged(path)
            history = (json.loads(raw) if raw is not None else []) + [entry]
            if self.artefacts.put_if(path, json.dumps(history[-MAX_HISTORY:]).encode(), tag) is not None:
                break
        else:
            raise RegistryError(f"{path} changed under {COMMIT_TRIES} tries in a row; try again")

        def change(index: dict[str, Any]) -> int:
            r = _version_of(index, name, rec["version"])
            r["metrics"].update(clean)
            return r["version"]

        return self._version(name, self._mutate(change))

    def performance(self, name: str, version: int) -> list[dict[str, Any]]:
        rec = self._version(name, version)
        return self._history(name, rec["version"])

    def best(self, task: str, metric: str, stages: tuple[str, ...] = ("candidate", "production")) -> dict[str, Any]:
        """The version of any model of ``task`` with the best latest ``metric``."""
        if metric not in METRICS:
            raise RegistryError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        self._fresh()
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

                def change(index: dict[str, Any]) -> bool:
                    r = _version_of(index, name, rec["version"])
                    if "degraded" in r["flags"]:
                        return False  # flagged by another writer meanwhile: one request, not two
                    r["flags"] = sorted(set(r["flags"]) | {"degraded"})
                    r["metrics"]["hit_rate"] = acc
                    index.setdefault("retraining_requests", []).append(request)
                    return True

                if self._mutate(change):
                    log.warning("%s v%d degraded: %s; retraining requested", name, rec["version"], request["reason"])
        return out

    def retraining_requests(self, clear: bool = False) -> list[dict[str, Any]]:
        def change(index: dict[str, Any]) -> list[dict[str, Any]]:
            out = list(index.get("retraining_requests", []))
            if clear:
                index["retraining_requests"] = []
            return out

        if clear:
            return self._mutate(change)
        self._fresh()
        return list(self._index.get("retraining_requests", []))

    # -- reads -------------------------------------------------------------------------
    def generation(self) -> int:
        self._fresh()
        return int(self._index["generation"])

    def get(self, name: str, version: int | None = None, stage: str | None = None) -> dict[str, Any]:
        return dict(self._version(name, version, stage))

    def list(self, name: str | None = None) -> list[dict[str, Any]]:
        self._fresh()
        models = [name] if name else sorted(self._index["models"])
        out = []
        for n in models:
            m = self._model(n)
            out.extend(m["versions"][v] for v in sorted(m["versions"], key=int))
        return out

    def production(self, tasks: list[str] | None = None) -> dict[str, Any]:
        """{"generation": g, "models": {name: record}} for every model with a production version."""
        self._fresh()
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


def _model_of(index: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        return index["models"][name]
    except KeyError:
        known = ", ".join(sorted(index["models"])) or "none"
        raise UnknownModel(f"no model named {name!r}; registered models: {known}") from None


def _version_of(index: dict[str, Any], name: str, version: int | str | None = None,
                stage: str | None = None) -> dict[str, Any]:
    """The record of ``name`` at ``version`` (or the production / newest ``stage`` one) in ``index``."""
    m = _model_of(index, name)
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
