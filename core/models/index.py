"""The registry's index: its format, and the checks that refuse a damaged one.

The index is one JSON object in the store, replaced whole on every write::

    models/index.json                       every model, version, stage and sha256
    models/<name>/v<version>/model.onnx     the artefact, written once, never changed
    models/<name>/v<version>/performance.json   tracked metrics and outcomes

``generation`` counts the writes; readers (the ensemble) follow it to know when
the production versions changed.

Metric conventions are ``core.metrics``'s: ``max_drawdown`` is a positive
fraction (lower is better), ``cvar`` a return at the lower tail (negative;
higher is better).

Not here: writing the index (``core.models.registry``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

MODELS_DIR = "models"
INDEX = f"{MODELS_DIR}/index.json"
INDEX_FORMAT = 1
STAGES = ("candidate", "production", "archived")
TASKS = ("forecasting", "classification", "policy", "regression")
# Metric -> whether larger is better (conventions of core.metrics).
METRICS: dict[str, bool] = {
    "sharpe": True,
    "max_drawdown": False,
    "cvar": True,
    "win_rate": True,
    "hit_rate": True,
    "latency_ms": False,
}
MAX_HISTORY = 1000
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def empty_index() -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "generation": 0, "models": {}}


def index_problem(index: Any) -> str | None:
    """What makes ``index`` not a registry index this build can use (the first thing found), or None.

    Checks everything the registry reads from it, so a hand-edited or damaged
    index is refused when it is opened, never met later as a KeyError.
    """

    if not isinstance(index, dict):
        return f"it is a JSON {type(index).__name__}, not an object"
    if not _is_int(index.get("format")) or index["format"] != INDEX_FORMAT:
        return f'"format" must be {INDEX_FORMAT}'
    if not _is_int(index.get("generation")) or index["generation"] < 0:
        return '"generation" must be a whole number >= 0'
    if not isinstance(index.get("models"), dict):
        return '"models" must be an object of model name -> model'
    requests = index.get("retraining_requests", [])
    if not isinstance(requests, list) or not all(isinstance(r, dict) for r in requests):
        return '"retraining_requests" must be a list of objects'
    for name, m in index["models"].items():
        at = f"models[{name!r}]"
        if not NAME.match(name):
            return f"{at}: not a valid model name"
        if not isinstance(m, dict):
            return f"{at} must be an object"
        if m.get("task") not in TASKS:
            return f'{at}["task"] must be one of {", ".join(TASKS)}'
        if not isinstance(m.get("versions"), dict):
            return f'{at}["versions"] must be an object of version -> record'
        if not isinstance(m.get("history"), list) or not all(_is_int(v) for v in m["history"]):
            return f'{at}["history"] must be a list of version numbers'
        prod = m.get("production")
        if prod is not None and (not _is_int(prod) or str(prod) not in m["versions"]):
            return f'{at}["production"] must be null or one of its versions'
        for key, r in m["versions"].items():
            vat = f'{at}["versions"][{key!r}]'
            if not key.isdigit():
                return f"{vat}: a version is a whole number"
            if not isinstance(r, dict):
                return f"{vat} must be an object"
            fields = _record_checks(name, key, m["task"])
            for k, ok in fields.items():
                if k not in r:
                    return f'{vat} has no "{k}"'
                if not ok(r[k]):
                    return f'{vat}["{k}"] = {json.dumps(r[k])[:80]} is not valid'
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return _is_int(x) or isinstance(x, float)


def _record_checks(name: str, key: str, task: str) -> dict[str, Callable[[Any], bool]]:
    """Each field of a version's record in the index, and the test its value must pass."""
    return {
        "name": lambda x: x == name,
        "version": lambda x: _is_int(x) and str(x) == key,
        "task": lambda x: x == task,
        "kind": lambda x: isinstance(x, str) and x != "",
        "path": lambda x: isinstance(x, str) and x.startswith(f"{MODELS_DIR}/{name}/") and ".." not in x.split("/"),
        "sha256": lambda x: isinstance(x, str) and re.fullmatch(r"[0-9a-f]{64}", x) is not None,
        "size": lambda x: _is_int(x) and x > 0,
        "stage": lambda x: x in STAGES,
        "created_at": _is_num,
        "metadata": lambda x: isinstance(x, dict),
        "metrics": lambda x: isinstance(x, dict) and all(_is_num(v) for v in x.values()),
        "flags": lambda x: isinstance(x, list) and all(isinstance(f, str) for f in x),
    }
