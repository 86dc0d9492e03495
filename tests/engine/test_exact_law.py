"""Exact law of the engine's output: the law of the first two (three) generated tokens, computed by
enumerating every drafted tree with the engine's own rules (``walk.enumerate_children`` /
``walk.emission_law``), equals the target's autoregressive law to 1e-10, for every exact (law,
verifier) pair; sequence-level rules; verification on the union support.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder, build_tree
from mdsd.engine.walk import RuleBook, emission_law, enumerate_children
from mdsd.verifiers import VERIFIERS

from .helpers import (
    LAW_TOL,
    PROMPT,
    TOP_K,
    VOCAB,
    Oracle,
    SyntheticModels,
    assert_same_law,
    autoregressive_law,
    drafted_trees,
    first_tokens_law,
    path_tokens,
)

EXACT_PAIRS = sorted((law, name) for name, v in VERIFIERS.items() for law in v.laws)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("law,verifier", EXACT_PAIRS)
def test_first_two_tokens_follow_target_law(llama, law, verifier, temperature):
    sampling = SamplingConfig(temperature, top_k=TOP_K)
    oracle = Oracle(llama, sampling)
    want = autoregressive_law(oracle, PROMPT, 2)
    trees = [(2, 1), (2, 2)] if law == "spechub" else [(2, 1), (3,)]
    for widths in trees:
        book = RuleBook(law, verifier, widths)
        got = first_tokens_law(build_tree(widths), book, oracle, PROMPT, 2)
        assert_same_law(got, want, LAW_TOL)


@pytest.mark.parametrize(
    "verifier,law,widths",
    [
        ("block", "iid", (1, 1)),
        ("traversal", "iid", (2, 1)),
        ("traversal", "without_replacement", (2, 1)),
        ("traversal", "greedy", (3,)),
        ("hybrid", "without_replacement", (2, 1)),
    ],
)
def test_sequence_verifiers_follow_target_law(llama, verifier, law, widths):
    """Engine with a sequence-level rule: exact law of the first two tokens == target law."""
    sampling = SamplingConfig(1.0, top_k=TOP_K)
    oracle = Oracle(llama, sampling)
    dec = TreeDecoder(llama, TreeConfig.make(widths, law, verifier), sampling, check_attention=False)
    got = first_tokens_law(dec.tree, dec.book, oracle, PROMPT, 2, decoder=dec)
    assert_same_law(got, autoregressive_law(oracle, PROMPT, 2), LAW_TOL)
    out = dec.generate([PROMPT], seed=0)[0]  # and the sampling path runs
    assert out.stats.steps >= 1


@pytest.mark.parametrize(
    "law,verifier",
    [("without_replacement", "rrs_without_replacement"), ("iid", "kseq"), ("greedy", "greedy")],
)
def test_engine_walk_law_equals_sequence_node_law(law, verifier):
    """The engine's node-by-node walk (``walk.emission_law``, the law its sampler follows) and
    ``mdsd.sequence``'s reference node method give the same law on every drafted tree (1e-12)."""
    from mdsd.sequence import drafted_tree, tree_emission_law

    models = SyntheticModels(5, seed=3, top_k=4)
    tree = build_tree((2, 2))
    book = RuleBook(law, verifier, tree.widths)
    for drafted, _ in itertools.islice(drafted_trees(tree, book, models.q, []), 12):
        nodes = np.flatnonzero(drafted.valid)
        compact = {-1: -1} | {int(n): i for i, n in enumerate(nodes)}
        rows = [-1] + [int(n) for n in nodes]
        p = np.stack([models.p(path_tokens(tree, drafted, r)) for r in rows])
        q = np.stack([drafted.draft_probs.get(r, np.zeros(5)) for r in rows])
        laws = [drafted.rules[r].law.name if r in drafted.rules else law for r in rows]
        parents = [compact[int(tree.parents[n])] for n in nodes]
        reference = tree_emission_law(
            drafted_tree(parents, drafted.tokens[nodes], p, q, laws), "node", verifier
        )
        fast = emission_law(tree, drafted, lambda node, d=drafted: models.p(path_tokens(tree, d, node)))
        assert_same_law(fast, reference, 1e-12)


