"""Requests to the ensemble read into a batch of feature windows, and its answers shaped.

A request is one symbol's latest window::

    {"symbol": "SPY",
     "bars": {"open": [...], "high": [...], "low": [...], "close": [...], "volume": [...], "ts": [...]},
     "features": [[...], ...]}     # optional: core.features rows; computed from bars if absent

A request that cannot be read is not refused: its row carries the error and a NaN
window, so every member skips it and its answer is HOLD with the reason.

Not here: calling members or fusing their positions (``core.ensemble``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from core.features import FEATURE_NAMES, WARMUP, compute_features, latest_features
from core.fusion import FusedSignal
from core.members import MemberBatch


class RequestError(ValueError):
    """A request the ensemble cannot read; the message says what to fix."""


def prepare(requests: Sequence[Mapping[str, Any]], L: int) -> tuple[MemberBatch, list[str | None], list[dict]]:
    """The batch of ``L``-row feature windows for ``requests``, each row's error (None when it has
    none; its window is then NaN) and each row's meta (symbol, last bar's ts and close, seq)."""
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
            bars = read_bars(req.get("bars"))
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
        _features_from_bars(from_bars, bars_out, feats, row_errors, L)
    finite = np.isfinite(feats).all(axis=(1, 2)).tolist()  # one check for the whole batch
    for i, ok in enumerate(finite):
        if not ok and row_errors[i] is None:
            row_errors[i] = f"need {L} finite feature rows (at least {WARMUP + L} bars); the last {L} are not all finite"
    batch = MemberBatch(feats, tuple(bars_out), tuple(m["symbol"] for m in metas))
    return batch, row_errors, metas


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


def read_bars(raw: Any) -> dict[str, np.ndarray] | None:
    """A request's bars as float64 arrays (ts as int64), or None when it gave none."""
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


def answer(sig: FusedSignal, meta: dict, versions: dict[str, str], row_error: str | None, generation: int) -> dict[str, Any]:
    """The answer to one request: its meta, the fused signal, each member's part, what failed and why."""
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
