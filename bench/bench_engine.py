"""Benchmark: how many backtests per second core.engine runs, against
backtesting.py and vectorbt on the same data and parameter grid, and how many
Monte Carlo path-steps per second its compiled and torch paths run against
plain numpy.

    python bench/bench_engine.py                 # 1,000 SMA pairs, about a minute
    python bench/bench_engine.py --pairs 200 --repeats 3

Everything runs on one core (numba, torch and BLAS held to one thread) on the
GOOG daily bars that backtesting.py ships. Each peer runs the same strategy:
an SMA(fast, slow) crossover, long on the up-cross, short on the down-cross,
0.2% commission, 10,000 cash. Timings are medians over repeats, each timed
from bars and parameters to per-parameter-set metrics (signals included),
with Python's garbage collector paused during every timed call of every
contestant (``timed``); backtesting.py runs a sample of the pairs and is
extrapolated per backtest.

Ours is what the engine offers for a grid, ``core.engine.backtest_sma_grid``:
all 14 metrics of ``core.metrics.summary`` per pair (vectorbt is timed for
total return and Sharpe). The "moments" line is the same grid with
``compute_metrics="moments"``: the 10 metrics that come from the returns'
moments and the trade tallies (vectorbt's two among them), without the
drawdown pass and the VaR/CVaR tail: the like-for-like comparison with
vectorbt. The lines under it keep each pair's trade list,
then the [P, T] curves too, and time the general path the grid replaces
(``sma_crossover``'s [P, T] target matrix, then ``run_batch``).

This is a script that prints numbers, not a test: nothing here asserts a
target. It does check that the implementations it times agree (the grid's
metrics equal the general path's to the bit, final equity matches
backtesting.py's, the Monte Carlo kernels match plain numpy), so a fast
wrong answer cannot pass as a speed-up.
"""

from __future__ import annotations

import os

# One core: set before numpy, numba and torch start their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"
# backtesting.py draws a tqdm progress bar per run when tqdm is installed.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

# Run from a checkout without installing: the repo root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from core.engine import backtest_sma_grid, run_batch, simulate_paths, simulate_paths_torch  # noqa: E402
from core.features import sma  # noqa: E402
from core.strategies import pair_grid, sma_crossover, sma_grid_table  # noqa: E402

CASH = 10_000.0
COMMISSION = 0.002


@dataclass
class Timing:
    """Median seconds of wall-clock and of this process's CPU time.

    On a shared machine the wall clock also counts time other processes held
    the core; CPU time is what the code itself cost. On an idle core the two
    agree. Rates and ratios are printed from both.
    """

    wall: float
    cpu: float


def _clocks():
    return time.perf_counter(), time.process_time()


def timed(fn) -> tuple[float, float, object]:
    """Run ``fn`` once: (wall seconds, cpu seconds, what it returned), with Python's garbage collector
    paused (as ``timeit`` does).

    A collection pass walks every container object in the process, ours,
    numba's, pandas' and torch's included, and it lands on whichever
    contestant happens to allocate when the threshold trips: vectorbt,
    which allocates many Python objects per grid, swung by more than 2x
    from run to run with the collector on, and held still with it paused.
    Collected between calls, outside the timing.
    """
    gc.collect()
    gc.disable()
    try:
        w0, c0 = _clocks()
        value = fn()
        w1, c1 = _clocks()
    finally:
        gc.enable()
    return w1 - w0, c1 - c0, value


def interleaved_medians(fns: dict, repeats: int) -> dict[str, Timing]:
    """Time each callable in turn within each repeat; medians per callable.

    Interleaving keeps a slow spell on a shared machine from landing on one
    contestant only.
    """
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c, _ = timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def paired_ratios(ours, ours_backtests: int, peer, peer_backtests: int, rounds: int) -> list[tuple[float, float]]:
    """Per round, (cpu, wall) ratio of backtests per second, ours over the peer's, timed back to back.

    Each round times ``ours`` right before and right after one run of
    ``peer`` (ours as the median of three calls each time: it takes
    milliseconds, the peer up to a second), so both sides of a ratio see
    the same spell of the machine. A slow spell that lands between two
    phases of a run biases a ratio of phase medians; here it lands on both
    sides of one round's ratio or on neither.
    """
    def ours_once():
        samples = [timed(ours) for _ in range(3)]
        return statistics.median(x[0] for x in samples), statistics.median(x[1] for x in samples)

    out = []
    for _ in range(rounds):
        before = ours_once()
        peer_w, peer_c, _ = timed(peer)
        after = ours_once()
        ours_w, ours_c = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        out.append((peer_c / peer_backtests / (ours_c / ours_backtests),
                    peer_w / peer_backtests / (ours_w / ours_backtests)))
    return out


