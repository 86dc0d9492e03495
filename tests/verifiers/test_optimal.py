"""The optimal verifier: exact by enumeration, attains alpha* (LP), fit reuse, exact by construction."""

import itertools
import warnings
import zlib

import numpy as np
import pytest

import mdsd
from mdsd import lp
from mdsd.io import random_pair as lm_pair
from mdsd.laws import THREE_DRAFT_CLOSED_MAX
from mdsd.verifiers import accepted_mass
from mdsd.verifiers import optimal as opt
from mdsd.verifiers.optimal import (
    common,
    fit_optimal,
    orders,
    output_law_from_fit,
    priority_orders,
    threshold,
    verify_from_fit,
)
from mdsd.verifiers.optimal import verifier as front
from mdsd.verifiers.optimal.common import ORDER_SPLIT_MAX_DRAFTS, ORDER_SPLIT_WIDE_SUPPORT, priority_scan
from mdsd.verifiers.optimal.verifier import node_plan

from conftest import edge_pairs, g_test_pvalue, law_accepts, random_pair

LAWS = ["iid", "without_replacement", "conditional_poisson"]
MARGINAL_TOL = 1e-12  # sum_x P(x) pi(. | x) = p
OPTIMAL_TOL = 1e-6  # acceptance vs the LP's alpha*
G_TEST_MIN_P = 1e-4  # each G-test fails a correct sampler with probability 1e-4


@pytest.fixture
def orders_for_three(monkeypatch):
    """Three to twelve drafts without replacement fitted by priority orders (as more are),
    instead of the order split: the orders method's tests on small n."""
    monkeypatch.setattr(front, "uses_order_split", lambda law, n, support: False)


def enumerate_optimal(p, q, n, law, fit=None):
    """(marginal [V], acceptance, output laws [M, V], tuples [M, n]) by enumerating the law."""
    tuples, probs = mdsd.get_law(law).enumerate(q, n)
    if fit is None:
        out = mdsd.output_law(
            np.broadcast_to(p, (len(tuples), p.size)),
            np.broadcast_to(q, (len(tuples), q.size)),
            tuples,
            "optimal",
            law,
        )
    else:
        out = output_law_from_fit(fit, tuples)
    return probs @ out, float(probs @ accepted_mass(out, tuples)), out, tuples


def check_exact_and_optimal(p, q, n, law, lp_check=False):
    marginal, acceptance, out, _ = enumerate_optimal(p, q, n, law)
    assert np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(marginal, p, rtol=0, atol=MARGINAL_TOL)
    bound = mdsd.optimal_acceptance(p, q, n, law)
    assert acceptance <= bound + 1e-12
    assert acceptance == pytest.approx(bound, abs=OPTIMAL_TOL)
    if lp_check:
        assert acceptance == pytest.approx(lp.lp_optimal_acceptance(p, q, n, law).alpha, abs=OPTIMAL_TOL)
    # the closed form is the rate of the rule actually used (sum a; for priority orders it may be
    # certified by its distance to alpha* instead, where the rate lies in [sum a, alpha*])
    closed = mdsd.acceptance_rate(p, q, n, "optimal", law, method="auto")
    if closed.method == "closed_form":
        tol = 1e-12 if fit_optimal(p, q, n, law).method == "threshold" else opt.CERTIFY_GAP
        assert closed.rate == pytest.approx(acceptance, abs=tol)
    return acceptance


@pytest.mark.parametrize("law", LAWS)
def test_exact_and_optimal_on_random_cases(law):
    """Hundreds of random small cases: exact to 1e-12, within 1e-6 of the LP's alpha*."""
    rng = np.random.default_rng(zlib.crc32(f"optimal-{law}".encode()))
    checked = 0
    for i in range(200):
        vocab = int(rng.integers(2, 7))
        n = int(rng.integers(1, 5))
        p, q = random_pair(
            rng,
            vocab,
            concentration=float(rng.choice([0.2, 0.5, 1.0, 3.0])),
            zero_p=i % 3 == 0,
            zero_q=i % 4 == 0,
        )
        if law_accepts(law, q, n):
            check_exact_and_optimal(p, q, n, law, lp_check=i % 4 == 0)
            checked += 1
    assert checked >= 150


@pytest.mark.parametrize("name", list(edge_pairs()))
@pytest.mark.parametrize("law", LAWS)
def test_edge_cases(name, law):
    p, q = edge_pairs()[name]
    for n in range(1, 5):
        if law_accepts(law, q, n):
            check_exact_and_optimal(p, q, n, law, lp_check=True)


@pytest.mark.parametrize("law", LAWS)
def test_more_edge_cases(law):
    """One-hot q, p = q with n > 1, tiny masses, far-apart p and q."""
    cases = [
        (np.array([0.2, 0.3, 0.5]), np.array([0.0, 1.0, 0.0])),
        (np.array([0.25, 0.25, 0.25, 0.25]), np.array([0.25, 0.25, 0.25, 0.25])),
        (np.array([1e-30, 1e-30, 1.0 - 2e-30]), np.array([0.5 - 1e-30, 0.5, 1e-30])),
        (np.array([0.97, 0.01, 0.01, 0.01]), np.array([0.01, 0.01, 0.01, 0.97])),
    ]
    for p, q in cases:
        for n in range(1, 4):
            if law_accepts(law, q, n):
                check_exact_and_optimal(p, q, n, law)


def test_iid_larger_vocabulary_exact():
    """A 12-token LM-like pair with 3 i.i.d. drafts: 1728 tuples, still exact and optimal."""
    p, q = lm_pair(12, seed=4, temperature=0.8)
    check_exact_and_optimal(p, q, 3, "iid")


@pytest.mark.parametrize("seed,temperature,n", [(0, 1.0, 2), (1, 0.7, 4), (2, 0.3, 8)])
def test_iid_full_vocabulary_attains_alpha(seed, temperature, n):
    """At V = 2000 the fit's exact acceptance equals the sort-and-scan alpha*."""
    p, q = lm_pair(2000, seed=seed, temperature=temperature)
    fit = fit_optimal(p, q, n, "iid")
    assert fit.certified[0]
    assert fit.acceptance[0] == pytest.approx(mdsd.optimal_acceptance(p, q, n, "iid"), abs=1e-9)
    law = np.atleast_2d(output_law_from_fit(fit, mdsd.get_law("iid").sample(q, n, np.random.default_rng(0))))
    assert np.all(law >= 0) and np.allclose(law.sum(axis=1), 1.0)


def test_fit_reuse_matches_front_door():
    """One fit serves every draft set of its position, batched or one at a time."""
    rng = np.random.default_rng(5)
    p, q = random_pair(rng, 6)
    for law in LAWS:
        fit = fit_optimal(p, q, 3, law)
        drafts = mdsd.get_law(law).sample(np.broadcast_to(q, (50, 6)), 3, rng)
        batched = output_law_from_fit(fit, drafts)
        direct = mdsd.output_law(
            np.broadcast_to(p, (50, 6)), np.broadcast_to(q, (50, 6)), drafts, "optimal", law
        )
        np.testing.assert_allclose(batched, direct, atol=1e-14)
        np.testing.assert_allclose(output_law_from_fit(fit, drafts[7]), direct[7], atol=1e-14)
        via_verifier = mdsd.get_verifier("optimal").output_law(
            np.broadcast_to(p, (50, 6)), np.broadcast_to(q, (50, 6)), drafts, mdsd.get_law(law), fit=fit
        )
        np.testing.assert_allclose(via_verifier, direct, atol=1e-14)


def test_batched_fit_rows_are_independent():
    rng = np.random.default_rng(6)
    pairs = [random_pair(rng, 5) for _ in range(4)]
    p = np.stack([a for a, _ in pairs])
    q = np.stack([b for _, b in pairs])
    fit = fit_optimal(p, q, 2, "iid")
    for b in range(4):
        single = fit_optimal(p[b], q[b], 2, "iid")
        np.testing.assert_allclose(fit.accepted[b], single.accepted[0], atol=1e-15)
    assert fit.acceptance == pytest.approx(mdsd.optimal_acceptance(p, q, 2, "iid"), abs=1e-12)


def test_exact_whatever_the_levels(monkeypatch):
    """Exactness by construction: random cut levels lose acceptance, never exactness."""
    rng = np.random.default_rng(7)

    def random_levels(ps, qs, phi, split):
        levels = rng.random(qs.size + 1)
        levels[0] = levels[-1] = 0.0
        return levels, threshold._threshold_rates(qs, phi, levels)

    monkeypatch.setattr(threshold, "_fit_levels", random_levels)
    for _ in range(20):
        vocab, n = int(rng.integers(3, 7)), int(rng.integers(2, 4))
        p, q = random_pair(rng, vocab)
        for law, drafts in (("iid", n), ("without_replacement", 2)):
            fit = fit_optimal(p, q, drafts, law)
            marginal, acceptance, _, _ = enumerate_optimal(p, q, drafts, law, fit=fit)
            np.testing.assert_allclose(marginal, p, rtol=0, atol=MARGINAL_TOL)
            assert acceptance <= mdsd.optimal_acceptance(p, q, drafts, law) + 1e-12
            assert acceptance >= fit.acceptance[0] - 1e-12  # sum a is a lower bound


def test_peel_rates_match_reference():
    """The rates accumulated while peeling equal the plain level-by-level computation."""
    rng = np.random.default_rng(8)
    for _ in range(20):
        p, q = random_pair(rng, int(rng.integers(3, 30)), concentration=0.5)
        n = int(rng.integers(2, 6))
        scan = priority_scan(p, q, n, mdsd.get_law("iid"))
        order, phi, split = scan.order, scan.phi, scan.split
        target, _ = threshold._target_curve(p[order], q[order], phi, split)
        levels, rate = threshold._peel(q[order], phi, target)
        reference = threshold._threshold_rates(q[order], phi, levels)
        np.testing.assert_allclose(rate, reference, rtol=1e-10, atol=1e-12)


def test_accepted_mass_is_min_p_cq():
    """With the fitted levels the accepted-mass vector is min(p, c q) for one scalar c."""
    rng = np.random.default_rng(9)
    for _ in range(20):
        p, q = random_pair(rng, 8, concentration=0.5)
        fit = fit_optimal(p, q, 3, "iid")
        a = fit.accepted[0]
        free = (a < p - 1e-12) & (q > 0)
        if free.any():
            c = a[free] / q[free]
            assert np.allclose(c, c[0], rtol=1e-9)
            assert np.allclose(a, np.minimum(p, c[0] * q), atol=1e-12)


