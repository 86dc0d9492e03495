"""Compiled pieces both methods' one-call nodes share (``_threshold_numba.threshold_node``,
``_orders_numba.orders_node``): the priority order and the drafts' positions in it, numpy's
summation order, 1 - q, and the keep
test with the residual draw. Each is the numpy step of the row path (``common``, ``laws``) with
the same arithmetic in the same order, so the nodes draw the same tokens as the row paths.
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd._radix_numba import stable_argsort
from mdsd.bound import RADIX_MIN
from mdsd.sampling import draw
from mdsd.verifiers.base import EMPTY_MASS


@numba.njit(cache=True)
def priority_gather(p, q):
    """(order [K], p [K], q [K] in that order): the tokens with q > 0 by p/q decreasing, ties by
    lower id (a stable sort, as ``common.priority_order_reference``): from ``RADIX_MIN`` tokens
    the radix sort, else a merge sort."""
    support = np.flatnonzero(q > 0.0)
    key = np.empty(support.size)
    for j in range(support.size):
        key[j] = -(p[support[j]] / q[support[j]])
    if support.size >= RADIX_MIN:
        order = support[stable_argsort(key)]
    else:
        order = support[np.argsort(key, kind="mergesort")]
    return order, p[order], q[order]


@numba.njit(cache=True)
def positions_in(order, drafts):
    """``common.positions_of``: the position in ``order`` [K] of each draft [n] (draws have
    q > 0, so each is there)."""
    pos = np.zeros(drafts.size, dtype=np.int64)
    for d in range(drafts.size):
        for j in range(order.size):
            if order[j] == drafts[d]:
                pos[d] = j
                break
    return pos


@numba.njit(cache=True)
def numpy_sum(values):
    """values.sum() in numpy's own order, so that the compiled nodes' sums equal the row paths'
    bit for bit (tested): numpy's pairwise summation halves a row
    (at a multiple of 8) until a part has at most 128 values, sums each part in eight
    interleaved partial sums, and adds the halves back up the tree. The tree is walked with an
    explicit stack (numba's on-disk cache mishandles recursive functions)."""
    task_lo = np.empty(64, dtype=np.int64)
    task_count = np.empty(64, dtype=np.int64)  # -1: add the two sums on top of the value stack
    sums = np.empty(64)
    task_lo[0], task_count[0], tasks, depth = 0, values.size, 1, 0
    while tasks > 0:
        tasks -= 1
        lo, count = task_lo[tasks], task_count[tasks]
        if count < 0:
            depth -= 1
            sums[depth - 1] = sums[depth - 1] + sums[depth]
        elif count > 128:
            half = count // 2
            half -= half % 8
            task_lo[tasks], task_count[tasks] = 0, -1  # after both halves
            task_lo[tasks + 1], task_count[tasks + 1] = lo + half, count - half
            task_lo[tasks + 2], task_count[tasks + 2] = lo, half  # the first half first
            tasks += 3
        else:
            sums[depth] = _block_sum(values, lo, count)
            depth += 1
    return sums[0]


@numba.njit(cache=True)
def _block_sum(values, lo, count):
    """numpy's sum of at most 128 values: sequential below 8, else eight partial sums."""
    if count < 8:
        total = 0.0
        for i in range(lo, lo + count):
            total += values[i]
        return total
    r = values[lo : lo + 8].copy()
    i = 8
    while i < count - count % 8:
        for j in range(8):
            r[j] += values[lo + i + j]
        i += 8
    total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < count:
        total += values[lo + i]
        i += 1
    return total


@numba.njit(cache=True)
def others_mass(q):
    """``laws.others_mass``: sum_{b != a} q_b for every a, the largest q (if > 1/2) summed apart."""
    out = numpy_sum(q) - q
    top = np.argmax(q)
    if q[top] > 0.5:
        rest = np.concatenate((q[:top], q[top + 1 :]))
        out[top] = numpy_sum(rest)
    return out


@numba.njit(cache=True)
def keep_or_recover(p, order, rule_mass, chosen, u_keep, u_residual):
    """``common.keep_or_recover``: keep the draft at position ``chosen`` when u_keep m_y < p_y,
    else draw from the residual max(p - m, 0) (p where it is empty) at u_residual."""
    mass, token = rule_mass[chosen], order[chosen]
    if mass > 0.0 and u_keep * mass < p[token]:
        return token
    left = p.copy()
    for j in range(order.size):
        left[order[j]] = max(p[order[j]] - rule_mass[j], 0.0)
    total = 0.0
    for j in range(left.size):
        total += left[j]
    return draw(left, u_residual) if total > EMPTY_MASS else draw(p, u_residual)
