"""Monte Carlo robustness of one strategy as a Ray Tune experiment.

::

    from tune.monte_carlo import monte_carlo
    mc = monte_carlo(bars, "sma_crossover", {"fast": 10, "slow": 50}, n_paths=2000)
    mc.table()                 # percentiles of terminal wealth, Sharpe, max drawdown, CVaR per method
    mc.methods["blocks"].prob_ruin

The strategy is backtested once on the real bars; then three methods ask how
much of that result was luck:

- ``"trades"``: bootstrap of the closed trades' returns (each trade's P&L
  over the equity before it), drawn with replacement, as many trades per path
  as the backtest made. Order is forgotten, so streaks are reshuffled.
- ``"blocks"``: moving-block bootstrap of the strategy's per-bar returns:
  blocks of ``block`` consecutive bars, drawn with replacement, so volatility
  clusters and autocorrelation inside a block survive.
- ``"synthetic"``: new price paths on which the strategy is *run again*:
  ``generator="regimes"`` takes ``core.synthetic``'s regime-switching market
  (one seed per path, started at the bars' first close), ``"gbm"`` a
  geometric Brownian motion with the bars' drift and volatility (or
  ``mu``/``sigma`` given). This is the only method that tests the rule
  itself rather than its realised returns.

Every method resamples *returns* and compounds them, never absolute P&L, so
equity stays positive and no drawdown passes 100%; a trade return below -1
(a short that lost more than the account) is floored at -1: ruin.

Per path: terminal wealth (a multiple of the starting cash), total return,
Sharpe (annualised; for trades, by trades per year), max drawdown, CVaR of
the path's returns at ``alpha``, and whether it was ruined. Per method: the
distributions, their percentiles, the probability of loss (terminal wealth
below 1) and of ruin (equity at or below ``ruin`` times the starting cash at
any point; 0.5 by default), and a fan of equity percentiles over time.

**Tune's share.** A trial simulates ``paths_per_trial`` paths of one method
(hundreds), seeded from ``seed``, the method and the chunk, so results do not
depend on how trials were scheduled. Trials take ``backtest_trial``'s
resources and write to Tune's storage (``storage_path``).

Not here: the engine (``core.engine``), the Tune plumbing
(``tune.experiment``; the caller connects to Ray first), walk-forward
(``tune.walk_forward``), charts (``tune.report``).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

import ray
from ray import tune

from core.engine import backtest, run_batch, simulate_paths_torch
from core.metrics import summary
from core.strategies import Strategy, get_strategy
from core.synthetic import SyntheticMarket
from tune.experiment import chunks as trial_chunks
from tune.experiment import experiment_name, run_experiment
from tune.walk_forward import Costs, _json_float, infer_periods_per_year

METHODS = ("trades", "blocks", "synthetic")
STATS = ("terminal_wealth", "total_return", "sharpe", "max_drawdown", "cvar", "mean_return")
PERCENTILES = (5, 25, 50, 75, 95)
FAN_POINTS = 101


# -- path generators (Ray-free) -------------------------------------------------------
def bootstrap_trades(trade_returns: np.ndarray, n_paths: int, n_trades: int, rng: np.random.Generator) -> np.ndarray:
    """[n_paths, n_trades] trade returns drawn with replacement, floored at -1 (ruin)."""
    r = np.maximum(np.asarray(trade_returns, dtype=np.float64), -1.0)
    if r.size == 0:
        raise ValueError("no closed trades to bootstrap")
    return r[rng.integers(0, r.size, size=(n_paths, n_trades))]


def block_bootstrap(returns: np.ndarray, n_paths: int, horizon: int, block: int,
                    rng: np.random.Generator) -> np.ndarray:
    """[n_paths, horizon] moving-block bootstrap: blocks of ``block`` consecutive returns (order kept
    inside each), starts drawn uniformly from every full block, concatenated and cut to ``horizon``."""
    r = np.maximum(np.asarray(returns, dtype=np.float64), -1.0)
    if not 1 <= block <= r.size:
        raise ValueError(f"block ({block}) must be between 1 and the number of returns ({r.size})")
    n_blocks = math.ceil(horizon / block)
    starts = rng.integers(0, r.size - block + 1, size=(n_paths, n_blocks))
    idx = (starts[:, :, None] + np.arange(block)).reshape(n_paths, -1)[:, :horizon]
    return r[idx]


def gbm_closes(s0: float, mu: float, sigma: float, n_paths: int, horizon: int,
               rng: np.random.Generator) -> np.ndarray:
    """[n_paths, horizon] closes of a GBM started at ``s0`` (bar 0's close is ``s0``): per-bar log
    returns are N(mu - sigma^2 / 2, sigma^2), so log(S_t / S_0) ~ N((mu - sigma^2/2) t, sigma^2 t)."""
    steps = rng.standard_normal((n_paths, horizon - 1)) * sigma + (mu - 0.5 * sigma**2)
    log_path = np.concatenate([np.zeros((n_paths, 1)), np.cumsum(steps, axis=1)], axis=1)
    return s0 * np.exp(log_path)


def _gbm_bars(close: np.ndarray, times: np.ndarray) -> list[pd.DataFrame]:
    """Bars for each GBM path: open at the previous close, high/low the larger/smaller of the two."""
    out = []
    for c in close:
        o = np.concatenate([[c[0]], c[:-1]])
        out.append(pd.DataFrame({"ts": times, "open": o, "high": np.maximum(o, c), "low": np.minimum(o, c),
                                 "close": c, "volume": 0.0}))
    return out


def _regime_bars(symbol: str, seeds: Sequence[int], horizon: int, start_price: float, start, interval) -> list[pd.DataFrame]:
    return [SyntheticMarket([symbol], seed=int(s), start=start, interval=interval, start_price=start_price)
            .generate(horizon) for s in seeds]


def path_stats(equity: np.ndarray, periods_per_year: float, alpha: float, ruin: float) -> dict[str, np.ndarray]:
    """Per-path statistics of equity curves ``[N, H]`` that started at 1 (the start is not a column)."""
    m = summary(equity, 1.0, periods_per_year=periods_per_year, alpha=alpha)
    prev = np.concatenate([np.ones((equity.shape[0], 1)), equity[:, :-1]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rets = np.where(prev > 0, equity / prev - 1.0, 0.0)
    return {
        "terminal_wealth": equity[:, -1].copy(), "total_return": m["total_return"], "sharpe": m["sharpe"],
        "max_drawdown": m["max_drawdown"], "cvar": m["cvar"], "mean_return": rets.mean(axis=1),
        "ruined": equity.min(axis=1) <= ruin,
    }


def _fan_points(horizon: int) -> np.ndarray:
    """Columns (0 = the start) kept for the fan chart."""
    return np.unique(np.linspace(0, horizon, min(horizon + 1, FAN_POINTS)).round().astype(int))


def simulate(method: str, n_paths: int, rng: np.random.Generator, *, inputs: Mapping[str, Any]) -> np.ndarray:
    """Equity curves ``[n_paths, H]`` (start 1 excluded) of one method; ``inputs`` from ``_inputs``."""
    if method == "trades":
        r = bootstrap_trades(inputs["trade_returns"], n_paths, inputs["n_trades"], rng)
        return np.cumprod(1.0 + r, axis=1)
    if method == "blocks":
        r = block_bootstrap(inputs["bar_returns"], n_paths, inputs["horizon"], inputs["block"], rng)
        return np.cumprod(1.0 + r, axis=1)
    if method == "synthetic":
        strategy: Strategy = inputs["strategy"]
        costs: Costs = inputs["costs"]
        horizon = inputs["horizon"]
        if inputs["generator"] == "gbm":
            close = gbm_closes(inputs["s0"], inputs["mu"], inputs["sigma"], n_paths, horizon, rng)
            paths = _gbm_bars(close, inputs["times"])
        else:
            seeds = rng.integers(0, 2**31, size=n_paths)
            paths = _regime_bars(inputs["symbol"], seeds, horizon, inputs["s0"], inputs["start"], inputs["interval"])
        table = {k: np.array([v]) for k, v in inputs["params"].items()}
        targets = np.stack([strategy.targets(b, table)[0] for b in paths])
        open_ = np.stack([b["open"].to_numpy(dtype=np.float64) for b in paths])
        close = np.stack([b["close"].to_numpy(dtype=np.float64) for b in paths])
        device = engine_device(inputs.get("device"))
        if device is None:
            res = run_batch(open_, close, targets, compute_metrics=False, record_trades=False, **costs.kwargs())
            return res.equity / costs.cash
        # The trial holds a GPU: the torch engine, same fill rules, all paths at once.
        equity, _ = simulate_paths_torch(close, targets, open_=open_, device=device, **costs.kwargs())
        return equity.cpu().numpy() / costs.cash
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def engine_device(requested: str | None = None) -> str | None:
    """Where the synthetic paths are backtested: ``requested`` if given, else ``"cuda"`` when Ray gave
    this process a GPU and CUDA works, else None (the compiled CPU engine)."""
    if requested is not None:
        return requested
    try:
        if not ray.is_initialized() or not ray.get_gpu_ids():
            return None
        import torch  # only on a GPU trial: torch costs seconds to import

        return "cuda" if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no GPU answer is a CPU answer
        return None


def _mc_trial(config, *, inputs, chunks, seed, periods, alpha, ruin):
    t0 = time.perf_counter()
    method = config["method"]
    lo, hi = chunks[config["chunk"]]
    rng = np.random.default_rng([seed, zlib.crc32(method.encode()), config["chunk"]])
    equity = simulate(method, hi - lo, rng, inputs=inputs)
    stats = path_stats(equity, periods[method], alpha, ruin)
    cols = _fan_points(equity.shape[1])
    full = np.concatenate([np.ones((equity.shape[0], 1)), equity], axis=1)
    tune.report({
        "method": method, "chunk": config["chunk"], "paths": hi - lo,
        **{k: [float(x) for x in np.asarray(v, dtype=np.float64)] for k, v in stats.items()},
        "fan": full[:, cols].round(6).tolist(), "fan_x": cols.tolist(), "work_s": time.perf_counter() - t0,
    })


# -- the result -------------------------------------------------------------------------
@dataclass
class MethodResult:
    """One method's distributions: ``stats[name]`` is ``[paths]``; ``fan`` holds equity percentiles
    (rows ``PERCENTILES``) at steps ``fan_x``."""

    method: str
    stats: dict[str, np.ndarray]
    ruined: np.ndarray
    fan: np.ndarray
    fan_x: np.ndarray
    step_unit: str

    @property
    def prob_loss(self) -> float:
        return float(np.mean(self.stats["terminal_wealth"] < 1.0))

    @property
    def prob_ruin(self) -> float:
        return float(np.mean(self.ruined))

    def percentiles(self) -> pd.DataFrame:
        rows = {}
        for k in ("terminal_wealth", "sharpe", "max_drawdown", "cvar"):
            v = self.stats[k]
            v = v[np.isfinite(v)]
            rows[k] = {**{f"p{q}": float(np.percentile(v, q)) if v.size else float("nan") for q in PERCENTILES},
                       "mean": float(v.mean()) if v.size else float("nan")}
        return pd.DataFrame(rows).T


@dataclass
class MonteCarloResult:
    strategy: str
    params: dict[str, Any]
    costs: Costs
    base_metrics: dict[str, float]
    base_equity: np.ndarray
    base_times: np.ndarray | None
    methods: dict[str, MethodResult]
    skipped: dict[str, str]
    experiment_path: str
    n_trials: int
    work_s: float
    wall_s: float
    ruin: float
    periods_per_year: float

    def table(self) -> pd.DataFrame:
        """One row per method: percentiles of terminal wealth and the probabilities."""
        rows = []
        for name, m in self.methods.items():
            p = m.percentiles()
            rows.append({"method": name, "paths": len(m.ruined),
                         **{f"wealth_p{q}": p.loc["terminal_wealth", f"p{q}"] for q in PERCENTILES},
                         "sharpe_p50": p.loc["sharpe", "p50"], "max_dd_p50": p.loc["max_drawdown", "p50"],
                         "max_dd_p95": p.loc["max_drawdown", "p95"], "cvar_p50": p.loc["cvar", "p50"],
                         "prob_loss": m.prob_loss, "prob_ruin": m.prob_ruin})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "params": self.params, "ruin_level": self.ruin,
            "base_metrics": {k: _json_float(v) for k, v in self.base_metrics.items()},
            "methods": {n: {"paths": len(m.ruined), "prob_loss": m.prob_loss, "prob_ruin": m.prob_ruin,
                            "percentiles": {s: {k: _json_float(v) for k, v in row.items()}
                                            for s, row in m.percentiles().to_dict("index").items()}}
                        for n, m in self.methods.items()},
            "skipped": self.skipped, "experiment_path": self.experiment_path, "trials": self.n_trials,
            "trial_work_s": round(self.work_s, 3), "wall_s": round(self.wall_s, 3),
        }


def _inputs(bars: pd.DataFrame, strategy: Strategy, params: Mapping[str, Any], costs: Costs, *, block: int,
            horizon: int | None, generator: str, mu: float | None, sigma: float | None,
            periods_per_year: float, alpha: float):
    """The base backtest and everything the methods resample; (inputs, base result, skipped reasons)."""
    table = {k: np.array([v]) for k, v in params.items()}
    targets = strategy.targets(bars, table)[0]
    base = backtest(bars, targets, periods_per_year=periods_per_year, alpha=alpha, **costs.kwargs())
    trades = base.trades[~base.trades.is_open]
    # Each trade's return on the equity the account had before the bar it was entered on.
    before = np.concatenate([[costs.cash], base.equity])[trades.entry_bar.to_numpy()]
    trade_returns = trades.pnl.to_numpy() / before
    close = bars["close"].to_numpy(dtype=np.float64)
    log_r = np.diff(np.log(close))
    times = bars["ts"].to_numpy() if "ts" in bars.columns else np.arange(len(bars))
    spacing = pd.Series(bars["ts"]).diff().median() if "ts" in bars.columns and len(bars) > 2 else pd.Timedelta("1D")
    H = int(horizon or len(bars))
    sig = float(np.std(log_r, ddof=1)) if sigma is None else float(sigma)
    inputs = {
        # As many trades per path as the backtest made in ``horizon`` bars, so every method spans the same time.
        "trade_returns": trade_returns, "n_trades": max(1, round(len(trade_returns) * H / len(bars))),
        "bar_returns": base.returns, "horizon": H, "block": int(block),
        "strategy": strategy, "params": dict(params), "costs": costs, "generator": generator,
        "s0": float(close[0]), "mu": float(np.mean(log_r) + 0.5 * sig**2) if mu is None else float(mu), "sigma": sig,
        "symbol": str(bars["symbol"].iloc[0]) if "symbol" in bars.columns else "SIM",
        "start": pd.Timestamp(times[0]) if "ts" in bars.columns else "2024-01-02",
        "interval": spacing,
        "times": pd.date_range(pd.Timestamp(times[0]) if "ts" in bars.columns else "2024-01-02", periods=H,
                               freq=spacing),
    }
    skipped = {}
    if len(trade_returns) < 2:
        skipped["trades"] = f"the backtest closed {len(trade_returns)} trade(s); the trade bootstrap needs at least 2"
    if not 1 <= block <= len(base.returns):
        skipped["blocks"] = f"block {block} does not fit {len(base.returns)} bar returns"
    if generator not in ("regimes", "gbm"):
        raise ValueError(f"generator must be 'regimes' or 'gbm', got {generator!r}")
    return inputs, base, skipped


@dataclass(frozen=True)
class MonteCarloPlan:
    """A checked Monte Carlo, ready to run: the base backtest and what each method resamples (no Ray yet)."""

    strategy: Strategy
    params: dict[str, Any]
    costs: Costs
    bars: pd.DataFrame
    inputs: dict[str, Any]
    base: Any  # the base backtest (core.engine.BacktestResult)
    run: list[str]  # the methods that run; those skipped are in ``skipped``, with the reason
    skipped: dict[str, str]
    periods: dict[str, float]  # per method: steps per year of its paths
    chunks: list[tuple[int, int]]
    n_paths: int
    seed: int
    ruin: float
    alpha: float
    periods_per_year: float
    started: float  # perf_counter() when planning began: the result's wall_s counts from here


def plan_monte_carlo(
    bars: pd.DataFrame,
    strategy: Strategy | str,
    params: Mapping[str, Any] | None = None,
    *,
    methods: Sequence[str] = METHODS,
    n_paths: int = 1000,
    paths_per_trial: int = 500,
    block: int = 20,
    horizon: int | None = None,
    generator: str = "regimes",
    mu: float | None = None,
    sigma: float | None = None,
    ruin: float = 0.5,
    alpha: float = 0.05,
    seed: int = 0,
    costs: Costs | None = None,
    periods_per_year: float | None = None,
    resolver: Callable[[str], Strategy] | None = None,
) -> MonteCarloPlan:
    """Everything :func:`monte_carlo` checks, and the base backtest, without Ray: a ValueError here
    means no cluster was touched.

    ``n_paths`` per method; ``horizon`` bars per bar-level path (default: as
    many as ``bars``); ``ruin`` is the equity fraction that counts as ruin.
    A method the data cannot support (fewer than two closed trades) is
    skipped, with the reason in ``skipped``. ``resolver`` resolves a
    ``model:`` name (``tune.models.connect_registry``).
    """
    started = time.perf_counter()
    strategy = get_strategy(strategy, resolver) if isinstance(strategy, str) else strategy
    costs = costs or Costs()
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {', '.join(unknown) or 'none'}")
    if n_paths < 1 or paths_per_trial < 1:
        raise ValueError("n_paths and paths_per_trial must be positive")
    if not 0 < ruin < 1:
        raise ValueError(f"ruin must be a fraction of the starting cash in (0, 1), got {ruin}")
    bars = bars.reset_index(drop=True)
    ppy = periods_per_year or infer_periods_per_year(bars)
    params = dict(params) if params is not None else {k: v[0] for k, v in strategy.grid.items()}
    inputs, base, skipped = _inputs(bars, strategy, params, costs, block=block, horizon=horizon,
                                    generator=generator, mu=mu, sigma=sigma, periods_per_year=ppy, alpha=alpha)
    run = [m for m in methods if m not in skipped]
    skipped = {m: why for m, why in skipped.items() if m in methods}
    if not run:
        raise ValueError("no Monte Carlo method can run: " + "; ".join(skipped.values()))
    years = len(bars) / ppy
    periods = {"trades": max(len(inputs["trade_returns"]), 1) / years, "blocks": ppy, "synthetic": ppy}
    return MonteCarloPlan(strategy, params, costs, bars, inputs, base, run, skipped, periods,
                          trial_chunks(n_paths, paths_per_trial), n_paths, seed, ruin, alpha, ppy, started)


def monte_carlo(
    bars: pd.DataFrame,
    strategy: Strategy | str,
    params: Mapping[str, Any] | None = None,
    *,
    storage_path: str | None = None,
    name: str | None = None,
    settings=None,
    profile: str | None = None,
    progress: Callable[[str], None] | None = None,
    **plan: Any,
) -> MonteCarloResult:
    """Monte Carlo of ``strategy`` with ``params`` on one symbol's ``bars``, as a Tune experiment:
    :func:`plan_monte_carlo` (whose keywords ``plan`` holds: ``methods``, ``n_paths``, ``ruin``...)
    then :func:`run_monte_carlo`. The caller connects to Ray first (``cluster.runtime.connect``)."""
    return run_monte_carlo(plan_monte_carlo(bars, strategy, params, **plan), storage_path=storage_path, name=name,
                           settings=settings, profile=profile, progress=progress)


def run_monte_carlo(plan: MonteCarloPlan, *, storage_path: str | None = None, name: str | None = None,
                    settings=None, profile: str | None = None, progress: Callable[[str], None] | None = None,
                    ) -> MonteCarloResult:
    """Run a planned Monte Carlo as one Tune experiment (in ``storage_path``). Ray must be connected."""
    strategy, params, run, chunks, bars = plan.strategy, plan.params, plan.run, plan.chunks, plan.bars
    n_chunks = len(chunks)
    trial = tune.with_parameters(_mc_trial, inputs=plan.inputs, chunks=chunks, seed=plan.seed, periods=plan.periods,
                                 alpha=plan.alpha, ruin=plan.ruin)
    name = name or experiment_name("monte_carlo", strategy.name)
    if progress:
        progress(f"monte carlo {strategy.name} {params}: {', '.join(run)} x {plan.n_paths} paths in "
                 f"{len(run) * n_chunks} trials")
    results, path = run_experiment(
        trial, {"method": tune.grid_search(run), "chunk": tune.grid_search(list(range(n_chunks)))},
        name=name, storage_path=storage_path, settings=settings, profile=profile, progress=progress)

    out: dict[str, MethodResult] = {}
    for m in run:
        mine = sorted((r for r in results if r["method"] == m), key=lambda r: r["chunk"])
        stats = {k: np.concatenate([np.asarray(r[k], dtype=np.float64) for r in mine]) for k in STATS}
        ruined = np.concatenate([np.asarray(r["ruined"], dtype=bool) for r in mine])
        fan_paths = np.concatenate([np.asarray(r["fan"], dtype=np.float64) for r in mine])
        out[m] = MethodResult(m, stats, ruined, np.percentile(fan_paths, PERCENTILES, axis=0),
                              np.asarray(mine[0]["fan_x"]), "trade" if m == "trades" else "bar")
    return MonteCarloResult(
        strategy=strategy.name, params=params, costs=plan.costs, base_metrics=dict(plan.base.metrics),
        base_equity=plan.base.equity, base_times=bars["ts"].to_numpy() if "ts" in bars.columns else None,
        methods=out, skipped=plan.skipped, experiment_path=path, n_trials=len(results),
        work_s=float(sum(r["work_s"] for r in results)), wall_s=time.perf_counter() - plan.started, ruin=plan.ruin,
        periods_per_year=plan.periods_per_year)
