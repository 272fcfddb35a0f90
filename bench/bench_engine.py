"""Benchmark: how many backtests per second core.engine runs, against
backtesting.py and vectorbt on the same data and parameter grid, and how many
Monte Carlo path-steps per second its compiled and torch paths run against
plain numpy.

    python bench/bench_engine.py                 # 1,000 SMA pairs, ~1-3 minutes
    python bench/bench_engine.py --pairs 200 --repeats 3

Everything runs on one core (numba, torch and BLAS held to one thread) on the
GOOG daily bars that backtesting.py ships. Each peer runs the same strategy:
an SMA(fast, slow) crossover, long on the up-cross, short on the down-cross,
0.2% commission, 10,000 cash. Timings are medians over repeats, each timed
from bars and parameters to per-parameter-set metrics (signals included);
backtesting.py runs a sample of the pairs and is extrapolated per backtest.

This is a script that prints numbers, not a test: nothing here asserts a
target. It does check that the implementations it times agree, so a fast
wrong answer cannot pass as a speed-up.
"""

from __future__ import annotations

import os

# One core: set before numpy, numba and torch start their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

# Run from a checkout without installing: the repo root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from core.engine import run_batch, simulate_paths, simulate_paths_torch  # noqa: E402
from core.features import sma  # noqa: E402
from core.strategies import pair_grid, sma_crossover  # noqa: E402

CASH = 10_000.0
COMMISSION = 0.002


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, timed in turn within each repeat.

    Interleaving keeps a slow spell on a shared machine from landing on one
    contestant only.
    """
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def sma_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n (fast, slow) pairs spread evenly over fast 2..100, slow 3..250, fast < slow."""
    fast, slow = pair_grid(range(2, 101), range(3, 251))
    pick = np.linspace(0, len(fast) - 1, n).round().astype(int)
    return fast[pick], slow[pick]


def bench_ours(bars, fast, slow, repeats):
    open_, close = bars.Open.to_numpy(float), bars.Close.to_numpy(float)

    def sweep():  # what a parameter search needs: metrics per pair
        targets = sma_crossover(bars, fast, slow, sma_method="rolling")
        return run_batch(open_, close, targets, cash=CASH, commission=COMMISSION, keep_curves=False)

    def with_curves():  # plus every equity and position curve, [P, T] each
        targets = sma_crossover(bars, fast, slow, sma_method="rolling")
        return run_batch(open_, close, targets, cash=CASH, commission=COMMISSION)

    targets = sma_crossover(bars, fast, slow, sma_method="rolling")

    def engine_only():
        return run_batch(open_, close, targets, cash=CASH, commission=COMMISSION, keep_curves=False)

    result = sweep()  # compile (or load the numba cache) outside the timing
    with_curves()
    timed = interleaved_medians(
        {"sweep": sweep, "curves": with_curves, "engine": engine_only,
         "signals": lambda: sma_crossover(bars, fast, slow, sma_method="rolling")},
        repeats,
    )
    return timed, result


def bench_backtesting_py(bars, fast, slow, sample, ours):
    try:
        from backtesting import Backtest, Strategy
        from backtesting.lib import crossover
    except ImportError as exc:  # pragma: no cover - reported, not hidden
        return None, f"backtesting.py not importable: {exc}"

    class SmaCross(Strategy):
        n1, n2 = 10, 20

        def init(self):
            self.fast = self.I(sma, self.data.Close, self.n1, "rolling")
            self.slow = self.I(sma, self.data.Close, self.n2, "rolling")

        def next(self):
            if crossover(self.fast, self.slow):
                self.position.close()
                self.buy()
            elif crossover(self.slow, self.fast):
                self.position.close()
                self.sell()

    picks = np.linspace(0, len(fast) - 1, sample).round().astype(int)
    per_run, worst_gap = [], 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = Backtest(bars, SmaCross, cash=CASH, commission=COMMISSION)
        for p in picks:
            start = time.perf_counter()
            stats = bt.run(n1=int(fast[p]), n2=int(slow[p]))
            per_run.append(time.perf_counter() - start)
            worst_gap = max(worst_gap, abs(stats["Equity Final [$]"] - ours.metrics["final_equity"][p]))
    return statistics.median(per_run), f"{sample} pairs; max |final equity - ours| = {worst_gap:.2e}"


