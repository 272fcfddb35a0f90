"""Fusing the members' target positions into one signal with a confidence.

For one row (one symbol's latest window) with member positions ``p_i`` in
[-1, 1] and weights ``w_i`` for the row's regime::

    answered   = members that returned a finite position in range (others failed)
    coverage   = sum(w_i, answered) / sum(w_i, all)            share of the weight that answered
    mean       = sum(w_i p_i, answered) / sum(w_i, answered)    the weighted average
    agreement  = 1 - sqrt(sum(w_i (p_i - mean)^2) / sum(w_i))   1 when all agree, 0 when split +1/-1
    tail       = min(1, max_tail_risk / predicted_cvar)         1 unless the predicted tail loss is large
    position   = mean * agreement * tail
    confidence = coverage * agreement * tail

A member that failed lowers ``coverage`` and so the confidence; when every
member failed, the signal is flat with confidence 0 and the reason names each
member's failure (the decision becomes HOLD).

Weights are ``base * regime multiplier * adaptive multiplier``: the base is
set per member, the regime multiplier per (regime, member) in settings, and
the adaptive multiplier learns from outcomes by multiplicative weights
(Littlestone and Warmuth's weighted majority, in its exponential form):
after each realised bar, ``m_i *= exp(-eta * loss_i)`` with
``loss_i = (1 - p_i * sign(r)) / 2`` in [0, 1], per regime.

The predicted tail risk is the one-bar CVaR at 95 % of a normal return with
the row's volatility, ``sigma * phi(z_0.95) / 0.05 = 2.063 sigma``: a parametric
estimate, because a live row has only its volatility feature to go on.

Not here: calling members, timeouts (``actors.ensemble``), order sizing (the
risk manager).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

from core.regime import UNKNOWN

# A float32 tanh can overshoot 1 by an ulp; more than this is a broken member.
RANGE_TOLERANCE = 1e-5


def normal_cvar(sigma: np.ndarray | float, alpha: float = 0.95) -> np.ndarray:
    """Expected loss beyond the ``alpha`` quantile of N(0, sigma^2), as a positive number."""
    z = NormalDist().inv_cdf(alpha)
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return np.asarray(sigma, dtype=np.float64) * pdf / (1.0 - alpha)


def outcome_loss(position: np.ndarray | float, realised_return: np.ndarray | float) -> np.ndarray:
    """Loss in [0, 1] of holding ``position`` over a bar that returned ``realised_return``."""
    p = np.clip(np.asarray(position, dtype=np.float64), -1.0, 1.0)
    return (1.0 - p * np.sign(np.asarray(realised_return, dtype=np.float64))) / 2.0


class MultiplicativeWeights:
    """Per-regime multipliers learnt from outcomes; the best member of a regime has 1.

    ``floor`` keeps a member that had a bad spell able to earn its weight back.
    """

    def __init__(self, eta: float = 0.05, floor: float = 0.05):
        if eta < 0 or not 0 < floor <= 1:
            raise ValueError("eta must be >= 0 and floor in (0, 1]")
        self.eta = eta
        self.floor = floor
        self._m: dict[str, dict[str, float]] = {}

    def multiplier(self, regime: str, member: str) -> float:
        return self._m.get(regime, {}).get(member, 1.0)

    def update(self, regime: str, losses: Mapping[str, float]) -> None:
        row = self._m.setdefault(regime, {})
        for name, loss in losses.items():
            if not np.isfinite(loss):
                continue
            row[name] = row.get(name, 1.0) * math.exp(-self.eta * float(np.clip(loss, 0.0, 1.0)))
        top = max(row.values(), default=1.0)
        for name in row:
            row[name] = max(self.floor, row[name] / top)

    def state(self) -> dict[str, dict[str, float]]:
        return {r: dict(m) for r, m in self._m.items()}

    def load(self, state: Mapping[str, Mapping[str, float]]) -> None:
        self._m = {r: {k: float(v) for k, v in m.items()} for r, m in state.items()}


@dataclass
class RegimeWeights:
    """Weight of each member in each regime: base x regime multiplier x adaptive multiplier."""

    base: dict[str, float] = field(default_factory=dict)
    regime_multipliers: dict[str, dict[str, float]] = field(default_factory=dict)
    adaptive: MultiplicativeWeights = field(default_factory=MultiplicativeWeights)

    def weight(self, regime: str, member: str) -> float:
        w = self.base.get(member, 1.0)
        if regime != UNKNOWN:
            w *= self.regime_multipliers.get(regime, {}).get(member, 1.0)
            w *= self.adaptive.multiplier(regime, member)
        return w

    def matrix(self, regimes: Sequence[str], members: Sequence[str]) -> np.ndarray:
        """Weights ``[B, M]`` for rows in ``regimes``."""
        cache: dict[str, list[float]] = {}
        out = np.empty((len(regimes), len(members)))
        for i, r in enumerate(regimes):
            if r not in cache:
                cache[r] = [self.weight(r, m) for m in members]
            out[i] = cache[r]
        return out


@dataclass(frozen=True)
class FusedSignal:
    position: float
    confidence: float
    regime: str
    coverage: float
    agreement: float
    tail_risk: float
    positions: dict[str, float]  # what each answering member said
    contributions: dict[str, float]  # w_i p_i / sum(w answered): they sum to the mean before shrinking
    weights: dict[str, float]  # the row's weights, normalised over all members
    failed: dict[str, str]  # member -> why it was left out
    reason: str | None = None  # set when the signal is flat because nothing could be fused

    @property
    def hold(self) -> bool:
        return self.reason is not None


def fuse(
    positions: np.ndarray,
    members: Sequence[str],
    regimes: Sequence[str],
    weights: RegimeWeights,
    tail_risk: np.ndarray | None = None,
    max_tail_risk: float = 0.02,
    failures: Sequence[Mapping[str, str]] | None = None,
) -> list[FusedSignal]:
    """Fuse ``positions [B, M]`` (NaN where a member failed) into one signal per row.

    ``failures[b]`` gives reasons for members already known to have failed
    on row ``b``; a NaN without a reason, or a value outside [-1, 1], is
    recorded as such.
    """
    P = np.array(positions, dtype=np.float64, copy=True)
    if P.ndim != 2 or P.shape[1] != len(members):
        raise ValueError(f"positions must be [rows, {len(members)}], got {P.shape}")
    B, M = P.shape
    reasons: list[dict[str, str]] = [dict(failures[b]) if failures else {} for b in range(B)]
    with np.errstate(invalid="ignore"):
        out_of_range = np.isfinite(P) & (np.abs(P) > 1.0 + RANGE_TOLERANCE)
    for b, j in zip(*np.nonzero(out_of_range)):
        reasons[b].setdefault(members[j], f"returned {P[b, j]:.6g}, outside [-1, 1]")
    for b, j in zip(*np.nonzero(~np.isfinite(P))):
        reasons[b].setdefault(members[j], f"returned {P[b, j]}")
    column = {m: j for j, m in enumerate(members)}
    for b in range(B):
        for name in reasons[b]:
            P[b, column[name]] = np.nan
    P = np.clip(P, -1.0, 1.0)
    ok = np.isfinite(P)
    W = weights.matrix(regimes, members)
    W_ok = np.where(ok, W, 0.0)
    P0 = np.where(ok, P, 0.0)
    total = W.sum(axis=1)
    answered = W_ok.sum(axis=1)
    tail = np.full(B, np.nan) if tail_risk is None else np.asarray(tail_risk, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = np.where(total > 0, answered / total, 0.0)
        mean = np.where(answered > 0, (W_ok * P0).sum(axis=1) / answered, 0.0)
        var = np.where(answered > 0, (W_ok * (P0 - mean[:, None]) ** 2).sum(axis=1) / answered, 1.0)
        tail_factor = np.where(np.isfinite(tail) & (tail > max_tail_risk), max_tail_risk / tail, 1.0)
    agreement = np.clip(1.0 - np.sqrt(var), 0.0, 1.0)
    position = np.clip(mean * agreement * tail_factor, -1.0, 1.0)
    confidence = np.clip(coverage * agreement * tail_factor, 0.0, 1.0)

    # Python lists from here on: the per-row loop is the batch's per-request cost.
    P_l, ok_l, Wok_l, P0_l = P.tolist(), ok.tolist(), W_ok.tolist(), P0.tolist()
    answered_l = answered.tolist()
    position_l, confidence_l, coverage_l = position.tolist(), confidence.tolist(), coverage.tolist()
    agreement_l, tail_l = agreement.tolist(), tail.tolist()
    # Normalised weights depend on the regime only: one dict per regime in the batch.
    norms: dict[str, dict[str, float]] = {}
    for b, r in enumerate(regimes):
        if r not in norms:
            tot = float(total[b])
            norms[r] = {members[j]: float(W[b, j]) / tot if tot > 0 else 0.0 for j in range(M)}
    out = []
    for b in range(B):
        okb = ok_l[b]
        got = {members[j]: P_l[b][j] for j in range(M) if okb[j]}
        reason = None
        if not got:
            if M == 0:
                reason = "no members are configured"
            elif answered_l[b] == 0 and not reasons[b]:
                reason = "every member has weight 0 in regime " + str(regimes[b])
            else:
                reason = "every member failed: " + "; ".join(f"{k}: {v}" for k, v in sorted(reasons[b].items()))
        elif answered_l[b] == 0:
            reason = f"every answering member has weight 0 in regime {regimes[b]}"
        flat = reason is not None
        ans = answered_l[b]
        contrib = {} if flat else {members[j]: Wok_l[b][j] * P0_l[b][j] / ans for j in range(M) if okb[j]}
        out.append(
            FusedSignal(
                position=0.0 if flat else position_l[b],
                confidence=0.0 if flat else confidence_l[b],
                regime=str(regimes[b]),
                coverage=coverage_l[b],
                agreement=0.0 if flat else agreement_l[b],
                tail_risk=tail_l[b],
                positions=got,
                contributions=contrib,
                weights=dict(norms[regimes[b]]),
                failed=reasons[b],
                reason=reason,
            )
        )
    return out
