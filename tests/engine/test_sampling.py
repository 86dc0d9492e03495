"""The engine's sampling paths against its exact laws, by seeded G-tests (each fails a correct
engine with probability G_TEST_ALPHA = 1e-4): drafting and walking a tree, the walk on top-k
supports, and end to end the first two generated tokens."""

from __future__ import annotations

import numpy as np
import pytest

from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder, build_tree
from mdsd.engine.walk import DraftedSlots, RuleBook, emission_law, enumerate_children

from .helpers import (
    G_TEST_ALPHA,
    LAW_TOL,
    PROMPT,
    TOP_K,
    Oracle,
    SyntheticModels,
    autoregressive_law,
    drafted_trees,
    g_test_pvalue_of,
    path_tokens,
)


@pytest.mark.parametrize(
    "law,verifier",
    [
        ("without_replacement", "rrs_without_replacement"),
        ("iid", "kseq"),
        ("spechub", "spechub"),
        ("conditional_poisson", "sample_check"),
    ],
)
def test_sampled_walk_and_drafts_follow_their_exact_laws(law, verifier):
    """The sampling paths (``draft_children``, ``walk``) against the enumerations the exact
    tests use (``enumerate_children``, ``emission_law``), by G-tests (false-positive rate 1e-4
    each, 2 tests)."""
    from mdsd.engine.walk import draft_children, walk

    models = SyntheticModels(6, seed=7, top_k=5)
    tree = build_tree((2, 2))
    book = RuleBook(law, verifier, tree.widths)
    rng = np.random.default_rng(99)
    # 1. drafts of one node
    q = models.q([])
    options, _ = enumerate_children(q, 2, book)
    want = {tuple(t.tolist()): pr for t, pr in options}
    counts = {}
    for _ in range(2000):
        drafts, _ = draft_children(q, 2, book, rng)
        counts[tuple(drafts.tolist())] = counts.get(tuple(drafts.tolist()), 0) + 1
    assert g_test_pvalue_of(counts, want) > G_TEST_ALPHA
    # 2. verification walks over one fixed drafted tree
    drafted, _ = next(iter(drafted_trees(tree, book, models.q, [])))

    def target_probs(node):
        return models.p(path_tokens(tree, drafted, node))

    want = emission_law(tree, drafted, target_probs)
    assert abs(sum(want.values()) - 1.0) < LAW_TOL
    counts = {}
    for _ in range(2000):
        key = tuple(walk(tree, drafted, target_probs, rng).emitted)
        counts[key] = counts.get(key, 0) + 1
    assert g_test_pvalue_of(counts, want) > G_TEST_ALPHA


def test_walk_on_supports_follows_emission_law():
    """The sampled walk with p and q stored on their top-k supports (as the engine stores them)
    against the exact emission law of the dense vectors: G-test, false-positive rate 1e-4."""
    from mdsd.engine.walk import walk
    from mdsd.logits import process_logits_row

    tree = build_tree((3, 1))
    book = RuleBook("without_replacement", "rrs_without_replacement", tree.widths)

    def logits_of(which, context):
        return np.random.default_rng([11, which, len(context)] + list(context)).normal(size=8) * 2

    def p_row(context):
        return process_logits_row(logits_of(0, context), 1.0, top_k=5)

    def q_row(context):
        return process_logits_row(logits_of(1, context), 1.0, top_k=4)

    drafted_dense, _ = next(iter(drafted_trees(tree, book, lambda c: q_row(c).dense(), [])))
    sparse_q = {node: q_row(path_tokens(tree, drafted_dense, node)) for node in drafted_dense.draft_probs}
    drafted = DraftedSlots(drafted_dense.tokens, drafted_dense.valid, drafted_dense.rules, sparse_q)

    def target_probs(node):
        return p_row(path_tokens(tree, drafted, node))

    want = emission_law(tree, drafted_dense, lambda node: target_probs(node).dense())
    rng = np.random.default_rng(5)
    counts = {}
    for _ in range(3000):
        key = tuple(walk(tree, drafted, target_probs, rng).emitted)
        counts[key] = counts.get(key, 0) + 1
    assert g_test_pvalue_of(counts, want) > G_TEST_ALPHA


def _first_two_tokens_pvalue(decoder: TreeDecoder, seed: int) -> float:
    """G-test p-value of the first two tokens of 1,200 decodings of PROMPT against the target's
    autoregressive law (the decoder's own sampling transform)."""
    counts = {}
    for r in decoder.generate([PROMPT] * 1200, seed=seed):
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    return g_test_pvalue_of(counts, autoregressive_law(Oracle(decoder.pair, decoder.sampling), PROMPT, 2))