def bench_vectorbt(bars, fast, slow, repeats):
    try:
        import vectorbt as vbt
    except ImportError as exc:
        return None, f"vectorbt not installed ({exc}); pip install vectorbt to compare"
    close = bars.Close

    def run(f, s):
        fast_ma = vbt.MA.run(close, f, short_name="fast")
        slow_ma = vbt.MA.run(close, s, short_name="slow")
        entries = fast_ma.ma_crossed_above(slow_ma)
        exits = fast_ma.ma_crossed_below(slow_ma)
        # direction="both": an entry goes long, an exit reverses to short, like ours.
        pf = vbt.Portfolio.from_signals(close, entries, exits, direction="both", fees=COMMISSION,
                                        init_cash=CASH, freq="1D")
        return pf.total_return().to_numpy(), pf.sharpe_ratio().to_numpy()

    run(fast[:4], slow[:4])  # numba compile outside the timing
    t, _ = median_seconds(lambda: run(fast, slow), repeats)
    return t, f"vectorbt {vbt.__version__}: fractional sizing, total return and Sharpe per pair"


def gbm_paths(n, steps, seed=0):
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0002, 0.015, (n, steps)), axis=1))
    return close


def momentum_targets(close, lookback=10):
    """A rule for the paths: long above the price `lookback` steps back, short below (computed once)."""
    targets = np.zeros_like(close)
    targets[:, lookback:] = np.sign(close[:, lookback:] - close[:, :-lookback])
    return targets


def simulate_paths_numpy(close, targets, cash, commission, slippage):
    """Plain numpy reference: the engine's rules (close fills, fractional units) vectorised over paths.

    The loop over time stays in Python, as it must in numpy: each step's size
    depends on the equity the previous steps left.
    """
    n, steps = close.shape
    full = 1.0 - 2.0**-52
    cash_t = np.full(n, cash)
    units = np.zeros(n)
    acted = np.zeros(n)
    equity_out = np.empty((n, steps))
    for t in range(steps):
        price, target = close[:, t], targets[:, t]
        pending = target != acted
        flip = pending & (units != 0) & ((target == 0) | ((target > 0) != (units > 0)))
        delta = np.where(flip, -units, 0.0)
        fill = np.where(delta > 0, price * (1 + slippage), price * (1 - slippage))
        cash_t = cash_t - delta * fill - np.abs(delta) * fill * commission
        units = units + delta
        equity = cash_t + units * price
        direction = np.where(target > 0, 1.0, -1.0)
        budget = equity * np.abs(target) * full
        size_add = budget / (price * (1 + direction * slippage) * (1 + commission))
        size_cut = budget / (price * (1 - direction * slippage) * (1 + commission))
        held = np.abs(units)
        goal = np.where(held < size_add, direction * size_add, np.where(held > size_cut, direction * size_cut, units))
        delta = np.where(pending & (target != 0) & (equity > 0), goal - units, 0.0)
        fill = np.where(delta > 0, price * (1 + slippage), price * (1 - slippage))
        cash_t = cash_t - delta * fill - np.abs(delta) * fill * commission
        units = units + delta
        acted = np.where(pending, target, acted)
        equity_out[:, t] = cash_t + units * price
    # Ruin is not modelled here; the bench's paths never reach it (checked).
    return equity_out


