"""The compiled radix argsort (``mdsd._radix_numba``) against numpy's stable argsort."""

import numpy as np

from mdsd._radix_numba import stable_argsort


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