@pytest.mark.parametrize(
    "widths,law,verifier",
    [
        ((2, 1), "without_replacement", "rrs_without_replacement"),
        ((2, 1), "without_replacement", "optimal"),
        ((2, 2), "iid", "rrs"),
        ((1, 1), "iid", "rrs"),
        ((1, 1), "iid", "block"),
    ],
)
def test_engine_samples_follow_target_law(llama, widths, law, verifier):
    """End to end: the engine's own sampled output, first two tokens, G-test
    (false-positive rate 1e-4 each); the chains run the lean loop; both decode in one compiled
    call (``_step_numba.chain_steps``, ``tree_steps``: the draft, the target's forward, the
    walk, step after step)."""
    sampling = SamplingConfig(1.0, top_k=TOP_K, max_new_tokens=2, stop_on_eos=False)
    dec = TreeDecoder(llama, TreeConfig.make(widths, law, verifier), sampling)
    assert dec.fast_chain == (widths == (1, 1))
    assert dec.one_call_steps
    assert _first_two_tokens_pvalue(dec, seed=1234) > G_TEST_ALPHA
    if not dec.fast_chain:
        assert dec._walks_tree_from_logits(dec.last_step.drafted)


@pytest.mark.parametrize("verifier", ["rrs", "block"])
def test_engine_chain_walked_from_logits_follows_target_law(llama, verifier):
    """End to end, the lean loop's chain walked in one compiled call from the target's logits
    (``walk.walk_chain_softmax``: temperature alone, no top-k; node by node and as a block):
    first two tokens of 3,000 decodings over the whole vocabulary, G-test (false-positive rate
    1e-4 each)."""
    sampling = SamplingConfig(0.8, max_new_tokens=2, stop_on_eos=False)
    widths = (1,) if verifier == "rrs" else (1, 1)
    dec = TreeDecoder(llama, TreeConfig.make(widths, "iid", verifier), sampling)  # token 2: a bonus or
    dec.generate([PROMPT], seed=0)  # the token after a recovered one
    assert dec.fast_chain and dec._walks_from_logits(dec.last_step.drafted)
    counts = {}
    for r in dec.generate([PROMPT] * 3000, seed=99):
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    law = autoregressive_law(Oracle(dec.pair, dec.sampling), PROMPT, 2)
    assert g_test_pvalue_of(counts, law) > G_TEST_ALPHA


@pytest.mark.parametrize(
    "widths,law,verifier",
    [
        ((1, 1), "iid", "rrs"),
        ((2, 1), "without_replacement", "rrs_without_replacement"),
        ((3, 1), "without_replacement", "optimal"),
        ((2, 2), "iid", "traversal"),
    ],
)
def test_engine_samples_follow_target_law_on_cuda(llama_cuda, widths, law, verifier):
    """The same end-to-end G-test with both models on the CUDA device (float32; skipped without
    one): the chain's lean loop, a tree with cache surgery, the optimal verifier and a
    sequence-level rule; false-positive rate 1e-4 each."""
    sampling = SamplingConfig(1.0, top_k=TOP_K, max_new_tokens=2, stop_on_eos=False)
    dec = TreeDecoder(llama_cuda, TreeConfig.make(widths, law, verifier), sampling)
    assert _first_two_tokens_pvalue(dec, seed=4321) > G_TEST_ALPHA


def _chain_case(seed: int, depth: int):
    """A drafted chain and its p per node, with p and q stored densely or on top-k supports,
    at temperature 1 or 0 (one-hot), and p = q at some nodes (empty residuals)."""
    from mdsd.engine.walk import draft_children
    from mdsd.logits import process_logits_row

    gen = np.random.default_rng([21, seed])
    vocab = int(gen.integers(2, 9))
    top_k = [None, int(gen.integers(1, vocab + 1))]
    temperature = 0.0 if seed % 7 == 0 else 1.0
    book = RuleBook("iid", "rrs", (1,) * depth)

    def row(kind: int):
        logits = gen.normal(size=vocab) * 2.0
        return process_logits_row(logits, temperature, top_k[int(gen.integers(2))], drop_zeros=kind == 1)

    tokens, qs, ps = np.zeros(depth, dtype=np.int64), {}, {}
    for node in range(-1, depth - 1):
        qs[node] = row(1)
        ps[node] = qs[node] if gen.random() < 0.2 else row(0)  # p == q: the residual is empty
        tokens[node + 1] = draft_children(qs[node], 1, book, gen)[0][0]
    ps[depth - 1] = row(0)
    rules = dict.fromkeys(qs, book.rule(1, 2))
    return build_tree((1,) * depth), DraftedSlots(tokens, np.ones(depth, dtype=bool), rules, qs), ps


