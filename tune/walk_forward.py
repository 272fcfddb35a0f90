"""Walk-forward optimisation as a Ray Tune experiment.

::

    from cluster.runtime import connect
    from tune.walk_forward import walk_forward
    connect(settings)  # the caller joins Ray; tune/ never does
    wf = walk_forward(bars, "sma_crossover", train=500, test=100)
    wf.folds          # one row per fold: windows, chosen parameters, in/out-of-sample metrics
    wf.oos_equity     # the stitched out-of-sample equity curve
    wf.efficiency     # walk-forward efficiency (out-of-sample growth over in-sample growth)

The bars are cut into folds: train ``N`` bars, test the next ``M``, move on
``S`` bars (``S = M`` by default; ``anchored=True`` keeps every train window
starting at bar 0). In each fold the strategy's parameter table (a grid, or
sets sampled from Tune search-space domains) is backtested on the in-sample
part and ranked by the objective (``"sharpe"``, or ``"cvar_ratio"``: mean
return per unit of expected shortfall, the STARR ratio); the best set is then
run on the out-of-sample part.

**Tune's share.** One trial searches one fold (or one chunk of a large
table) with the compiled batch engine, so a trial backtests hundreds to
thousands of parameter sets and Tune's per-trial overhead (about a second)
stays a small share. Trials ask for ``cluster.resources`` role
``backtest_trial`` and write their results to Tune's storage
(``storage_path``: a local directory or ``s3://bucket/prefix``).

**No look-ahead.** A fold's choice sees only bars before its test window:
the strategy is called on ``bars[:train_end]`` and ranked on
``[train_start, train_end)``. Its out-of-sample run calls the strategy on
``bars[:test_end]`` only, so even a model that peeks at the whole series it is
given cannot see past the fold. Targets decided on bar ``t``'s close fill at
bar ``t + 1``'s open (the engine's default), so the first out-of-sample fill
is at ``test_start``'s open, decided on the last in-sample bar's close.

**Stitching.** The stitched curve is one continuous backtest: bar ``t``'s
target comes from the latest fold whose test window has begun by ``t``'s
fill, so positions carry across fold boundaries and commission is paid only
when the target changes. Each fold's own out-of-sample metrics come from a
separate backtest of its test window starting from cash, which is what
walk-forward efficiency compares against the in-sample run.

**Walk-forward efficiency** is Pardo's ratio of annualised out-of-sample to
in-sample return. Returns are annualised as log growth per year
(``log(final / initial) * periods_per_year / bars``), linear in time, since
compounding a 100-bar window to a year inflates it. The overall figure is
the mean over folds of the out-of-sample rate over the mean of the
in-sample rate; NaN when the in-sample mean is not positive.

**Strategies.** A ``core.strategies.Strategy`` maps bars and a parameter
table to targets ``[P, T]``; a name is looked up in ``core.strategies``'
registry, and a ``model:NAME@VERSION`` name through the ``resolver`` the
caller passes (``tune.models.connect_registry(settings)`` makes one). This
module does not load or train models.

Not here: the strategy registry (``core.strategies``), the engine's fill
rules (``core.engine``), the Tune plumbing (``tune.experiment``), Monte Carlo
(``tune.monte_carlo``), charts (``tune.report``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from ray import tune
from ray.tune.search.sample import Domain

from core.engine import backtest, backtest_batch
from core.metrics import TRADING_DAYS_PER_YEAR, summary
from core.strategies import (
    ParamTable,
    Strategy,
    filter_table,
    get_strategy,
    grid_table,
    params_at,
    table_size,
    take,
)
from tune.experiment import chunks as trial_chunks
from tune.experiment import experiment_name, run_experiment

OBJECTIVES = ("sharpe", "cvar_ratio")


def sample_table(space: Mapping[str, Any], n: int, seed: int = 0, valid=None) -> ParamTable:
    """``n`` parameter sets drawn from Tune search-space domains (``tune.randint``, ``tune.uniform``,
    ``tune.choice``...); a plain list is a uniform choice, a scalar a constant. Duplicates are dropped."""
    rng = np.random.default_rng(seed)
    cols: ParamTable = {}
    for k, dom in space.items():
        if isinstance(dom, Domain):
            cols[k] = np.asarray(dom.sample(size=n, random_state=np.random.RandomState(rng.integers(2**31))))
        elif isinstance(dom, (list, tuple, np.ndarray)):
            cols[k] = np.asarray(dom)[rng.integers(0, len(dom), size=n)]
        else:
            cols[k] = np.full(n, dom)
    table = filter_table(cols, valid)
    frame = pd.DataFrame(table).drop_duplicates()
    return {k: frame[k].to_numpy() for k in frame.columns}


# -- folds and objectives -----------------------------------------------------------
@dataclass(frozen=True)
class Fold:
    """Bars ``[train_start, train_end)`` are in-sample, ``[test_start, test_end)`` out-of-sample."""

    index: int
    train_start: int
    train_end: int
    test_start: int
    test_end: int


def make_folds(n_bars: int, train: int, test: int, step: int | None = None, anchored: bool = False) -> list[Fold]:
    """Rolling (or anchored) folds over ``n_bars``; only whole test windows are used."""
    step = test if step is None else step
    if train < 2 or test < 2:
        raise ValueError(f"train ({train}) and test ({test}) must be at least 2 bars")
    if not 1 <= step <= test:
        raise ValueError(f"step ({step}) must be between 1 and test ({test}): a larger step leaves bars untested")
    folds = []
    start = train
    while start + test <= n_bars:
        folds.append(Fold(len(folds), 0 if anchored else start - train, start, start, start + test))
        start += step
    if not folds:
        raise ValueError(f"{n_bars} bars hold no fold of train {train} + test {test}")
    return folds


def objective_values(metrics: Mapping[str, np.ndarray], objective: str, periods_per_year: float) -> np.ndarray:
    """The objective per parameter set; NaN where undefined (no volatility: never traded)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    sharpe = np.asarray(metrics["sharpe"], dtype=np.float64)
    if objective == "sharpe":
        return sharpe
    # mean per-bar return, recovered from sharpe * volatility = mean * periods_per_year.
    mean = sharpe * np.asarray(metrics["volatility"]) / periods_per_year
    cvar = np.asarray(metrics["cvar"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(cvar < 0, mean / -cvar, np.where(mean > 0, np.inf, np.nan))


def best_index(values: np.ndarray) -> int:
    """The first maximum, NaN ranking last; -1 when every value is NaN."""
    v = np.where(np.isnan(values), -np.inf, values)
    if not np.isfinite(v).any() and not np.isposinf(v).any():
        return -1
    return int(np.argmax(v))


def growth_rate(total_return: np.ndarray | float, n_bars: int, periods_per_year: float) -> np.ndarray:
    """Annualised log growth: log(1 + total return) per year of bars."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log1p(np.asarray(total_return, dtype=np.float64)) * periods_per_year / n_bars


def infer_periods_per_year(bars: pd.DataFrame) -> float:
    """Bars per year from the bars' spacing: 252 for daily or slower, a 6.5-hour session otherwise."""
    if "ts" not in bars.columns or len(bars) < 3:
        return float(TRADING_DAYS_PER_YEAR)
    spacing = pd.Series(bars["ts"]).diff().median()
    if pd.isna(spacing) or spacing >= pd.Timedelta(hours=20):
        return float(TRADING_DAYS_PER_YEAR)
    return TRADING_DAYS_PER_YEAR * pd.Timedelta(hours=6.5) / spacing


@dataclass(frozen=True)
class Costs:
    """How the engine fills (``core.engine.run_batch``'s keyword arguments)."""

    cash: float = 10_000.0
    commission: float = 0.0
    slippage: float = 0.0
    fill: str = "open"
    whole_units: bool = False

    def kwargs(self) -> dict[str, Any]:
        return dict(cash=self.cash, commission=self.commission, slippage=self.slippage, fill=self.fill,
                    whole_units=self.whole_units)

    @property
    def offset(self) -> int:
        """Bars between a decision and its fill: 1 for next-open fills, 0 for same-close."""
        return 1 if self.fill == "open" else 0


# -- the pieces a trial and the driver run (Ray-free) -----------------------------------
def in_sample(bars: pd.DataFrame, strategy: Strategy, table: ParamTable, fold: Fold, costs: Costs,
              objective: str, periods_per_year: float, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Backtest every parameter set on the fold's in-sample bars: objective and metrics per set."""
    history = bars.iloc[: fold.train_end]
    targets = strategy.targets(history, table)[:, fold.train_start:]
    res = backtest_batch(history.iloc[fold.train_start:], np.ascontiguousarray(targets), keep_curves=False,
                         record_trades=False, periods_per_year=periods_per_year, alpha=alpha, **costs.kwargs())
    out = {k: np.asarray(res.metrics[k]) for k in ("sharpe", "total_return", "max_drawdown", "cvar")}
    out["objective"] = objective_values(res.metrics, objective, periods_per_year)
    return out


def out_of_sample(bars: pd.DataFrame, strategy: Strategy, params: Mapping[str, Any], fold: Fold, costs: Costs,
                  periods_per_year: float, alpha: float = 0.05) -> dict[str, Any]:
    """Run one parameter set on the fold's test window, starting from cash.

    The backtest starts ``costs.offset`` bars early so the decision made on
    the last in-sample close fills at the first test bar's open; that lead
    bar (equity = cash, nothing filled yet) is dropped from the curve.
    """
    history = bars.iloc[: fold.test_end]
    table = {k: np.array([v]) for k, v in params.items()}
    targets = strategy.targets(history, table)[0]
    start = fold.test_start - costs.offset
    r = backtest(history.iloc[start:], targets[start:], **costs.kwargs())
    equity, units = r.equity[costs.offset:], r.units[costs.offset:]
    closed = r.trades.loc[~r.trades.is_open, "pnl"].to_numpy()
    m = summary(equity, costs.cash, positions=units, trade_pnl=closed[None, :] if closed.size else np.full((1, 0), np.nan),
                periods_per_year=periods_per_year, alpha=alpha)
    return {"equity": equity, "metrics": {k: float(np.asarray(v).ravel()[0]) for k, v in m.items()},
            "trades": r.trades}


def stitched(bars: pd.DataFrame, strategy: Strategy, chosen: Sequence[Mapping[str, Any]], folds: Sequence[Fold],
             costs: Costs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One continuous backtest over every test window: (equity, units, bar index) from the first test bar.

    Fold ``k``'s parameters decide the targets from the bar whose decision
    fills at its ``test_start`` until the next fold's; each fold's targets are
    computed from bars up to the end of the stretch it decides, never beyond.
    """
    off = costs.offset
    first, last = folds[0].test_start - off, folds[-1].test_end
    targets = np.zeros(last)
    for k, (fold, params) in enumerate(zip(folds, chosen)):
        seg_end = folds[k + 1].test_start - off if k + 1 < len(folds) else last
        seg_start = fold.test_start - off
        history = bars.iloc[: max(seg_end, fold.test_start)]
        t = strategy.targets(history, {n: np.array([v]) for n, v in params.items()})[0]
        targets[seg_start:seg_end] = t[seg_start:seg_end]
    r = backtest(bars.iloc[first:last], targets[first:last], **costs.kwargs())
    return r.equity[off:], r.units[off:], np.arange(first + off, last)


# -- Tune ---------------------------------------------------------------------------
def _search_trial(config, *, bars, strategy, table, chunks, folds, costs, objective, periods_per_year, alpha):
    t0 = time.perf_counter()
    fold = folds[config["fold"]]
    lo, hi = chunks[config["chunk"]]
    res = in_sample(bars, strategy, take(table, slice(lo, hi)), fold, costs, objective, periods_per_year, alpha)
    tune.report({
        "fold": config["fold"], "chunk": config["chunk"], "lo": lo, "hi": hi,
        **{k: [float(x) for x in v] for k, v in res.items()},
        "param_sets": hi - lo, "work_s": time.perf_counter() - t0,
    })


# -- the result ---------------------------------------------------------------------
@dataclass
class WalkForwardResult:
    """What a walk-forward run found. ``folds`` has one row per fold; ``oos_equity`` is the stitched
    out-of-sample curve over bars ``oos_index`` (times ``oos_times``)."""

    strategy: str
    objective: str
    costs: Costs
    folds: pd.DataFrame
    params: pd.DataFrame
    table: ParamTable
    is_objective: np.ndarray  # [folds, parameter sets]
    oos_equity: np.ndarray
    oos_units: np.ndarray
    oos_index: np.ndarray
    oos_times: np.ndarray | None
    oos_metrics: dict[str, float]
    efficiency: float
    experiment_path: str
    n_trials: int
    work_s: float
    wall_s: float
    periods_per_year: float

    @property
    def fold_boundaries(self) -> list[int]:
        """Positions in ``oos_equity`` where a fold's test window starts."""
        return [int(np.searchsorted(self.oos_index, s)) for s in self.folds["test_start"]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy, "objective": self.objective, "efficiency": _json_float(self.efficiency),
            "oos_metrics": {k: _json_float(v) for k, v in self.oos_metrics.items()},
            "folds": [{k: _json_float(v) for k, v in row.items()} for row in self.folds.to_dict("records")],
            "parameter_sets": int(table_size(self.table)), "trials": self.n_trials,
            "experiment_path": self.experiment_path, "trial_work_s": round(self.work_s, 3),
            "wall_s": round(self.wall_s, 3),
        }


def _json_float(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return v


@dataclass(frozen=True)
class WalkForwardPlan:
    """A checked walk-forward, ready to run: the table, the folds and the trials' chunks (no Ray yet)."""

    bars: pd.DataFrame
    strategy: Strategy
    table: ParamTable
    folds: list[Fold]
    chunks: list[tuple[int, int]]
    costs: Costs
    objective: str
    periods_per_year: float
    alpha: float
    started: float  # perf_counter() when planning began: the result's wall_s counts from here


def plan_walk_forward(
    bars: pd.DataFrame,
    strategy: Strategy | str,
    *,
    train: int,
    test: int,
    step: int | None = None,
    anchored: bool = False,
    params: Mapping[str, Any] | None = None,
    search: str = "grid",
    num_samples: int = 200,
    seed: int = 0,
    objective: str = "sharpe",
    costs: Costs | None = None,
    periods_per_year: float | None = None,
    alpha: float = 0.05,
    max_sets_per_trial: int = 5000,
    resolver: Callable[[str], Strategy] | None = None,
) -> WalkForwardPlan:
    """Everything :func:`walk_forward` checks, without Ray: a ValueError here means no cluster was touched.

    ``params``: the search space (name -> values); the strategy's grid when
    None. ``search="grid"`` searches every combination; ``"random"`` draws
    ``num_samples`` sets (seeded) from Tune domains (``tune.randint(5, 50)``)
    or lists. The same table is searched in every fold, so the parameter
    heatmap compares like with like. ``max_sets_per_trial`` splits a larger
    table into chunks, each a trial. ``resolver`` resolves a ``model:`` name
    (``tune.models.connect_registry``).
    """
    started = time.perf_counter()
    strategy = get_strategy(strategy, resolver) if isinstance(strategy, str) else strategy
    costs = costs or Costs()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    bars = bars.reset_index(drop=True)
    ppy = periods_per_year or infer_periods_per_year(bars)
    space = strategy.grid if params is None else params
    if search == "grid":
        table = strategy.check(grid_table(space))
    elif search == "random":
        table = strategy.check(sample_table(space, num_samples, seed))
    else:
        raise ValueError(f"search must be 'grid' or 'random', got {search!r}")
    folds = make_folds(len(bars), train, test, step, anchored)
    if folds[0].test_start < costs.offset:
        raise ValueError("the first fold needs an in-sample bar before its test window")
    return WalkForwardPlan(bars, strategy, table, folds, trial_chunks(table_size(table), max_sets_per_trial), costs,
                           objective, ppy, alpha, started)


def walk_forward(
    bars: pd.DataFrame,
    strategy: Strategy | str,
    *,
    storage_path: str | None = None,
    name: str | None = None,
    settings=None,
    profile: str | None = None,
    progress: Callable[[str], None] | None = None,
    **plan: Any,
) -> WalkForwardResult:
    """Walk-forward optimisation of ``strategy`` on one symbol's ``bars`` as a Tune experiment:
    :func:`plan_walk_forward` (whose keywords ``plan`` holds: ``train``, ``test``, ``params``...)
    then :func:`run_walk_forward`. The caller connects to Ray first (``cluster.runtime.connect``)."""
    return run_walk_forward(plan_walk_forward(bars, strategy, **plan), storage_path=storage_path, name=name,
                            settings=settings, profile=profile, progress=progress)


def run_walk_forward(plan: WalkForwardPlan, *, storage_path: str | None = None, name: str | None = None,
                     settings=None, profile: str | None = None, progress: Callable[[str], None] | None = None,
                     ) -> WalkForwardResult:
    """Run a planned walk-forward as one Tune experiment (in ``storage_path``), then each fold's best set
    out of sample and the stitched curve. Ray must be connected."""
    bars, strategy, table, folds, chunks = plan.bars, plan.strategy, plan.table, plan.folds, plan.chunks
    costs = plan.costs
    objective, ppy, alpha = plan.objective, plan.periods_per_year, plan.alpha
    n_sets, n_chunks = table_size(table), len(chunks)
    trial = tune.with_parameters(
        _search_trial, bars=bars, strategy=strategy, table=table, chunks=chunks, folds=folds, costs=costs,
        objective=objective, periods_per_year=ppy, alpha=alpha)
    name = name or experiment_name("walk_forward", strategy.name)
    if progress:
        progress(f"walk-forward {strategy.name}: {len(folds)} folds x {n_sets} parameter sets in "
                 f"{len(folds) * n_chunks} trials")
    results, path = run_experiment(
        trial, {"fold": tune.grid_search(list(range(len(folds)))), "chunk": tune.grid_search(list(range(n_chunks)))},
        name=name, storage_path=storage_path, settings=settings, profile=profile, progress=progress)

    keys = ("objective", "sharpe", "total_return", "max_drawdown", "cvar")
    found = {k: np.full((len(folds), n_sets), np.nan) for k in keys}
    for r in results:
        for k in keys:
            found[k][r["fold"], r["lo"]:r["hi"]] = np.asarray(r[k], dtype=np.float64)

    rows, chosen = [], []
    times = pd.to_datetime(bars["ts"]) if "ts" in bars.columns else None
    for fold in folds:
        i = best_index(found["objective"][fold.index])
        if i < 0:
            i = 0  # nothing traded in-sample: every set ties at "no view"; take the first
        params_k = params_at(table, i)
        chosen.append(params_k)
        oos = out_of_sample(bars, strategy, params_k, fold, costs, ppy, alpha)
        is_growth = float(growth_rate(found["total_return"][fold.index, i], fold.train_end - fold.train_start, ppy))
        oos_growth = float(growth_rate(oos["metrics"]["total_return"], fold.test_end - fold.test_start, ppy))
        row = {
            "fold": fold.index, "train_start": fold.train_start, "train_end": fold.train_end,
            "test_start": fold.test_start, "test_end": fold.test_end,
            **({"test_first": times.iloc[fold.test_start], "test_last": times.iloc[fold.test_end - 1]}
               if times is not None else {}),
            **{f"param_{k}": v for k, v in params_k.items()},
            "is_objective": float(found["objective"][fold.index, i]),
            "is_sharpe": float(found["sharpe"][fold.index, i]),
            "is_total_return": float(found["total_return"][fold.index, i]),
            "is_growth": is_growth,
            "oos_sharpe": oos["metrics"]["sharpe"], "oos_total_return": oos["metrics"]["total_return"],
            "oos_max_drawdown": oos["metrics"]["max_drawdown"], "oos_trades": oos["metrics"]["n_trades"],
            "oos_growth": oos_growth,
            "efficiency": oos_growth / is_growth if is_growth > 0 else float("nan"),
        }
        rows.append(row)
    frame = pd.DataFrame(rows)
    is_mean = frame["is_growth"].mean()
    efficiency = float(frame["oos_growth"].mean() / is_mean) if is_mean > 0 else float("nan")

    equity, units, index = stitched(bars, strategy, chosen, folds, costs)
    m = summary(equity, costs.cash, positions=units, periods_per_year=ppy, alpha=alpha)
    oos_metrics = {k: float(v) for k, v in m.items()}
    return WalkForwardResult(
        strategy=strategy.name, objective=objective, costs=costs, folds=frame,
        params=pd.DataFrame(chosen, index=pd.Index([f.index for f in folds], name="fold")),
        table=table, is_objective=found["objective"], oos_equity=equity, oos_units=units, oos_index=index,
        oos_times=times.iloc[index].to_numpy() if times is not None else None, oos_metrics=oos_metrics,
        efficiency=efficiency, experiment_path=path, n_trials=len(results),
        work_s=float(sum(r["work_s"] for r in results)), wall_s=time.perf_counter() - plan.started,
        periods_per_year=ppy)

