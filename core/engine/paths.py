"""Monte Carlo price paths through the engine: ``simulate_paths`` (compiled) and ``simulate_paths_torch``.

``simulate_paths`` is ``run_batch`` with a path's defaults (fills at the
close without open prices, fractional units, outcomes only).
``simulate_paths_torch`` states the same fill rules in torch, vectorised over
N paths, for large batches on a GPU; it is tested equal to the compiled loop.

Not here: the fill rules (``kernels``), where paths come from
(``tune.monte_carlo``, ``core.synthetic``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from core.engine.batch import BatchResult, run_batch
from core.engine.kernels import _FULL

def simulate_paths(
    close: np.ndarray,
    targets: np.ndarray | Callable[[np.ndarray], np.ndarray],
    *,
    open_: np.ndarray | None = None,
    fill: str | None = None,
    whole_units: bool = False,
    **kwargs,
) -> BatchResult:
    """Monte Carlo: run targets over N price paths ``[N, T]`` with the compiled loop.

    ``targets`` is ``[N, T]`` or a rule mapping the close paths to it (e.g.
    ``lambda c: sma_crossover({"close": ...})``). Without ``open_`` paths,
    orders fill at the close. Units are fractional by default: a simulated
    path has no lot size. No trade list is kept unless ``record_trades=True``.
    """
    close = np.asarray(close, dtype=np.float64)
    if callable(targets):
        targets = targets(close)
    fill = fill or ("close" if open_ is None else "open")
    open_ = close if open_ is None else open_
    kwargs.setdefault("compute_metrics", False)
    kwargs.setdefault("record_trades", False)
    return run_batch(open_, close, targets, fill=fill, whole_units=whole_units, **kwargs)


def simulate_paths_torch(
    close,
    targets,
    *,
    open_=None,
    fill: str | None = None,
    cash: float = 10_000.0,
    commission: float = 0.0,
    slippage: float = 0.0,
    whole_units: bool = False,
    device: str | None = None,
    dtype=None,
):
    """Monte Carlo in torch: the same rules as the compiled loop, vectorised over N paths.

    ``close`` (and ``open_``) are ``[N, T]`` tensors or arrays; ``targets`` is
    ``[N, T]`` or a callable mapping the close tensor to it. ``device``
    defaults to CUDA when available. Returns ``(equity [N, T], units [N, T])``
    as tensors on ``device``. There is no trade list: this path is for
    distributions of outcomes over many paths, not for auditing fills.
    """
    import torch  # here, not at the top: torch takes seconds to import and only this function needs it

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or torch.float64
    close = torch.as_tensor(close, dtype=dtype, device=device)
    if callable(targets):
        targets = targets(close)
    targets = torch.as_tensor(targets, dtype=dtype, device=device)
    fill = fill or ("close" if open_ is None else "open")
    if fill not in ("open", "close"):
        raise ValueError(f"fill must be 'open' or 'close', got {fill!r}")
    open_t = close if open_ is None else torch.as_tensor(open_, dtype=dtype, device=device)
    if targets.shape != close.shape or open_t.shape != close.shape:
        raise ValueError("close, open_ and targets must all be [N, T]")
    if not bool(torch.isfinite(targets).all()) or bool((targets.abs() > 1).any()):
        raise ValueError("target positions must be finite and lie in [-1, 1]")
    N, T = close.shape
    cash_t = torch.full((N,), float(cash), dtype=dtype, device=device)
    units = torch.zeros(N, dtype=dtype, device=device)
    acted = torch.zeros(N, dtype=dtype, device=device)
    alive = torch.ones(N, dtype=torch.bool, device=device)
    equity_out = torch.empty((N, T), dtype=dtype, device=device)
    units_out = torch.empty((N, T), dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)

    def trade(delta, price, mask):
        delta = torch.where(mask, delta, zero)
        fill_price = torch.where(delta > 0, price * (1 + slippage), price * (1 - slippage))
        return cash_t - delta * fill_price - delta.abs() * fill_price * commission, units + delta

    for t in range(T):
        if fill == "close":
            target, price = targets[:, t], close[:, t]
            pending = (target != acted) & alive
        else:
            if t == 0:
                target, price = acted, open_t[:, 0]
                pending = torch.zeros(N, dtype=torch.bool, device=device)
            else:
                target, price = targets[:, t - 1], open_t[:, t]
                pending = (target != acted) & alive
        flip = pending & (units != 0) & ((target == 0) | ((target > 0) != (units > 0)))
        cash_t, units = trade(-units, price, flip)
        opening = pending & (target != 0)
        equity = cash_t + units * price
        direction = torch.where(target > 0, 1.0, -1.0).to(dtype)
        budget = equity * target.abs() * _FULL
        size_add = budget / (price * (1 + direction * slippage) * (1 + commission))
        size_cut = budget / (price * (1 - direction * slippage) * (1 + commission))
        if whole_units:
            size_add, size_cut = size_add.floor(), size_cut.floor()
        held = units.abs()
        goal = torch.where(held < size_add, direction * size_add, torch.where(held > size_cut, direction * size_cut, units))
        cash_t, units = trade(goal - units, price, opening & (equity > 0))
        acted = torch.where(pending, target, acted)
        equity = cash_t + units * close[:, t]
        broke = alive & (equity <= 0)
        cash_t, units = trade(-units, close[:, t], broke)
        cash_t = torch.where(broke, zero, cash_t)
        alive = alive & ~broke
        equity = torch.where(alive, cash_t + units * close[:, t], zero)
        equity_out[:, t] = equity
        units_out[:, t] = units
    return equity_out, units_out
