"""The member judged out of sample: its ONNX bytes run on each symbol's held-out bars.

The member's target for held-out bar ``t`` goes to ``core.engine.backtest`` with the
training costs, filling at the next bar's open by default (``learner.eval_fill``: a
decision made from bar t's close cannot trade at that close live) and fractional
units. The evaluation runs exactly the bytes registered through ONNX Runtime, so the
metrics registered are those of the model registered, not of a cousin of it.

Per symbol: mean per-bar return, Sharpe, CVaR at the run's alpha (the engine's
per-bar CVaR), max drawdown, total return, and the CVaR of consecutive held-out
episodes' log returns. Across symbols, conservatively: mean of means, mean Sharpe,
the worst CVaR and the worst drawdown.

Not here: the held-out split (``core.rl.data``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from core.engine import backtest
from core.metrics import cvar as cvar_of
from core.rl.data import SymbolData

EVAL_CASH = 10_000.0


def member_positions(onnx_bytes: bytes, windows: np.ndarray) -> np.ndarray:
    """Run a member ONNX on ``[B, W, F]`` windows with ONNX Runtime (CPU); positions ``[B]``."""
    import onnxruntime as ort  # here, as in core.rl.export: a second's import only this needs

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["position"], {"features": np.ascontiguousarray(windows, np.float32)})[0],
                      dtype=np.float64)


def evaluate(onnx_bytes: bytes, data: list[SymbolData], ls: Any, alpha: float) -> dict[str, Any]:
    """Backtest the member on every symbol's held-out bars with core's engine (see the module
    docstring). Returns ``{"symbols": {sym: metrics}, "aggregate": metrics, "alpha": alpha}``;
    each symbol's entry also holds its ``targets`` as a list."""
    per: dict[str, dict[str, Any]] = {}
    for d in data:
        targets = member_positions(onnx_bytes, d.heldout_windows(ls.window))
        bars = d.heldout_bars
        res = backtest(bars, targets, cash=EVAL_CASH, commission=ls.commission, slippage=ls.slippage,
                       fill=ls.eval_fill, whole_units=False, periods_per_year=ls.periods_per_year, alpha=alpha)
        # Consecutive held-out episodes of the training length, as the objective saw them.
        L = ls.episode_length
        equity = np.concatenate(([EVAL_CASH], res.equity))
        ends = np.arange(0, len(equity), L)
        ep = np.log(equity[ends[1:]] / equity[ends[:-1]]) if len(ends) > 1 else np.empty(0)
        sharpe = float(res.metrics["sharpe"])
        if not math.isfinite(sharpe) and not np.any(res.returns):
            sharpe = 0.0  # never in the market and nothing paid: a Sharpe of 0, not 0/0
        per[d.symbol] = {
            "bars": len(bars),
            "first": str(bars["ts"].iloc[0]),
            "last": str(bars["ts"].iloc[-1]),
            "mean": float(np.mean(res.returns)),
            "sharpe": sharpe,
            "cvar": float(res.metrics["cvar"]),
            "max_drawdown": float(res.metrics["max_drawdown"]),
            "total_return": float(res.metrics["total_return"]),
            "exposure": float(np.mean(np.abs(targets))),
            "n_trades": int(res.metrics["n_trades"]),
            "episodes": int(len(ep)),
            "episode_cvar": float(cvar_of(ep, alpha)) if len(ep) else math.nan,
            "targets": targets.tolist(),
        }
    vals = list(per.values())
    aggregate = {
        "mean": float(np.mean([v["mean"] for v in vals])),
        "sharpe": float(np.mean([v["sharpe"] for v in vals])),
        "cvar": float(np.min([v["cvar"] for v in vals])),
        "max_drawdown": float(np.max([v["max_drawdown"] for v in vals])),
        "total_return": float(np.mean([v["total_return"] for v in vals])),
        "exposure": float(np.mean([v["exposure"] for v in vals])),
    }
    return {"alpha": alpha, "fill": ls.eval_fill, "symbols": per, "aggregate": aggregate}
