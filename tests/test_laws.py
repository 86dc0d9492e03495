"""Draft laws: enumeration sums to 1, sampling follows the enumerated law, Qall prefixes."""

import itertools
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import chisquare

import mdsd
from mdsd._race import wor_qall_prefixes
from mdsd.bound import qall_reference
from mdsd.io import random_pair as lm_pair
from mdsd.laws import THREE_DRAFT_CLOSED_MAX, three_draft_qall_window, top_tokens, top_tokens_reference

from conftest import ALL_LAWS, inverse_cdf_reference, law_accepts, random_pair


@pytest.mark.parametrize("law", ALL_LAWS)
def test_enumeration_is_a_distribution(law, rng):
    for _ in range(20):
        vocab = int(rng.integers(2, 6))
        n = 2 if law == "spechub" else int(rng.integers(1, 4))
        p, q = random_pair(rng, vocab, zero_q=bool(rng.integers(2)))
        if not law_accepts(law, q, n):
            continue
        tuples, probs = mdsd.get_law(law).enumerate(q, n)
        assert tuples.shape[1] == n
        assert np.all(probs > 0)
        assert abs(probs.sum() - 1) < 1e-12
        assert np.all(q[tuples] > 0)
        if mdsd.get_law(law).distinct:
            assert all(len(set(t)) == n for t in tuples.tolist())


def test_without_replacement_sequential_probabilities():
    q = np.array([0.5, 0.3, 0.2])
    tuples, probs = mdsd.get_law("without_replacement").enumerate(q, 2)
    table = dict(zip(map(tuple, tuples.tolist()), probs))
    assert table[(0, 1)] == pytest.approx(0.5 * 0.3 / 0.5)
    assert table[(2, 0)] == pytest.approx(0.2 * 0.5 / 0.8)


@pytest.mark.parametrize("law", ALL_LAWS)
def test_sampler_matches_enumeration(law):
    """Seeded chi-square test of the sampler against the enumerated tuple law (p-value > 1e-4: false-positive
    rate 1e-4)."""
    rng = np.random.default_rng(7)
    q = np.array([0.35, 0.25, 0.2, 0.15, 0.05])
    n = 2 if law == "spechub" else 3
    the_law = mdsd.get_law(law)
    tuples, probs = the_law.enumerate(q, n)
    index = {t: i for i, t in enumerate(map(tuple, tuples.tolist()))}
    samples = the_law.sample(np.broadcast_to(q, (20000, q.size)), n, rng)
    counts = np.zeros(len(tuples))
    for t in map(tuple, samples.tolist()):
        counts[index[t]] += 1  # KeyError would mean an impossible tuple
    expected = probs * counts.sum()
    keep = expected >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    assert chisquare(observed, expected).pvalue > 1e-4


@pytest.mark.parametrize("law", ["iid", "without_replacement", "conditional_poisson"])
def test_qall_prefixes_match_enumeration(law, rng):
    for _ in range(30):
        vocab = int(rng.integers(2, 7))
        n = int(rng.integers(1, 5))
        _, q = random_pair(rng, vocab, zero_q=bool(rng.integers(2)))
        if not law_accepts(law, q, n):
            continue
        the_law = mdsd.get_law(law)
        order = rng.permutation(vocab)
        fast = the_law.qall_prefixes(q[order][None, :], n)[0]
        tuples, probs = the_law.enumerate(q, n)
        for k in range(vocab + 1):
            mask = np.zeros(vocab, dtype=bool)
            mask[order[:k]] = True
            assert fast[k] == pytest.approx(qall_reference(tuples, probs, mask), abs=1e-12)


@pytest.mark.parametrize("law", ["iid", "without_replacement", "conditional_poisson"])
def test_qall_window_matches_prefixes(law, rng):
    """qall_window (the optimal verifier's vertex oracle) == the window of qall_prefixes, on small
    and LM-sized rows (the without-replacement window kernel skips prefixes outside it)."""
    the_law = mdsd.get_law(law)
    for trial in range(20):
        vocab = int(rng.integers(2, 8)) if trial % 2 else int(rng.integers(50, 400))
        n = int(rng.integers(1, min(vocab, 8) + 1))
        q = rng.dirichlet(np.full(vocab, 0.3))
        if trial % 3 == 0:
            q[rng.integers(vocab)] = 0.0
            q /= q.sum()
        if not law_accepts(law, q, n):
            continue
        order = rng.permutation(vocab)
        k_lo = int(rng.integers(0, vocab + 1))
        k_hi = int(rng.integers(k_lo, vocab + 1))
        full = the_law.qall_prefixes(q[order][None, :], n)[0]
        window = the_law.qall_window(q[order], n, k_lo, k_hi)
        assert window.shape == (k_hi - k_lo + 1,)
        np.testing.assert_allclose(window, full[k_lo : k_hi + 1], rtol=0, atol=1e-12)