def _assert_same_walk(fast, fast_rng, ref, ref_rng, seed):
    """The two walks emitted the same result and left their generators in the same state."""
    got = (fast.path, fast.emitted, fast.bonus, fast.expected_accept)
    assert got == (ref.path, ref.emitted, ref.bonus, ref.expected_accept), seed
    assert fast_rng.random() == ref_rng.random(), seed


def test_chain_walk_equals_walk():
    """``walk_chain`` (the lean loop's compiled walk of a chain) returns ``walk``'s result from
    the same generator, draw for draw: 600 chains of depth 1-4 with p and q dense or on supports,
    temperature 0 and p = q nodes included; and both leave the generator in the same state."""
    from mdsd.engine.walk import walk, walk_chain

    for seed in range(600):
        tree, drafted, ps = _chain_case(seed, 1 + seed % 4)
        fast_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        fast = walk_chain(drafted, ps.__getitem__, fast_rng)
        ref = walk(tree, drafted, ps.__getitem__, ref_rng)
        _assert_same_walk(fast, fast_rng, ref, ref_rng, seed)


def _softmax_chain_case(seed: int, depth: int):
    """A chain drafted from q's stored as ``sample_chain`` stores them (one [depth, K] array on
    a draft vocabulary or dense) and target logits [depth + 1, V] with -inf entries, at
    temperatures 1, 0.5 and 0.002 (most of p and q underflow to 0); q = p at some nodes."""
    from mdsd.engine.walk import DENSE_IDS, draft_children
    from mdsd.logits import SupportProbs, process_logits_row

    gen = np.random.default_rng([22, seed])
    vocab = int(gen.integers(2, 9))
    temperature = (1.0, 0.5, 0.002)[seed % 3]
    ids = np.sort(gen.choice(vocab, int(gen.integers(1, vocab + 1)), replace=False)) if seed % 2 else None
    logits = (gen.normal(size=(depth + 1, vocab)) * 3.0).astype(np.float32)
    logits[gen.random(logits.shape) < 0.2] = -np.inf
    logits[np.arange(depth + 1), gen.integers(vocab, size=depth + 1)] = 0.0  # a finite entry per row
    q_values = np.empty((depth, vocab if ids is None else ids.size))
    book = RuleBook("iid", "rrs", (1,) * depth)
    tokens, qs = np.zeros(depth, dtype=np.int64), {}
    for i in range(depth):
        draft_logits = logits[i] if gen.random() < 0.3 else gen.normal(size=vocab).astype(np.float32)
        draft_logits = draft_logits if ids is None else draft_logits[ids]
        if not np.isfinite(draft_logits).any():
            draft_logits = np.zeros_like(draft_logits)
        q = process_logits_row(draft_logits, temperature, drop_zeros=True)
        q_values[i] = q.dense()
        kept = np.flatnonzero(q_values[i])
        qs[i - 1] = SupportProbs(kept if ids is None else ids[kept], q_values[i][kept], vocab)
        tokens[i] = draft_children(qs[i - 1], 1, book, gen)[0][0]
    rules = dict.fromkeys(qs, book.rule(1, 2))
    chain_q = (DENSE_IDS if ids is None else ids, q_values)
    return DraftedSlots(tokens, np.ones(depth, dtype=bool), rules, qs, chain_q), logits, temperature


def test_softmax_chain_walk_equals_chain_walk():
    """``walk_chain_softmax`` (the whole walk of a chain in one compiled call from the target's
    logits) returns ``walk_chain``'s result with p = ``SamplingConfig.row_probs`` of each row,
    draw for draw, and leaves the generator in the same state: 600 chains of depth 1-4, q on a
    draft vocabulary or dense, -inf logits, underflowing temperatures and q = p nodes."""
    from mdsd.engine.walk import walk_chain, walk_chain_softmax

    outcomes = set()
    for seed in range(600):
        drafted, logits, temperature = _softmax_chain_case(seed, 1 + seed % 4)
        sampling = SamplingConfig(temperature)
        fast_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        fast = walk_chain_softmax(drafted, logits, temperature, fast_rng)
        ref = walk_chain(drafted, lambda node, s=sampling, lg=logits: s.row_probs(lg[node + 1]), ref_rng)
        _assert_same_walk(fast, fast_rng, ref, ref_rng, seed)
        outcomes.add((len(fast.path), fast.bonus))
    assert {(0, False), (1, False), (4, True)} <= outcomes  # rejections and bonuses both ran