def test_verify_from_fit_samples_output_law():
    """verify_from_fit draws follow output_law_from_fit: seeded G-test, false-positive rate 1e-4."""
    rng = np.random.default_rng(10)
    p = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    q = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
    fit = fit_optimal(p, q, 2, "iid")
    drafts = np.tile([2, 1], (20000, 1))
    tokens, accepted = verify_from_fit(fit, drafts, rng)
    expected = output_law_from_fit(fit, [2, 1])
    assert g_test_pvalue(np.bincount(tokens, minlength=5), expected) > G_TEST_MIN_P
    assert np.array_equal(accepted, np.isin(tokens, [1, 2]))
    token, ok = verify_from_fit(fit, [2, 1], rng)
    assert isinstance(token, int) and isinstance(ok, bool)


@pytest.mark.parametrize(
    "law, fallback",
    [("without_replacement", "rrs_without_replacement"), ("conditional_poisson", "sample_check")],
)
def test_fallback_warns_and_stays_valid(orders_for_three, monkeypatch, law, fallback):
    monkeypatch.setattr(front, "MAX_ORDER_SUPPORT", 5)
    p, q = random_pair(np.random.default_rng(11), 6)
    with pytest.warns(RuntimeWarning, match="MAX_ORDER_SUPPORT"):
        fit = fit_optimal(p, q, 3, law)
    assert fit.method == fallback and not fit.certified[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        marginal, acceptance, _, _ = enumerate_optimal(p, q, 3, law, fit=fit)
        rate = mdsd.acceptance_rate(p, q, 3, "optimal", law, method="enumeration").rate
    np.testing.assert_allclose(marginal, p, rtol=0, atol=MARGINAL_TOL)
    assert rate == pytest.approx(acceptance, abs=1e-12)


def test_methods_by_law_and_n():
    p, q = random_pair(np.random.default_rng(12), 6)
    assert fit_optimal(p, q, 4, "iid").method == "threshold"
    assert fit_optimal(p, q, 2, "without_replacement").method == "threshold"
    assert fit_optimal(p, q, 3, "without_replacement").method == "threshold"  # the order split
    assert fit_optimal(p, q, 4, "without_replacement").method == "threshold"
    big_p, big_q = random_pair(np.random.default_rng(14), 12)
    assert fit_optimal(big_p, big_q, 8, "without_replacement").method == "threshold"
    assert fit_optimal(big_p, big_q, 12, "without_replacement").method == "threshold"
    wide_p, wide_q = random_pair(np.random.default_rng(13), 300)  # Qall by quadrature
    assert fit_optimal(wide_p, wide_q, 3, "without_replacement").method == "threshold"
    assert fit_optimal(wide_p, wide_q, 12, "without_replacement").method == "threshold"
    assert fit_optimal(wide_p, wide_q, 16, "without_replacement").method == "threshold"  # > 128 tokens
    assert fit_optimal(wide_p, wide_q, 17, "without_replacement").method == "orders"
    small_p, small_q = random_pair(np.random.default_rng(15), 100)  # <= ORDER_SPLIT_WIDE_SUPPORT
    assert fit_optimal(small_p, small_q, 12, "without_replacement").method == "threshold"
    assert fit_optimal(small_p, small_q, 13, "without_replacement").method == "orders"
    assert fit_optimal(p, q, 2, "conditional_poisson").method == "orders"
    assert fit_optimal(p, q, 1, "conditional_poisson").method == "threshold"


@pytest.mark.parametrize("vocab", [12, 15])
def test_two_drafts_without_replacement_exact_and_optimal(vocab):
    """n = 2 without replacement uses the threshold construction with the q-proportional split."""
    rng = np.random.default_rng(vocab)
    for _ in range(10):
        p, q = random_pair(rng, vocab, concentration=float(rng.choice([0.1, 0.5, 2.0])), zero_p=True)
        check_exact_and_optimal(p, q, 2, "without_replacement")


@pytest.mark.parametrize("top_k", [64, None])
def test_two_drafts_without_replacement_attains_alpha_at_scale(top_k):
    p, q = lm_pair(4000, seed=2, temperature=0.8, top_k=top_k)
    fit = fit_optimal(p, q, 2, "without_replacement")
    assert fit.method == "threshold" and fit.certified[0]
    bound = mdsd.optimal_acceptance(p, q, 2, "without_replacement")
    assert fit.acceptance[0] == pytest.approx(bound, abs=1e-9)


def test_refuses_other_laws_and_bad_drafts():
    with pytest.raises(ValueError, match="exact only for law"):
        mdsd.output_law([0.5, 0.5], [0.5, 0.5], [0, 1], "optimal", law="greedy")
    with pytest.raises(ValueError, match="exact only for law"):
        fit_optimal([0.5, 0.5], [0.5, 0.5], 2, "spechub")
    fit = fit_optimal([0.5, 0.5], [0.5, 0.5], 2, "iid")
    with pytest.raises(ValueError, match="n = 2"):
        output_law_from_fit(fit, [0, 1, 1])
    with pytest.raises(ValueError, match="distinct"):
        mdsd.output_law([0.5, 0.5], [0.5, 0.5], [0, 0], "optimal", law="without_replacement")


def test_staircase_keeps_the_fit_optimal():
    """The H* staircase (few cuts at full vocabulary) changes nothing on L: a = min(p, c q)."""
    p, q = lm_pair(3000, seed=3, temperature=1.0)
    n = 8
    scan = priority_scan(p, q, n, mdsd.get_law("iid"))
    order, phi, split = scan.order, scan.phi, scan.split
    ps, qs = p[order], q[order]
    target, clipped = threshold._target_curve(ps, qs, phi, split)
    run = np.where(clipped, np.where(np.arange(order.size) < split, 0, 1), -1)
    stairs, new_run = threshold._staircase(ps, qs, phi, split, target, run)
    assert stairs is not target and np.all(stairs <= phi + 1e-15)
    assert np.unique(new_run[new_run >= 2]).size < (new_run[split:] >= 0).sum()
    fit = fit_optimal(p, q, n, "iid")
    assert fit.acceptance[0] == pytest.approx(mdsd.optimal_acceptance(p, q, n, "iid"), abs=1e-10)
    a = fit.accepted[0]
    free = (a < p - 1e-12) & (q > 0)
    c = np.median(a[free] / q[free])
    np.testing.assert_allclose(a, np.minimum(p, c * q), rtol=1e-8, atol=1e-13)


def test_staircase_tries_smaller_ratios():
    """Where the first step ratio spends H*'s slack before the last step can form (twelve drafts
    without replacement on a 32,000-token row at T = 1: every later token on its own), the
    staircase tries the smaller ratios of ``STAIR_RATIOS`` and keeps one of at most
    ``STAIR_FEW_STEPS`` steps; the curve stays below Phi, every H* rate is at least the token's s
    (m >= p), the compiled fit equals the numpy one, and the fit attains alpha*."""
    from mdsd.verifiers.optimal._threshold_numba import STAIR_FEW_STEPS, staircase_steps

    law = mdsd.get_law("without_replacement")
    p, q = lm_pair(32000, seed=1, temperature=1.0)
    scan = priority_scan(p, q, 12, law)
    phi, split, ps, qs = scan.phi, scan.split, scan.target_probs, scan.draft_probs
    target, clipped = threshold._target_curve(ps, qs, phi, split)
    run = np.where(clipped, np.where(np.arange(qs.size) < split, 0, 1), -1)
    first_curve, first_run = threshold._staircase_walk(
        ps, qs, phi, split, target, run, threshold.STAIR_SHARES[0], threshold.STAIR_RATIOS[0]
    )
    assert first_curve is not target and staircase_steps(first_run, split) > 1000
    curve, new_run = threshold._staircase(ps, qs, phi, split, target, run)
    assert staircase_steps(new_run, split) <= STAIR_FEW_STEPS
    assert np.all(curve <= phi + 1e-15)
    assert np.all(np.diff(curve)[split:] >= ps[split:] - 1e-15)  # m >= p on H*, to rounding
    levels, rate = threshold._fit_levels(ps, qs, phi, split)
    ref_levels, ref_rate = threshold._fit_levels_reference(ps, qs, phi, split)
    np.testing.assert_allclose(rate * qs, ref_rate * qs, rtol=1e-9, atol=1e-14)
    assert np.array_equal(levels < 1, ref_levels < 1)
    fit = fit_optimal(p, q, 12, law)
    assert fit.certified[0]
    assert fit.acceptance[0] == pytest.approx(mdsd.optimal_acceptance(p, q, 12, law), abs=1e-10)


# -- priority orders (without_replacement n >= 3, conditional_poisson) -----------------------------


@pytest.mark.parametrize("law", ["without_replacement", "conditional_poisson"])
def test_order_mixture_mass_matches_enumeration(law):
    """Each block's mixture mass (from Qall scans) == its mass by enumerating the draws; the
    mixture is <= p on L and >= p on H* (the minimum-norm point of the polytope to p), and L's
    mass is P(set(x) meets L)."""
    rng = np.random.default_rng(zlib.crc32(f"orders-{law}".encode()))
    the_law = mdsd.get_law(law)
    for _ in range(12):
        vocab, n = int(rng.integers(5, 9)), int(rng.integers(2, 5))
        p, q = random_pair(rng, vocab, concentration=float(rng.choice([0.3, 1.0, 3.0])))
        row = orders.fit_orders_row(p, q, n, the_law)
        order, split, mass = row.order, row.split, row.rule_mass
        ps, qs = p[order], q[order]
        low = np.arange(split)
        for block, mix, before, _ in row.blocks():
            if block.size == 0:
                continue
            reference = priority_orders.mixture_mass_reference(
                the_law, qs, n, block, before, mix.orders, mix.weights
            )
            np.testing.assert_allclose(mix.mass, reference, rtol=0, atol=1e-13)
            assert np.all(mix.weights > 0) and mix.weights.sum() == pytest.approx(1.0, abs=1e-14)
        assert np.all(mass[:split] <= ps[:split] + 1e-13)
        assert np.all(mass[split:] >= ps[split:] - 1e-13)
        tuples, probs = the_law.enumerate(qs, n)
        meets_low = np.isin(np.asarray(tuples), low).any(axis=1)
        assert mass[:split].sum() == pytest.approx(np.asarray(probs)[meets_low].sum(), abs=1e-13)


@pytest.mark.parametrize("law", ["without_replacement", "conditional_poisson"])
def test_orders_exact_whatever_the_mixture(orders_for_three, monkeypatch, law):
    """Random orders with random weights instead of the fit: still exactly p (capping + residual)."""
    rng = np.random.default_rng(5)

    def random_mixture(vertex, target, start, **kwargs):
        orders = np.stack([rng.permutation(target.size) for _ in range(3)])
        weights = rng.dirichlet(np.ones(3))
        mass = sum(w * vertex(o) for w, o in zip(weights, orders))
        return priority_orders.OrderMixture(orders, weights, mass, 1.0, 0)

    def random_mixture_compiled(the_law, q, n, rest, block, before, target, start, **kwargs):
        def vertex(sigma):
            return priority_orders.order_vertex(the_law, q, n, rest, block, before, sigma)

        return random_mixture(vertex, target, start)

    monkeypatch.setattr(orders, "decompose", random_mixture)
    monkeypatch.setattr(orders, "decompose_compiled", random_mixture_compiled)
    checked = []
    for vocab, n in [(6, 3), (7, 4), (5, 3), (8, 3), (9, 5)]:
        p, q = random_pair(rng, vocab, concentration=0.5, zero_p=True)
        fit = fit_optimal(p, q, n, law)
        assert fit.method == "orders"
        marginal, acceptance, out, _ = enumerate_optimal(p, q, n, law, fit=fit)
        np.testing.assert_allclose(marginal, p, rtol=0, atol=MARGINAL_TOL)
        assert np.all(out >= 0) and acceptance <= mdsd.optimal_acceptance(p, q, n, law) + 1e-12
        # the reported acceptance is exact for any mixture: sum a plus the residual draws that
        # hit a draft (a random mixture leaves both residual and rejection on most tokens)
        assert fit.certified[0]
        assert fit.acceptance[0] == pytest.approx(acceptance, abs=1e-12)
        uncapped = float(fit.accepted[0].sum())
        checked.append(acceptance - uncapped)
    assert max(checked) > 1e-3  # the residual term mattered: sum a alone would fail


def test_three_drafts_without_replacement_exact_at_nine_tokens():
    rng = np.random.default_rng(9)
    for _ in range(3):
        p, q = random_pair(rng, 9, concentration=float(rng.choice([0.3, 1.0])), zero_p=True)
        check_exact_and_optimal(p, q, 3, "without_replacement", lp_check=True)


@pytest.mark.parametrize(
    "law, n",
    [
        ("without_replacement", 3),
        ("without_replacement", 4),
        ("without_replacement", 8),
        ("conditional_poisson", 3),
    ],
)
def test_orders_attain_alpha_at_top_k(orders_for_three, law, n):
    """Top-64 drafting on a 4,000-token LM-like pair: acceptance == alpha*, certified."""
    p, q = lm_pair(4000, seed=4, temperature=0.9, top_k=64)
    fit = fit_optimal(p, q, n, law)
    assert fit.method == "orders" and fit.certified[0]
    bound = mdsd.optimal_acceptance(p, q, n, law)
    assert fit.acceptance[0] == pytest.approx(bound, abs=1e-9)
    # a draft set served from the fit is a probability vector
    x = mdsd.get_law(law).sample(q, n, np.random.default_rng(0))
    law_given_x = output_law_from_fit(fit, x)
    assert law_given_x.sum() == pytest.approx(1.0, abs=1e-12) and np.all(law_given_x >= 0)


@pytest.mark.parametrize(
    "law,n", [("without_replacement", 3), ("without_replacement", 4), ("conditional_poisson", 3)]
)
def test_orders_put_the_zero_target_tail_last(law, n):
    """Where p = 0 on part of q's support (top-k of p and of q differ), H*'s orders end with those
    tokens in scan order, Wolfe fitted only the others, and the rule still accepts alpha*
    (exact acceptance of the fit) with an output law that sums to 1 given any draft set."""
    the_law = mdsd.get_law(law)
    rng = np.random.default_rng(9)
    tails = 0
    for trial in range(6):
        p, q = lm_pair(400, seed=40 + trial, temperature=0.8, top_k=24)
        support = np.flatnonzero(q > 0)
        row = orders.fit_orders_row(p[support], q[support], n, the_law)
        zeros = int(np.count_nonzero(p[support][row.order[row.split :]] == 0.0))
        high = row.high.orders
        tails += zeros > 0
        tail = np.arange(high.shape[1] - zeros, high.shape[1])
        assert np.all(high[:, tail] == tail)
        fit = fit_optimal(p, q, n, law)
        assert fit.acceptance[0] == pytest.approx(mdsd.optimal_acceptance(p, q, n, law), abs=1e-9)
        x = the_law.sample(q, n, rng)
        assert output_law_from_fit(fit, x).sum() == pytest.approx(1.0, abs=1e-12)
    assert tails >= 3  # the case is exercised


@pytest.mark.parametrize("weighted", [False, True])
def test_decompose_recovers_a_mixture_of_vertices(weighted):
    """A target built as a mixture of three order vertices is matched to 1e-13 by Wolfe's
    algorithm (plain or 1/q-weighted norm), and the mixture it returns has that mass."""
    law = mdsd.get_law("without_replacement")
    rng = np.random.default_rng(21)
    q = rng.dirichlet(np.ones(9))
    block, before, rest = np.arange(2, 9), np.arange(2), np.arange(0)

    def vertex(sigma):
        return priority_orders.order_vertex(law, q, 3, rest, block, before, sigma)

    target = sum(w * vertex(rng.permutation(block.size)) for w in (0.2, 0.3, 0.5))
    scale = np.sqrt(q[block]) if weighted else None
    mix = priority_orders.decompose(vertex, target, np.arange(block.size), scale=scale)
    assert mix.residual <= 1e-13
    reference = priority_orders.mixture_mass_reference(law, q, 3, block, before, mix.orders, mix.weights)
    np.testing.assert_allclose(reference, target, rtol=0, atol=1e-13)


def test_compiled_wolfe_factor_updates():
    """The compiled Wolfe loop's Cholesky factor R of M = 1 1^T + Gram(active points): appending
    points and dropping any of them keeps R upper triangular with R^T R = M (1e-12), its affine
    minimiser equals the reference's KKT solve, and a point in the active points' affine hull
    is refused (as by the reference's ``_affinely_independent``)."""
    from mdsd.verifiers.optimal import _orders_numba

    rng = np.random.default_rng(5)
    for _ in range(40):
        size, capacity = int(rng.integers(3, 30)), 40
        buffer = np.zeros((capacity, size))
        factor = np.zeros((capacity, capacity))
        count = 0
        for _ in range(int(rng.integers(2, 25))):
            if count > 1 and rng.random() < 0.3:
                j = int(rng.integers(count))
                _orders_numba._drop_point(factor, count, j)
                buffer[j : count - 1] = buffer[j + 1 : count].copy()
                count -= 1
            elif count < size:
                c = rng.normal(size=size)
                assert _orders_numba._append_point(factor, buffer, count, c)
                buffer[count] = c
                count += 1
            active, r = buffer[:count], factor[:count, :count]
            np.testing.assert_array_equal(np.tril(r, -1), 0.0)
            np.testing.assert_allclose(r.T @ r, active @ active.T + 1.0, rtol=0, atol=1e-12)
            want = priority_orders._affine_minimiser(active @ active.T)
            got = _orders_numba._affine_minimiser(factor, count)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
        if count >= 2:  # an affine combination of the active points adds no dimension
            weights = rng.dirichlet(np.ones(count)) * 2.0 - 1.0 / count
            weights /= weights.sum()
            c = weights @ buffer[:count]
            gram = buffer[:count] @ buffer[:count].T
            assert not priority_orders._affinely_independent(gram, buffer[:count], c)
            assert not _orders_numba._append_point(factor, buffer, count, c)


def _split_groups(rng, n, trials, span, most_earlier=None):
    """``trials`` random cases of the order split's setting: (q [V], the earlier tokens A, the
    group met first G, alpha = q(A + G) / q(G)), V from n + 1 to n + span, at most
    ``most_earlier`` tokens in A, the rest of the tokens later than G."""
    for _ in range(trials):
        vocab = int(rng.integers(n + 1, n + 1 + span))
        q = rng.dirichlet(np.ones(vocab) * rng.choice([0.3, 1.0, 3.0]))
        perm = rng.permutation(vocab)
        a_size = int(rng.integers(0, min(vocab - n, most_earlier if most_earlier is not None else vocab) + 1))
        g_size = int(rng.integers(1, vocab - a_size + 1))
        earlier, group = perm[:a_size], perm[a_size : a_size + g_size]
        yield q, earlier, group, q[np.concatenate([earlier, group])].sum() / q[group].sum()


def _split_sets(q, n, earlier, group, alpha):
    """(drafts [n], inside [n], share [n]) for every set of n tokens that misses ``earlier`` and
    meets ``group``: the order split's pick probabilities (``order_split_shares`` at alpha),
    each checked to lie in [0, 1]."""
    from mdsd.verifiers.optimal._threshold_numba import order_split_shares

    for drafts in itertools.combinations(range(q.size), n):
        drafts = np.array(drafts)
        inside = np.isin(drafts, group)
        if np.isin(drafts, earlier).any() or not inside.any():
            continue
        b0, b1 = order_split_shares(q[drafts], inside, q[np.setdiff1d(np.arange(q.size), drafts)].sum())
        share = b0 + alpha * b1
        assert np.all(share >= -1e-12) and np.all(share <= 1.0 + 1e-12)
        yield drafts, inside, share


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_order_split_is_q_proportional(n):
    """The order split (``_threshold_numba.order_split_shares``) by enumeration: for random token
    groups A (earlier), G (the first group met) and R (later) and every set of n draws without
    replacement that misses A and meets G, the shares are probabilities, they are the plain
    average over the set's orders of the rule "alpha on the first drawn of G and 1 - alpha on the
    last draw when the last draw and an earlier one lie in G, else the first drawn of G" (alpha =
    q(A + G) / q(G)), and summed over the sets they put mass exactly proportional to q on G:
    P(meet G, miss A) q_y / q(G). For n = 2 they are the pair split's."""
    rng = np.random.default_rng(60 + n)
    for q, earlier, group, alpha in _split_groups(rng, n, 40 if n < 5 else 12, 4 if n < 5 else 3):
        mass, met = np.zeros(q.size), 0.0
        for drafts, inside, share in _split_sets(q, n, earlier, group, alpha):
            plain, total = np.zeros(n), 0.0  # the average over the orders, in plain Python
            for sigma in itertools.permutations(range(n)):
                prob, used = 1.0, 0.0
                for i in sigma:
                    prob *= q[drafts[i]] / (1.0 - used)
                    used += q[drafts[i]]
                members = [i for i in sigma if inside[i]]
                if len(members) >= 2 and inside[sigma[-1]]:
                    plain[members[0]] += alpha * prob
                    plain[sigma[-1]] += (1.0 - alpha) * prob
                else:
                    plain[members[0]] += prob
                total += prob
            np.testing.assert_allclose(share, plain / total, rtol=0, atol=1e-12)
            if n == 2 and inside.all():
                c = 1.0 / (1.0 - q[drafts])
                np.testing.assert_allclose(share[0], (c[1] + alpha * (c[0] - c[1])) / c.sum(), atol=1e-12)
            mass[drafts] += total * share
            met += total
        np.testing.assert_allclose(mass[group], met * q[group] / q[group].sum(), rtol=0, atol=1e-14)
        assert np.all(mass[np.setdiff1d(np.arange(q.size), group)] == 0.0)


@pytest.mark.parametrize("n, trials", [(6, 4), (8, 4), (10, 3), (12, 2)])
def test_order_split_is_q_proportional_for_more_drafts(n, trials):
    """The order split for six to twelve drafts: every set's shares are probabilities and,
    weighted by the set's probability (a sum over its orders by a plain subset recursion,
    P(X) = prod q * sum_sigma prod_i 1 / (1 - q(sigma_<i))), put mass exactly proportional to q
    on the group met first (from ten drafts on, at most one earlier token: 11 to 91 sets per
    case)."""

    def set_prob(masses):
        full = (1 << masses.size) - 1
        bits = (np.arange(full + 1)[:, None] >> np.arange(masses.size)) & 1
        used = bits @ masses  # q of each prefix set
        orders = np.zeros(full + 1)  # sum over the orders of a prefix set Q of prod 1 / (1 - q)
        orders[0] = 1.0
        for prefix in range(1, full + 1):
            before = prefix & ~(1 << np.flatnonzero(bits[prefix]))
            orders[prefix] = np.sum(orders[before] / (1.0 - used[before]))
        return np.prod(masses) * orders[full]

    rng = np.random.default_rng(70 + n)
    for q, earlier, group, alpha in _split_groups(rng, n, trials, 2, 1 if n >= 10 else None):
        mass, met = np.zeros(q.size), 0.0
        for drafts, _, share in _split_sets(q, n, earlier, group, alpha):
            prob = set_prob(q[drafts])
            mass[drafts] += prob * share
            met += prob
        np.testing.assert_allclose(mass[group], met * q[group] / q[group].sum(), rtol=0, atol=1e-14)


def test_order_split_shares_are_probabilities_at_the_largest_alpha():
    """The order split's shares for 2 to ``ORDER_SPLIT_MAX_DRAFTS`` drafts on random masses (flat
    to extremely peaked, the rest from 1e-9 to nearly all the mass, every size of the group's
    part): probabilities at alpha = 1 and at the largest alpha the set allows, 1 + rest / q(drafts
    in G) (a share is affine in alpha); b0 sums to 1 and b1 to 0. ``order_split_shares`` raises
    where a share falls below this; here no case may come near that."""
    from mdsd.verifiers.optimal._threshold_numba import order_split_shares

    rng = np.random.default_rng(90)
    for n in range(2, ORDER_SPLIT_MAX_DRAFTS + 1):
        for _ in range(400 if n <= 8 else 40):
            masses = np.maximum(rng.dirichlet(np.ones(n) * rng.choice([0.05, 0.3, 1.0, 5.0])), 1e-30)
            masses /= masses.sum()
            rest = float(10.0 ** rng.uniform(-9, np.log10(0.999)))
            inside = np.zeros(n, dtype=bool)
            inside[rng.choice(n, int(rng.integers(1, n + 1)), replace=False)] = True
            b0, b1 = order_split_shares(masses * (1.0 - rest), inside, rest)
            assert b0.sum() == pytest.approx(1.0, abs=1e-12) and abs(b1.sum()) < 1e-9
            bound = 1.0 + rest / (masses[inside].sum() * (1.0 - rest))
            for alpha in (1.0, bound):
                share = b0 + alpha * b1
                assert np.all(share >= -1e-12 * alpha) and np.all(share[~inside] == 0.0)


def _clocks_before(q, tokens, t):
    """P(the clocks of ``tokens`` (rates q) all ring before t)."""
    return np.prod([1.0 - np.exp(-q[z] * t) for z in tokens])


def _ring_integral(f, scales):
    """The integral of f over t in [0, inf), break points at the clocks' time scales."""
    from scipy.integrate import quad

    return quad(f, 0.0, 60.0 * max(scales), points=sorted(scales), epsabs=1e-15, limit=800)[0]


def _proof_integrand(s, t, q, y, others):
    """docs/optimal.md, "Why the shares are probabilities": the nonnegative integrand over s in
    [0, t] of Q P(F_y) + rho P(F_y, L_G) - rho P(L_y) given the outside token rings at t."""
    d = {h: np.exp(-q[h] * s) - np.exp(-q[h] * t) for h in others}
    first = q[y] * np.exp(-q[y] * s) * np.prod([d[h] for h in others])
    rest = sum(
        q[last]
        * np.exp(-q[last] * s)
        * (np.exp(-q[y] * s) - np.exp(-q[y] * t))
        * np.prod([d[h] for h in others if h != last])
        for last in others
    )
    return q[y] * (first + rest)


def _proof_share(q, rho, inside, y):
    """beta(y) at the largest alpha by the proof's double integral, divided by Q Z."""
    from scipy.integrate import quad

    group, outside = np.flatnonzero(inside), np.flatnonzero(~inside)
    others = [h for h in group if h != y]
    scales = [1.0 / rho] + list(1.0 / q)

    def at(t):
        inner = quad(_proof_integrand, 0.0, t, args=(t, q, y, others), epsabs=1e-15, limit=200)[0]
        return rho * np.exp(-rho * t) * _clocks_before(q, outside, t) * inner

    weight = _ring_integral(lambda t: rho * np.exp(-rho * t) * _clocks_before(q, range(q.size), t), scales)
    return _ring_integral(at, scales) / (q[inside].sum() * weight)


def test_order_split_shares_match_the_nonnegativity_proof():
    """docs/optimal.md, "Why the shares are probabilities": at the largest alpha a set allows, Q
    beta(y) Z (Q: the mass of the drafts in G, Z: the set's weight over its orders) is an integral
    over the merged outside token's ring time t (density rho e^(-rho t), the drafts outside G
    rung before t) of an integral over s in [0, t] whose integrand is a sum of nonnegative terms.
    That double integral (scipy's quad) equals the shares, 2 to 5 drafts."""
    from mdsd.verifiers.optimal._threshold_numba import order_split_shares

    rng = np.random.default_rng(95)
    for _ in range(8):
        n = int(rng.integers(2, 6))
        masses = rng.dirichlet(np.ones(n + 1))
        q, rho = masses[:n], masses[n]
        inside = np.zeros(n, dtype=bool)
        inside[rng.choice(n, int(rng.integers(2, n + 1)), replace=False)] = True
        b0, b1 = order_split_shares(q, inside, rho)
        beta = b0 + (1.0 + rho / q[inside].sum()) * b1
        for y in np.flatnonzero(inside):
            assert _proof_share(q, rho, inside, y) == pytest.approx(beta[y], abs=1e-10)


def test_negative_shares_are_refused():
    """The order split's guard (``shares_are_probabilities``) refuses a share below rounding at
    either end of alpha's range and lets rounding-sized ones pass."""
    from mdsd.verifiers.optimal._threshold_numba import SHARE_TOLERANCE, shares_are_probabilities

    b0, b1 = np.array([0.5, 0.5, 0.0]), np.array([0.2, -0.2, 0.0])
    assert shares_are_probabilities(b0, b1, 2.5)  # 0.5 - 2.5 * 0.2 = 0 at the bound
    assert not shares_are_probabilities(b0, b1, 2.6)  # -0.02 at the bound
    assert not shares_are_probabilities(np.array([1.1, -0.1]), np.zeros(2), 1.0)  # at alpha = 1
    rounding = np.array([-0.5, 0.5]) * SHARE_TOLERANCE  # -50 tolerances at alpha = 100
    assert shares_are_probabilities(np.array([0.0, 1.0]), rounding, 100.0)


@pytest.mark.parametrize("n", [5, 6])
def test_order_split_exact_and_optimal_for_more_drafts(n):
    """Five and six drafts without replacement by the order split: exact and optimal by
    enumeration of the draws on 7-token pairs (``check_exact_and_optimal``)."""
    rng = np.random.default_rng(80 + n)
    for _ in range(3):
        p, q = random_pair(rng, 7, concentration=0.7, zero_p=True)
        if np.count_nonzero(q) < n:
            continue
        assert fit_optimal(p, q, n, "without_replacement").method == "threshold"
        check_exact_and_optimal(p, q, n, "without_replacement")


def test_order_split_attains_alpha_at_top_k():
    """Three drafts without replacement at top-64 of an LM-like pair take the threshold method
    with the order split: certified, acceptance alpha*, and a draft set's law sums to 1."""
    p, q = lm_pair(4000, seed=4, temperature=0.9, top_k=64)
    fit = fit_optimal(p, q, 3, "without_replacement")
    assert fit.method == "threshold" and fit.certified[0]
    assert fit.acceptance[0] == pytest.approx(
        mdsd.optimal_acceptance(p, q, 3, "without_replacement"), abs=1e-9
    )
    x = mdsd.get_law("without_replacement").sample(q, 3, np.random.default_rng(0))
    law_given_x = output_law_from_fit(fit, x)
    assert law_given_x.sum() == pytest.approx(1.0, abs=1e-12) and np.all(law_given_x >= 0)


@pytest.mark.parametrize("vocab", [1000, 5000])
def test_order_split_attains_alpha_on_large_supports(vocab):
    """Three, four, eight, twelve and sixteen drafts without replacement over a whole LM-like
    vocabulary (Phi by the race quadrature; the row path's fit): the threshold method, certified,
    acceptance alpha* to
    1e-12 (1e-11 beyond eight), a draft set's law sums to 1; at 1,000 tokens the decoding sampler's
    tokens (n = 3, 4, 12), drafts drawn afresh for each, follow p (G-test on the tokens with an
    expected count of at least 5 and the rest pooled; false-positive rate 1e-4 per n)."""
    p, q = lm_pair(vocab, seed=vocab, temperature=0.9)
    law = mdsd.get_law("without_replacement")
    rng = np.random.default_rng(vocab)
    for n in (3, 4, 8, 12, 16):
        fit = fit_optimal(p, q, n, "without_replacement")
        assert fit.method == "threshold" and fit.certified[0]
        tol = 1e-12 if n <= 8 else 1e-11  # both sides' race quadratures (1.1e-12 apart at 5,000, n = 12)
        assert fit.acceptance[0] == pytest.approx(mdsd.optimal_acceptance(p, q, n, law), abs=tol)
        law_given_x = output_law_from_fit(fit, law.sample(q, n, rng))
        assert law_given_x.sum() == pytest.approx(1.0, abs=1e-12) and np.all(law_given_x >= 0)
        if vocab > 1000 or n in (8, 16):
            continue
        draws = 4000
        drafts = law.sample(np.broadcast_to(q, (draws, vocab)), n, rng)
        tokens, _ = mdsd.verify(
            np.broadcast_to(p, (draws, vocab)),
            np.broadcast_to(q, (draws, vocab)),
            drafts,
            "optimal",
            law,
            rng=rng,
        )
        cells = np.flatnonzero(draws * p >= 5)
        counts = np.append(
            np.bincount(tokens, minlength=vocab)[cells], np.isin(tokens, cells, invert=True).sum()
        )
        assert g_test_pvalue(counts, np.append(p[cells], 1.0 - p[cells].sum())) > G_TEST_MIN_P


def test_compiled_wolfe_sums_keep_their_order():
    """The Wolfe loop's interleaved sums are its plain ones bit for bit: ``_rows_dot`` (four rows
    per pass) is each row's ``_dot``, ``_gap_dots`` the three ``_dot`` of the gap test, and the
    column-wise ``_forward_solve`` subtracts in the row-wise order (so the loop takes the same
    steps as before these were interleaved)."""
    from mdsd.verifiers.optimal import _orders_numba

    rng = np.random.default_rng(8)
    for _ in range(30):
        size, count = int(rng.integers(1, 60)), int(rng.integers(1, 19))
        buffer, c, g = rng.normal(size=(count, size)), rng.normal(size=size), rng.normal(size=size)
        want = [_orders_numba._dot(row, c) for row in buffer]
        np.testing.assert_array_equal(_orders_numba._rows_dot(buffer, count, c), want)
        gap = (_orders_numba._dot(g, g), _orders_numba._dot(c, c), _orders_numba._dot(g, g - c))
        assert _orders_numba._gap_dots(g, c) == gap
        factor = np.triu(rng.normal(size=(count, count))) + 3.0 * np.eye(count)
        rhs = rng.normal(size=count)
        x = np.empty(count)
        for i in range(count):  # row-wise forward substitution
            total = rhs[i]
            for j in range(i):
                total -= factor[j, i] * x[j]
            x[i] = total / factor[i, i]
        np.testing.assert_array_equal(_orders_numba._forward_solve(factor, count, rhs.copy()), x)


def _assert_peel_matches_reference(qs, phi, target):
    """The compiled peel against ``_peel_reference``: the rule mass of every position equal to
    the reference's and to the target's increments to rounding (the levels themselves are
    ill-conditioned: a share 1 - excess / room), levels in [0, 1] with 0 at both ends, and the
    rates those of the levels (computed level by level where that is cheap)."""
    levels, rate = threshold._peel(qs, phi, target)
    ref_levels, ref_rate = threshold._peel_reference(qs, phi, target)
    np.testing.assert_allclose(rate * qs, ref_rate * qs, rtol=0, atol=2e-14)
    np.testing.assert_allclose(rate * qs, np.diff(target), rtol=0, atol=2e-14)
    assert levels[0] == levels[-1] == 0.0 and np.all((levels >= 0) & (levels <= 1))
    if qs.size <= 3000:
        by_levels = threshold._threshold_rates(qs, phi, levels)
        np.testing.assert_allclose(rate * qs, by_levels * qs, rtol=0, atol=2e-14)
    return levels, ref_levels


def test_compiled_peel_matches_reference():
    """The numba peel (each interval's cut from its own ratio, anchor table and scans) gives the
    reference's rule mass (LM-like pairs with many cuts, small random ones, and without
    replacement, whose Phi need not be concave)."""
    rng = np.random.default_rng(31)
    cases = [lm_pair(3000, seed=s, temperature=t) for s, t in ((1, 1.0), (2, 0.7), (3, 0.1))]
    cases += [random_pair(rng, int(rng.integers(2, 40)), concentration=0.5) for _ in range(30)]
    for i, (p, q) in enumerate(cases):
        for law, n in (("iid", 2 + i % 5), ("without_replacement", 2 + i % 3)):
            scan = priority_scan(p, q, n, mdsd.get_law(law))
            order, phi = scan.order, scan.phi
            target, _ = threshold._target_curve(p[order], q[order], phi, scan.split)
            _assert_peel_matches_reference(q[order], phi, target)
    # (the cuts may differ: runs of one rate, lumped before the fit peels, leave the target linear
    # to rounding here, where either kernel may cut or not; the lumped curves' test compares them)


@pytest.mark.parametrize(("law", "n"), [("iid", 4), ("iid", 8), ("without_replacement", 2)])
def test_compiled_peel_matches_reference_on_lumped_full_vocabulary(law, n):
    """The peel as the fit calls it at V = 32,000, T = 1.0 (runs with one rate lumped first):
    hundreds of nested intervals, mostly a chain that loses points at its right end, answered by
    the root's anchor table; the same cuts and rule mass as the reference."""
    p, q = lm_pair(32000, seed=1, temperature=1.0)
    scan = priority_scan(p, q, n, mdsd.get_law(law))
    _, coarse = threshold._lumped_curve(scan.target_probs, scan.draft_probs, scan.phi, scan.split)
    levels, ref_levels = _assert_peel_matches_reference(*coarse)
    assert np.count_nonzero(levels < 1) > 100  # a deep peel
    assert np.array_equal(levels < 1, ref_levels < 1)


@pytest.mark.parametrize("concave", [True, False])
def test_peel_anchor_table_is_the_largest_ratio(concave):
    """``_sweep``'s table: for every interval [0, e] the largest ratio (A_b - chord_A(b)) /
    (Phi_b - chord_Phi(b)) over its interior and a boundary attaining it, as a brute-force
    maximum finds them (inf where Phi is at or below its chord); concave Phi (new points always
    leftmost on the hull) and not (points inserted inside the hull)."""
    from mdsd.verifiers.optimal._threshold_numba import _sweep

    rng = np.random.default_rng(33 + concave)
    for _ in range(30):
        k = int(rng.integers(2, 60))
        qs = rng.dirichlet(np.full(k, 0.5))
        gains = np.sort(rng.random(k))[::-1] if concave else rng.random(k)
        phi = np.concatenate([[0.0], np.cumsum(gains * qs)])
        target = np.concatenate([[0.0], np.cumsum(np.sort(rng.random(k))[::-1] * qs)])
        best, ratios, spans = np.empty(k + 1, dtype=np.int64), np.empty(k + 1), np.empty(k + 1)
        hull = np.empty(k + 1), np.empty(k + 1), np.empty(k + 1, dtype=np.int64)
        _sweep(qs, phi, target, 0, k, best, ratios, spans, *hull)
        cum = np.concatenate([[0.0], np.cumsum(qs)])
        inserted_inside = False
        for e in range(2, k + 1):
            inner = np.arange(1, e)
            x = cum[inner] / cum[e]
            over = target[inner] - target[e] * x
            room = phi[inner] - phi[e] * x
            brute = np.where(room > 0, over / np.where(room > 0, room, 1.0), np.inf)
            assert spans[e] == pytest.approx(cum[e], rel=1e-12)
            if np.isinf(brute.max()):
                assert np.isinf(ratios[e]) and room[best[e] - 1] <= 1e-15
                inserted_inside = True
                continue
            assert brute[best[e] - 1] == pytest.approx(brute.max(), rel=1e-9, abs=1e-12)
            # the same ratio by other rounding: a room of 1e-8 leaves ~1e-8 of it
            assert ratios[e] == pytest.approx(brute.max(), rel=1e-6, abs=1e-12)
        if concave:
            assert not inserted_inside


@pytest.mark.parametrize("concave", [True, False])
def test_peel_branch_and_bound_is_the_largest_ratio(concave):
    """``_bound_ratios``: where it finds the cut (within its budget), it is a boundary of largest
    ratio and R that ratio, as a brute-force maximum over the interval finds them, on random
    intervals of long random curves (A concave or not, Phi concave or not; slowly varying
    slopes, whose ratios near an end are close to each other as on real rows, and rough ones)."""
    from mdsd.verifiers.optimal._threshold_numba import _bound_ratios, _compensated_prefix, _rises

    rng = np.random.default_rng(35 + concave)
    found = 0
    for trial in range(40):
        k = int(rng.integers(130, 2000))
        qs = rng.dirichlet(np.full(k, 0.3 if trial % 2 else 3.0))
        smooth = trial % 4 < 2
        gains = np.sort(rng.random(k))[::-1] if concave else rng.random(k)
        if smooth:
            gains = np.linspace(2.0, 0.1, k) ** (1 + trial % 3) + (0 if concave else 0.01 * rng.random(k))
        rates = np.sort(rng.random(k))[::-1] * (1.0 if concave else 1 + 0.02 * rng.random(k))
        phi = np.concatenate([[0.0], np.cumsum(gains * qs)])
        target = np.concatenate([[0.0], np.cumsum(rates * gains * qs)])
        high, low = _compensated_prefix(qs)
        slope, phi_slope = np.diff(target) / qs, np.diff(phi) / qs
        curves = (high, low, phi, target, slope, phi_slope, _rises(slope), _rises(phi_slope))
        for _ in range(5):
            lo = int(rng.integers(0, k - 128))
            hi = int(rng.integers(lo + 128, k + 1))
            mass = (high[hi] - high[lo]) + (low[hi] - low[lo])
            cut, ratio, ok = _bound_ratios(curves, lo, hi, mass, 64 + (hi - lo) // 8)
            if not ok:
                continue
            found += 1
            inner = np.arange(lo + 1, hi)
            x = (high[inner] - high[lo]) + (low[inner] - low[lo])  # as _span
            over = target[inner] - target[lo] - (target[hi] - target[lo]) / mass * x
            room = phi[inner] - phi[lo] - (phi[hi] - phi[lo]) / mass * x
            brute = np.where(room > 0, np.maximum(over / np.where(room > 0, room, 1.0), 0.0), np.inf)
            assert lo < cut < hi
            if np.isinf(brute.max()):
                assert np.isinf(ratio) and room[cut - lo - 1] <= 1e-15
                continue
            assert ratio == pytest.approx(brute[cut - lo - 1], rel=1e-12, abs=1e-15)
            assert ratio == pytest.approx(brute.max(), rel=1e-9, abs=1e-15)
    assert found >= 100


def test_peel_matches_reference_on_the_bundled_pair():
    """The bundled pair's rows without a top-k: at T = 0.1 and 0.3 fits certified at alpha* (a
    leaf test that missed the largest excess lost up to 0.2 there); at 0.7 those that lump to
    thousands of units, peeled by intervals shrinking at either end in turn (the branch and
    bound's case), with the reference's rule mass, to rounding."""
    import torch

    from mdsd.logits import process_logits
    from mdsd.models import bundled_domains, bundled_prompts, load_pair

    pair = load_pair(draft="mdsd-bundled/draft-distilled")
    prompt = bundled_prompts(bundled_domains()[0])[0]["prompt"]
    ids = pair.tokenizer(prompt, return_tensors="pt").input_ids[:, :40]
    with torch.no_grad():
        target_logits = pair.target(ids).logits[0].double().numpy()
        draft_logits = pair.draft(ids).logits[0].double().numpy()
    for temperature in (0.1, 0.3):  # peaked rows: tails of masses far below rounding, flat Phi
        p = np.stack([process_logits(t, temperature) for t in target_logits])
        q = np.stack([process_logits(d, temperature) for d in draft_logits])
        for law in ("iid", "without_replacement"):
            fit = fit_optimal(p, q, 2, law)
            gap = mdsd.optimal_acceptance(p, q, 2, law) - fit.acceptance
            assert np.all(fit.certified) and np.nanmax(np.abs(gap)) < 1e-12
    hard = 0
    for t, d in zip(target_logits, draft_logits):
        p, q = process_logits(t, 0.7), process_logits(d, 0.7)
        for law, n in (("iid", 4), ("without_replacement", 3)):
            scan = priority_scan(p, q, n, mdsd.get_law(law))
            ps, qs, phi, split = scan.target_probs, scan.draft_probs, scan.phi, scan.split
            levels, rate = threshold._fit_levels(ps, qs, phi, split)
            if np.count_nonzero(levels < 1) < 5000 or hard >= 3:
                continue
            hard += 1
            ref_levels, ref_rate = threshold._fit_levels_reference(ps, qs, phi, split)
            np.testing.assert_allclose(rate * qs, ref_rate * qs, rtol=0, atol=2e-14)
    assert hard == 3


def test_compiled_staircase_equals_reference():
    """The numba staircase walk returns the reference's curve and run ids bit for bit, whether a
    staircase forms or not."""
    rng = np.random.default_rng(32)
    cases = [lm_pair(3000, seed=s, temperature=t) for s, t in ((3, 1.0), (4, 0.7), (5, 0.3))]
    cases += [random_pair(rng, int(rng.integers(4, 60)), concentration=0.3) for _ in range(30)]
    formed = 0
    for i, (p, q) in enumerate(cases):
        n = 2 + i % 7
        scan = priority_scan(p, q, n, mdsd.get_law("iid"))
        order, phi, split = scan.order, scan.phi, scan.split
        target, clipped = threshold._target_curve(p[order], q[order], phi, split)
        run = np.where(clipped, np.where(np.arange(order.size) < split, 0, 1), -1)
        for share, ratio in itertools.product(threshold.STAIR_SHARES, threshold.STAIR_RATIOS):
            args = (p[order], q[order], phi, split, target, run, share, ratio)
            curve, new_run = threshold._staircase_walk(*args)
            ref_curve, ref_run = threshold._staircase_walk_reference(*args)
            np.testing.assert_array_equal(curve, ref_curve)
            np.testing.assert_array_equal(new_run, ref_run)
            formed += curve is not target
    assert formed >= 3


@pytest.mark.parametrize("numpy_first", [True, False])
def test_priority_order_equals_stable_sort(monkeypatch, numpy_first):
    """The fast priority order (unstable sort, p = 0 block in id order, stable sort on ties; from
    ``RADIX_MIN`` tokens the radix sort or numpy's sort made stable, whichever
    ``mdsd.bound.numpy_sort_is_faster`` picks) is the stable sort of p/q decreasing over q > 0,
    with zeros and ties; the priority scan's gathers (``common._priority_gather``, either way)
    are p and q in that order."""
    from mdsd import bound

    monkeypatch.setattr(bound, "numpy_sort_is_faster", lambda: numpy_first)
    monkeypatch.setattr(common, "numpy_sort_is_faster", lambda: numpy_first)
    rng = np.random.default_rng(33)
    for i in range(60):
        vocab = int(rng.choice([2, 7, 300, 1500, 5000]))
        p, q = random_pair(rng, vocab, zero_p=i % 2 == 0, zero_q=i % 3 == 0)
        if i % 4 == 0 and p[vocab // 2 :].sum() > 0:  # tied ratios: p = q on a block
            p[: vocab // 2] = q[: vocab // 2]
            p /= p.sum()
        if i % 5 == 0:
            p = q.copy()
        want = common.priority_order_reference(p, q)
        np.testing.assert_array_equal(common.priority_order(p, q), want)
        order, ps, qs = common._priority_gather(p, q, int(np.count_nonzero(q)))
        np.testing.assert_array_equal(order, want)
        assert np.array_equal(ps, p[want]) and np.array_equal(qs, q[want])


# -- sampling (the decoding path) ------------------------------------------------------------------

SAMPLE_CASES = [
    ("iid", 2),
    ("iid", 3),
    ("without_replacement", 2),
    ("without_replacement", 3),
    ("without_replacement", 4),
    ("conditional_poisson", 2),
    ("conditional_poisson", 3),
]


def row_sampler(law, n):
    """(fit one row, draw one token from it) for the method the law and n use."""
    if front.method_for(mdsd.get_law(law), n, 0) == "threshold":
        return threshold.fit_threshold_row, threshold.sample_threshold_row
    return orders.fit_orders_row, orders.sample_orders_row


@pytest.mark.parametrize("law, n", SAMPLE_CASES)
def test_sample_matches_output_law(law, n):
    """The direct sampler of a fit (draw the threshold / order, keep or reject, residual only on a
    rejection) has the conditional law output_law(. | x) for fixed drafts x: a seeded G-test per
    draft set (false-positive rate 1e-4 each, 2 draft sets per case), and no token outside the
    law's support is ever drawn. Cases with residual mass, so rejections are exercised."""
    rng = np.random.default_rng(zlib.crc32(f"sample-{law}-{n}".encode()))
    the_law = mdsd.get_law(law)
    fit_row, sample_row = row_sampler(law, n)
    p, q = random_pair(rng, 7, concentration=0.7, zero_p=True)
    row = fit_row(p, q, n, the_law)
    draws = 3000
    for drafts in the_law.sample(np.broadcast_to(q, (2, 7)), n, rng):
        expected = output_law_from_fit(fit_optimal(p, q, n, law), drafts)
        tokens = np.array([sample_row(row, p, drafts, rng) for _ in range(draws)])
        counts = np.bincount(tokens, minlength=7)
        assert np.all(counts[expected <= 0] == 0)
        assert g_test_pvalue(counts, expected) > G_TEST_MIN_P


def _node_rows(gen, count: int, smallest: int, largest: int):
    """(p, q) rows for the one-call nodes: mostly 2-40 tokens, every third up to ``largest``;
    zeros in p (every 4th) and q (every 5th; ``_zero_one``), p = q (every 7th), uniform rows
    (every 11th), flat and very peaked q in turn."""
    for trial in range(count):
        vocab = int(gen.integers(smallest, largest)) if trial % 3 == 0 else int(gen.integers(smallest, 40))
        p = gen.dirichlet(np.full(vocab, 0.5))
        q = gen.dirichlet(np.full(vocab, 0.5 if trial % 2 else 0.05))
        if trial % 4 == 0:
            _zero_one(p, int(gen.integers(vocab)))
        if trial % 5 == 0:
            _zero_one(q, int(gen.integers(vocab)))
        if trial % 7 == 0:
            q = p.copy()
        if trial % 11 == 0:
            p, q = np.full(vocab, 1.0 / vocab), np.full(vocab, 1.0 / vocab)
        yield p, q


def _zero_one(row, i):
    """Set row[i] to 0 and renormalise, unless row[i] holds all the mass (a peaked row)."""
    if row.sum() - row[i] > 0.0:
        row[i] = 0.0
        row /= row.sum()


def test_threshold_node_equals_row_path():
    """The compiled node (``node_plan``: fit + draw in one call, the engine's per-node path) draws
    the same token as the row path (``fit_threshold_row`` + ``sample_threshold_row``) from the
    same generator state: i.i.d. n = 1..5, two drafts without replacement, three to twelve and
    on rows above ``ORDER_SPLIT_WIDE_SUPPORT`` tokens thirteen to sixteen (Qall in closed form for
    three up to ``THREE_DRAFT_CLOSED_MAX`` tokens, by the race beyond) on rows
    of 2-300 tokens with zeros in p and q, p = q, flat and very peaked q, ties; so every branch
    (pair split, order split, keep, residual, empty residual) is compared exactly."""
    gen = np.random.default_rng(44)
    compared = 0
    for trial, (p, q) in enumerate(_node_rows(gen, 500, smallest=2, largest=300)):
        cases = (("iid", 1 + trial % 5), ("without_replacement", 2), ("without_replacement", 3 + trial % 10))
        if np.count_nonzero(q) > ORDER_SPLIT_WIDE_SUPPORT:  # thirteen to sixteen drafts
            cases += (("without_replacement", 13 + trial % 4),)
        for law, n in cases:
            the_law = mdsd.get_law(law)
            if not law_accepts(law, q, n):
                continue
            drafts = the_law.sample(q, n, gen)
            seed = int(gen.integers(1 << 30))
            plan = node_plan(the_law, n, int(np.count_nonzero(q)))
            assert plan.kind == "threshold"
            node = plan.sample(p, q, drafts, np.random.default_rng(seed))
            row = threshold.fit_threshold_row(p, q, n, the_law)
            assert node == threshold.sample_threshold_row(row, p, drafts, np.random.default_rng(seed))
            compared += 1
    assert compared > 1300


@pytest.mark.parametrize("numpy_first", [True, False])
def test_threshold_node_equals_row_path_on_long_rows(monkeypatch, numpy_first):
    """On rows of 1,100-8,192 tokens (the radix sort's range in the node; the row path's order by
    the radix sort or by numpy's sort made stable, ``mdsd.bound.numpy_sort_is_faster``) the
    compiled node draws the row path's token from the same generator state: i.i.d. and two and
    three drafts without replacement, LM-like rows at two temperatures, q over part of p's support
    (a draft vocabulary), p = q."""
    from mdsd import bound
    from mdsd.verifiers.optimal import common

    monkeypatch.setattr(bound, "numpy_sort_is_faster", lambda: numpy_first)
    monkeypatch.setattr(common, "numpy_sort_is_faster", lambda: numpy_first)
    gen = np.random.default_rng(45)
    for trial, vocab in enumerate((1100, 3000, 4096, 8192)):
        p, q = lm_pair(vocab, seed=trial, temperature=0.7 + 0.3 * (trial % 2))
        if trial % 2:  # q on its likeliest half only
            q = np.where(q >= np.median(q), q, 0.0)
            q /= q.sum()
        if trial == 2:
            p = q.copy()
        for law, n in (("iid", 2), ("without_replacement", 2), ("without_replacement", 3)):
            the_law = mdsd.get_law(law)
            plan = node_plan(the_law, n, int(np.count_nonzero(q)))
            assert plan is not None and plan.kind == "threshold"
            row = threshold.fit_threshold_row(p, q, n, the_law)
            for _ in range(4):  # drafts and uniforms afresh: other branches of the draw
                drafts = the_law.sample(q, n, gen)
                seed = int(gen.integers(1 << 30))
                node = plan.sample(p, q, drafts, np.random.default_rng(seed))
                assert node == threshold.sample_threshold_row(row, p, drafts, np.random.default_rng(seed))


@pytest.mark.parametrize("plain_first", [orders.ORDER_PLAIN_FIRST, 0])
def test_orders_node_equals_row_path(orders_for_three, monkeypatch, plain_first):
    """The compiled node of the orders method (split, both blocks' Wolfe runs with their norms,
    the draw) draws the same token as ``fit_orders_row`` + ``sample_orders_row`` from the same
    generator state: three drafts without replacement (Qall in closed form), four or five (the
    race quadrature), conditional Poisson with two or three drafts, on rows of 3-100 tokens with
    zeros in p and q, p = q, flat and peaked q; with the plain norm tried first (blocks up to
    ``ORDER_PLAIN_FIRST`` tokens) and, with that bound at 0, with 1/q first (larger blocks)."""
    monkeypatch.setattr(orders, "ORDER_PLAIN_FIRST", plain_first)
    gen = np.random.default_rng(46)
    cases = (("without_replacement", 3), ("without_replacement", 4), ("without_replacement", 5))
    cases += (("conditional_poisson", 2), ("conditional_poisson", 3))
    compared = 0
    for trial, (p, q) in enumerate(_node_rows(gen, 400, smallest=3, largest=100)):
        name, n = cases[trial % len(cases)]
        law = mdsd.get_law(name)
        if not law_accepts(name, q, n):
            continue
        drafts = law.sample(q, n, gen)
        seed = int(gen.integers(1 << 30))
        plan = node_plan(law, n, int(np.count_nonzero(q)))
        assert plan.kind == "orders"
        node = plan.sample(p, q, drafts, np.random.default_rng(seed))
        row = orders.fit_orders_row(p, q, n, law)
        assert node == orders.sample_orders_row(row, p, drafts, np.random.default_rng(seed))
        compared += 1
    assert compared > 330


def test_compiled_split_equals_reference():
    """The compiled split (``priority_scan(curve=False)`` by ``_orders_numba.scan_split``) gives
    ``priority_scan_reference``'s order and split, and its alpha* to rounding (the race's node
    weights and the e_n ratios are exponentials of numba's, not numpy's, libm): drafts without
    replacement whose Qall is a quadrature (the bounds' candidate window, the race on it: n = 4
    and 6 on small random rows and top-k rows of a 8,192-token pair, n = 3 beyond the closed
    form's ``THREE_DRAFT_CLOSED_MAX`` tokens) and conditional Poisson (n = 2 and 4)."""
    gen = np.random.default_rng(47)
    rows = list(_node_rows(gen, 60, smallest=6, largest=200))
    cases = [(p, q, "without_replacement", 4 + 2 * (i % 2)) for i, (p, q) in enumerate(rows)]
    cases += [(p, q, "conditional_poisson", 2 + 2 * (i % 2)) for i, (p, q) in enumerate(rows)]
    for s, t in ((1, 0.7), (2, 1.0)):
        p, q = lm_pair(8192, seed=s, temperature=t, top_k=64)
        cases += [(p, q, "without_replacement", 4), (p, q, "conditional_poisson", 4)]
    cases += [(*lm_pair(600, seed=3, temperature=1.0), "without_replacement", 3)]
    compared = 0
    for p, q, name, n in cases:
        law = mdsd.get_law(name)
        if not (law_accepts(name, q, n) and common.compiled_split(law, n, np.count_nonzero(q))):
            continue
        fast = priority_scan(p, q, n, law, curve=False)
        ref = common.priority_scan_reference(p, q, n, law, curve=False)
        assert fast.split == ref.split
        assert fast.alpha_star == pytest.approx(ref.alpha_star, rel=1e-13, abs=1e-15)
        np.testing.assert_array_equal(fast.order, ref.order)
        compared += 1
    assert compared > 110


def test_node_sums_are_numpys():
    """The node kernel's sums and 1 - q equal numpy's ``sum`` and ``laws.others_mass`` bit for bit
    (numpy's pairwise order), on rows of 1-5,000 tokens, forward and reversed."""
    from mdsd.laws import others_mass
    from mdsd.verifiers.optimal._common_numba import numpy_sum as _numpy_sum
    from mdsd.verifiers.optimal._common_numba import others_mass as _others_mass

    gen = np.random.default_rng(45)
    for trial in range(400):
        size = int(gen.integers(1, 5000)) if trial % 2 else int(gen.integers(1, 300))
        values = gen.dirichlet(np.full(size, 0.3 if trial % 3 else 0.02))
        for view in (values, values[::-1]):
            row = np.ascontiguousarray(view)
            assert _numpy_sum(row) == view.sum()
            np.testing.assert_array_equal(_others_mass(row), others_mass(view))


@pytest.mark.parametrize("law, n", SAMPLE_CASES)
def test_verifier_sample_is_the_row_sampler(law, n):
    """OptimalVerifier.sample on a batch = fit each row, then its row sampler, with the same
    generator (seeded replay), and returns int64 [B]."""
    rng = np.random.default_rng(zlib.crc32(f"replay-{law}-{n}".encode()))
    the_law = mdsd.get_law(law)
    fit_row, sample_row = row_sampler(law, n)
    pairs = [random_pair(rng, 6, zero_p=True) for _ in range(4)]
    p, q = np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])
    drafts = the_law.sample(q, n, rng)
    tokens = mdsd.get_verifier("optimal").sample(p, q, drafts, the_law, np.random.default_rng(1))
    replay = np.random.default_rng(1)
    expected = [sample_row(fit_row(p[b], q[b], n, the_law), p[b], drafts[b], replay) for b in range(4)]
    assert tokens.dtype == np.int64 and tokens.shape == (4,)
    np.testing.assert_array_equal(tokens, expected)


def test_sample_at_top_k_and_fallback(orders_for_three, monkeypatch):
    """Top-64 rows of a 4,000-token pair sample tokens of the support of output_law; beyond
    MAX_ORDER_SUPPORT sample warns and uses the fallback verifier."""
    p, q = lm_pair(4000, seed=6, temperature=0.9, top_k=64)
    verifier = mdsd.get_verifier("optimal")
    rng = np.random.default_rng(34)
    for law, n in (("iid", 4), ("without_replacement", 2), ("without_replacement", 4)):
        drafts = mdsd.get_law(law).sample(q, n, rng)
        token = verifier.sample(p[None], q[None], drafts[None], mdsd.get_law(law), rng)[0]
        assert output_law_from_fit(fit_optimal(p, q, n, law), drafts)[token] > 0
    monkeypatch.setattr(front, "MAX_ORDER_SUPPORT", 5)
    p, q = random_pair(np.random.default_rng(35), 6)
    drafts = mdsd.get_law("without_replacement").sample(q, 3, rng)
    with pytest.warns(RuntimeWarning, match="MAX_ORDER_SUPPORT"):
        token = verifier.sample(p[None], q[None], drafts[None], mdsd.get_law("without_replacement"), rng)
    assert 0 <= int(token[0]) < 6


def test_compiled_curve_scan_equals_reference():
    """The compiled curve scan (i.i.d., two drafts without replacement; three on supports where
    Qall is the closed form, ``wor_curve_scan``) gives the numpy scan's
    phi, split, alpha* and prefix masses bit for bit: full vocabularies (torch's long prefix
    sums), small random pairs with zeros, a mass above 1/2, and the edge pairs."""
    rng = np.random.default_rng(41)
    cases = [
        lm_pair(v, seed=s, temperature=t) for v, s, t in ((32000, 1, 1.0), (3000, 2, 0.7), (5000, 3, 0.3))
    ]
    cases += [random_pair(rng, int(rng.integers(2, 60)), concentration=0.4, zero_p=True) for _ in range(40)]
    cases += list(edge_pairs().values())
    for i, (p, q) in enumerate(cases):
        for law, n in (("iid", 1 + i % 8), ("without_replacement", 2), ("without_replacement", 3)):
            the_law = mdsd.get_law(law)
            if np.count_nonzero(q) < n or (n == 3 and np.count_nonzero(q) > THREE_DRAFT_CLOSED_MAX):
                continue
            fast = priority_scan(p, q, n, the_law)
            ref = common.priority_scan_reference(p, q, n, the_law)
            assert (fast.split, fast.alpha_star) == (ref.split, ref.alpha_star)
            for field in ("order", "phi", "draft_prefix", "target_probs", "draft_probs"):
                np.testing.assert_array_equal(getattr(fast, field), getattr(ref, field))


def test_order_split_curve_of_four_drafts():
    """Four drafts without replacement on short supports: ``priority_scan``'s curve comes from
    Qall of every prefix by the race quadrature (``wor_curve_scan``), equal to
    ``laws.WithoutReplacement.qall_prefixes`` and, on tiny supports, to enumeration (1e-14);
    its split and alpha* are the bound's (whose scan integrates only the prefixes that can attain
    the minimum) to 1e-12."""
    rng = np.random.default_rng(47)
    law = mdsd.get_law("without_replacement")
    for trial in range(30):
        p, q = random_pair(rng, int(rng.integers(4, 80)), concentration=0.5, zero_p=trial % 3 == 0)
        if np.count_nonzero(q) < 4:
            continue
        fast = priority_scan(p, q, 4, law)
        ref = common.priority_scan_reference(p, q, 4, law)
        assert fast.alpha_star == pytest.approx(ref.alpha_star, abs=1e-12)
        np.testing.assert_array_equal(fast.order, ref.order)
        qall = law.qall_prefixes(fast.draft_probs[::-1][None], 4)[0]
        want = np.maximum.accumulate(np.clip(1.0 - qall[::-1], 0.0, 1.0))
        want[0], want[-1] = 0.0, 1.0
        np.testing.assert_allclose(fast.phi, want, rtol=0, atol=1e-14)
        if q.size <= 7:
            tuples, probs = law.enumerate(fast.draft_probs, 4)
            meets = [sum(pr for t, pr in zip(tuples, probs) if min(t) < k) for k in range(q.size + 1)]
            np.testing.assert_allclose(fast.phi[: len(meets)], meets, rtol=0, atol=1e-14)


def test_compiled_fit_levels_match_reference():
    """The one-kernel fit (target, staircase, lumping, peel) gives the numpy composition's cuts
    and rule mass (to rounding), at full vocabularies (many cuts, staircases) and on small random
    pairs."""
    rng = np.random.default_rng(36)
    cases = [lm_pair(3000, seed=s, temperature=t) for s, t in ((7, 1.0), (8, 0.7), (9, 0.3))]
    cases += [random_pair(rng, int(rng.integers(2, 60)), concentration=0.4, zero_p=True) for _ in range(40)]
    same_cuts = 0
    for i, (p, q) in enumerate(cases):
        for law, n in (("iid", 2 + i % 7), ("without_replacement", 2)):
            scan = priority_scan(p, q, n, mdsd.get_law(law))
            args = (scan.target_probs, scan.draft_probs, scan.phi, scan.split)
            levels, rate = threshold._fit_levels(*args)
            ref_levels, ref_rate = threshold._fit_levels_reference(*args)
            np.testing.assert_allclose(
                rate * scan.draft_probs, ref_rate * scan.draft_probs, rtol=1e-9, atol=1e-14
            )
            # the levels themselves are ill-conditioned (a share 1 - excess / room), the mass is not
            assert levels[0] == levels[-1] == 0.0 and np.all((levels >= 0) & (levels <= 1))
            same_cuts += np.array_equal(levels < 1, ref_levels < 1)
    assert same_cuts >= 0.9 * 2 * len(cases)  # the same cuts but where ties leave a choice


def _wor_block(gen, support: int, zeros: bool):
    """A random block problem: q over the support (some zero masses), rest / block / before."""
    q = gen.dirichlet(np.full(support, 0.5))
    if zeros:
        q[gen.random(support) < 0.2] = 0.0
        q[0] = max(q[0], 0.1)
        q = q / q.sum()
    perm = gen.permutation(support).astype(np.int64)
    cut_a, cut_b = sorted(gen.integers(0, support + 1, size=2))
    cut_b = max(cut_b, cut_a + 1)
    return q, perm[cut_b:], perm[cut_a:cut_b], perm[:cut_a]  # q, rest, block, before


@pytest.mark.parametrize("law_name", ["without_replacement", "conditional_poisson"])
def test_compiled_vertex_equals_reference(law_name):
    """The compiled vertex is the reference's to rounding: the same tail masses, nodes and race
    kernel without replacement, exp of the same log e_n for conditional Poisson (LLVM may fuse
    multiply-adds differently from numpy on a given CPU: equal to the last bit on AVX2, within
    1 ulp on AVX-512)."""
    from mdsd.verifiers.optimal import _orders_numba

    law = mdsd.get_law(law_name)
    gen = np.random.default_rng(21)
    for trial in range(40):
        support, n = int(gen.integers(4, 70)), int(gen.integers(2, 7))
        q, rest, block, before = _wor_block(gen, support, zeros=trial % 2 == 1)
        if np.count_nonzero(q) < n:
            continue
        sigma = gen.permutation(block.size).astype(np.int64)
        want = priority_orders.order_vertex(law, q, n, rest, block, before, sigma)
        code = _orders_numba.LAW_CODES[law_name]
        race = _orders_numba.race_settings(n, support)
        got = _orders_numba.order_vertex(q, n, code, rest, block, before, sigma, race)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("law_name", ["without_replacement", "conditional_poisson"])
@pytest.mark.parametrize("side", [None, "below", "above"])
def test_compiled_decompose_equals_reference(law_name, side):
    """decompose_compiled takes Wolfe's steps of decompose with order_vertex: the same mass to
    1e-10 (after up to 300 steps), a mixture of its orders' vertices with that mass, and in all
    but at most 2 of the 25 problems the same orders in the same rows, weights to 1e-10 and the
    same iteration count. The compiled loop solves for the affine minimiser by an updated
    Cholesky factor, the reference by the KKT system: weights equal to rounding, which can break
    a tie between two tokens' coordinates in the next order differently (one problem here), after
    which the two paths reach the same point by other vertices."""
    law = mdsd.get_law(law_name)
    gen = np.random.default_rng(22)
    other_paths = 0
    for trial in range(25):
        support, n = int(gen.integers(4, 50)), int(gen.integers(3, 6))
        q, rest, block, before = _wor_block(gen, support, zeros=trial % 3 == 0)
        if np.count_nonzero(q) < n:
            continue
        target = gen.dirichlet(np.ones(block.size)) * gen.uniform(0.2, 1.0)
        scale = np.sqrt(q[block] + 1e-3) if trial % 2 else None

        def vertex(sigma, rest=rest, block=block, before=before, q=q, n=n):
            return priority_orders.order_vertex(law, q, n, rest, block, before, sigma)

        start = np.arange(block.size)
        kwargs = {"scale": scale, "side": side, "max_iter": 300}
        want = priority_orders.decompose(vertex, target, start, **kwargs)
        got = priority_orders.decompose_compiled(law, q, n, rest, block, before, target, start, **kwargs)
        np.testing.assert_allclose(got.mass, want.mass, rtol=0, atol=1e-10)
        assert got.residual == pytest.approx(want.residual, abs=1e-10)
        assert np.all(got.weights > 0) and got.weights.sum() == pytest.approx(1.0, abs=1e-12)
        mixed = sum(w * vertex(sigma) for w, sigma in zip(got.weights, got.orders))
        np.testing.assert_allclose(mixed, got.mass, rtol=0, atol=1e-12)
        if got.iterations == want.iterations and np.array_equal(got.orders, want.orders):
            np.testing.assert_allclose(got.weights, want.weights, rtol=0, atol=1e-10)
        else:
            other_paths += 1
    assert other_paths <= 2


def test_plan_table_serves_the_nodes_of_one_kernel():
    """``plan_table`` serves a node of k drafts on s tokens exactly where ``node_plan(law, k, s)``
    is the table's threshold kernel with head (k, flag) and the plan's tail but for the race
    settings, which it keeps: every node of two or three i.i.d. drafts on two tokens or more,
    every node of two or three drafts without replacement on as many tokens or more; three
    drafts without replacement change race
    step above ``_race.SMALL_VOCAB`` tokens. A node drawn with the table's plan, its k and race
    settings draws ``node_plan``'s token."""
    from mdsd._race import SMALL_VOCAB
    from mdsd.engine._walk_numba import _plan_of
    from mdsd.laws import get_law
    from mdsd.verifiers.optimal.verifier import plan_table

    iid, wor = get_law("iid"), get_law("without_replacement")
    for law in (iid, wor):
        table = plan_table(law, 3, SMALL_VOCAB + 40)
        assert table.plan.kind == "threshold"
        for k in (2, 3):
            fewest = 2 if law is iid else k  # tokens: i.i.d. drafts may repeat one
            assert not table.served[k, :fewest].any() and table.served[k, fewest:].all()
        assert not table.served[:2].any()
    races = plan_table(wor, 3, SMALL_VOCAB + 40).races
    assert not races[2].any()  # two drafts: no order split
    assert np.all(races[3, 3 : SMALL_VOCAB + 1] == races[3, 3]) and np.all(
        races[3, SMALL_VOCAB + 1 :] == races[3, -1]
    )
    assert races[3, 3, 0] != races[3, -1, 0]  # the race step
    gen = np.random.default_rng(5)
    table = plan_table(wor, 3, 60)
    for trial in range(30):  # rows of 2 or 3 drafts on 4-60 tokens
        k, size = 2 + trial % 2, int(gen.integers(4, 61))
        p, q = gen.dirichlet(np.ones(size)), gen.dirichlet(np.ones(size))
        drafts = np.argsort(-q)[:k]
        head, tail = _plan_of(table.plan.head, table.plan.tail, table.races, k, size)
        seed = int(gen.integers(1 << 30))
        want = node_plan(wor, k, size).sample(p, q, drafts, np.random.default_rng(seed))
        uniforms = np.random.default_rng(seed).random(table.plan.uniforms)
        got = table.plan.kernel()(p, q, *head, drafts, uniforms, *tail)
        assert got == want
