"""mdsd.testing.stats: pooling of small cells and the law test on known inputs."""

from __future__ import annotations

import numpy as np

from mdsd.testing.stats import law_test, pool_bins


def test_pool_bins_and_g_test():
    probs = np.array([0.5, 0.3, 0.0, 1e-4, 2e-4, 0.1997, 1e-4])
    bins = pool_bins(probs, 1000)
    assert bins[2] == -1  # impossible
    assert len({bins[3], bins[4], bins[6]}) == 1  # small tokens pooled
    expected = np.bincount(bins[bins >= 0], probs[bins >= 0] * 1000)
    assert expected.min() >= 10
    rng = np.random.default_rng(0)
    assert law_test(np.array([500, 300, 1, 0, 0, 199, 0]), probs, rng).pvalue == 0.0  # impossible
    fit = law_test(np.array([700, 100, 0, 0, 0, 200, 0]), probs, rng)
    assert fit.pvalue < 1e-20 and fit.tv_low > 0.1