def _truncated_chain_case(seed: int, depth: int):
    """A chain drafted under a truncation (a top-k, a top-p, both) as ``sample_chain`` stores it
    (``_llama_numba.level_q``: values [depth, W] and their kept positions on a draft vocabulary
    or dense), q per node from the reference (``process_logits_row``), target logits
    [depth + 1, V] with -inf entries (some rows keep fewer finite entries than k), temperatures
    1, 0.5 and 0.002."""
    from mdsd.engine._llama_numba import level_q
    from mdsd.engine.walk import DENSE_IDS, draft_children
    from mdsd.logits import SupportProbs, process_logits_row

    gen = np.random.default_rng([23, seed])
    vocab = int(gen.integers(4, 12))
    top_k, top_p = (
        (int(gen.integers(1, vocab - 2)), None),
        (int(gen.integers(1, vocab - 2)), 0.8),
        (None, 0.6),
    )[seed % 3]
    temperature = (1.0, 0.5, 0.002)[seed % 5 % 3]
    ids = (
        np.sort(gen.choice(vocab, int(gen.integers((top_k or 2) + 1, vocab + 1)), replace=False))
        if seed % 2
        else None
    )
    width = top_k or (vocab if ids is None else ids.size)
    logits = (gen.normal(size=(depth + 1, vocab)) * 3.0).astype(np.float32)
    logits[gen.random(logits.shape) < 0.3] = -np.inf
    logits[np.arange(depth + 1), gen.integers(vocab, size=depth + 1)] = 0.0  # a finite entry per row
    q_values, kept = np.empty((depth, width)), np.empty((depth, width), dtype=np.int64)
    book = RuleBook("iid", "rrs", (1,) * depth)
    tokens, qs = np.zeros(depth, dtype=np.int64), {}
    for i in range(depth):
        draft_logits = logits[i] if gen.random() < 0.3 else gen.normal(size=vocab).astype(np.float32)
        draft_logits = np.ascontiguousarray(draft_logits if ids is None else draft_logits[ids])
        if not np.isfinite(draft_logits).any():
            draft_logits = np.zeros_like(draft_logits)
        level_q(draft_logits, temperature, top_k or 0, top_p or 1.0, kept[i], q_values[i])
        q = process_logits_row(draft_logits, temperature, top_k, top_p, drop_zeros=True)
        positions = np.arange(width) if q.indices is None else q.indices
        qs[i - 1] = SupportProbs(positions if ids is None else ids[positions], q.values, vocab)
        tokens[i] = draft_children(qs[i - 1], 1, book, gen)[0][0]
    rules = dict.fromkeys(qs, book.rule(1, 2))
    chain_q = (DENSE_IDS if ids is None else ids, q_values)
    drafted = DraftedSlots(tokens, np.ones(depth, dtype=bool), rules, qs, chain_q, kept)
    return drafted, logits, temperature, top_k, top_p


def test_truncated_chain_walk_equals_chain_walk():
    """``walk_chain_softmax(..., top_k=k, top_p=t)`` (the walk of a chain drafted under a top-k
    and / or a top-p, in one compiled call from the target's logits) returns ``walk_chain``'s
    result, and with ``block`` ``walk_chain_block``'s, with p =
    ``SamplingConfig(T, k, t).row_probs`` of each row, draw for draw, and leaves the generator in
    the same state: 600 chains of depth 1-4, q on a draft vocabulary or dense, -inf logits,
    underflowing temperatures."""
    from mdsd.engine.walk import walk_chain, walk_chain_block, walk_chain_softmax

    outcomes = {False: set(), True: set()}
    for seed in range(600):
        drafted, logits, temperature, top_k, top_p = _truncated_chain_case(seed, 1 + seed % 4)
        sampling = SamplingConfig(temperature, top_k, top_p)
        for block, reference in ((False, walk_chain), (True, walk_chain_block)):
            fast_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
            fast = walk_chain_softmax(drafted, logits, temperature, fast_rng, block, top_k=top_k, top_p=top_p)
            ref = reference(drafted, lambda node, s=sampling, lg=logits: s.row_probs(lg[node + 1]), ref_rng)
            _assert_same_walk(fast, fast_rng, ref, ref_rng, seed)
            outcomes[block].add((len(fast.path), fast.bonus))
    assert {(0, False), (1, False), (4, True)} <= outcomes[False]  # rejections and bonuses both ran
    assert {(0, False), (1, False), (2, False), (3, False), (4, True)} <= outcomes[True]
    untruncated, logits, temperature = _softmax_chain_case(0, 2)
    with pytest.raises(ValueError, match="top_k, top_p"):
        walk_chain_softmax(untruncated, logits, temperature, np.random.default_rng(0), top_k=2)


