"""Registered models as strategies: ``model:NAME@VERSION`` in walk-forward, Monte Carlo and ``raytrade backtest``.

A learned member in the model registry (an ONNX file under the ensemble's
member contract: feature windows ``[B, W, F]`` in, positions ``[B]`` in
[-1, 1] out; the CVaR-PPO learner's member export is one) becomes a
:class:`core.strategies.Strategy`. Its target for bar ``t`` is the
member's position on the window of ``core.features`` rows ending at ``t``,
the window the ensemble gives it live, so target ``t`` reads bars ``<= t``
only. Bars whose window reaches into the features' warm-up, and rows the
member answers with NaN, get target 0 (flat).

Two knobs make the default grid, one value each, so a walk-forward checks
the model out of sample as it is:

- ``scale``: the position is multiplied by it, then clipped to [-1, 1];
- ``threshold``: a position whose size is below it is flat (a confidence gate).

Give several values (``--params scale=0.5,1 threshold=0,0.2``) and
walk-forward chooses among them in sample, fold by fold.

Names: ``model:NAME@3`` is version 3; ``model:NAME@production`` or
``model:NAME@candidate`` the production or the newest candidate version;
``model:NAME`` the production version, or the newest when none is in
production (the registry's own default). The artefact is read through
``core.models.registry.ModelRegistry`` straight from the store, its sha256
checked, once per resolve; what Tune's trials receive is the bytes, and
each process opens its own ONNX Runtime session on the CPU on first use.

Not here: the registry (``core.models.registry``), serving members live
(``actors.ensemble``), training (``actors.learner``).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable

import numpy as np
import pandas as pd

from core.features import FEATURE_NAMES, compute_features, price_arrays
from core.models.cache import DeviceConfig, OnnxModel
from core.models.registry import ModelRegistry
from core.strategies import Strategy, model_strategy

PREFIX = "model:"
DEFAULT_GRID = {"scale": [1.0], "threshold": [0.0]}
_SPEC = re.compile(r"^model:([A-Za-z0-9][A-Za-z0-9_.-]{0,63})(?:@([A-Za-z0-9]+))?$")
_ROWS_PER_RUN = 4096  # windows per ONNX Runtime call: bounds the [rows, W, F] copy


def parse_model_spec(spec: str) -> tuple[str, int | None, str | None]:
    """``"model:NAME@VERSION"`` -> (name, version or None, stage or None)."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"strategy {spec!r}: write model:NAME@VERSION (a number, production or candidate), "
                         "e.g. model:cvar-ppo@3")
    name, at = m.group(1), m.group(2)
    if at is None:
        return name, None, None
    if at.isdigit():
        return name, int(at), None
    if at in ("production", "candidate"):
        return name, None, at
    raise ValueError(f"strategy {spec!r}: the version must be a number, production or candidate, not {at!r}")