def _three_draft_qall_exact(q):
    """Qall of every prefix for three draws without replacement, in exact rational arithmetic."""
    masses = [Fraction(float(x)) for x in q]
    total = sum(masses)
    out = []
    for k in range(len(masses) + 1):
        out.append(
            float(
                sum(
                    masses[a]
                    * masses[b]
                    * masses[c]
                    / (total * (total - masses[a]) * (total - masses[a] - masses[b]))
                    for a, b, c in itertools.permutations(range(k), 3)
                )
            )
        )
    return np.array(out)


def test_three_draft_closed_form_matches_exact_enumeration(rng):
    """The closed-form Qall of three draws without replacement is within a few ulp of the exact
    rational value: random rows (flat to very peaked, with zeros) and rows built to cancel (a
    dominant token, two near-halves, tiny tails), in both orders."""
    rows = []
    for trial in range(150):
        vocab = int(rng.integers(3, 7))
        q = rng.dirichlet(np.full(vocab, (0.05, 0.2, 1.0)[trial % 3]))
        if trial % 5 == 0:
            q[rng.integers(vocab)] = 0.0
            q /= q.sum()
        if np.count_nonzero(q) >= 3:
            rows.append(q)
    for q in (
        [0.999999, 5e-7, 2e-7, 1e-7, 1e-7, 1e-7],
        [0.5, 0.4999999, 5e-8, 3e-8, 2e-8],
        [0.3, 0.3, 0.3, 0.1, 1e-20],
    ):
        q = np.array(q) / np.sum(q)
        rows += [q, q[::-1].copy()]
    law = mdsd.get_law("without_replacement")
    for q in rows:
        exact = _three_draft_qall_exact(q)
        np.testing.assert_allclose(law.qall_prefixes(q[None, :], 3)[0], exact, rtol=0, atol=2e-15)
        np.testing.assert_allclose(three_draft_qall_window(q, 1, q.size - 1), exact[1:-1], rtol=0, atol=2e-15)


def test_three_draft_closed_form_matches_race_quadrature():
    """On LM-like top-k rows (the optimal verifier's supports) and a whole 1,000-token row (where
    the optimal verifier's order split takes the quadrature) the closed form and the race
    quadrature, which it replaces up to ``THREE_DRAFT_CLOSED_MAX`` tokens, agree to the
    quadrature's accuracy."""
    gen = np.random.default_rng(7)
    for vocab, top_k, temperature in ((8192, 64, 0.3), (8192, 64, 1.0), (8192, 256, 0.7), (1000, None, 0.9)):
        _, q = lm_pair(vocab, seed=top_k or 1, temperature=temperature, top_k=top_k)
        row = gen.permutation(q[q > 0])
        race = wor_qall_prefixes(row[None, :] / row.sum(), 3)[0]
        np.testing.assert_allclose(three_draft_qall_window(row, 0, row.size), race, rtol=0, atol=1e-12)
    assert mdsd.get_law("without_replacement").qall_by_quadrature(3, THREE_DRAFT_CLOSED_MAX + 1)
    assert not mdsd.get_law("without_replacement").qall_by_quadrature(3, THREE_DRAFT_CLOSED_MAX)


@pytest.mark.parametrize("law", ["greedy", "spechub"])
def test_closed_form_laws_qall_prefixes_match_enumeration(law, rng):
    """Greedy / SpecHub Qall of prefixes of any order, with ties in q placed by token id."""
    for trial in range(30):
        vocab = int(rng.integers(2, 7))
        n = 2 if law == "spechub" else int(rng.integers(1, 5))
        _, q = random_pair(rng, vocab, zero_q=bool(rng.integers(2)))
        if trial % 3 == 0:
            q = np.round(q * 4) + 1.0  # ties
            q /= q.sum()
        if not law_accepts(law, q, n):
            continue
        the_law = mdsd.get_law(law)
        order = rng.permutation(vocab)
        fast = the_law.qall_prefixes(q[order][None, :], n, order=order)[0]
        tuples, probs = the_law.enumerate(q, n)
        for k in range(vocab + 1):
            mask = np.zeros(vocab, dtype=bool)
            mask[order[:k]] = True
            assert fast[k] == pytest.approx(qall_reference(tuples, probs, mask), abs=1e-12)


def test_pitfall_elementary_symmetric_ratio_differs_from_sequential():
    """docs/theory.md §4.3: q = (0.5, 0.3, 0.2), n = 2, H = first two: 0.5143 sequential vs 0.4839 ratio."""
    q = np.array([[0.5, 0.3, 0.2]])
    sequential = mdsd.get_law("without_replacement").qall_prefixes(q, 2)[0, 2]
    ratio = mdsd.get_law("conditional_poisson").qall_prefixes(q, 2)[0, 2]
    assert sequential == pytest.approx(0.5142857142857142, abs=1e-12)  # 18/35
    assert ratio == pytest.approx(0.15 / 0.31, abs=1e-12)