@pytest.mark.parametrize(
    "law,verifier", [("without_replacement", "rrs_without_replacement"), ("iid", "importance")]
)
def test_first_three_tokens_with_top_p(gpt2, law, verifier):
    sampling = SamplingConfig(0.8, top_k=TOP_K + 1, top_p=0.9)
    oracle = Oracle(gpt2, sampling)
    book = RuleBook(law, verifier, (3,))
    got = first_tokens_law(build_tree((3,)), book, oracle, PROMPT, 3)
    assert_same_law(got, autoregressive_law(oracle, PROMPT, 3), LAW_TOL)


def test_common_support_merge_equals_numpy():
    """The compiled merge of two supports gives ``np.union1d``'s tokens and the same p and q on
    them: overlapping, disjoint, identical and nested supports of 1-300 tokens, and dense rows."""
    from mdsd.engine.walk import common_support, common_support_reference
    from mdsd.logits import SupportProbs

    gen = np.random.default_rng(12)
    vocab = 500
    for trial in range(200):
        p_ids = np.sort(gen.choice(vocab, int(gen.integers(1, 300)), replace=False))
        q_ids = [
            np.sort(gen.choice(vocab, int(gen.integers(1, 300)), replace=False)),
            p_ids.copy(),
            np.setdiff1d(np.arange(vocab), p_ids)[:5],
            p_ids[: max(1, p_ids.size // 2)].copy(),
        ][trial % 4]
        p = SupportProbs(p_ids, gen.dirichlet(np.ones(p_ids.size)), vocab)
        q = SupportProbs(q_ids, gen.dirichlet(np.ones(q_ids.size)), vocab)
        for got, want in zip(common_support(p, q), common_support_reference(p, q)):
            np.testing.assert_array_equal(got, want)
    dense = SupportProbs(None, gen.dirichlet(np.ones(vocab)), vocab)
    tokens, p_local, _ = common_support(dense, q)
    assert tokens is None and np.array_equal(p_local, dense.values)


@pytest.mark.parametrize("law,verifier", EXACT_PAIRS)
def test_verification_on_the_union_support_is_exact(law, verifier):
    """``walk.verify_node`` verifies on the union of the supports of p and q: the output law
    there, mapped back to token ids, equals the full-vocabulary output law for every drafted
    set (enumeration, 1e-12), with top-k supports that overlap only partly."""
    from mdsd.engine.walk import common_support, node_output_law
    from mdsd.logits import process_logits_row

    gen = np.random.default_rng(3)
    for _ in range(6):
        p_row = process_logits_row(gen.normal(size=VOCAB) * 2, 1.0, top_k=4)
        q_row = process_logits_row(gen.normal(size=VOCAB) * 2, 1.0, top_k=5)
        p, q = p_row.dense(), q_row.dense()
        width = 2
        book = RuleBook(law, verifier, (width,))
        tokens, p_local, q_local = common_support(p_row, q_row)
        options, rule = enumerate_children(q, width, book)
        for drafts, _ in options:
            full = node_output_law(p, q, drafts, rule)
            local = node_output_law(p_local, q_local, np.searchsorted(tokens, drafts), rule)
            mapped = np.zeros(VOCAB)
            mapped[tokens] = local
            np.testing.assert_allclose(mapped, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "law,single",
    [("iid", True), ("without_replacement", True), ("conditional_poisson", False)],
)
def test_optimal_single_draft_nodes_use_classic_sampling(law, single):
    """One draft that is one draw from q: classic speculative sampling attains alpha* with an
    early exit, so ``optimal`` nodes with one draft use it (other laws keep the optimal fit);
    nodes with several drafts keep ``optimal``. The exact-law tests above cover the emitted law."""
    book = RuleBook(law, "optimal", (3, 1))
    one, three = book.rule(1, 10), book.rule(3, 10)
    assert (one.verifier.name, one.law.name) == (("rrs", "iid") if single else ("optimal", law))
    assert (three.verifier.name, three.n_eff) == ("optimal", 3)
