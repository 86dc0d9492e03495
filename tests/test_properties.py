"""Property tests (hypothesis): structural facts about alpha* and the verifiers."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import mdsd


@st.composite
def pairs(draw, min_vocab=2, max_vocab=40):
    vocab = draw(st.integers(min_vocab, max_vocab))
    seed = draw(st.integers(0, 2**32 - 1))
    sharp = draw(st.sampled_from([0.1, 0.5, 2.0]))
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(vocab, sharp))
    q = rng.dirichlet(np.full(vocab, sharp))
    if draw(st.booleans()):
        q = 0.5 * q + 0.5 * p  # overlapping pairs, as real draft/target pairs are
    return p, q


@settings(max_examples=60, deadline=None)
@given(pairs(), st.integers(1, 5))
def test_bound_is_monotone_in_n_and_wor_beats_iid(pair, n):
    p, q = pair
    iid = mdsd.optimal_acceptance(p, q, n, "iid")
    assert 0 <= iid <= 1
    assert mdsd.optimal_acceptance(p, q, n + 1, "iid") >= iid - 1e-12
    if n <= np.count_nonzero(q):
        assert mdsd.optimal_acceptance(p, q, n, "without_replacement") >= iid - 1e-9


@settings(max_examples=60, deadline=None)
@given(pairs())
def test_single_draft_bound_is_overlap(pair):
    p, q = pair
    overlap = np.minimum(p, q).sum()
    for law in ("iid", "without_replacement", "greedy", "conditional_poisson"):
        assert abs(mdsd.optimal_acceptance(p, q, 1, law) - overlap) < 1e-9


@settings(max_examples=40, deadline=None)
@given(pairs(max_vocab=12), st.integers(1, 4))
def test_closed_form_rates_never_exceed_their_bound(pair, n):
    p, q = pair
    for verifier, law in (("rrs", "iid"), ("kseq", "iid"), ("greedy", "greedy")):
        if law == "greedy" and n > np.count_nonzero(q):
            continue
        rate = mdsd.acceptance_rate(p, q, n, verifier, law).rate
        assert rate <= mdsd.optimal_acceptance(p, q, n, law) + 1e-12
