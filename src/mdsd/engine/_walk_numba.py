"""Compiled step of the engine's walk (``mdsd.engine.walk``): the union of two supports.

Every verified node is verified on the union of the supports of p and q (``walk.common_support``);
with ``np.union1d`` and two ``searchsorted`` calls that took several microseconds per node, and
tens of microseconds in the decoding loop, where the weights' stream has evicted numpy's code. One
merge of the two ascending id lists gives the same arrays (tested against the numpy form,
``walk.common_support_reference``).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def merge_supports(p_ids, p_values, q_ids, q_values):
    """(tokens [K] ascending, p [K], q [K]) on the union of two ascending, duplicate-free id lists
    with their values; 0 where a token is in one support only."""
    size = p_ids.size + q_ids.size
    tokens = np.empty(size, dtype=np.int64)
    p_local, q_local = np.zeros(size), np.zeros(size)
    i = j = m = 0
    while i < p_ids.size or j < q_ids.size:
        if j == q_ids.size or (i < p_ids.size and p_ids[i] < q_ids[j]):
            tokens[m], p_local[m] = p_ids[i], p_values[i]
            i += 1
        elif i == p_ids.size or q_ids[j] < p_ids[i]:
            tokens[m], q_local[m] = q_ids[j], q_values[j]
            j += 1
        else:  # in both supports
            tokens[m], p_local[m], q_local[m] = p_ids[i], p_values[i], q_values[j]
            i += 1
            j += 1
        m += 1
    return tokens[:m], p_local[:m], q_local[:m]
