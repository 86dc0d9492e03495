"""mdsd.verifiers.classic: the fast paths of the classic verifiers equal their references
(K-SEQ's rho* and brackets, the importance law, RRS without replacement's acceptance, the
importance acceptance), exactly by enumeration on small vocabularies."""

import math

import numpy as np
import pytest
import torch

import mdsd
from mdsd.acceptance import _enumerate_row
from mdsd.verifiers.classic import RRSWithoutReplacement
from mdsd.verifiers.classic_math import (
    at_least_one,
    importance_acceptance,
    kseq_rho,
    kseq_rho_reference,
    rrs_wor_acceptance_tree,
    rrs_wor_acceptance_two,
    rrs_wor_acceptance_walk,
)

from conftest import llm_like_pair, random_pair


def test_kseq_rho_equals_bisection():
    rng = np.random.default_rng(16)
    for i in range(200):
        vocab, n = int(rng.integers(2, 60)), int(rng.integers(1, 9))
        p = rng.dirichlet(np.full(vocab, 0.3), size=3)
        q = rng.dirichlet(np.full(vocab, 0.3), size=3)
        if i % 3 == 0:
            p[:, 0] = 0.0
            p /= p.sum(axis=1, keepdims=True)
        if i % 5 == 0:
            q[:, -1] = 0.0
            q /= q.sum(axis=1, keepdims=True)
        rho, beta = kseq_rho(p, q, n)
        _, beta_ref = kseq_rho_reference(p, q, n)
        # the acceptance 1 - (1 - beta)^n is what matters (rho is not unique where g is flat)
        np.testing.assert_allclose(at_least_one(beta, n), at_least_one(beta_ref, n), atol=1e-12)
        # rho is on the safe side of the root: c = (1 - (1-beta)^n) / beta <= rho
        c = np.where(beta > 0, at_least_one(beta, n) / np.where(beta > 0, beta, 1.0), n)
        assert np.all(c <= rho * (1 + 1e-12))
        assert np.all((rho >= 1.0) & (rho <= n))


def kseq_g(p, q, n, rho):
    """g(rho) = 1 - (1 - beta)^n - rho beta, beta = sum min(q, p / rho) summed exactly."""
    beta = math.fsum(np.minimum(q, p / rho))
    return 1.0 - (1.0 - min(beta, 1.0)) ** n - rho * beta


