"""Compiled CPU kernel (numba) for the prefix elementary symmetric polynomials of conditional
Poisson sampling (``mdsd.laws.ConditionalPoisson``).

For the tokens in a given order, e_m(H_k) over the first k tokens obeys
e_m(H_k) = e_m(H_{k-1}) + q_k e_{m-1}(H_{k-1}) (all terms non-negative). The state e_0..e_n is
rescaled by its largest entry after every token and the scale kept as a running logarithm, so
nothing overflows or underflows; the kernel returns log e_n(H_k) for k = 0..V (-inf where it is 0).
Same recurrence and rescaling as the numpy reference ``mdsd.laws._elementary_symmetric_scaled``.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True)
def prefix_log_en(q_rows: np.ndarray, n: int) -> np.ndarray:
    """log e_n(first k tokens of each row), k = 0..V.  [B, V] -> [B, V + 1]"""
    batch, vocab = q_rows.shape
    out = np.empty((batch, vocab + 1))
    state = np.empty(n + 1)
    for b in range(batch):
        state[:] = 0.0
        state[0] = 1.0
        log_scale = 0.0
        out[b, 0] = 0.0 if n == 0 else -np.inf
        for k in range(vocab):
            qk = q_rows[b, k]
            top = 0.0
            for m in range(n, 0, -1):
                state[m] += qk * state[m - 1]
                top = max(top, state[m])
            top = max(top, state[0])
            for m in range(n + 1):
                state[m] /= top
            log_scale += math.log(top)
            out[b, k + 1] = math.log(state[n]) + log_scale if state[n] > 0.0 else -np.inf
    return out