@pytest.mark.parametrize("law", ["iid", "greedy", "spechub", "conditional_poisson"])
def test_inclusion_probabilities(law, rng):
    for _ in range(10):
        vocab = int(rng.integers(2, 6))
        n = 2 if law == "spechub" else int(rng.integers(1, 4))
        _, q = random_pair(rng, vocab)
        if not law_accepts(law, q, n):
            continue
        the_law = mdsd.get_law(law)
        tuples, probs = the_law.enumerate(q, n)
        expected = [probs[(tuples == y).any(axis=1)].sum() for y in range(vocab)]
        np.testing.assert_allclose(the_law.inclusion_probs(q, n), expected, atol=1e-12)


@pytest.mark.parametrize("law", ["without_replacement", "greedy", "conditional_poisson"])
def test_distinct_laws_refuse_n_above_support(law):
    q = np.array([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="support"):
        mdsd.get_law(law).sample(q, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="support"):
        mdsd.optimal_acceptance(q, q, 3, law)


@pytest.mark.parametrize("law", ALL_LAWS)
def test_trusted_sampling_draws_what_sample_draws(law):
    """``sample_trusted`` (the engine's path, n validated by the caller) skips the checks only:
    from the same generator state it returns the same drafts as ``sample``."""
    q = np.random.default_rng(3).dirichlet(np.ones(12), size=5)
    q[:, -2:] = 0.0  # tokens of zero mass
    q /= q.sum(axis=1, keepdims=True)
    for n in (1, 2, 3):
        if not law_accepts(law, q, n):
            continue
        want = mdsd.get_law(law).sample(q, n, np.random.default_rng(n))
        got = mdsd.get_law(law).sample_trusted(q, n, np.random.default_rng(n))
        np.testing.assert_array_equal(got, want)


def test_spechub_needs_two_drafts():
    q = np.array([0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="n = 2"):
        mdsd.get_law("spechub").check(q, 3)


def test_unknown_law():
    with pytest.raises(ValueError, match="unknown law 'sorted'"):
        mdsd.get_law("sorted")


def test_batched_sampling_shapes(rng):
    q = rng.dirichlet(np.ones(10), size=(4, 3))
    for law in ALL_LAWS:
        n = 2
        x = mdsd.get_law(law).sample(q, n, rng)
        assert x.shape == (4, 3, 2)
        assert np.all(np.take_along_axis(q, x, axis=-1) > 0)


def test_conditional_poisson_compiled_prefixes_match_numpy_reference():
    """The compiled prefix recurrence == the numpy one, incl. zeros, 1e-30 masses and long rows."""
    law = mdsd.get_law("conditional_poisson")
    rng = np.random.default_rng(17)
    for i in range(60):
        vocab = int(rng.integers(2, 400)) if i % 10 else 20000
        q = rng.dirichlet(np.ones(vocab) * rng.choice([0.05, 0.5, 2.0]))
        if i % 3 == 0:
            q[rng.random(vocab) < 0.3] = 0.0
        if i % 4 == 0:
            q[int(rng.integers(vocab))] = 1e-30
        support = int(np.count_nonzero(q > 0))
        if support == 0:
            continue
        q = q / q.sum()
        n = int(rng.integers(1, min(support, 12) + 1))
        fast = law.qall_prefixes(q[None, :], n)
        slow = law.qall_prefixes_reference(q[None, :], n)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-13)
        assert fast[0, -1] == pytest.approx(1.0, abs=1e-15)


def test_without_replacement_sampling_is_gumbel_top_n_in_stable_order():
    """The Gumbel path (more than SEQUENTIAL_DRAWS_MAX drafts): the O(V) selection draws what a
    stable argsort of the Gumbel keys gives (zeros in q make -inf keys, which tie; n up to V)."""
    from mdsd.laws import WithoutReplacement

    law = WithoutReplacement()
    gen = np.random.default_rng(4)
    for _ in range(40):
        vocab = int(gen.integers(2, 300))
        q = gen.dirichlet(np.full(vocab, 0.3)) * (gen.random(vocab) < 0.7)
        q = q / q.sum() if q.sum() > 0 else np.full(vocab, 1.0 / vocab)
        for n in (1, 2, 4, vocab):
            seed = int(gen.integers(1 << 30))
            got = law._sample_gumbel(q, n, np.random.default_rng(seed))
            with np.errstate(divide="ignore"):
                keys = np.log(q) + np.random.default_rng(seed).gumbel(size=q.shape)
            np.testing.assert_array_equal(got, np.argsort(-keys, kind="stable")[:n])


def test_top_tokens_equals_stable_sort():
    """Both fast paths (rounds of argmax up to ``TOP_ARGMAX_MAX``, partition beyond) give the
    stable sort's tokens and order: rows with many ties and zeros, 1-D and [B, V] inputs."""
    from mdsd.laws import TOP_ARGMAX_MAX

    rng = np.random.default_rng(10)
    for _ in range(30):
        vocab = int(rng.integers(2, 80))
        q = rng.integers(0, 5, size=(3, vocab)).astype(float)  # many ties and zeros
        for k in (1, 2, 3, TOP_ARGMAX_MAX, TOP_ARGMAX_MAX + 1, min(7, vocab), vocab - 1):
            k = min(k, vocab)
            np.testing.assert_array_equal(top_tokens(q, k), top_tokens_reference(q, k))
            np.testing.assert_array_equal(top_tokens(q[0], k), top_tokens_reference(q[0], k))
    q = np.zeros(6)  # all tied: the lowest ids, in order
    np.testing.assert_array_equal(top_tokens(q, 3), [0, 1, 2])


def test_holds_top_equals_the_top_mask():
    """``holds_top`` (the greedy law's check without a mask) answers as comparing the listed
    tokens' mask with ``top_mask``: the true top sets, sets one swap away (a tie broken the other
    way, a lower token for a higher one), duplicated tokens; rows with many ties and zeros."""
    from mdsd._array_ops import holds_top, top_mask

    rng = np.random.default_rng(12)
    seen = {True: 0, False: 0}
    for trial in range(300):
        vocab = int(rng.integers(2, 40))
        q = rng.integers(0, 4, size=(2, vocab)).astype(float) if trial % 2 else rng.random((2, vocab))
        k = int(rng.integers(1, vocab + 1))
        members = top_tokens(q, k)
        for _ in range(int(rng.integers(0, 3))):  # swaps: a member for a non-member
            b, i = int(rng.integers(2)), int(rng.integers(k))
            others = np.setdiff1d(np.arange(vocab), members[b])
            if others.size:
                members[b, i] = rng.choice(others)
        if trial % 7 == 0 and k > 1:
            members[0, 1] = members[0, 0]  # a repeated token
        want = ~np.any(_mask(members, vocab) != top_mask(q, k), axis=1)
        got = holds_top(q, members)
        np.testing.assert_array_equal(got, want)
        seen[True] += int(want.sum())
        seen[False] += int((~want).sum())
    assert min(seen.values()) > 100  # both answers are exercised


def _mask(members, vocab):
    mask = np.zeros((members.shape[0], vocab), dtype=bool)
    np.put_along_axis(mask, members, True, axis=1)
    return mask


def test_without_replacement_sequential_draws():
    """Up to SEQUENTIAL_DRAWS_MAX drafts: draw i is the inverse CDF at the i-th uniform over q with
    the earlier draws removed (a numpy reference), for rows with zeros, tiny masses and one token
    near 1; never a zero-mass or repeated token; batched rows draw as single rows."""
    from mdsd.laws import SEQUENTIAL_DRAWS_MAX, WithoutReplacement

    def reference(q, uniforms):
        rest, out = q.copy(), []
        for u in uniforms:
            y = inverse_cdf_reference(rest, u)
            out.append(y)
            rest[y] = 0.0
        return out

    law = WithoutReplacement()
    gen = np.random.default_rng(12)
    for case in range(60):
        vocab = int(gen.integers(2, 200))
        q = gen.dirichlet(np.full(vocab, 0.3)) * (gen.random(vocab) < 0.7)
        q[int(gen.integers(vocab))] += 1e-300 if case % 3 == 0 else 0.5
        q = q / q.sum()
        n = int(min(np.count_nonzero(q), gen.integers(1, SEQUENTIAL_DRAWS_MAX + 1)))
        got = law.sample(q, n, np.random.default_rng(case))
        uniforms = np.random.default_rng(case).random((1, n))[0]
        cdf_gaps = [np.min(np.abs(np.cumsum(q) - u * q.sum())) for u in uniforms]
        if min(cdf_gaps) > 1e-12:  # away from rounding ties of the two summation orders
            assert got.tolist() == reference(q, uniforms)
        assert len(set(got.tolist())) == n and np.all(q[got] > 0)
    q = gen.dirichlet(np.ones(30), size=(2, 3))
    batched = law.sample(q, 4, np.random.default_rng(5))
    uniforms = np.random.default_rng(5).random((6, 4))
    singles = [reference(row, u) for row, u in zip(q.reshape(6, 30), uniforms)]
    np.testing.assert_array_equal(batched.reshape(6, 4), singles)
