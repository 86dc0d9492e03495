"""Bad input raises ValueError naming the argument and the value."""

import numpy as np
import pytest

import mdsd


@pytest.mark.parametrize(
    "p,match",
    [
        ([0.5, np.nan], r"target_probs contains a non-finite value nan"),
        ([0.5, np.inf], r"target_probs contains a non-finite value inf"),
        ([1.2, -0.2], r"target_probs has negative mass -0.2"),
        ([0.5, 0.6], r"target_probs must sum to 1.*1\.1.*normalize=True"),
        ([], r"target_probs has an empty vocabulary"),
        (0.5, r"target_probs must have at least one dimension"),
    ],
)
def test_bad_target(p, match):
    with pytest.raises(ValueError, match=match):
        mdsd.optimal_acceptance(p, [0.5, 0.5], 2)


def test_normalize_option():
    alpha = mdsd.optimal_acceptance([1.0, 1.0], [2.0, 2.0], 1, normalize=True)
    assert alpha == pytest.approx(1.0)


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"target_probs and draft_probs must have the same shape"):
        mdsd.optimal_acceptance([0.5, 0.5], [0.2, 0.3, 0.5], 1)


@pytest.mark.parametrize(
    "n,match", [(0, "n must be >= 1, got 0"), (1.5, "n must be an integer"), (True, "n must be an integer")]
)
def test_bad_n(n, match):
    with pytest.raises(ValueError, match=match):
        mdsd.optimal_acceptance([0.5, 0.5], [0.5, 0.5], n)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown law 'nope'"):
        mdsd.optimal_acceptance([0.5, 0.5], [0.5, 0.5], 1, "nope")
    with pytest.raises(ValueError, match="unknown verifier 'nope'"):
        mdsd.acceptance_rate([0.5, 0.5], [0.5, 0.5], 1, "nope")


def test_n_above_support_for_distinct_laws():
    with pytest.raises(ValueError, match=r"n = 3 drafts are more than the support"):
        mdsd.acceptance_rate([0.5, 0.5, 0], [0.5, 0.5, 0], 3, "rrs_without_replacement")
