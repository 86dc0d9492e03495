"""Chain verification (mdsd.sequence.chain): token- and block-level rules.

Exactness is checked by enumeration: every drafted chain with its probability, the verifier's
exact block law, and the losslessness identity on every sequence of length k + 1 (to 1e-12); the
block rule attains the chain LP optimum. Samplers are checked against their exact laws by seeded
chi-square tests with threshold 1e-4: each such test has a false-positive rate of 1e-4 (and is
deterministic for its seed).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from mdsd.lp import tree_optimum
from mdsd.sequence import (
    chain_as_tree,
    chain_emission_law,
    chain_expected_length,
    chain_verify,
    expected_block_length,
    lossless_error,
    tree_emission_law,
)
from mdsd.sequence.enumerate import PrefixModel

from .helpers import EXACT, LP_TOL, P_THRESHOLD, tables


def chain_block_law(p, q, k, verifier):
    """Marginal block law of a chain verifier: enumerate every chain x in V^k with q(x) > 0."""
    target, draft = PrefixModel(p, "p"), PrefixModel(q, "q")
    vocab = target.vocab
    out = {}
    for x in itertools.product(range(vocab), repeat=k):
        prob = np.prod([draft(x[:i])[x[i]] for i in range(k)])
        if prob == 0:
            continue
        p_rows = [target(x[:i]) for i in range(k + 1)]
        q_rows = [draft(x[:i]) for i in range(k)]
        law = chain_emission_law(p_rows, q_rows, list(x), verifier)
        for j, y in zip(*np.nonzero(law)):
            key = tuple(x[:j]) + (int(y),)
            out[key] = out.get(key, 0.0) + prob * law[j, y]
    return out


CHAIN_CASES = [(v, k, seed) for v in (2, 3, 4) for k in (1, 2, 3) for seed in (0, 1)]


@pytest.mark.parametrize("verifier", ["token", "block"])
@pytest.mark.parametrize("vocab,k,seed", CHAIN_CASES)
def test_chain_law_is_lossless(verifier, vocab, k, seed):
    p, q = tables(seed, vocab, k, zero_p=0.25 * (seed % 2), zero_q=0.25 * (seed % 2))
    law = chain_block_law(p, q, k, verifier)
    assert abs(sum(law.values()) - 1.0) < EXACT
    assert lossless_error(law, p, k + 1) < EXACT


def test_chain_law_rows_sum_to_one_and_shape():
    p, q = tables(3, 4, 3)
    x = [1, 2, 0]
    p_rows = [p[tuple(x[:i])] for i in range(4)]
    q_rows = [q[tuple(x[:i])] for i in range(3)]
    for verifier in ("token", "block"):
        law = chain_emission_law(p_rows, q_rows, x, verifier)
        assert law.shape == (4, 4)
        assert abs(law.sum() - 1.0) < EXACT
        assert law.min() >= 0


def test_paper_binary_example():
    """Sun et al. (arXiv 2403.10444): p = (1/3, 2/3), q = (2/3, 1/3), k = 2: 10/9 vs 11/9."""
    p, q = [[1 / 3, 2 / 3]] * 3, [[2 / 3, 1 / 3]] * 2
    kept = {}
    for verifier in ("token", "block"):
        kept[verifier] = sum(
            np.prod([q[0][t] for t in x])
            * (chain_expected_length(chain_emission_law(p, q, list(x), verifier)) - 1)
            for x in itertools.product(range(2), repeat=2)
        )
    assert abs(kept["token"] - 10 / 9) < EXACT
    assert abs(kept["block"] - 11 / 9) < EXACT


@pytest.mark.parametrize("vocab,k,seed", [(v, k, s) for v in (2, 3, 4) for k in (1, 2, 3) for s in (5, 6)])
def test_block_equals_chain_lp_optimum(vocab, k, seed):
    p, q = tables(seed, vocab, k)
    block = expected_block_length(chain_block_law(p, q, k, "block"))
    token = expected_block_length(chain_block_law(p, q, k, "token"))
    optimum = tree_optimum((1,) * k, "iid", p, q)
    assert abs(block - optimum.value) < LP_TOL
    assert token <= block + EXACT


@pytest.mark.parametrize("seed", range(6))
def test_chain_front_door_matches_tree_methods(seed):
    """block == traversal and token == node-by-node rrs on the same chain, exactly."""
    rng = np.random.default_rng(seed)
    vocab, k = 4, 3
    p_rows = rng.dirichlet(np.ones(vocab), k + 1)
    q_rows = rng.dirichlet(np.ones(vocab), k)
    if seed % 2:
        p_rows[:, 0] = 0.0
        p_rows /= p_rows.sum(axis=1, keepdims=True)
    x = [int(rng.choice(vocab, p=q_rows[i])) for i in range(k)]
    tree = chain_as_tree(p_rows, q_rows, x)
    for verifier, method, node_verifier in (("block", "traversal", None), ("token", "node", "rrs")):
        law = chain_emission_law(p_rows, q_rows, x, verifier)
        as_array = np.zeros_like(law)
        for z, mass in tree_emission_law(tree, method, node_verifier).items():
            as_array[len(z) - 1, z[-1]] += mass
        assert np.abs(law - as_array).max() < EXACT


@pytest.mark.parametrize("verifier", ["token", "block"])
def test_chain_sampler_matches_law(verifier):
    """chi-square of 12,000 seeded draws over the (j, y) cells; false-positive rate 1e-4."""
    rng = np.random.default_rng(7)
    p_rows = rng.dirichlet(np.ones(3), 4)
    q_rows = rng.dirichlet(np.ones(3), 3)
    x = [0, 2, 1]
    law = chain_emission_law(p_rows, q_rows, x, verifier)
    draws = 12_000
    counts = np.zeros_like(law)
    sampler_rng = np.random.default_rng(11)
    for _ in range(draws):
        result = chain_verify(p_rows, q_rows, x, verifier, sampler_rng)
        assert result.tokens[:-1] == tuple(x[: result.accepted])
        assert result.bonus == (result.accepted == 3)
        counts[result.accepted, result.tokens[-1]] += 1
    support = law > 0
    assert counts[~support].sum() == 0
    assert chisquare(counts[support], law[support] * draws).pvalue > P_THRESHOLD


def test_block_sampler_kernels_equal_the_law_rows():
    """The sampler's compiled steps against the law's numpy rows: ``_excess_and_deficit`` equals
    the two numpy sums (1e-12), and ``_residual_draw`` over a grid of 20,000 uniforms draws each
    token with ``_block_residual``'s probability to the grid's step; w = 0, w = 1 and p = q rows
    (empty residuals: draws from p) included."""
    from mdsd.sequence.chain import _block_residual, _excess_and_deficit, _residual_draw

    rng = np.random.default_rng(5)
    grid = (np.arange(20_000) + 0.5) / 20_000
    for case in range(40):
        vocab = int(rng.integers(2, 12))
        p_row = rng.dirichlet(np.ones(vocab)) * (rng.random(vocab) < 0.8)
        p_row = p_row / p_row.sum() if p_row.sum() > 0 else np.full(vocab, 1.0 / vocab)
        q_row = p_row.copy() if case % 5 == 0 else rng.dirichlet(np.ones(vocab))
        weight = [0.0, 1.0, float(rng.random())][case % 3]
        excess, deficit = _excess_and_deficit(p_row, q_row, weight)
        assert excess == pytest.approx(np.maximum(weight * p_row - q_row, 0).sum(), abs=1e-12)
        assert deficit == pytest.approx(np.maximum(q_row - weight * p_row, 0).sum(), abs=1e-12)
        want = _block_residual(p_row, q_row, weight)
        want = want / want.sum()
        drawn = np.bincount([_residual_draw(p_row, q_row, weight, u) for u in grid], minlength=vocab)
        assert np.abs(drawn / grid.size - want).max() <= 2.0 / grid.size, case


def test_chain_verify_is_seeded():
    p, q = [[0.2, 0.8]] * 3, [[0.6, 0.4]] * 2
    assert chain_verify(p, q, [0, 1], "block", 3) == chain_verify(p, q, [0, 1], "block", 3)


@pytest.mark.parametrize(
    "args,name",
    [
        (([[0.5, 0.5]] * 2, [[0.5, 0.5]] * 2, [0, 1]), "target_probs"),  # k + 1 rows needed
        (([[0.5, 0.5]] * 3, [[0.5, 0.5]], [0, 1]), "draft_probs"),
        (([[0.5, 0.5]] * 3, [[1.0, 0.0]] * 2, [0, 1]), "drafts"),  # q = 0 on a draft
        (([[0.5, 0.5]] * 3, [[0.5, 0.5]] * 2, [0, 2]), "drafts"),  # outside V
        (([[0.5, 0.5]] * 3, [[0.5, 0.5]] * 2, [[0, 1]]), "drafts"),
        (([[0.5, 0.6]] * 3, [[0.5, 0.5]] * 2, [0, 1]), "target_probs"),
        (([[0.5, 0.5]] * 3, [[0.5, 0.5, 0.0]] * 2, [0, 1]), "draft_probs"),
    ],
)
def test_chain_validation(args, name):
    with pytest.raises(ValueError, match=name):
        chain_emission_law(*args)
    with pytest.raises(ValueError, match=name):
        chain_verify(*args, rng=0)


def test_chain_unknown_verifier():
    with pytest.raises(ValueError, match="verifier"):
        chain_emission_law([[0.5, 0.5]] * 2, [[0.5, 0.5]], [0], "bogus")
