"""The compiled pass behind ``core.metrics.summary``: every metric of one equity curve in one go.

``summary_core`` writes ``SUMMARY_NAMES`` for one curve from what cheaper
passes hand it: ``returns_into`` (the returns and their moment sums, one
pass), ``floor_ratio`` (the drawdown, tested a stretch of bars at a time)
and ``_smallest_first`` (the return tail, selected rather than sorted).
``summary_row`` runs them all on one series. The backtest engine
(``core.engine.kernels``) calls the same pieces inside its own compiled loop,
right after simulating a series, so a sweep never keeps every equity curve.

The conventions (time on the last axis, drawdowns as positive fractions, VaR
and CVaR as returns, NaN for a zero denominator) and the definitions are
``core.metrics``': its one-metric numpy functions are what the tests hold
these kernels equal to.

Not here: taking arrays of any shape and checking them (``core.metrics.summary``),
the weights of the return tail (``core.metrics.tail_weights``), simulating
trades (``core.engine``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from core.bitmask import gather_set, mask_at_most

# What ``summary_core`` writes: ``out[i]`` is ``SUMMARY_NAMES[i]``.
SUMMARY_NAMES = (
    "final_equity", "total_return", "cagr", "volatility", "sharpe", "sortino", "max_drawdown", "calmar",
    "var", "cvar", "exposure", "n_trades", "win_rate", "profit_factor",
)
# What ``summary_core`` computes without ``full``: everything but the drawdown and the return tail.
MOMENT_NAMES = tuple(n for n in SUMMARY_NAMES if n not in ("max_drawdown", "calmar", "var", "cvar"))


@njit(cache=True, error_model="numpy")
def _smallest_first(a, n, k, buf, guess):
    """Reorder ``a[:n]`` so that ``a[:k]`` holds its k smallest values (in no particular order).

    Quickselect, partitioning out of place into ``buf`` (scratch, at least
    n long) without branches: every value is written to both ends of the
    gap and only the matching end moves on (a branchy partition of returns
    mispredicts on every other value). The first pivot is ``guess``, a
    value expected near the k-th smallest (NaN: none), so the first pass
    leaves only the values between the guess and the k-th; later pivots
    are medians of three. The tail measures need the k smallest returns,
    not a sorted copy.
    """
    lo = 0
    hi = n
    while hi - lo > 1 and lo < k < hi:
        size = hi - lo
        values = a[lo:hi]
        parted = buf[lo:hi]
        element = guess != guess
        if element:
            x, y, z = values[0], values[size >> 1], values[size - 1]
            pivot = max(min(x, y), min(max(x, y), z))
        else:
            pivot = guess
            guess = np.nan
        left = 0
        right = size
        for i in range(size):
            v = values[i]
            parted[left] = v
            parted[right - 1] = v
            below = v < pivot
            left += below
            right -= 1 - below
        if not element and (left == 0 or left == size):
            continue  # the guess split nothing off; values untouched
        if left == 0:
            # Nothing below the pivot, so it is the smallest value: split off
            # every copy of it instead (at least the pivot itself moves).
            right = size
            for i in range(size):
                v = values[i]
                parted[left] = v
                parted[right - 1] = v
                below = v <= pivot
                left += below
                right -= 1 - below
            values[:] = parted
            if k <= lo + left:
                break  # a[lo:lo + left] all hold that smallest value
            lo += left
            continue
        values[:] = parted
        if k <= lo + left:
            hi = lo + left
        else:
            lo += left


# floor_ratio tests this many bars at once, and then pieces of this many.
_DRAWDOWN_STRETCH, _DRAWDOWN_PIECE = 256, 32
_NO_BITS = np.iinfo(np.int64).max


@njit(cache=True, inline="always")
def _double_to_bits(x, cell):
    cell.view(np.float64)[0] = x
    return cell[0]


@njit(cache=True, inline="always")
def _bits_to_double(bits, cell):
    cell[0] = bits
    return cell.view(np.float64)[0]


@njit(cache=True, error_model="numpy", inline="always")
def _bit_range(bits, start, stop):
    """(lowest, highest) of int64 bit patterns ``bits[start:stop]``: for non-negative doubles, their order.

    Unsigned indices, not a slice: known non-negative, so the loop
    vectorises, without reference counting a view per call.
    """
    lo = _NO_BITS
    hi = -_NO_BITS
    for i in range(np.uint64(start), np.uint64(stop)):
        lo = min(lo, bits[i])
        hi = max(hi, bits[i])
    return lo, hi


@njit(cache=True, error_model="numpy")
def floor_ratio(equity, initial, cell):
    """(lowest equity / running peak, final peak) of a curve, the peak starting at ``initial``.

    Exactly min over t of ``equity[t] / peak[t]`` as each division rounds,
    so ``1 - `` it is ``max_drawdown``'s number to the last bit. A running
    peak is a chain of dependent steps with a hard-to-predict branch per
    bar; instead, stretches of bars are tested at once. A stretch whose
    highest equity does not exceed the peak so far leaves the peak alone,
    and dividing by a fixed positive peak keeps order, so its lowest ratio
    is its lowest equity over the peak: one division. Highest and lowest
    come from the bits: non-negative doubles order as their int64 bit
    patterns do, and integer min/max vectorise (float min/max do not, in
    numba). Stretches of 256 bars are tested, then the 32-bar pieces of
    those that fail; a piece with a new high (or a negative value) is
    walked bar by bar. ``cell`` is one int64 of scratch, where bits turn
    back into doubles.
    """
    bits = equity.view(np.int64)
    T = equity.shape[0]
    peak = initial
    ratio = 1.0
    for start in range(0, T, _DRAWDOWN_STRETCH):
        stop = min(start + _DRAWDOWN_STRETCH, T)
        lo, hi = _bit_range(bits, start, stop)
        peak_bits = _double_to_bits(peak, cell)
        if peak > 0.0 and lo >= 0 and hi <= peak_bits:
            ratio = min(ratio, _bits_to_double(lo, cell) / peak)
            continue
        for piece in range(start, stop, _DRAWDOWN_PIECE):
            end = min(piece + _DRAWDOWN_PIECE, stop)
            lo, hi = _bit_range(bits, piece, end)
            if peak > 0.0 and lo >= 0 and hi <= peak_bits:
                ratio = min(ratio, _bits_to_double(lo, cell) / peak)
                continue
            for i in range(np.uint64(piece), np.uint64(end)):
                e = equity[i]
                if e > peak:
                    peak = e
                elif e <= peak * ratio:
                    # Only here can e / peak fall below the ratio (for peak > 0:
                    # e / peak < ratio implies e <= peak * ratio as rounded).
                    ratio = min(ratio, e / peak)
            peak_bits = _double_to_bits(peak, cell)
    return ratio, peak


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def returns_into(equity, before, out):
    """``out[:T]`` = simple returns of ``equity`` [T], the first measured from ``before``; returns their
    moment sums (shift, sum of r - shift, sum of (r - shift)^2, sum of min(r, 0)^2).

    Once equity is gone (ruin) it stays 0; 0/0 is a zero return. The sums
    come from the same pass, shifted by the first return: near the mean, so
    the variance (second - first^2 / T) / (T - 1) cancels little, and
    returns that are all equal give exactly zero. ``reassoc`` lets the
    compiler split the sums into vector lanes instead of chains of dependent
    additions; that changes their rounding, not what is summed (the last
    bits may differ from numpy's pairwise sums, and between CPUs with
    different vector widths). Nothing else here can be reordered: each
    return is one division and one subtraction.
    """
    T = equity.shape[0]
    if T == 0:
        return 0.0, 0.0, 0.0, 0.0
    shift = equity[0] / before - 1.0 if before != 0.0 else 0.0
    out[0] = shift
    b = min(shift, 0.0)
    first = 0.0
    second = 0.0
    down = b * b
    for t in range(1, T):
        prev = equity[t - 1]
        x = equity[t] / prev - 1.0
        x = x if prev != 0.0 else 0.0
        out[t] = x
        d = x - shift
        first += d
        second += d * d
        b = min(x, 0.0)
        down += b * b
    return shift, first, second, down


@njit(cache=True)
def scratch_size(n):
    """Length of the float64 scratch array ``summary_core`` needs for n bars."""
    return 2 * n + (n + 63) // 64


@njit(cache=True, error_model="numpy")
def summary_core(equity, initial, moments, lowest, peak, held, n_closed, wins, gains, losses, periods_per_year,
                 tail, scratch, out, full):
    """The metrics of one equity curve, writing ``out[i]`` for ``SUMMARY_NAMES[i]``.

    ``scratch`` is a float64 array of ``scratch_size(len(equity))`` whose
    first T entries hold the curve's returns and ``moments`` their sums
    (``returns_into``, from ``initial``); ``lowest`` and ``peak`` are the curve's lowest equity / running
    peak and its final peak (``floor_ratio``, from ``initial``);
    ``held`` is the number of bars with a position (exposure's numerator);
    ``n_closed``, ``wins``, ``gains`` and ``losses`` summarise the closed
    trades (``_trade_stats``); ``tail`` comes from ``core.metrics.tail_weights``. The
    backtest engine calls this inside its compiled loop, right after
    simulating a series, so a sweep never has to keep every equity curve;
    ``summary_row`` and ``summary`` call it too, so every caller gets the
    same numbers.

    With ``full`` False only the ``MOMENT_NAMES`` are computed (the drawdown
    and tail entries are NaN and ``lowest``/``peak`` are not read): what a
    search that ranks by Sharpe needs, without the drawdown pass and the
    tail selection.

    Each pass is a plain loop over the returns that the compiler vectorises
    (error_model="numpy": a division is IEEE, with no zero check in the
    loop).
    """
    T = equity.shape[0]
    r = scratch[:T]
    kept = scratch[T:2 * T]
    masks = scratch[2 * T:2 * T + (T + 63) // 64].view(np.uint64)
    root = np.sqrt(periods_per_year)
    shift, first, second, down = moments
    mean = shift + first / T
    sq = max(second - first * (first / T), 0.0)
    worst = 1.0 - lowest if peak > 0.0 else 0.0
    std = np.sqrt(sq / (T - 1)) if T > 1 else np.nan
    downside = np.sqrt(down / T)
    # Compounded growth is the ratio of last to first equity; the product of
    # (1 + r) is the same number with T roundings more.
    growth = equity[T - 1] / initial
    cagr_ = growth ** (periods_per_year / T) - 1.0 if growth > 0.0 else -1.0
    out[0] = equity[T - 1]
    out[1] = growth - 1.0
    out[2] = cagr_
    out[3] = std * root
    out[4] = mean / std * root if std > 0.0 else np.nan
    out[5] = mean / downside * root if downside > 0.0 else np.nan
    out[10] = held / T
    out[11] = n_closed
    out[12] = wins / n_closed if n_closed > 0 else np.nan
    out[13] = gains / losses if losses > 0.0 else (np.inf if gains > 0.0 else np.nan)
    if not full:
        out[6:10] = np.nan
        return
    out[6] = worst
    out[7] = cagr_ / worst if worst > 0.0 else np.nan
    # VaR and CVaR need the ceil(n alpha) smallest returns (see cvar() for the
    # weighting). Select, don't sort: keep the returns below a guess at the
    # tail's edge (a normal fit's quantile at 1.5 alpha, then at 2 alpha),
    # marked in bit masks and gathered; select among those few. If fat
    # tails or flat stretches leave too few below both guesses, select among
    # all returns.
    tail_k, tail_frac, tail_mass, z_near, z_far, z_at = int(tail[0]), tail[1], tail[2], tail[3], tail[4], tail[5]
    need = tail_k + 1 if tail_frac > 0.0 else tail_k
    spread = std if std == std else 0.0
    n_kept = 0
    if mask_at_most(r, mean + z_near * spread, masks) >= need or mask_at_most(r, mean + z_far * spread,
                                                                              masks) >= need:
        n_kept = gather_set(r, masks, kept)
    else:
        kept[:] = r
        n_kept = T
    # r is done with: it is the scratch. First pivot: the normal fit's alpha quantile.
    _smallest_first(kept, n_kept, need, r, mean + z_at * spread)
    tail_sum = 0.0
    var = -np.inf  # the ceil(n alpha)-th smallest return: the largest of the tail
    for i in range(need):
        tail_sum += kept[i]
        if kept[i] > var:
            var = kept[i]
    if tail_frac > 0.0:
        tail_sum -= (1.0 - tail_frac) * var
    out[8] = var
    out[9] = tail_sum / tail_mass


@njit(cache=True, inline="always")
def _trade_stats(trade_pnl):
    """(closed trades, wins, gross profit, gross loss) of a NaN-padded P&L row."""
    n = 0
    wins = 0
    gains = 0.0
    losses = 0.0
    for k in range(trade_pnl.shape[0]):
        x = trade_pnl[k]
        if x == x:
            n += 1
            if x > 0.0:
                wins += 1
                gains += x
            elif x < 0.0:
                losses -= x
    return n, wins, gains, losses


@njit(cache=True)
def summary_row(equity, initial, units, trade_pnl, periods_per_year, tail, out):
    """``summary`` for one series, compiled: ``summary_core`` with the returns, the drawdown,
    the exposure and the trade statistics computed from the curve, a position series and a P&L row."""
    held = 0
    for t in range(units.shape[0]):
        if units[t] != 0.0:
            held += 1
    n, wins, gains, losses = _trade_stats(trade_pnl)
    T = equity.shape[0]
    scratch = np.empty(scratch_size(T))
    moments = returns_into(equity, initial, scratch)
    lowest, peak = floor_ratio(equity, initial, np.empty(1, dtype=np.int64))
    summary_core(equity, initial, moments, lowest, peak, held, n, wins, gains, losses, periods_per_year, tail, scratch,
                 out, True)


@njit(cache=True, parallel=True)
def _summary_rows(equity, initial, units, trade_pnl, periods_per_year, tail, out):
    for p in prange(equity.shape[0]):
        summary_row(equity[p], initial, units[p], trade_pnl[p], periods_per_year, tail, out[p])
