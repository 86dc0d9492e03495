import numpy as np
import pytest

import mdsd

ALL_LAWS = list(mdsd.LAWS)


def random_pair(rng, vocab, concentration=0.7, zero_p=False, zero_q=False):
    """A random (p, q) on `vocab` tokens, optionally with a zero in p and/or q."""
    p = rng.dirichlet(np.full(vocab, concentration))
    q = rng.dirichlet(np.full(vocab, concentration))
    if zero_p:
        p[rng.integers(vocab)] = 0.0
        p /= p.sum()
    if zero_q:
        q[rng.integers(vocab)] = 0.0
        q /= q.sum()
    return p, q


def law_accepts(law, q, n):
    """True when the law can draw n drafts from q (support large enough, spechub n = 2)."""
    try:
        mdsd.get_law(law).check(q, n)
    except ValueError:
        return False
    return True


def edge_pairs():
    """Edge cases (docs/theory.md §6): zeros, p = q, disjoint supports, one-hot p or q, ties."""
    u5 = np.full(5, 0.2)
    return {
        "p_equals_q": (np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.1, 0.2, 0.3, 0.4])),
        "disjoint": (np.array([0.5, 0.5, 0.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.2, 0.3, 0.5])),
        "one_hot_p": (np.array([0.0, 1.0, 0.0, 0.0]), np.array([0.4, 0.3, 0.2, 0.1])),
        "one_hot_q_like": (np.array([0.3, 0.3, 0.4]), np.array([0.98, 0.01, 0.01])),
        "uniform_ties": (u5, u5),
        "zeros_both": (np.array([0.0, 0.5, 0.5, 0.0, 0.0]), np.array([0.25, 0.25, 0.0, 0.25, 0.25])),
        "tiny_mass": (np.array([1e-30, 0.5, 0.5 - 1e-30]), np.array([0.5, 1e-30, 0.5 - 1e-30])),
    }


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
