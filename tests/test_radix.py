"""The compiled radix argsort (``mdsd._radix_numba``) against numpy's stable argsort."""

import numpy as np
import pytest

from mdsd import bound
from mdsd._radix_numba import stabilize, stable_argsort


def test_radix_argsort_is_numpys_stable_argsort():
    """The same permutation as ``np.argsort(kind="stable")`` on 300 vectors of 0-3,000 keys:
    normal values, values over 600 decades (every digit of the exponent), many zeros of either
    sign (one key), rounded values (ties), +-inf and NaNs of either sign (last, in index order),
    and the empty vector."""
    gen = np.random.default_rng(0)
    for trial in range(300):
        n = int(gen.integers(0, 3000))
        keys = gen.normal(size=n)
        if trial % 3 == 0:
            keys *= 10.0 ** gen.integers(-300, 300, size=n)
        if n and trial % 4 == 0:
            keys[gen.integers(0, n, size=n // 3)] = 0.0
        if n and trial % 5 == 0:
            keys[gen.integers(0, n, size=n // 5)] = -0.0
        if trial % 6 == 0:
            keys = np.round(keys, 1)
        if n and trial % 7 == 0:
            keys[gen.integers(0, n, size=3)] = np.nan
            keys[gen.integers(0, n, size=2)] = -np.inf
            keys[gen.integers(0, n, size=2)] = np.inf
        if n and trial % 11 == 0:
            keys[gen.integers(0, n, size=3)] = -np.nan
        np.testing.assert_array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))


def test_radix_argsort_of_constant_and_sorted_keys():
    """Keys whose digits are all equal (every pass skipped), already sorted, reversed."""
    for keys in (np.full(5000, 0.25), np.linspace(-1, 1, 5000), np.linspace(1, -1, 5000), np.zeros(1)):
        np.testing.assert_array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))


@pytest.mark.parametrize("numpy_first", [True, False])
def test_stable_argsort_either_way_is_numpys_stable_argsort(monkeypatch, numpy_first):
    """``mdsd.bound.stable_argsort`` gives ``np.argsort(kind="stable")``'s permutation whichever
    sort it picks (numpy's made stable by ``stabilize``, or the radix sort): ties, zeros of
    either sign, NaNs, infinities, below and above ``RADIX_MIN``; ``stabilize`` of any ascending
    order of the keys too."""
    assert isinstance(bound.numpy_sort_is_faster(), bool)
    monkeypatch.setattr(bound, "numpy_sort_is_faster", lambda: numpy_first)
    gen = np.random.default_rng(1)
    for trial in range(60):
        n = int(gen.integers(0, 5000))
        keys = np.round(gen.normal(size=n), int(gen.integers(0, 4)))
        if n and trial % 3 == 0:
            keys[gen.integers(0, n, size=n // 4)] = -0.0
            keys[gen.integers(0, n, size=3)] = np.nan
            keys[gen.integers(0, n, size=2)] = -np.inf
        want = np.argsort(keys, kind="stable")
        np.testing.assert_array_equal(bound.stable_argsort(keys), want)
        np.testing.assert_array_equal(stabilize(keys, np.argsort(keys, kind="heapsort")), want)