class RegisteredMember:
    """One registry version's member, runnable over a whole bar history; pickles as its bytes."""

    def __init__(self, name: str, version: int, data: bytes):
        self.name, self.version, self.data = name, int(version), data
        self._model: Any = None
        self._cache: tuple[bytes, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"], state["_cache"] = None, None  # an ONNX Runtime session does not travel
        return state

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = OnnxModel(self.name, self.version, self.data, DeviceConfig(), len(FEATURE_NAMES))
        return self._model

    def positions(self, bars: Any) -> np.ndarray:
        """The member's position after each bar, ``[T]``: 0 where its window is not yet full of features.

        Cached on the bars' prices, which are all the features read: the P
        parameter sets of one table cost one feature pass and one inference.
        """
        digest = hashlib.blake2b(digest_size=16)
        for column in price_arrays(bars).values():
            digest.update(np.ascontiguousarray(column).tobytes())
        key = digest.digest()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        feats = compute_features(bars)
        T, window = feats.shape[0], self.model.window
        out = np.zeros(T)
        finite = np.flatnonzero(np.isfinite(feats).all(axis=1))
        first = (int(finite[0]) if finite.size else T) + window - 1  # first bar with a whole window
        if first < T:
            # [T - W + 1, F, W] views; window i covers rows i .. i + W - 1 and decides bar i + W - 1.
            views = np.lib.stride_tricks.sliding_window_view(feats, window, axis=0)
            for lo in range(first - window + 1, T - window + 1, _ROWS_PER_RUN):
                chunk = views[lo:lo + _ROWS_PER_RUN].transpose(0, 2, 1)
                out[lo + window - 1:lo + window - 1 + chunk.shape[0]] = self.model.run(chunk)
        out = np.nan_to_num(out, nan=0.0)
        self._cache = (key, out)
        return out

    def targets(self, bars: Any, scale: float = 1.0, threshold: float = 0.0) -> np.ndarray:
        """``clip(scale * position, -1, 1)``, flat where ``|position| < threshold``."""
        p = self.positions(bars)
        return np.where(np.abs(p) < threshold, 0.0, np.clip(scale * p, -1.0, 1.0))


def registry_strategy(spec: str, registry: Any) -> Strategy:
    """The strategy for ``model:NAME@VERSION`` from ``registry`` (a ``core.models.registry.ModelRegistry``).

    Refuses, with a message that says what to fix, a name or version the
    registry does not hold, and an artefact that is not a member (wrong
    input shape or feature count): the model is opened here, once, so a bad
    one fails before any trial starts.
    """
    name, version, stage = parse_model_spec(spec)
    record = registry.get(name, version, stage)
    label = f"{PREFIX}{name}@{record['version']}"
    if record.get("kind", "onnx") != "onnx":
        raise ValueError(f"{label} is a {record['kind']} artefact; only ONNX members can be backtested")
    member = RegisteredMember(name, record["version"], registry.load(name, record["version"]))
    try:  # open it now: a broken contract is the user's error, not a trial's
        member.model  # noqa: B018
    except ValueError:
        raise  # BadModelContract: its message says what the member lacks
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own kinds
        raise ValueError(f"{label}: ONNX Runtime cannot open it ({str(e).splitlines()[0][:200]})") from None
    return model_strategy(label, member.targets, grid=DEFAULT_GRID,
                          description=f"registered {record['task']} model {name} v{record['version']} "
                                      f"({record['stage']})",
                          trained_on=training_ranges(record.get("metadata", {})))


def training_ranges(metadata: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """symbol -> (first, last) bar time a model was fitted on, from its registry metadata.

    Two spellings exist: the baselines' list of ``{symbol, first, last}`` and
    the learner's ``{symbol: {first, last}}`` (its held-out bars are apart,
    under ``heldout_data``, and are not training data).
    """
    data = metadata.get("training_data") or {}
    rows = data if isinstance(data, list) else [{"symbol": k, **v} for k, v in data.items() if isinstance(v, dict)]
    out = {}
    for row in rows:
        if isinstance(row, dict) and {"symbol", "first", "last"} <= set(row):
            out[str(row["symbol"]).upper()] = (str(row["first"]), str(row["last"]))
    return out


def in_sample_warning(strategy: Strategy, symbol: str, bars: Any) -> str | None:
    """A sentence when some of ``bars`` are ones ``strategy``'s model was trained on; None otherwise.

    Results over a model's own training bars are not a test of it: the
    backtest runs, and says so.
    """
    span = strategy.trained_on.get(symbol.upper())
    if span is None or "ts" not in getattr(bars, "columns", ()):
        return None
    ts = pd.to_datetime(bars["ts"], utc=True)
    try:
        first, last = (pd.Timestamp(x) for x in span)
    except (ValueError, TypeError):
        return None  # metadata written by hand with a date nobody can read: nothing to compare
    first = first.tz_localize("UTC") if first.tzinfo is None else first
    last = last.tz_localize("UTC") if last.tzinfo is None else last
    n = int(((ts >= first) & (ts <= last)).sum())
    if n == 0:
        return None
    return (f"{n} of {len(bars)} bars of {symbol} fall in {strategy.name}'s training data ({span[0]} to {span[1]}): "
            "results over them are in-sample, not a test of the model")


def connect_registry(settings: Any) -> Callable[[str], Strategy]:
    """A resolver for ``model:`` strategy names over the registry in the store of ``settings``:
    pass it to ``core.strategies.get_strategy``, ``walk_forward`` or ``monte_carlo`` as ``resolver``.
    Nothing is installed anywhere; each call opens the registry afresh."""

    def resolve(spec: str) -> Strategy:
        return registry_strategy(spec, ModelRegistry(settings, announce=False))

    return resolve