def test_softmax_block_walk_equals_block_walk():
    """``walk_chain_softmax(..., block=True)`` (block verification of a chain in one compiled
    call from the target's logits) returns ``walk_chain_block``'s result with p =
    ``SamplingConfig.row_probs`` of each row, draw for draw, and leaves the generator in the same
    state: 600 chains of depth 1-4, q on a draft vocabulary or dense, -inf logits, underflowing
    temperatures and q = p nodes; bonuses, full blocks and stops at every depth all occur. With
    float32 logits the walk first tries the whole block against the float32 lower bounds (the
    early acceptance), with float64 logits it does not: both are checked, and the early test
    alone keeps over 50 of the blocks."""
    from mdsd.engine import _walk_numba
    from mdsd.engine.walk import walk_chain_block, walk_chain_softmax

    outcomes, early_kept = set(), 0
    for seed in range(600):
        drafted, logits, temperature = _softmax_chain_case(seed, 1 + seed % 4)
        sampling = SamplingConfig(temperature)
        for rows in (logits, logits.astype(np.float64)):
            fast_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
            fast = walk_chain_softmax(drafted, rows, temperature, fast_rng, block=True)
            ref = walk_chain_block(
                drafted, lambda node, s=sampling, lg=rows: s.row_probs(lg[node + 1]), ref_rng
            )
            _assert_same_walk(fast, fast_rng, ref, ref_rng, seed)
            outcomes.add((len(fast.path), fast.bonus))
        lower = 1.0  # the early test's w_k, at the walk's first uniform
        for i, x in enumerate(drafted.tokens):
            bound = _walk_numba.softmax_lower_bound(logits[i], temperature, x)
            lower = min(1.0, lower * (bound / _chain_q_of(drafted, i, x)))
        early_kept += bool(np.random.default_rng(seed).random() < lower)
    assert {(0, False), (1, False), (2, False), (3, False), (4, True)} <= outcomes
    assert early_kept > 50


def _chain_q_of(drafted, level: int, token) -> float:
    """q(token) at ``level`` from ``drafted.chain_q`` (on the draft ids, or dense)."""
    ids, values = drafted.chain_q
    return float(values[level][token if ids.size == 0 else np.searchsorted(ids, token)])


