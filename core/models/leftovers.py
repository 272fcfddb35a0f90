"""What a registry writer that stopped half-way leaves under ``models/``, and what becomes of it.

``core.models.registry.ModelRegistry.register`` writes three things, each whole:
the artefact, its ``record.json`` beside it, then the index. A writer killed
after the record but before the index left a version that ``adopt`` adds at
the next start (its artefact checked against the record's sha256 first); one
killed before the record left an *orphan*, which ``orphans`` lists and
``collect`` removes (``raytrade models gc``). Its version number is skipped,
never reused.

Not here: the index's commit path (``ModelRegistry._mutate``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from core.models.errors import RegistryError
from core.models.index import INDEX, MODELS_DIR

log = logging.getLogger("raytrade.registry")


def record_path(name: str, version: int) -> str:
    return f"{MODELS_DIR}/{name}/v{version}/record.json"


def adopt(reg: Any) -> list[dict[str, Any]]:
    """Versions whose artefact and record were written but whose index commit never happened
    (a writer killed in between): checked against their sha256 and added, as candidates."""
    indexed = {(n, k) for n, m in reg._index["models"].items() for k in m["versions"]}
    adopted = []
    for rel in reg.artefacts.list(MODELS_DIR):
        parts = rel.split("/")
        if len(parts) != 4 or parts[3] != "record.json" or not parts[2][1:].isdigit():
            continue
        if (parts[1], parts[2][1:]) in indexed:
            continue
        try:
            record = json.loads(reg.artefacts.get(rel))
            reg.artefacts.load_verified(record)
            out = reg._mutate(lambda index, r=record: reg._add_record(index, r))
        except (ValueError, KeyError, TypeError, RegistryError, FileNotFoundError) as e:
            log.warning("registry: %s is not adoptable (%s); `raytrade models gc` lists it", rel, e)
            continue
        log.warning("registry: adopted %s v%s, whose index commit never happened (a writer stopped "
                    "between artefact and index)", out["name"], out["version"])
        adopted.append(out)
    return adopted


def orphans(reg: Any) -> list[str]:
    """Files under ``models/`` that no index record owns and no record can adopt: leftovers of a
    writer that stopped before its record was written. ``collect`` removes them."""
    reg._fresh()
    indexed = {(n, k) for n, m in reg._index["models"].items() for k in m["versions"]}
    out = []
    for rel in reg.artefacts.list(MODELS_DIR):
        parts = rel.split("/")
        if rel == INDEX or len(parts) != 4 or not parts[2].startswith("v") or not parts[2][1:].isdigit():
            continue
        if (parts[1], parts[2][1:]) not in indexed:
            out.append(rel)
    return out


def collect(reg: Any, paths: list[str]) -> list[str]:
    """Remove ``paths`` that are still orphans (``orphans()``); the ones removed."""
    still = set(orphans(reg))
    gone = [p for p in paths if p in still]
    for p in gone:
        reg.artefacts.delete(p)
    if gone:
        log.warning("registry: removed %d orphaned file(s) under %s/", len(gone), MODELS_DIR)
    return gone
