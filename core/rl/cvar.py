"""Empirical value at risk and conditional value at risk of a batch of returns, in torch.

For: the CVaR-PPO learner (``core.rl.cvar_ppo``), which needs the tail quantile
``nu`` and ``CVaR_alpha`` of a batch of episode returns on whatever device the
rollout ran on. Not for: portfolio risk reports on P&L series (that is the
metrics module's job), nor weighted or streaming estimates.

Conventions. ``R`` is a return: larger is better, and the risk is in the lower
tail. For a level ``alpha`` in (0, 1],

    VaR_alpha(R)  = nu = F^{-1}(alpha) = inf{x : P(R <= x) >= alpha}
    CVaR_alpha(R) = (1/alpha) * integral_0^alpha F^{-1}(u) du

i.e. the mean of the worst ``alpha`` fraction of outcomes. At ``alpha = 1`` it is
the mean.

Why not "the mean of the returns at or below VaR"? When the quantile sits on an
atom (ties in a sample, or a discrete distribution), ``P(R <= nu)`` is larger
than ``alpha`` and that mean puts too much weight on ``nu``. Example: +2 w.p.
0.95 and -20 w.p. 0.05. At ``alpha = 0.1``, ``nu = 2`` and the naive mean of
``R <= 2`` is the whole mean, 0.9, while the worst 10% is half -20 and half
+2: CVaR = -9.

Derivation of the formula used. Split the integral at the atom. The quantile
function equals ``F^{-1}(u) < nu`` exactly for ``u < P(R < nu)`` (where it
integrates to ``E[R 1{R < nu}]``) and equals ``nu`` for
``u in [P(R < nu), alpha]``; and ``P(R < nu) <= alpha`` by the definition of nu.
So

    CVaR_alpha = (1/alpha) * ( E[R 1{R < nu}] + nu * (alpha - P(R < nu)) )
               = (1/alpha) * E[R 1{R < nu}] + nu * (1 - P(R < nu) / alpha).

The atom at ``nu`` is given exactly the probability mass that is left to fill
``alpha`` (the fractional boundary weight). It is the same number as the
Rockafellar-Uryasev form ``max_nu  nu - (1/alpha) E[(nu - R)^+]``, whose
maximiser is the same ``nu``; the CVaR-PPO gradient is built on that form.

For a sample of ``n`` equally weighted returns, ``E`` and ``P`` are sample
averages; with the sorted sample ``r_(1) <= ... <= r_(n)`` and ``k =
floor(n alpha)`` this is ``(sum_{i<=k} r_(i) + (n alpha - k) r_(k+1)) / (n
alpha)``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["empirical_var", "empirical_cvar"]


def _check(returns: torch.Tensor, alpha: float) -> None:
    if returns.ndim != 1 or returns.numel() == 0:
        raise ValueError(f"returns must be a non-empty 1-D tensor, got shape {tuple(returns.shape)}")
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")


def empirical_var(returns: torch.Tensor, alpha: float) -> torch.Tensor:
    """nu = VaR_alpha: the sample's lower alpha-quantile, ``inf{x : F_n(x) >= alpha}``.

    That is the order statistic ``r_(ceil(n alpha))``. Returned as a 0-d tensor on
    ``returns``' device (no host sync).
    """
    _check(returns, alpha)
    n = returns.numel()
    # ceil(n*alpha) in exact-ish arithmetic: n*alpha = 5.000000001 must not become 6.
    k = max(1, math.ceil(round(n * alpha, 9)))
    return torch.kthvalue(returns, min(k, n)).values


def empirical_cvar(returns: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CVaR_alpha, nu) of an equally weighted sample of returns.

    ``CVaR_alpha = (1/alpha) mean(R 1{R < nu}) + nu (1 - mean(1{R < nu}) / alpha)``,
    derived in the module docstring; exact on ties. Both are 0-d tensors on
    ``returns``' device, computed in float64 when the input is float64 and in the
    input's dtype otherwise.
    """
    nu = empirical_var(returns, alpha)
    below = returns < nu
    n = returns.numel()
    tail_sum = torch.where(below, returns, torch.zeros_like(returns)).sum() / n
    p_below = below.sum().to(returns.dtype) / n
    cvar = tail_sum / alpha + nu * (1.0 - p_below / alpha)
    return cvar, nu
