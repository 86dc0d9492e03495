"""Tree verification (mdsd.sequence.tree) and the tree LP (mdsd.lp.tree_optimum).

Exactness is checked by enumeration: every drafted tree with its probability, the verifier's
exact block law, and the losslessness identity on every sequence of length D + 1 (to 1e-12).
Samplers are checked against their exact laws by seeded chi-square tests with threshold 1e-4:
each such test has a false-positive rate of 1e-4 (and is deterministic for its seed).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

import mdsd
from mdsd.lp import MAX_TREE_LP_SEQUENCES, tree_optimum
from mdsd.sequence import (
    drafted_tree,
    enumerate_drafted_trees,
    expected_block_length,
    lossless_error,
    marginal_block_law,
    tree_emission_law,
    tree_verify,
)

from .helpers import EXACT, LP_TOL, P_THRESHOLD, tables

# -- trees: exactness by enumeration -------------------------------------------------------
# (vocab, widths): depth 1-3, widths 1-3, vocabularies 2-4, kept small enough to enumerate fast
SHAPES = [
    (2, (1,)),
    (2, (2,)),
    (2, (2, 2)),
    (2, (2, 1, 1)),
    (3, (3,)),
    (3, (2, 1)),
    (3, (1, 2)),
    (3, (3, 1)),
    (4, (2,)),
    (4, (2, 1)),
]
# (method, law, node verifier): every draft law with an exact verifier
RULES = [
    ("traversal", "iid", None),
    ("traversal", "without_replacement", None),
    ("node", "iid", "rrs"),
    ("node", "iid", "kseq"),
    ("node", "iid", "optimal"),
    ("node", "without_replacement", "rrs_without_replacement"),
    ("node", "without_replacement", "optimal"),
    ("node", "greedy", "greedy"),
    ("node", "spechub", "spechub"),
    ("node", "conditional_poisson", "optimal"),
    ("node", "iid", "sample_check"),
    ("hybrid", "iid", "optimal"),
    ("hybrid", "without_replacement", "rrs_without_replacement"),
    ("hybrid", "greedy", "greedy"),
    ("traversal", "greedy", None),
    ("traversal", "spechub", None),
    ("traversal", "conditional_poisson", None),  # chains only: one draw from q, any law
]


def _laws_for(law, widths, vocab, method=None):
    """Per-depth laws, or None when the law cannot draw this shape (spechub: width 2 only;
    distinct laws: width <= V; traversal of conditional_poisson: chains only). Width-1 depths of spechub use
    iid (a single draft)."""
    if method == "traversal" and law == "conditional_poisson":
        return [law] * len(widths) if max(widths) == 1 else None
    if law == "spechub":
        if 2 not in widths or any(w > 2 for w in widths):
            return None
        return ["spechub" if w == 2 else "iid" for w in widths]
    if mdsd.get_law(law).distinct and max(widths) > vocab:
        return None
    return [law] * len(widths)


def _node_verifier_for(laws, verifier):
    """spechub trees mix laws: let each node use its law's default verifier."""
    return None if "spechub" in laws else verifier


@pytest.mark.parametrize("method,law,verifier", RULES)
@pytest.mark.parametrize("vocab,widths", SHAPES)
def test_tree_law_is_lossless(method, law, verifier, vocab, widths):
    laws = _laws_for(law, widths, vocab, method)
    if laws is None:
        pytest.skip(f"{method} with law {law} cannot handle widths {widths} over {vocab} tokens")
    zero_q = 0.3 if law == "iid" else 0.0  # distinct laws need full support at width = V
    p, q = tables(hash((vocab, widths)) % 1000, vocab, len(widths), zero_p=0.3, zero_q=zero_q)
    trees = enumerate_drafted_trees(widths, laws, p, q)
    assert abs(sum(prob for _, prob in trees) - 1.0) < EXACT
    block_law = marginal_block_law(trees, method, _node_verifier_for(laws, verifier))
    assert abs(sum(block_law.values()) - 1.0) < EXACT
    assert lossless_error(block_law, p, len(widths) + 1) < EXACT