def _softmax_edge_row(gen, case: int, vocabs):
    """(row float32 [V], temperature, ordinary) for the early paths' tests: V from ``vocabs``,
    scales 0.01-1,000 and temperatures 0.001-1,000, or, for even cases, an ordinary row (scales
    0.5-5, T = 0.3-3, at most 8,192 tokens); by case, -inf entries, ties at the maximum, huge
    logits and a token 590-740 below the maximum (p(x) near float64's subnormals)."""
    vocab = int(gen.choice(vocabs))
    scale = float(10.0 ** gen.uniform(-2, 3))
    temperature = float(10.0 ** gen.uniform(-3, 3))
    ordinary = case % 2 == 0
    if ordinary:
        vocab, scale, temperature = min(vocab, 8192), gen.uniform(0.5, 5), gen.uniform(0.3, 3)
    row = (gen.standard_normal(vocab) * scale).astype(np.float32)
    if case % 5 == 1 and vocab > 1:
        row[gen.random(vocab) < 0.3] = -np.inf
        row[0] = 0.0
    if case % 7 == 2:
        row[: max(1, vocab // 3)] = row.max()  # ties at the maximum
    if case % 11 == 3:
        row += np.float32(gen.choice([-3e4, 3e4]))
    if case % 13 == 4 and vocab > 1:  # a token far below the rest: p(x) near subnormal
        row[-1] = row.max() - np.float32(gen.choice([590.0, 610.0, 700.0, 740.0]) * temperature)
    return row, temperature, ordinary


def test_softmax_lower_bound_is_below_the_softmax_and_tight():
    """``softmax_lower_bound`` (the lean loop's early acceptance) never exceeds the probability
    ``tempered_softmax`` computes, on 400 float32 rows of 1-9,000 logits at scales 0.01-1,000
    and temperatures 0.001-1,000, with -inf entries, ties at the maximum, huge logits and tokens
    590-740 below the maximum (p(x) down to float64's subnormals), for the largest, the smallest
    and random tokens; where the row is an ordinary one (scales 0.5-5,
    T = 0.3-3, at most 8,192 tokens) it is within 1e-5 of it."""
    from mdsd._softmax_numba import tempered_softmax
    from mdsd.engine._walk_numba import softmax_lower_bound

    gen = np.random.default_rng(17)
    ordinary_checked = 0
    for case in range(400):
        row, temperature, ordinary = _softmax_edge_row(gen, case, [1, 2, 7, 64, 1000, 8192, 9000])
        vocab = row.size
        p, _ = tempered_softmax(row, temperature)
        tokens = {int(np.argmax(p)), int(np.argmin(np.where(p > 0, p, np.inf))), vocab - 1}
        tokens |= set(gen.integers(vocab, size=8).tolist())
        for x in tokens:
            lower = softmax_lower_bound(row, temperature, x)
            assert 0.0 <= lower <= p[x], (case, x)
            if ordinary and p[x] > 1e-250:  # below: exp(z_x) < exp(-600), no early bound
                assert lower >= p[x] * (1 - 1e-5), (case, x, lower / p[x])
                ordinary_checked += 1
    assert ordinary_checked > 1000


def test_softmax_draw_draws_the_reference_token():
    """``softmax_draw`` (a chain's bonus draw) returns ``draw(tempered_softmax(row, T), u)``, with
    and without its float32 path, on 400 float32 rows of the lower bound's kinds (1-9,000 logits,
    scales 0.01-1,000, T 0.001-1,000, -inf entries, ties, huge logits, tiny masses) at random
    uniforms, at 0 and just below 1, and at uniforms on, just below and just above the reference's
    prefix sums, where its certificate must refuse. On ordinary rows the float32 path decides at
    least 90% of the random draws itself (``_certified_draw`` >= 0)."""
    from mdsd._softmax_numba import tempered_softmax
    from mdsd.engine._walk_numba import _certified_draw, softmax_draw
    from mdsd.sampling import draw

    gen = np.random.default_rng(23)
    ordinary_draws = certified = 0
    for case in range(400):
        row, temperature, ordinary = _softmax_edge_row(gen, case, [1, 2, 7, 255, 256, 257, 1000, 8192, 9000])
        vocab = row.size
        p, _ = tempered_softmax(row, temperature)
        prefix = np.cumsum(p)
        at = prefix[gen.integers(vocab, size=4)]
        edges = np.concatenate([at, np.nextafter(at, 0.0), np.nextafter(at, 2.0)])
        uniforms = np.concatenate([gen.random(12), [0.0, 1.0 - 2.0**-53], edges[edges < 1.0]])
        for i, u in enumerate(uniforms):
            want = draw(p, u)
            assert softmax_draw(row, temperature, u, True) == want, (case, u)
            assert softmax_draw(row, temperature, u, False) == want, (case, u)
            if ordinary and i < 12:
                ordinary_draws += 1
                certified += _certified_draw(row, temperature, u) >= 0
    assert certified >= 0.9 * ordinary_draws


def test_block_chain_walk_equals_chain_verify():
    """``walk_chain_block`` (the decoding loop's block verification) returns
    ``mdsd.sequence.chain_verify(..., "block")``'s draw on the dense rows from the same generator:
    600 chains of depth 1-4 with p and q dense or on supports, temperature 0 and p = q nodes
    included. It reads each node's p once, the last node's for a bonus only, and leaves the
    generator in the reference's state."""
    from mdsd.engine.walk import as_support, walk_chain_block
    from mdsd.sequence import chain_verify

    bonuses = 0
    for seed in range(600):
        _, drafted, ps = _chain_case(seed, 1 + seed % 4)
        depth = drafted.tokens.size
        calls = []

        def target_probs(node, calls=calls, ps=ps):
            calls.append(node)
            return ps[node]

        fast_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        fast = walk_chain_block(drafted, target_probs, fast_rng)
        target = np.stack([ps[node].dense() for node in range(-1, depth)])  # [k + 1, V]
        draft = np.stack([as_support(drafted.draft_probs[node]).dense() for node in range(-1, depth - 1)])
        ref = chain_verify(target, draft, drafted.tokens, "block", ref_rng)
        assert (fast.emitted, fast.bonus, fast.path) == (
            list(ref.tokens),
            ref.bonus,
            list(range(ref.accepted)),
        )
        assert fast.expected_accept == [1.0] * ref.accepted + ([] if ref.bonus else [0.0])
        assert calls == list(range(-1, depth - 1 + int(fast.bonus))), seed
        assert fast_rng.random() == ref_rng.random()
        bonuses += fast.bonus
    assert 0 < bonuses < 600  # both branches ran


def test_chain_walk_follows_emission_law():
    """``walk_chain`` on one drafted chain with top-k supports against ``emission_law``: G-test,
    false-positive rate 1e-4."""
    from mdsd.engine.walk import walk_chain

    tree, drafted, ps = _chain_case(3, 3)
    want = emission_law(tree, drafted, lambda node: ps[node].dense())
    rng = np.random.default_rng(8)
    counts = {}
    for _ in range(3000):
        key = tuple(walk_chain(drafted, ps.__getitem__, rng).emitted)
        counts[key] = counts.get(key, 0) + 1
    assert g_test_pvalue_of(counts, want) > G_TEST_ALPHA


@pytest.mark.parametrize(
    "law,verifier",
    [
        ("iid", "rrs"),
        ("without_replacement", "rrs_without_replacement"),
        ("iid", "optimal"),
        ("without_replacement", "optimal"),
        ("conditional_poisson", "optimal"),
        ("greedy", "greedy"),
        ("iid", "kseq"),
        ("iid", "importance"),
        ("without_replacement", "sample_check"),
        ("spechub", "spechub"),
    ],
)
def test_compiled_nodes_equal_the_reference(law, verifier):
    """``verify_node`` runs recursive rejection sampling, the greedy law's verifier, SpecHub, K-SEQ,
    importance selection, sample_check and the optimal verifier's compiled nodes as one compiled
    call on the union support (``_walk_numba``); it returns
    ``verify_node_reference``'s verdict and leaves the generator in the same state: 800 nodes of
    1-4 drafts on 2-9 tokens and, every fifth, of 5-12 drafts on up to 15 tokens (the order
    split's widths), p and q dense or on top-k supports, temperature 0 (one-hot) and p = q (empty
    residuals) included. An optimal rule carries the plan ``node_plan`` makes for its rows."""
    from mdsd.engine.walk import draft_children, verify_node, verify_node_reference
    from mdsd.logits import process_logits_row
    from mdsd.verifiers.optimal.verifier import node_plan

    def row(gen, vocab, temperature, drop_zeros):
        top_k = [None, int(gen.integers(1, vocab + 1))][int(gen.integers(2))]
        return process_logits_row(gen.normal(size=vocab) * 2.0, temperature, top_k, drop_zeros=drop_zeros)

    for seed in range(800):
        gen = np.random.default_rng([33, seed])
        if seed % 5 == 4:  # wide nodes
            vocab, width = int(gen.integers(6, 16)), int(gen.integers(5, 13))
        else:
            vocab, width = int(gen.integers(2, 10)), int(gen.integers(1, 5))
        if law == "spechub":  # two drafts a node
            width = min(width, 2)
        temperature = 0.0 if seed % 9 == 0 else 1.0
        q = row(gen, vocab, temperature, True)
        p = q if gen.random() < 0.15 else row(gen, vocab, temperature, False)
        book = RuleBook(law, verifier, (width,))
        drafts, rule = draft_children(q, width, book, gen)
        if verifier == "optimal" and rule.verifier.name == "optimal":  # planned once per rule
            plan = node_plan(rule.law, rule.n_eff, q.support_size)
            assert rule.support == q.support_size and (rule.plan is None) == (plan is None)
            assert plan is None or (rule.plan.kind, rule.plan.head) == (plan.kind, plan.head)
        fast_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        assert verify_node(p, q, drafts, rule, fast_rng) == verify_node_reference(p, q, drafts, rule, ref_rng)
        assert fast_rng.random() == ref_rng.random()