def test_kseq_bracket_selection_equals_sort():
    """K-SEQ's bracket (lo, hi, A, B) by numba selection = by sorting, on ties, zeros, p = q,
    ratios capped at n, and LLM-like rows; and the acceptance and rho* from both equal."""
    from mdsd.verifiers import classic_math
    from mdsd.verifiers._compiled import kseq_brackets

    rng = np.random.default_rng(24)
    checked = 0
    for i in range(120):
        vocab, n = int(rng.choice([2, 5, 40, 300, 3000])), int(rng.integers(1, 9))
        if i % 4 == 3:
            pairs = [llm_like_pair(rng, vocab) for _ in range(3)]
            p, q = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        else:
            p, q = (rng.dirichlet(np.full(vocab, 0.3), size=3) for _ in range(2))
        if i % 5 == 0:
            q[1] = p[1]  # p = q: every breakpoint is 1
        if i % 3 == 0:
            q[:, : vocab // 3] = 0.0  # breakpoints capped at n
            p[:, -1] = 0.0
        if i % 7 == 0:  # ties
            p, q = np.round(p * 6) + 1.0, np.round(q * 6) + 1.0
        p /= p.sum(axis=1, keepdims=True)
        q /= q.sum(axis=1, keepdims=True)
        lo, hi, head, tail = classic_math._kseq_bracket_sorted(p, q, n)
        got = kseq_brackets(p, q, n)
        # where g is 0 to rounding at a breakpoint (p = q, n = 1, ties at the root) the two
        # searches may stop on either side of it; rho*, beta (below) agree there too
        clear = np.array(
            [
                hi[b] > lo[b]
                and min(abs(kseq_g(p[b], q[b], n, lo[b])), abs(kseq_g(p[b], q[b], n, hi[b]))) > 1e-12
                for b in range(3)
            ]
        )
        np.testing.assert_array_equal(got[clear, 1], hi[clear])
        np.testing.assert_array_equal(got[clear, 0], lo[clear])
        np.testing.assert_allclose(got[clear, 2], head[clear], rtol=0, atol=1e-13)
        np.testing.assert_allclose(got[clear, 3], tail[clear], rtol=0, atol=1e-13)
        checked += int(clear.sum())
        rho, beta = kseq_rho(p, q, n)
        rho_t, beta_t = kseq_rho(torch.tensor(p), torch.tensor(q), n)  # the sorted path
        # the acceptance is what matters: at a double root (p = q) rho moves by ~sqrt(eps)
        np.testing.assert_allclose(at_least_one(beta, n), at_least_one(beta_t.numpy(), n), rtol=0, atol=1e-12)
        np.testing.assert_allclose(rho[clear], rho_t.numpy()[clear], rtol=0, atol=1e-12)
    assert checked > 250  # most brackets are compared


def test_kseq_buckets_and_beta_equal_plain_numpy():
    """K-SEQ's vectorised pieces: each token's bucket = 1 + floor((r - 1) BUCKETS / (n - 1))
    capped (0 below 1), the bucket sums = ``np.add.at`` / ``np.minimum.at`` of the same tokens,
    and beta(rho) = its exact sum, across block edges (vocab not a multiple of the block)."""
    from mdsd.verifiers._compiled import BUCKETS, _bucket_sums
    from mdsd.verifiers._early_exit import _beta_at

    rng = np.random.default_rng(29)
    for vocab, n in ((3, 2), (511, 4), (512, 4), (1500, 3), (5000, 8)):
        p, q = llm_like_pair(rng, vocab)
        q[:: max(vocab // 7, 1)] = 0.0  # breakpoints capped at n
        p[1 :: max(vocab // 5, 1)] = 0.0
        q[2], p[2] = p[2], p[2]  # a breakpoint exactly 1
        r = np.minimum(np.divide(p, q, out=np.full(vocab, float(n)), where=q > 0), n)
        scale = BUCKETS / (n - 1)
        want_index = np.where(r >= 1, 1 + np.minimum(np.floor((r - 1) * scale), BUCKETS - 1), 0)
        index = np.empty(vocab, dtype=np.int16)
        bucket_q, bucket_p, bucket_min = _bucket_sums(p, q, float(n), scale, index)
        np.testing.assert_array_equal(index, want_index)
        want_q, want_p = np.zeros(BUCKETS + 1), np.zeros(BUCKETS + 1)
        want_min = np.full(BUCKETS + 1, np.inf)
        np.add.at(want_q, index, q)
        np.add.at(want_p, index, p)
        np.minimum.at(want_min, index, r)
        np.testing.assert_allclose(bucket_q, want_q, rtol=1e-13, atol=0)
        np.testing.assert_allclose(bucket_p, want_p, rtol=1e-13, atol=0)
        np.testing.assert_array_equal(bucket_min, want_min)
        for rho in (1.0, 1.7, float(n)):
            want = math.fsum(np.minimum(q, p / rho))
            assert _beta_at(p, q, rho) == pytest.approx(want, rel=1e-13, abs=0)


def test_kseq_final_draw_is_the_inverse_cdf_across_blocks():
    """K-SEQ's final draw (block sums, then one block walked) = the inverse CDF of
    (p - min(q, p / rho) c)_+ by ``np.cumsum``, at uniforms not within 1e-9 of a breakpoint;
    non-decreasing in the uniform, never a token of zero mass; a threshold past the total gives
    the last token of positive mass."""
    from mdsd.verifiers._early_exit import (
        LEFTOVER_BLOCK,
        _kseq_final,
        _kseq_leftover_blocks,
        _kseq_leftover_search,
        _kseq_rho_row,
    )

    rng = np.random.default_rng(30)
    for vocab in (5, LEFTOVER_BLOCK, LEFTOVER_BLOCK + 1, 1000, 5000):
        p, q = llm_like_pair(rng, vocab)
        p[-1] = 0.0  # the last token has no mass: never drawn, not the fallback
        p /= p.sum()
        n = 4
        rho, beta = _kseq_rho_row(p, q, n, 64)
        c = at_least_one(beta, n) / beta
        law = np.maximum(p - np.minimum(q, p * (1.0 / rho)) * c, 0.0)
        cdf = np.cumsum(law) / law.sum()
        uniforms = np.sort(rng.random(3000))
        got = np.array([_kseq_final(p, q, u, rho, beta, n) for u in uniforms])
        want = np.searchsorted(cdf, uniforms, side="right")
        gap = np.abs(cdf[np.minimum(want, vocab - 1)] - uniforms)
        gap = np.minimum(gap, np.abs(cdf[np.maximum(want - 1, 0)] - uniforms))
        away = gap > 1e-9
        assert away.mean() > 0.99
        np.testing.assert_array_equal(got[away], want[away])
        assert np.all(np.diff(got) >= 0) and np.all(law[got] > 0)
        blocks = np.empty((vocab + LEFTOVER_BLOCK - 1) // LEFTOVER_BLOCK)
        total = _kseq_leftover_blocks(p, q, 1.0 / rho, c, blocks)
        assert total == pytest.approx(law.sum(), rel=1e-13)
        last = int(np.flatnonzero(law > 0)[-1])
        assert _kseq_leftover_search(p, q, 1.0 / rho, c, blocks, np.inf) == last


def test_kseq_rho_with_zero_draft_mass_in_the_straddling_bucket():
    """Tokens with q = 0 have breakpoint n; where their bucket straddles the root the second
    pass gathers them: here n = 2, breakpoints 1.999 and 2 (q = 0) share the top bucket and
    rho* = 2 - beta lies between them (beta = 0.0005). rho* and beta as the reference, no
    division by zero."""
    p = np.array([[0.0009995, 0.9990005, 0.0]])
    q = np.array([[0.0005, 0.0, 0.9995]])
    rho, beta = kseq_rho(p, q, 2)
    rho_ref, beta_ref = kseq_rho_reference(p, q, 2)
    np.testing.assert_allclose(at_least_one(beta, 2), at_least_one(beta_ref, 2), atol=1e-12)
    assert 1.999 < rho[0] <= 2.0 and rho[0] == pytest.approx(rho_ref[0], abs=1e-12)


def test_importance_law_compiled_equals_sorted(monkeypatch):
    """p_I of max-importance selection: the numba pass after numpy's unstable argsort (tie runs
    put in token order) = the stable-sort path, with many ties, zeros in p and q, LLM-like rows."""
    from mdsd.verifiers import classic_math

    rng = np.random.default_rng(25)
    for i in range(60):
        vocab, n = int(rng.choice([2, 7, 50, 2000])), int(rng.integers(1, 9))
        if i % 3 == 0:  # integer masses: many equal weights p / q
            p, q = (rng.integers(0, 4, size=(4, vocab)).astype(float) + (i % 2) for _ in range(2))
            p[:, 0] += 1.0
            q[:, -1] += 1.0
        elif i % 3 == 1:
            pairs = [llm_like_pair(rng, vocab) for _ in range(4)]
            p, q = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        else:
            p, q = (rng.dirichlet(np.full(vocab, 0.3), size=4) for _ in range(2))
            q[:, : vocab // 4] = 0.0
        p /= p.sum(axis=1, keepdims=True)
        q /= q.sum(axis=1, keepdims=True)
        compiled = classic_math.importance_law(p, q, n)
        with monkeypatch.context() as m:
            m.setattr(classic_math, "compiled_kernels", lambda: None)
            plain = classic_math.importance_law(p, q, n)
        np.testing.assert_allclose(compiled, plain, rtol=0, atol=1e-14)
        np.testing.assert_allclose(compiled.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_rrs_without_replacement_acceptance_exact():
    rng = np.random.default_rng(17)
    law, verifier = mdsd.get_law("without_replacement"), RRSWithoutReplacement()
    for i in range(60):
        vocab, n = int(rng.integers(2, 7)), int(rng.integers(2, 5))
        p, q = random_pair(rng, vocab, zero_p=i % 3 == 0, zero_q=i % 4 == 0)
        if i % 7 == 0:
            q = p.copy()
        if np.count_nonzero(q) < n:
            continue
        exact = _enumerate_row(p, q, n, verifier, law)
        if n == 2:
            assert rrs_wor_acceptance_two(p[None], q[None])[0] == pytest.approx(exact, abs=1e-12)
            assert rrs_wor_acceptance_two(torch.tensor(p[None]), torch.tensor(q[None]))[
                0
            ].item() == pytest.approx(exact, abs=1e-12)
        assert rrs_wor_acceptance_tree(p, q, n) == pytest.approx(exact, abs=1e-12)


def test_rrs_without_replacement_two_drafts_near_one_hot_q():
    """n = 2 with q's top token at 1 - 1.3e-8 (and p's elsewhere, near one-hot too, as at T = 0.1
    in ``mdsd measure``): the second draft's law q_y / (1 - q_x) needs 1 - q_x summed from the
    other tokens; as total - q_x it was 5e-9 off. Exact value in rational arithmetic."""
    from fractions import Fraction

    p = np.array([1 - 1.0e-10 - 3e-12, 6e-11, 3e-11, 1e-11, 3e-12])
    q = np.array([1.3e-8 - 2e-11, 1 - 1.3e-8 - 2e-13, 1.5e-11, 5e-12, 2e-13])
    P, Q = [Fraction(x) for x in p], [Fraction(x) for x in q]
    P, Q = [x / sum(P) for x in P], [x / sum(Q) for x in Q]  # normalised exactly, not in float
    rejected = sum(max(b - a, 0) for a, b in zip(P, Q))
    r = [max(a - b, 0) / rejected for a, b in zip(P, Q)]
    exact = 1 - rejected
    for x in range(q.size):
        others = 1 - Q[x]
        exact += max(Q[x] - P[x], 0) * sum(min(Q[y] / others, r[y]) for y in range(q.size) if y != x)
    assert rrs_wor_acceptance_two(p[None], q[None])[0] == pytest.approx(float(exact), abs=1e-12)
    assert rrs_wor_acceptance_two(torch.tensor(p[None]), torch.tensor(q[None]))[0].item() == pytest.approx(
        float(exact), abs=1e-12
    )


def test_importance_acceptance_matches_enumeration(rng):
    for trial in range(60):
        vocab, n = int(rng.integers(2, 7)), int(rng.integers(1, 5))
        p, q = rng.dirichlet(np.full(vocab, 0.5)), rng.dirichlet(np.full(vocab, 0.5))
        if trial % 3 == 0:
            q[rng.integers(vocab)] = 0.0
            q /= q.sum()
        if trial % 4 == 0:
            p[rng.integers(vocab)] = 0.0
            p /= p.sum()
        if trial % 7 == 0:
            q = p.copy()
        exact = mdsd.acceptance_rate(p, q, n, "importance", method="enumeration").rate
        assert importance_acceptance(p[None], q[None], n)[0] == pytest.approx(exact, abs=1e-12)


def test_rrs_wor_walk_matches_tree_and_enumeration(rng):
    """The compiled draw-tree walk (the analysis' path for rrs_without_replacement, n >= 3) equals
    the numpy reference and enumeration of every draft sequence to 1e-12, zeros, ties and q = p
    included; on LLM-like top-k rows it matches the reference and refuses the same rows."""
    law, verifier = mdsd.get_law("without_replacement"), mdsd.get_verifier("rrs_without_replacement")
    for trial in range(80):
        vocab, n = int(rng.integers(2, 8)), int(rng.integers(1, 6))
        p, q = rng.dirichlet(np.full(vocab, 0.6)), rng.dirichlet(np.full(vocab, 0.6))
        if trial % 3 == 0:
            q[rng.integers(vocab)] = 0.0
            q /= q.sum()
        if trial % 4 == 0:
            p[rng.integers(vocab)] = 0.0
            p /= p.sum()
        if trial % 5 == 0:
            p = np.round(p * 4) / 4 + 1e-3  # ties between p and q
            p /= p.sum()
            q = np.round(q * 4) / 4 + 1e-3
            q /= q.sum()
        if trial % 7 == 0:
            q = p.copy()
        if np.count_nonzero(q) < n:
            continue
        exact = _enumerate_row(p, q, n, verifier, law)
        assert rrs_wor_acceptance_walk(p, q, n) == pytest.approx(exact, abs=1e-12)
        assert rrs_wor_acceptance_walk(p, q, n) == pytest.approx(rrs_wor_acceptance_tree(p, q, n), abs=1e-12)
    for _ in range(6):  # 40 tokens of a 200-token LLM-like pair: thousands of tree nodes
        logits = 3.0 * rng.standard_normal(200)
        p = mdsd.process_logits(logits, 1.0, 40)
        q = mdsd.process_logits(logits + 1.5 * rng.standard_normal(200), 1.0, 40)
        for n, max_rows in ((3, 10**6), (4, 10**6), (4, 5_000), (5, 20_000)):
            reference = rrs_wor_acceptance_tree(p, q, n, max_rows)
            walked = rrs_wor_acceptance_walk(p, q, n, max_rows)
            assert (walked is None) == (reference is None)
            if reference is not None:
                assert walked == pytest.approx(reference, abs=1e-12)
