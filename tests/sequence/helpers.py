"""Helpers of the sequence tests: random prefix tables and the tolerances."""

from __future__ import annotations

import numpy as np

from mdsd.sequence import random_prefix_table

EXACT = 1e-12  # exact laws, by enumeration


LP_TOL = 1e-9


P_THRESHOLD = 1e-4  # chi-square p-value threshold: the false-positive rate of each sampler test


def tables(seed, vocab, depth, zero_p=0.0, zero_q=0.0, concentration=1.0):
    rng = np.random.default_rng(seed)
    p = random_prefix_table(vocab, depth + 1, rng, concentration, zero_prob=zero_p)
    q = random_prefix_table(vocab, depth + 1, rng, concentration, zero_prob=zero_q)
    return p, q
