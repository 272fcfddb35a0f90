"""The decision rule: a signal and a position -> BUY, SELL or HOLD. No Ray.

For one symbol, with the ensemble's fused signal (``position`` p in [-1, 1],
``confidence`` c and its ``hold`` flag, ``core.fusion``) and, while one is
fresh, an outside signal (p_ext, c_ext) weighed by ``serve.external_weight``
w; positions in target units (1 = the symbol's position limit, long)::

    target     = clip((1 - w) p + w p_ext, -1, 1)     clip(p, -1, 1) without an outside signal
    confidence = (1 - w) c + w c_ext                   c without one
    delta      = target - current                      current: the account's book in the symbol
    action     = HOLD  if the signal says hold, or |delta| < MIN_POSITION_CHANGE
                 BUY   if delta > 0
                 SELL  otherwise

``blend`` gives (target, confidence), ``action_for`` the action. A HOLD
sends no order; its verdict (``hold_verdict``) is a refusal whose reason is
the signal's own, else that the target is within ``MIN_POSITION_CHANGE`` of
the position. When the ensemble cannot answer, the decision is made on
``unavailable_signal``: flat, confidence 0, hold, with the reason, so it is
a HOLD that says why. Likewise when the last bar is older than
``stale_limit_s`` (``serve.max_bar_age`` bar intervals): ``stale_signal``, a
HOLD whose reason gives the bar's age, so no order is ever made on stale data.

The live endpoint (``serve.decide``) applies this rule to every decision;
the benchmark's plain peer endpoint (``bench/bench_serve.py``) reads
``MIN_POSITION_CHANGE`` from here for its copy of it (a flat account). The
backtest engine (``core.engine``) takes targets, not actions: it trades
every change of target, with no minimum change.

Not here: fusing the members' positions into the signal (``core.fusion``),
where the position and the outside signal come from (``serve.decide``),
sizing and judging the order an action becomes (``core.risk``).
"""

from __future__ import annotations

from typing import Any

# A target this close to the current position is not worth an order.
MIN_POSITION_CHANGE = 0.05
ACTIONS = ("BUY", "SELL", "HOLD")


def blend(signal: dict[str, Any], external: dict[str, Any] | None = None,
          external_weight: float = 0.0) -> tuple[float, float]:
    """(target, confidence) from the ensemble's ``signal`` and, when given, an ``external`` one.

    ``external`` holds ``position`` and ``confidence``; it gets ``external_weight``
    of the say and the ensemble the rest. The target is clipped to [-1, 1].
    """
    internal = float(signal.get("position") or 0.0)
    confidence = float(signal.get("confidence") or 0.0)
    target = internal
    if external is not None:
        w_ext = external_weight
        target = (1 - w_ext) * internal + w_ext * external["position"]
        confidence = (1 - w_ext) * confidence + w_ext * external["confidence"]
    return max(-1.0, min(1.0, target)), confidence


def action_for(target: float, current: float, hold: bool = False) -> str:
    """BUY or SELL toward ``target`` from ``current``; HOLD if ``hold`` or the change is under ``MIN_POSITION_CHANGE``."""
    delta = target - current
    if hold or abs(delta) < MIN_POSITION_CHANGE:
        return "HOLD"
    return "BUY" if delta > 0 else "SELL"


def hold_verdict(reason: str | None, target: float, current: float) -> dict[str, Any]:
    """A HOLD's risk verdict: nothing approved, nothing sized, and why (``reason``, the signal's, first)."""
    why = reason or f"target {target:+.2f} is within {MIN_POSITION_CHANGE} of the current position {current:+.2f}"
    return {"approved": False, "quantity": 0.0, "reasons": [why], "checks": {}}


def stale_limit_s(max_bar_age: float, bar_interval_s: float, min_stale_s: float) -> float:
    """Seconds after which the last bar is stale: ``max_bar_age`` bar intervals, never under ``min_stale_s``."""
    return max(min_stale_s, max_bar_age * bar_interval_s)


def stale_signal(age_s: float) -> dict[str, Any]:
    """The signal to decide on when the last bar is stale: flat, confidence 0, hold, with its age."""
    return {"position": 0.0, "confidence": 0.0, "hold": True, "reason": f"stale data: last bar {age_s:.1f} s ago",
            "members": {}, "failed": {}, "model_versions": {}}


def unavailable_signal(error: BaseException) -> dict[str, Any]:
    """The signal to decide on when the ensemble could not be asked: flat, confidence 0, hold."""
    return {"position": 0.0, "confidence": 0.0, "hold": True,
            "reason": f"ensemble unavailable ({error.__class__.__name__})", "members": {}, "failed": {},
            "model_versions": {}}
