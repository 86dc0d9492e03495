"""Every verifier is exact for its laws (enumeration), never beats alpha*, and samples its law."""

import zlib

import numpy as np
import pytest
from scipy.stats import chisquare

import mdsd
from mdsd.verifiers import VERIFIERS, accepted_mass

from conftest import edge_pairs, law_accepts, random_pair

PAIRS = [(v, law) for v in VERIFIERS for law in VERIFIERS[v].laws]
ATTAINS_BOUND = {"greedy", "spechub"}


def enumerate_verifier(p, q, n, verifier, law):
    tuples, probs = mdsd.get_law(law).enumerate(q, n)
    rows = len(tuples)
    out = mdsd.output_law(
        np.broadcast_to(p, (rows, p.size)), np.broadcast_to(q, (rows, q.size)), tuples, verifier, law
    )
    return probs @ out, float(probs @ accepted_mass(out, tuples)), out


def check_exact(p, q, n, verifier, law):
    marginal, acceptance, out = enumerate_verifier(p, q, n, verifier, law)
    assert np.all(out >= 0) and np.allclose(out.sum(axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(marginal, p, rtol=0, atol=1e-12)
    bound = mdsd.optimal_acceptance(p, q, n, law)
    assert acceptance <= bound + 1e-12
    if verifier in ATTAINS_BOUND:
        assert acceptance == pytest.approx(bound, abs=1e-12)
    return acceptance


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_exact_on_random_cases(verifier, law):
    rng = np.random.default_rng(zlib.crc32(f"{verifier}-{law}".encode()))
    checked = 0
    for i in range(100):
        vocab = int(rng.integers(2, 7))
        n = 2 if law == "spechub" else int(rng.integers(1, 5))
        p, q = random_pair(
            rng, vocab, concentration=float(rng.choice([0.3, 1.0])), zero_p=i % 3 == 0, zero_q=i % 4 == 0
        )
        if law_accepts(law, q, n):
            check_exact(p, q, n, verifier, law)
            checked += 1
    assert checked >= 40


@pytest.mark.parametrize("name", list(edge_pairs()))
@pytest.mark.parametrize("verifier,law", PAIRS)
def test_exact_on_edge_cases(name, verifier, law):
    p, q = edge_pairs()[name]
    for n in range(1, 5):
        if (law == "spechub" and n != 2) or not law_accepts(law, q, n):
            continue
        check_exact(p, q, n, verifier, law)


def test_spechub_hub_close_to_one():
    """docs/theory.md §5.5: q_a = 0.99998 must not leave an empty residual with mass still to place."""
    q = np.array([0.99998, 1e-5, 1e-5])
    p = np.array([0.2, 0.5, 0.3])
    check_exact(p, q, 2, "spechub", "spechub")


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_verify_samples_output_law(verifier, law):
    """Seeded chi-square test: verify() draws follow output_law (p-value > 1e-4: false-positive
    rate 1e-4)."""
    rng = np.random.default_rng(3)
    p = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    q = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
    n = 2
    drafts = mdsd.get_law(law).sample(q, n, rng)
    expected_law = mdsd.output_law(p, q, drafts, verifier, law)
    count = 20000
    tokens, accepted = mdsd.verify(
        np.broadcast_to(p, (count, 5)),
        np.broadcast_to(q, (count, 5)),
        np.broadcast_to(drafts, (count, n)),
        verifier,
        law,
        rng=rng,
    )
    observed = np.bincount(tokens, minlength=5)
    support = expected_law > 0
    assert observed[~support].sum() == 0
    if support.sum() == 1:  # a deterministic output: every draw is that token
        return
    assert chisquare(observed[support], expected_law[support] * count).pvalue > 1e-4
    assert np.array_equal(accepted, np.isin(tokens, drafts))


def test_verify_single_position_types():
    token, accepted = mdsd.verify([0.5, 0.5], [0.5, 0.5], [0, 1], "rrs", rng=0)
    assert isinstance(token, int) and isinstance(accepted, bool) and accepted


def test_verifier_with_wrong_law_raises():
    with pytest.raises(ValueError, match="exact only for law"):
        mdsd.output_law([0.5, 0.5], [0.5, 0.5], [0, 1], "rrs", law="without_replacement")
    with pytest.raises(ValueError, match="unknown verifier 'fast'"):
        mdsd.output_law([0.5, 0.5], [0.5, 0.5], [0], "fast")


def test_impossible_drafts_are_refused():
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="draft_probs 0"):
        mdsd.output_law(p, q, [2], "rrs")
    with pytest.raises(ValueError, match="distinct"):
        mdsd.output_law(p, q, [0, 0], "rrs_without_replacement")
    with pytest.raises(ValueError, match="most probable"):
        mdsd.output_law([0.2, 0.3, 0.5], [0.5, 0.3, 0.2], [1, 0], "greedy")
    with pytest.raises(ValueError, match="hub"):
        mdsd.output_law([0.2, 0.3, 0.5], [0.5, 0.3, 0.2], [1, 2], "spechub")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mdsd.output_law(p, q, [3], "rrs")
    with pytest.raises(ValueError, match=r"drafts must be \[B, n\]"):
        mdsd.output_law(np.tile(p, (2, 1)), np.tile(q, (2, 1)), [0], "rrs")
