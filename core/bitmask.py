"""Masks of comparisons, 64 values to a word, for the compiled loops.

Marking which of T values pass a test and then visiting only those is how
the compiled loops pick a few bars out of thousands: building the masks
vectorises (a compare per value, no branch), and the set bits are visited
with one count-trailing-zeros instruction each. A loop that tests every
value and branches on it pays a misprediction for most values it keeps;
one that writes every value (branch-free) pays a store for all of them.
The engine uses this for the bars where a crossover's sign changes
(``core.strategies.sma_cross_changes``) and for the returns in the VaR
tail (``core.metrics.summary_core``).

Bit ``j`` of word ``i`` stands for value ``64 * i + j``. This module has no
opinion on what is compared; it is the plumbing, not a feature.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

import numpy as np


@intrinsic
def trailing_zeros(typingctx, word):
    """Index of the lowest set bit of a uint64 (the word must not be 0)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


@intrinsic
def popcount(typingctx, word):
    """Number of set bits of a uint64."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@njit(cache=True, error_model="numpy")
def mask_at_most(x, edge, masks):
    """``masks[i]`` bit j set where ``x[64 i + j] <= edge`` (NaN: unset); returns how many are set."""
    count = 0
    T = np.uint64(x.shape[0])
    for i in range((x.shape[0] + 63) // 64):
        # Unsigned indices: known non-negative, so the loads vectorise (no slices to count references to).
        start = np.uint64(64) * np.uint64(i)
        word = np.uint64(0)
        if start + np.uint64(64) <= T:  # a whole word: a fixed trip count the compiler unrolls
            for j in range(64):
                word |= np.uint64(x[start + np.uint64(j)] <= edge) << np.uint64(j)
        else:
            for t in range(start, T):
                word |= np.uint64(x[t] <= edge) << (t - start)
        masks[i] = word
        count += popcount(word)
    return count


@njit(cache=True)
def gather_set(x, masks, out):
    """Copy the values of ``x`` whose bits are set in ``masks`` to ``out``, in order; returns how many."""
    n = 0
    for i in range((x.shape[0] + 63) // 64):
        word = masks[i]
        base = 64 * i
        while word:
            out[n] = x[base + np.int64(trailing_zeros(word))]
            n += 1
            word &= word - np.uint64(1)
    return n