def sma_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n (fast, slow) pairs spread evenly over fast 2..100, slow 3..250, fast < slow."""
    fast, slow = pair_grid(range(2, 101), range(3, 251))
    pick = np.linspace(0, len(fast) - 1, n).round().astype(int)
    return fast[pick], slow[pick]


def bench_ours(bars, fast, slow, repeats):
    open_, close = bars.Open.to_numpy(float), bars.Close.to_numpy(float)
    costs = dict(cash=CASH, commission=COMMISSION)

    def sweep():  # what a parameter search needs: every metric per pair
        return backtest_sma_grid(bars, fast, slow, sma_method="rolling", keep_curves=False, record_trades=False,
                                 **costs)

    def moments():  # what vectorbt is timed for (total return, Sharpe) and the other moment metrics
        return backtest_sma_grid(bars, fast, slow, sma_method="rolling", keep_curves=False, record_trades=False,
                                 compute_metrics="moments", **costs)

    def with_trades():  # plus each pair's trade list
        return backtest_sma_grid(bars, fast, slow, sma_method="rolling", keep_curves=False, **costs)

    def with_curves():  # plus every equity and position curve, [P, T] each
        return backtest_sma_grid(bars, fast, slow, sma_method="rolling", **costs)

    def general():  # the target matrix spelled out, then the general engine
        targets = sma_crossover(bars, fast, slow, sma_method="rolling")
        return run_batch(open_, close, targets, keep_curves=False, **costs)

    result = sweep()  # compile (or load the numba cache) outside the timing
    # The fused grid must be the general path, to the last bit, or its speed means nothing.
    reference = general()
    for name, value in reference.metrics.items():
        if not np.array_equal(result.metrics[name], value, equal_nan=True):
            raise AssertionError(f"grid and general path disagree on {name}")
    def no_metrics():  # bars to fills and equity, nothing measured
        return backtest_sma_grid(bars, fast, slow, sma_method="rolling", keep_curves=False, record_trades=False,
                                 compute_metrics=False, **costs)

    with_trades()
    with_curves()
    timings = interleaved_medians(
        {"sweep": sweep, "moments": moments, "trades": with_trades, "curves": with_curves, "general": general,
         "signals": lambda: sma_crossover(bars, fast, slow, sma_method="rolling"),
         "table": lambda: sma_grid_table(close, fast, slow, "cross", "rolling"), "no_metrics": no_metrics},
        repeats,
    )
    return timings, result, sweep, moments


def bench_backtesting_py(bars, fast, slow, sample, ours):
    try:
        from backtesting import Backtest, Strategy
        from backtesting.lib import crossover
    except ImportError as exc:  # pragma: no cover - reported, not hidden
        return None, f"backtesting.py not importable: {exc}", None

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
    wall, cpu, worst_gap = [], [], 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt = Backtest(bars, SmaCross, cash=CASH, commission=COMMISSION)
        for p in picks:
            w, c, stats = timed(lambda: bt.run(n1=int(fast[p]), n2=int(slow[p])))
            wall.append(w)
            cpu.append(c)
            worst_gap = max(worst_gap, abs(stats["Equity Final [$]"] - ours.metrics["final_equity"][p]))
    timing = Timing(statistics.median(wall), statistics.median(cpu))

    def run_sample():  # for paired rounds: the whole sample, one backtest after another
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for p in picks:
                bt.run(n1=int(fast[p]), n2=int(slow[p]))

    return timing, f"{sample} pairs; max |final equity - ours| = {worst_gap:.1e}", run_sample


def bench_vectorbt(bars, fast, slow, repeats):
    try:
        import vectorbt as vbt
    except ImportError as exc:
        return None, f"vectorbt not installed ({exc}); pip install vectorbt to compare", None
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
    timing = interleaved_medians({"vectorbt": lambda: run(fast, slow)}, repeats)["vectorbt"]
    return (timing, f"vectorbt {vbt.__version__}: fractional sizing; total return and Sharpe per pair",
            lambda: run(fast, slow))


def gbm_paths(n, steps, seed=0):
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0002, 0.015, (n, steps)), axis=1))
    return close


def momentum_targets(close, lookback=10):
    """High-turnover rule: long above the price ``lookback`` steps back, short below.

    It changes side about every other step, so fills dominate the compiled
    loop's time; numpy's time does not depend on turnover.
    """
    targets = np.zeros_like(close)
    targets[:, lookback:] = np.sign(close[:, lookback:] - close[:, :-lookback])
    return targets


def sma_state_targets(close, fast=10, slow=30):
    """Low-turnover rule: sign(SMA(fast) - SMA(slow)) per path, flat in the warm-up."""
    csum = np.cumsum(close, axis=1)
    csum = np.concatenate([np.zeros((close.shape[0], 1)), csum], axis=1)
    steps = close.shape[1]
    fast_ma = np.full_like(close, np.nan)
    slow_ma = np.full_like(close, np.nan)
    fast_ma[:, fast - 1:] = (csum[:, fast:] - csum[:, :steps - fast + 1]) / fast
    slow_ma[:, slow - 1:] = (csum[:, slow:] - csum[:, :steps - slow + 1]) / slow
    return np.nan_to_num(np.sign(fast_ma - slow_ma))


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


def bench_monte_carlo(n_paths, steps, repeats, rule):
    import torch

    torch.set_num_threads(1)
    close = gbm_paths(n_paths, steps)
    targets = rule(close)
    costs = dict(cash=CASH, commission=COMMISSION, slippage=0.0005)
    compiled = simulate_paths(close, targets, **costs)  # compile outside the timing
    reference = simulate_paths_numpy(close, targets, **costs)
    torch_equity, _ = simulate_paths_torch(close, targets, device="cpu", **costs)
    assert compiled.equity.min() > 0, "a path was ruined; the numpy reference does not model ruin"
    gaps = {
        "numba": float(np.max(np.abs(compiled.equity - reference) / reference)),
        "torch": float(np.max(np.abs(torch_equity.numpy() - reference) / reference)),
    }
    timings = interleaved_medians(
        {"numpy": lambda: simulate_paths_numpy(close, targets, **costs),
         "numba": lambda: simulate_paths(close, targets, **costs),
         "torch_cpu": lambda: simulate_paths_torch(close, targets, device="cpu", **costs)},
        repeats,
    )
    if torch.cuda.is_available():
        simulate_paths_torch(close, targets, device="cuda", **costs)

        def on_gpu():
            simulate_paths_torch(close, targets, device="cuda", **costs)
            torch.cuda.synchronize()

        timings.update(interleaved_medians({"torch_cuda": on_gpu}, repeats))
    turnover = float(np.mean(np.diff(targets, axis=1) != 0))
    return timings, gaps, turnover


def _rate(n: float, t: Timing) -> str:
    return f"{n / t.cpu:12,.0f} /s cpu  {n / t.wall:12,.0f} /s wall"


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

    ours, result, sweep_fn, moments_fn = bench_ours(bars, fast, slow, args.repeats)
    P = len(fast)
    print("\ncore.engine (ms cpu / ms wall; backtests per second; bars per second from cpu time)")
    labels = {
        "sweep": "sweep: backtest_sma_grid, all 14 metrics per pair",
        "moments": "same, the 10 moment metrics (vectorbt's 2 among them)",
        "trades": "same, keeping each pair's trade list",
        "curves": "same, keeping trades and [P, T] curves",
        "general": "sma_crossover [P, T] targets + run_batch",
        "signals": "sma_crossover alone (pandas-exact SMAs)",
    }
    for name, label in labels.items():
        t = ours[name]
        line = f"  {label:47s} {t.cpu * 1e3:7.1f} / {t.wall * 1e3:7.1f}"
        if name != "signals":
            line += f"  {_rate(P, t)}  {P * n_bars / t.cpu:14,.0f} bars/s"
        print(line)
    # Where the sweep's time goes, from the differences of the lines timed above (cpu medians).
    table, bare, mom, full = (ours[k].cpu * 1e3 for k in ("table", "no_metrics", "moments", "sweep"))
    print(f"  where the sweep goes (ms cpu): SMA table {table:.2f}; crossings, fills and equity {bare - table:.2f}; "
          f"returns and moment metrics {mom - bare:.2f}; drawdown and VaR/CVaR tail {full - mom:.2f}")

    bt, bt_note, bt_run = bench_backtesting_py(bars, fast, slow, args.bt_sample, result)
    print("\nbacktesting.py (per backtest, extrapolated from a sample)")
    if bt is None:
        print(f"  {bt_note}")
    else:
        print(f"  {bt.cpu * 1e3:7.1f} / {bt.wall * 1e3:7.1f} ms per backtest  {_rate(1, bt)}  "
              f"{n_bars / bt.cpu:12,.0f} bars/s  ({bt_note})")

    print("\nvectorbt (the whole grid)")
    vbt, vbt_note, vbt_run = (None, "skipped (--skip-vectorbt)", None) if args.skip_vectorbt else bench_vectorbt(
        bars, fast, slow, args.repeats)
    if vbt is None:
        print(f"  {vbt_note}")
    else:
        print(f"  {vbt.cpu * 1e3:7.1f} / {vbt.wall * 1e3:7.1f} ms  {_rate(P, vbt)}  "
              f"{P * n_bars / vbt.cpu:14,.0f} bars/s  ({vbt_note})")

    print("\nratios of backtests per second, core.engine sweep over peer (cpu / wall); "
          "issue targets: >= 100x vectorbt, >= 5,000x backtesting.py")
    sweep, trades, curves, mom = ours["sweep"], ours["trades"], ours["curves"], ours["moments"]
    if vbt is not None:
        print(f"  vs vectorbt:       {vbt.cpu / sweep.cpu:8,.1f}x / {vbt.wall / sweep.wall:8,.1f}x   "
              f"(keeping trades {vbt.cpu / trades.cpu:,.1f}x / {vbt.wall / trades.wall:,.1f}x, "
              f"and curves {vbt.cpu / curves.cpu:,.1f}x / {vbt.wall / curves.wall:,.1f}x; "
              f"moments only {vbt.cpu / mom.cpu:,.1f}x / {vbt.wall / mom.wall:,.1f}x)")
    if bt is not None:
        print(f"  vs backtesting.py: {bt.cpu * P / sweep.cpu:8,.0f}x / {bt.wall * P / sweep.wall:8,.0f}x   "
              f"(keeping trades {bt.cpu * P / trades.cpu:,.0f}x / {bt.wall * P / trades.wall:,.0f}x, "
              f"and curves {bt.cpu * P / curves.cpu:,.0f}x / {bt.wall * P / curves.wall:,.0f}x)")

    print(f"\npaired rounds: the sweep timed right before and after each peer run, {args.repeats} rounds; "
          "median (min to max) of the per-round ratios, cpu / wall")
    paired = {}
    if vbt_run is not None:
        paired["vectorbt"] = (paired_ratios(sweep_fn, P, vbt_run, P, args.repeats), 100)
        paired["vectorbt, moments"] = (paired_ratios(moments_fn, P, vbt_run, P, args.repeats), 100)
    if bt_run is not None:
        paired["backtesting.py"] = (paired_ratios(sweep_fn, P, bt_run, args.bt_sample, args.repeats), 5000)
    for name, (ratios, target) in paired.items():
        cpu_r, wall_r = [r[0] for r in ratios], [r[1] for r in ratios]
        mc, mw = statistics.median(cpu_r), statistics.median(wall_r)
        print(f"  vs {name + ':':16s} {mc:8,.1f}x ({min(cpu_r):,.1f} to {max(cpu_r):,.1f}) / {mw:8,.1f}x "
              f"({min(wall_r):,.1f} to {max(wall_r):,.1f})   target >= {target:,}x: "
              f"{'meets' if min(mc, mw) >= target else 'MISSES'}")

    work = args.paths * args.steps
    for rule_name, rule in (("momentum(10), high turnover", momentum_targets),
                            ("SMA(10) vs SMA(30) state, low turnover", sma_state_targets)):
        timings, gaps, turnover = bench_monte_carlo(args.paths, args.steps, args.repeats, rule)
        print(f"\nMonte Carlo, rule {rule_name} (target changes on {turnover:.0%} of steps): "
              f"{args.paths:,} paths x {args.steps} steps, close fills, fractional units; "
              "issue target: >= 10x plain numpy")
        for name in ("numpy", "numba", "torch_cpu", "torch_cuda"):
            if name not in timings:
                print(f"  {name:10s} not run (no CUDA device here)")
                continue
            t = timings[name]
            print(f"  {name:10s} {t.cpu * 1e3:7.1f} / {t.wall * 1e3:7.1f} ms  {_rate(work, t)} path-steps  "
                  f"{timings['numpy'].cpu / t.cpu:5.1f}x / {timings['numpy'].wall / t.wall:5.1f}x numpy")
        print(f"  agreement with numpy (max relative equity gap): numba {gaps['numba']:.1e}, "
              f"torch {gaps['torch']:.1e}")


if __name__ == "__main__":
    main()