def bench_monte_carlo(n_paths, steps, repeats):
    import torch

    torch.set_num_threads(1)
    close = gbm_paths(n_paths, steps)
    targets = momentum_targets(close)
    costs = dict(cash=CASH, commission=COMMISSION, slippage=0.0005)
    compiled = simulate_paths(close, targets, **costs)  # compile outside the timing
    reference = simulate_paths_numpy(close, targets, **costs)
    torch_equity, _ = simulate_paths_torch(close, targets, device="cpu", **costs)
    assert compiled.equity.min() > 0, "a path was ruined; the numpy reference does not model ruin"
    gap_numba = float(np.max(np.abs(compiled.equity - reference) / reference))
    gap_torch = float(np.max(np.abs(torch_equity.numpy() - reference) / reference))
    timed = interleaved_medians(
        {"numpy": lambda: simulate_paths_numpy(close, targets, **costs),
         "numba": lambda: simulate_paths(close, targets, **costs),
         "torch_cpu": lambda: simulate_paths_torch(close, targets, device="cpu", **costs)},
        repeats,
    )
    cuda = None
    if torch.cuda.is_available():
        simulate_paths_torch(close, targets, device="cuda", **costs)

        def on_gpu():
            out = simulate_paths_torch(close, targets, device="cuda", **costs)
            torch.cuda.synchronize()
            return out

        cuda = median_seconds(on_gpu, repeats)[0]
    return {**timed, "torch_cuda": cuda, "gap_numba": gap_numba, "gap_torch": gap_torch}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000, help="SMA (fast, slow) pairs in the grid")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; medians are printed")
    parser.add_argument("--bt-sample", type=int, default=8, help="pairs run through backtesting.py")
    parser.add_argument("--paths", type=int, default=10_000, help="Monte Carlo paths")
    parser.add_argument("--steps", type=int, default=252, help="steps per Monte Carlo path")
    parser.add_argument("--skip-vectorbt", action="store_true", help="do not time vectorbt")
    args = parser.parse_args(argv)

    import numba

    numba.set_num_threads(1)
    from backtesting.test import GOOG

    bars = GOOG
    n_bars = len(bars)
    fast, slow = sma_pairs(args.pairs)
    print(f"data: GOOG daily, {n_bars} bars; grid: {len(fast)} SMA pairs; one core; medians of {args.repeats}")
    print(f"numpy {np.__version__}, numba {numba.__version__}")

    ours, result = bench_ours(bars, fast, slow, args.repeats)
    rate = {k: len(fast) / v for k, v in ours.items()}
    print("\ncore.engine")
    print(f"  sweep (signals + engine + metrics, no curves): {ours['sweep'] * 1e3:8.1f} ms  "
          f"{rate['sweep']:10,.0f} backtests/s  {rate['sweep'] * n_bars:14,.0f} bars/s")
    print(f"  same, keeping [P, T] equity and units curves:  {ours['curves'] * 1e3:8.1f} ms  "
          f"{rate['curves']:10,.0f} backtests/s  {rate['curves'] * n_bars:14,.0f} bars/s")
    print(f"  engine + metrics alone (targets given):        {ours['engine'] * 1e3:8.1f} ms  "
          f"{rate['engine']:10,.0f} backtests/s  {rate['engine'] * n_bars:14,.0f} bars/s")
    print(f"  signals alone (pandas-exact SMAs + crossings):   {ours['signals'] * 1e3:6.1f} ms")

    bt_time, bt_note = bench_backtesting_py(bars, fast, slow, args.bt_sample, result)
    print("\nbacktesting.py")
    if bt_time is None:
        print(f"  {bt_note}")
    else:
        print(f"  {bt_time * 1e3:8.1f} ms per backtest  {1 / bt_time:10,.1f} backtests/s  "
              f"{n_bars / bt_time:14,.0f} bars/s  ({bt_note})")

    print("\nvectorbt")
    vbt_time, vbt_note = (None, "skipped (--skip-vectorbt)") if args.skip_vectorbt else bench_vectorbt(
        bars, fast, slow, args.repeats)
    if vbt_time is None:
        print(f"  {vbt_note}")
    else:
        vbt_rate = len(fast) / vbt_time
        print(f"  {vbt_time * 1e3:8.1f} ms  {vbt_rate:10,.0f} backtests/s  {vbt_rate * n_bars:14,.0f} bars/s  "
              f"({vbt_note})")

    print("\nratios (core.engine sweep / peer, backtests per second; targets: >= 100x vectorbt, "
          ">= 5,000x backtesting.py)")
    if vbt_time is not None:
        print(f"  vs vectorbt:       {rate['sweep'] * vbt_time / len(fast):10,.1f}x "
              f"(with curves {rate['curves'] * vbt_time / len(fast):,.1f}x)")
    if bt_time is not None:
        print(f"  vs backtesting.py: {rate['sweep'] * bt_time:10,.0f}x "
              f"(with curves {rate['curves'] * bt_time:,.0f}x)")

    mc = bench_monte_carlo(args.paths, args.steps, args.repeats)
    work = args.paths * args.steps
    print(f"\nMonte Carlo: {args.paths:,} paths x {args.steps} steps, close fills, fractional units "
          "(target: >= 10x plain numpy)")
    for name in ("numpy", "numba", "torch_cpu", "torch_cuda"):
        if mc[name] is None:
            print(f"  {name:10s} not run (no CUDA device)")
            continue
        print(f"  {name:10s} {mc[name] * 1e3:8.1f} ms  {work / mc[name]:14,.0f} path-steps/s  "
              f"{mc['numpy'] / mc[name]:6.1f}x numpy")
    print(f"  agreement with numpy: numba {mc['gap_numba']:.1e}, torch {mc['gap_torch']:.1e} (max relative)")


if __name__ == "__main__":
    main()
