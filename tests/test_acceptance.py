"""Acceptance rates: closed forms == enumeration; Monte Carlo within 4 standard errors."""

import zlib

import numpy as np
import pytest

import mdsd
from mdsd.verifiers import VERIFIERS

from conftest import law_accepts, random_pair

CLOSED = [
    ("rrs", "iid"),
    ("kseq", "iid"),
    ("importance", "iid"),
    ("greedy", "greedy"),
    ("spechub", "spechub"),
    ("sample_check", "iid"),
    ("sample_check", "greedy"),
    ("sample_check", "spechub"),
    ("sample_check", "conditional_poisson"),
]


@pytest.mark.parametrize("verifier,law", CLOSED)
def test_closed_form_equals_enumeration(verifier, law):
    rng = np.random.default_rng(zlib.crc32(f"{verifier}/{law}".encode()))
    for i in range(40):
        vocab = int(rng.integers(2, 7))
        n = 2 if law == "spechub" else int(rng.integers(1, 5))
        p, q = random_pair(rng, vocab, zero_p=i % 3 == 0, zero_q=i % 4 == 0)
        if not law_accepts(law, q, n):
            continue
        closed = mdsd.acceptance_rate(p, q, n, verifier, law)
        assert closed.method == "closed_form"
        exact = mdsd.acceptance_rate(p, q, n, verifier, law, method="enumeration")
        assert closed.rate == pytest.approx(exact.rate, abs=1e-12)


@pytest.mark.parametrize("verifier,law", [(v, law) for v in VERIFIERS for law in VERIFIERS[v].laws])
def test_monte_carlo_within_four_standard_errors(verifier, law):
    rng = np.random.default_rng(zlib.crc32(f"mc/{verifier}/{law}".encode()))
    p, q = random_pair(rng, 6)
    n = 2
    exact = mdsd.acceptance_rate(p, q, n, verifier, law, method="enumeration").rate
    estimate = mdsd.acceptance_rate(p, q, n, verifier, law, method="monte_carlo", rng=1, num_samples=4000)
    assert estimate.method == "monte_carlo" and estimate.num_samples == 4000
    assert abs(estimate.rate - exact) <= 4 * estimate.stderr + 1e-12


def test_auto_falls_back_to_monte_carlo_for_large_support(rng):
    p, q = random_pair(rng, 400)
    result = mdsd.acceptance_rate(p, q, 3, "sample_check", "without_replacement", num_samples=256)
    assert result.method == "monte_carlo"
    assert 0 < result.stderr < 0.05
    bound = mdsd.optimal_acceptance(p, q, 3, "without_replacement")
    assert result.rate <= bound + 4 * result.stderr


def test_batched_acceptance_matches_rows(rng):
    p = rng.dirichlet(np.ones(20), size=5)
    q = rng.dirichlet(np.ones(20), size=5)
    batched = mdsd.acceptance_rate(p, q, 3, "kseq")
    rows = [mdsd.acceptance_rate(p[i], q[i], 3, "kseq").rate for i in range(5)]
    np.testing.assert_allclose(batched.rate, rows, atol=1e-14)
    assert batched.rate.shape == (5,)


def test_forced_closed_form_without_one_raises(rng):
    p, q = random_pair(rng, 5)
    with pytest.raises(ValueError, match="no closed form"):
        mdsd.acceptance_rate(p, q, 2, "sample_check", "without_replacement", method="closed_form")
    with pytest.raises(ValueError, match="unknown method"):
        mdsd.acceptance_rate(p, q, 2, "rrs", method="guess")


def test_single_draft_is_total_variation_overlap():
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.3, 0.5])
    for verifier in ("rrs", "kseq", "importance"):
        assert mdsd.acceptance_rate(p, q, 1, verifier).rate == pytest.approx(0.2 + 0.2 + 0.1)