def _edge_tables(kind, vocab, depth):
    """Structured edge cases: p = q, one-hot p, disjoint supports, tiny masses."""
    rng = np.random.default_rng(99)
    p, q = {}, {}
    for size in range(depth + 1):
        for prefix in itertools.product(range(vocab), repeat=size):
            base = rng.dirichlet(np.ones(vocab))
            if kind == "p_equals_q":
                p[prefix], q[prefix] = base, base
            elif kind == "one_hot_p":
                p[prefix], q[prefix] = np.eye(vocab)[size % vocab], base
            elif kind == "disjoint":
                half = np.where(np.arange(vocab) < vocab // 2, 1.0, 0.0)
                p[prefix] = half / half.sum()
                q[prefix] = base
            elif kind == "tiny":
                tiny = np.array([1e-30] + [1.0] * (vocab - 1))
                p[prefix], q[prefix] = tiny / tiny.sum(), base[::-1].copy()
    return p, q


@pytest.mark.parametrize("kind", ["p_equals_q", "one_hot_p", "disjoint", "tiny"])
@pytest.mark.parametrize(
    "method,law", [("traversal", "iid"), ("traversal", "without_replacement"), ("node", "iid")]
)
def test_tree_law_edge_cases(kind, method, law):
    p, q = _edge_tables(kind, 3, 2)
    trees = enumerate_drafted_trees((2, 2), law, p, q)
    block_law = marginal_block_law(trees, method)
    assert lossless_error(block_law, p, 3) < EXACT
    if kind == "p_equals_q":  # every verifier here accepts everything when p = q
        assert abs(expected_block_length(block_law) - 3.0) < EXACT


# -- trees versus the LP -------------------------------------------------------------------
@pytest.mark.parametrize(
    "vocab,widths,law",
    [
        (3, (2, 1), "without_replacement"),
        (3, (2, 1), "iid"),
        (2, (2, 2), "iid"),
        (3, (1, 2), "without_replacement"),
        (2, (3,), "iid"),
    ],
)
def test_tree_rules_below_lp_optimum(vocab, widths, law):
    p, q = tables(len(widths) * 10 + vocab, vocab, len(widths))
    optimum = tree_optimum(widths, law, p, q)
    trees = enumerate_drafted_trees(widths, law, p, q)
    values = {
        "traversal": expected_block_length(marginal_block_law(trees, "traversal")),
        "node": expected_block_length(marginal_block_law(trees, "node")),
        "node_optimal": expected_block_length(marginal_block_law(trees, "node", "optimal")),
        "hybrid_optimal": expected_block_length(marginal_block_law(trees, "hybrid", "optimal")),
    }
    for name, value in values.items():
        assert value <= optimum.value + LP_TOL, name
    assert values["node"] <= values["node_optimal"] + LP_TOL
    assert values["node_optimal"] <= values["hybrid_optimal"] + LP_TOL


@pytest.mark.parametrize("law", ["iid", "without_replacement"])
@pytest.mark.parametrize("seed", range(3))
def test_hybrid_never_below_node_on_n_by_depth_trees(law, seed):
    """On n x D trees the hybrid replaces token by block verification on the chains below the
    root, and block >= token on every chain."""
    p, q = tables(40 + seed, 3, 3)
    trees = enumerate_drafted_trees((2, 1, 1), [law, "iid", "iid"], p, q)
    for verifier in (None, "optimal"):
        node = expected_block_length(marginal_block_law(trees, "node", verifier))
        hybrid = expected_block_length(marginal_block_law(trees, "hybrid", verifier))
        assert node <= hybrid + EXACT


def test_lp_coupling_is_lossless_and_feasible():
    p, q = tables(21, 3, 2)
    optimum = tree_optimum((2, 1), "without_replacement", p, q, return_coupling=True)
    assert optimum.num_trees == len(optimum.trees) == len(optimum.coupling)
    marginal = {}
    for (_tree, prob), plan in zip(optimum.trees, optimum.coupling):
        assert abs(sum(plan.values()) - prob) < 1e-8
        for z, mass in plan.items():
            marginal[z] = marginal.get(z, 0.0) + mass
    assert lossless_error(marginal, p, 3) < 1e-8
    assert abs(expected_block_length(marginal) - optimum.value) < 1e-8


def test_lp_first_acceptance_constraint():
    """P(|z| >= 2) <= alpha* of the root for every verifier: alpha* is feasible, more is not."""
    p, q = tables(22, 3, 2)
    free = tree_optimum((2, 1), ["without_replacement", "iid"], p, q)
    assert free.max_violation < 1e-8
    alpha = mdsd.optimal_acceptance(p[()], q[()], 2, "without_replacement")
    constrained = tree_optimum((2, 1), ["without_replacement", "iid"], p, q, first_acceptance=alpha - 1e-12)
    assert constrained.value <= free.value + LP_TOL
    with pytest.raises(ValueError, match="first_acceptance"):
        tree_optimum((2, 1), ["without_replacement", "iid"], p, q, first_acceptance=alpha + 1e-3)


def test_lp_refuses_large_problems():
    p, q = tables(0, 2, 1)
    big_vocab = int(round(MAX_TREE_LP_SEQUENCES ** (1 / 3))) + 2
    uniform = np.full(big_vocab, 1.0 / big_vocab)
    with pytest.raises(ValueError, match="MAX_TREE_LP_SEQUENCES"):
        tree_optimum((1, 1), "iid", lambda prefix: uniform, lambda prefix: uniform)
    with pytest.raises(ValueError, match="max_trees"):
        enumerate_drafted_trees((3, 3, 3), "iid", p, q)
    with pytest.raises(ValueError, match="widths"):
        tree_optimum((), "iid", p, q)
    with pytest.raises(ValueError, match="laws"):
        tree_optimum((1, 1), ["iid"], p, q)


# -- tree samplers -------------------------------------------------------------------------
def _fixed_tree(law):
    p, q = tables(4, 3, 3)
    trees = enumerate_drafted_trees((2, 1, 1), law, p, q)
    return max(trees, key=lambda pair: pair[1])[0]


@pytest.mark.parametrize(
    "method,law,verifier",
    [
        ("traversal", "without_replacement", None),
        ("traversal", "iid", None),
        ("node", "without_replacement", None),
    ],
)
def test_tree_sampler_matches_law(method, law, verifier):
    """chi-square of 10,000 seeded draws over the emitted blocks; false-positive rate 1e-4."""
    tree = _fixed_tree(law)
    block_law = tree_emission_law(tree, method, verifier)
    blocks = sorted(block_law)
    index = {z: i for i, z in enumerate(blocks)}
    counts = np.zeros(len(blocks))
    rng = np.random.default_rng(5)
    draws = 10_000
    for _ in range(draws):
        result = tree_verify(tree, method, verifier, rng)
        assert result.tokens[:-1] == tuple(int(tree.tokens[i]) for i in result.path)
        for child, parent in zip(result.path[1:], result.path[:-1]):
            assert tree.parents[child] == parent
        counts[index[result.tokens]] += 1
    expected = np.array([block_law[z] for z in blocks]) * draws
    assert chisquare(counts, expected).pvalue > P_THRESHOLD


# -- tree validation -----------------------------------------------------------------------
def _small_tree_args():
    p = np.full((3, 2), 0.5)
    q = np.full((3, 2), 0.5)
    return [-1, -1], [0, 1], p, q


def test_drafted_tree_validation():
    parents, tokens, p, q = _small_tree_args()
    drafted_tree(parents, tokens, p, q, "without_replacement")  # valid
    with pytest.raises(ValueError, match="parents"):
        drafted_tree([0, -1], tokens, p, q)
    with pytest.raises(ValueError, match="target_probs"):
        drafted_tree(parents, tokens, p[:2], q)
    with pytest.raises(ValueError, match="draft_probs"):
        drafted_tree(parents, tokens, p, q[:2])
    with pytest.raises(ValueError, match="tokens"):
        drafted_tree(parents, [0, 0], p, q, "without_replacement")  # repeats a distinct draw
    with pytest.raises(ValueError, match="tokens"):
        drafted_tree(parents, [0, 5], p, q)
    zero_q = q.copy()
    zero_q[0] = [1.0, 0.0]
    with pytest.raises(ValueError, match="draft_probs 0"):
        drafted_tree(parents, tokens, p, zero_q)
    with pytest.raises(ValueError, match="law"):
        drafted_tree(parents, tokens, p, q, ["iid"])
    with pytest.raises(ValueError, match="law"):
        drafted_tree(parents, tokens, p, q, "bogus")


def test_tree_method_validation():
    parents, tokens, p, q = _small_tree_args()
    cp_tree = drafted_tree(parents, tokens, p, q, "conditional_poisson")
    with pytest.raises(ValueError, match="traversal"):
        tree_emission_law(cp_tree, "traversal")
    greedy_tree = drafted_tree(parents, tokens, p, q, "greedy")
    assert abs(sum(tree_emission_law(greedy_tree, "hybrid").values()) - 1.0) < EXACT  # node step at the root
    iid_tree = drafted_tree(parents, tokens, p, q, "iid")
    with pytest.raises(ValueError, match="method"):
        tree_emission_law(iid_tree, "bogus")
    with pytest.raises(ValueError, match="verifier"):
        tree_emission_law(iid_tree, "traversal", "rrs")
    with pytest.raises(ValueError, match="verifier"):
        tree_verify(iid_tree, "node", "rrs_without_replacement", rng=0)  # inexact pair


def test_childless_rows_of_draft_probs_are_not_used():
    """The engine may leave q undefined at leaves: those rows are neither checked nor read."""
    p = np.full((2, 2), 0.5)
    q = np.array([[0.3, 0.7], [np.nan, np.nan]])
    tree = drafted_tree([-1], [1], p, q)
    law = tree_emission_law(tree, "traversal")
    assert abs(sum(law.values()) - 1.0) < EXACT
