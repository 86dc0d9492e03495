"""The importance verifier's rejected path (``mdsd.verifiers._importance_residual``): the radix
selection draws exactly resid(p, p_I), the reference law (``importance_law`` + ``base.residual``).

The draw is an inverse CDF along the rank order (p / q decreasing, ties by lower id, q = 0 last),
a monotone function of its uniform, so its law is recovered exactly by locating the breakpoints
on the float64 grid (bisection on the bits), for every rank position at once; it is compared with
the reference to 1e-12. ``leaf`` = 1 forces every set through the bounds and the splits (the
default only splits sets of more than 32 tokens); ``leaf`` >= V sorts the whole row.
"""

import numpy as np
import pytest

from mdsd.verifiers._importance_residual import LEAF, importance_residual_draw
from mdsd.verifiers.base import residual
from mdsd.verifiers.classic_math import importance_law, importance_rank

from conftest import awkward_draft, llm_like_pair, random_pair

EXACT_TOL = 1e-12
ONE_BITS = np.float64(1.0).view(np.int64)


def draw(p, q, n, uniforms, leaf):
    tokens = np.empty(uniforms.size, dtype=np.int64)
    importance_residual_draw(
        p[None],
        q[None],
        np.zeros(uniforms.size, dtype=np.int64),  # every draw from the one row
        n,
        uniforms,
        tokens,
        leaf,
    )
    return tokens


def drawn_law(p, q, n, leaf):
    """The kernel's law, exactly: for each rank position k the first u whose token lies after k."""
    vocab = p.size
    order = importance_rank(p[None], q[None])[0]
    position = np.empty(vocab, dtype=np.int64)
    position[order] = np.arange(vocab)
    lo = np.full(vocab, -1, dtype=np.int64)  # the token at lo is at or before k (virtually at -1)
    hi = np.full(vocab, ONE_BITS, dtype=np.int64)  # after k at hi (virtually at 1.0)
    while np.any(hi - lo > 1):
        mid = lo + (hi - lo) // 2
        u = np.maximum(mid, 0).view(np.float64)
        at_or_before = (position[draw(p, q, n, u, leaf)] <= np.arange(vocab)) & (mid >= 0)
        open_ = hi - lo > 1
        lo = np.where(open_ & at_or_before, mid, lo)
        hi = np.where(open_ & ~at_or_before, mid, hi)
    law = np.zeros(vocab)
    law[order] = np.diff(np.concatenate([[0.0], hi.view(np.float64)]))
    return law


def reference(p, q, n):
    return residual(p[None], importance_law(p[None], q[None], n))[0]


def tempered(probs, temperature):
    logits = np.log(probs) / temperature
    out = np.exp(logits - logits.max())
    return out / out.sum()


def cases():
    """(name, p, q): LLM-like rows, ties, zeros in p and q, tiny masses, a huge weight range."""
    rng = np.random.default_rng(20261202)
    out = []
    for temperature in (0.7, 1.0, 2.0):
        p, q = llm_like_pair(rng, 300)
        out.append((f"llm_T{temperature}", tempered(p, temperature), tempered(q, temperature)))
    p, q = random_pair(rng, 200, concentration=0.3)
    out.append(("dirichlet", p, q))
    q = rng.dirichlet(np.ones(150))
    out.append(("p_equals_q", q.copy(), q))  # every weight 1: one tie run
    q = awkward_draft(rng, 150, "ties")
    p = q * rng.integers(1, 6, 150)
    out.append(("tied_weights", p / p.sum(), q))  # five distinct weights
    p, q = random_pair(rng, 200)
    p[rng.choice(200, 60, replace=False)] = 0.0
    q[rng.choice(200, 60, replace=False)] = 0.0
    out.append(("zeros", p / p.sum(), q / q.sum()))
    p, q = random_pair(rng, 120)
    p[:40] = 1e-30
    q[40:80] = 1e-200
    out.append(("tiny", p / p.sum(), q / q.sum()))
    return out


CASES = cases()


def check(p, q, n, leaf):
    """The draw's law times the residual mass m = sum (p - p_I)_+ (the probability of reaching
    this draw, over the drafts: m = sum (p_I - p)_+) equals the reference's, to 1e-12: where m is
    rounding noise (p_I = p), both laws are noise and the draw is never reached."""
    expected = reference(p, q, n)
    mass = np.maximum(p - importance_law(p[None], q[None], n)[0], 0.0).sum()
    got = drawn_law(p, q, n, leaf)
    np.testing.assert_allclose(mass * got, mass * expected, rtol=0, atol=EXACT_TOL)
    np.testing.assert_allclose(got.sum(), 1.0, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("name,p,q", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("leaf", [1, LEAF])
def test_law_is_the_residual(name, p, q, leaf):
    """Exact law of the draw = resid(p, p_I), n = 1, 2, 4, through the radix path."""
    for n in (1, 2, 4):
        check(p, q, n, leaf)


def test_more_drafts_than_support():
    """n = 8 drafts on a draft support of 5 tokens (p_I puts mass only there)."""
    rng = np.random.default_rng(3)
    p, q = random_pair(rng, 60)
    q[5:] = 0.0
    q /= q.sum()
    for leaf in (1, LEAF):
        check(p, q, 8, leaf)


def test_leaf_size_changes_nothing():
    """The same tokens from the same uniforms whatever ``leaf`` (1: all bounds and splits; 32;
    V: one sorted leaf), on LLM-like rows at V = 1000."""
    rng = np.random.default_rng(5)
    p, q = llm_like_pair(rng, 1000)
    uniforms = rng.random(1000)
    sorted_whole = draw(p, q, 4, uniforms, 1000)
    for leaf in (1, LEAF):
        np.testing.assert_array_equal(draw(p, q, 4, uniforms, leaf), sorted_whole)


def test_empty_residual_draws_from_p():
    """p = p_I exactly (one draft, p = q): the residual is empty (<= EMPTY_MASS), so the draw is
    from p, in rank order, as the reference (``base.residual`` returns p)."""
    q = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(reference(q, q, 1), q)
    for leaf in (1, LEAF):
        np.testing.assert_allclose(drawn_law(q, q, 1, leaf), q, rtol=0, atol=EXACT_TOL)


def test_same_draws_as_the_sorted_reference_at_full_vocabulary():
    """At V = 32,000 (LLM-like rows, T = 0.7 and 1, n = 2 and 4), the draws from 400 uniforms
    equal the inverse CDF of the reference residual along the sorted rank order (a draw differs
    only if a uniform falls within rounding, ~1e-15, of a breakpoint)."""
    rng = np.random.default_rng(32000)
    for temperature, n in ((0.7, 4), (1.0, 2)):
        p, q = llm_like_pair(rng, 32000)
        p, q = tempered(p, temperature), tempered(q, temperature)
        order = importance_rank(p[None], q[None])[0]
        cdf = np.cumsum(reference(p, q, n)[order])
        uniforms = rng.random(400)
        expected = order[np.minimum(np.searchsorted(cdf, uniforms * cdf[-1], side="right"), p.size - 1)]
        np.testing.assert_array_equal(draw(p, q, n, uniforms, LEAF), expected)
