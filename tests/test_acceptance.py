"""Acceptance rates: closed forms == enumeration; Monte Carlo within 4 standard errors."""

import zlib

import numpy as np
import pytest

import mdsd
from mdsd.laws import top_tokens_reference
from mdsd.verifiers import VERIFIERS

from conftest import law_accepts, llm_like_pair, random_pair

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
    """The seeded Monte Carlo estimate is within 4 standard errors of enumeration (normal
    approximation: false-positive rate 6.3e-5 per case)."""
    rng = np.random.default_rng(zlib.crc32(f"mc/{verifier}/{law}".encode()))
    p, q = random_pair(rng, 6)
    n = 2
    exact = mdsd.acceptance_rate(p, q, n, verifier, law, method="enumeration").rate
    estimate = mdsd.acceptance_rate(p, q, n, verifier, law, method="monte_carlo", rng=1, num_samples=4000)
    assert estimate.method == "monte_carlo" and estimate.num_samples == 4000
    assert abs(estimate.rate - exact) <= 4 * estimate.stderr + 1e-12


def test_auto_falls_back_to_monte_carlo_for_large_support(rng):
    """Beyond the enumeration budget, auto uses Monte Carlo; its estimate is below alpha* + 4
    standard errors (one-sided, false-positive rate <= 3.2e-5; seeded)."""
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


def test_acceptance_rate_methods_for_rrs_without_replacement():
    """Closed form at n = 2, enumeration on a top-12 support at n = 4, and the seeded Monte Carlo
    estimate within 5 standard errors of it (false-positive rate 5.7e-7)."""
    rng = np.random.default_rng(18)
    p, q = llm_like_pair(rng, 2000)
    two = mdsd.acceptance_rate(p, q, 2, "rrs_without_replacement")
    assert two.method == "closed_form"
    top = top_tokens_reference(q, 12)
    q_top = np.zeros_like(q)
    q_top[top] = q[top]
    q_top /= q_top.sum()
    four = mdsd.acceptance_rate(p, q_top, 4, "rrs_without_replacement")
    assert four.method == "enumeration"
    estimate = mdsd.acceptance_rate(
        p, q_top, 4, "rrs_without_replacement", method="monte_carlo", num_samples=4096, rng=1
    )
    assert abs(four.rate - estimate.rate) < 5 * estimate.stderr + 1e-12


def test_acceptance_ladder_knobs_used_by_the_analysis(rng, monkeypatch):
    """acceptance_rate's chunk_rows picks the method per chunk (the rates equal the unchunked
    ones); its batched Monte Carlo equals the one-row-at-a-time path draw for draw and is within
    5 standard errors of enumeration (per row: false-positive rate < 6e-7 each, 5 rows)."""
    import mdsd.acceptance as acceptance_module

    p, q = rng.dirichlet(np.ones(5), size=5), rng.dirichlet(np.ones(5), size=5)  # [5, 5]
    exact = mdsd.acceptance_rate(p, q, 3, "rrs_without_replacement", method="enumeration").rate
    chunked = mdsd.acceptance_rate(
        p, q, 3, "sample_check", "without_replacement", max_tuples=10**6, chunk_rows=2
    )
    whole = mdsd.acceptance_rate(p, q, 3, "sample_check", "without_replacement", max_tuples=10**6)
    assert chunked.method == whole.method == "enumeration"
    assert chunked.rate == pytest.approx(whole.rate, abs=1e-15)
    mixed = mdsd.acceptance_rate(p, q, 3, "sample_check", "without_replacement", max_tuples=0, chunk_rows=2)
    assert mixed.method == "monte_carlo" and np.all(mixed.stderr > 0)
    batched = mdsd.acceptance_rate(
        p, q, 3, "rrs_without_replacement", method="monte_carlo", rng=7, num_samples=3000
    )
    assert np.all(np.abs(batched.rate - exact) <= 5 * batched.stderr)
    monkeypatch.setattr(acceptance_module, "CHUNK_ELEMENTS", 64)  # forces one row at a time
    row_by_row = mdsd.acceptance_rate(
        p, q, 3, "rrs_without_replacement", method="monte_carlo", rng=7, num_samples=3000
    )
    assert np.array_equal(row_by_row.rate, batched.rate)
    assert np.array_equal(row_by_row.stderr, batched.stderr)


def test_sample_check_one_draft_without_replacement_is_closed_form(rng):
    """At n = 1 the without-replacement inclusion probabilities are q: sample_check's rate is
    sum p q in closed form, equal to enumeration."""
    p, q = rng.dirichlet(np.ones(6), size=4), rng.dirichlet(np.ones(6), size=4)
    q[0, 2] = 0.0
    q[0] /= q[0].sum()
    closed = mdsd.acceptance_rate(p, q, 1, "sample_check", "without_replacement")
    exact = mdsd.acceptance_rate(p, q, 1, "sample_check", "without_replacement", method="enumeration")
    assert closed.method == "closed_form"
    np.testing.assert_allclose(closed.rate, exact.rate, rtol=0, atol=1e-12)
