"""Categorical sampling by inverse CDF: the one implementation every layer uses (numpy).

``categorical(probs, rng)`` draws one token from each row of ``probs`` [..., V] (rows need not
be normalised: the uniform is scaled by the row total). Tokens of zero mass are never drawn: the
draw is the first index whose cumulative mass exceeds u * total (``side="right"``), clipped to
V - 1 against rounding in the last partial sum.

>>> import numpy as np
>>> int(categorical(np.array([0.0, 1.0, 0.0]), np.random.default_rng(0)))
1
"""

from __future__ import annotations

import numpy as np


def categorical(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray | np.int64:
    """One draw per row of ``probs`` [..., V]; an int64 scalar for [V], else int64 [...]."""
    probs = np.asarray(probs)
    if probs.ndim == 1:
        cdf = np.cumsum(probs)
        u = rng.random() * cdf[-1]
        return np.int64(min(int(np.searchsorted(cdf, u, side="right")), probs.size - 1))
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[:-1] + (1,)) * cdf[..., -1:]
    idx = np.sum(cdf <= u, axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1)
