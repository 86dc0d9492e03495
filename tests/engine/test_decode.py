"""mdsd.engine.decode: seeded replay, temperature 0 is the target's greedy continuation, bad
input raises ValueError."""

from __future__ import annotations

import numpy as np
import pytest

from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder
from mdsd.engine.decode import Autoregressive, _DraftedProbs
from mdsd.models import ModelPair, load_pair

from .helpers import PROMPT, VOCAB, Oracle


def test_sequence_verifier_errors(llama):
    sampling = SamplingConfig(1.0)
    with pytest.raises(ValueError, match="block"):
        TreeDecoder(llama, TreeConfig.make((2, 1), "iid", "block"), sampling, check_attention=False)
    with pytest.raises(ValueError, match="law"):
        TreeDecoder(
            llama, TreeConfig.make((2,), "conditional_poisson", "traversal"), sampling, check_attention=False
        )


def test_seeded_runs_replay(llama):
    sampling = SamplingConfig(1.0, max_new_tokens=12, stop_on_eos=False)
    dec = TreeDecoder(
        llama, TreeConfig.make("3x3", "without_replacement", "rrs_without_replacement"), sampling
    )
    a = dec.generate([PROMPT, [4, 4]], seed=5)
    b = dec.generate([PROMPT, [4, 4]], seed=5)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(len(r.token_ids) == 12 and r.stop_reason == "length" for r in a)
    stats = a[0].stats.merge(a[1].stats)
    assert stats.new_tokens == 24 and stats.steps == stats.target_calls
    assert 1.0 <= stats.block_efficiency <= 4.0
    assert len(stats.acceptance_by_depth) == 3


def test_lean_chain_draws_from_each_call_s_generator(llama):
    """The lean loop keeps the compiled draws' source (``uniform_source``) for the generator it
    last saw: a call with another generator draws from that one, as a fresh decoder does, and the
    same seed replays."""
    sampling = SamplingConfig(1.0, max_new_tokens=12, stop_on_eos=False)
    config = TreeConfig.make("1x3", "iid", "rrs")
    dec = TreeDecoder(llama, config, sampling)
    first = dec.generate([PROMPT], seed=5)[0].token_ids
    second = dec.generate([PROMPT], seed=6)[0].token_ids
    assert dec.fast_chain and dec._walks_from_logits(dec.last_step.drafted)
    assert second == TreeDecoder(llama, config, sampling).generate([PROMPT], seed=6)[0].token_ids
    assert first == dec.generate([PROMPT], seed=5)[0].token_ids
    assert first != second


def _greedy_continuation(pair, context, k):
    oracle = Oracle(pair, SamplingConfig(0.0))
    out = []
    for _ in range(k):
        out.append(int(np.argmax(oracle.logits(pair.target, context + out))))
    return out


@pytest.mark.filterwarnings("ignore:acceptance at depth 1")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "law,verifier,tree",
    [("iid", "rrs", "3x3"), ("without_replacement", "sample_check", "3,2,1"), ("spechub", "spechub", "2,2")],
)
def test_temperature_zero_is_target_greedy(request, family, law, verifier, tree):
    pair = request.getfixturevalue(family)
    sampling = SamplingConfig(0.0, max_new_tokens=15, stop_on_eos=False)
    dec = TreeDecoder(pair, TreeConfig.make(tree, law, verifier), sampling)
    got = dec.generate([PROMPT], seed=0)[0].token_ids
    assert got == _greedy_continuation(pair, PROMPT, 15)
    ar = Autoregressive(pair, sampling).generate([PROMPT], seed=0)[0].token_ids
    assert ar == got


def test_bad_input(llama, tiny):
    sampling = SamplingConfig(1.0)
    with pytest.raises(ValueError, match="law"):
        TreeDecoder(llama, TreeConfig.make("2x2", "nope", "rrs"), sampling)
    with pytest.raises(ValueError, match="verifier"):
        TreeDecoder(llama, TreeConfig.make("2x2", "iid", "nope"), sampling)
    with pytest.raises(ValueError, match="exact only"):
        TreeDecoder(llama, TreeConfig.make("2x2", "without_replacement", "rrs"), sampling)
    with pytest.raises(ValueError, match="spechub"):
        TreeDecoder(llama, TreeConfig.make("3x2", "spechub", "spechub"), sampling)
    with pytest.raises(ValueError, match="width"):
        TreeDecoder(
            llama,
            TreeConfig.make(f"{VOCAB + 1}x1", "without_replacement", "rrs_without_replacement"),
            sampling,
        )
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(-1.0)
    dec = TreeDecoder(llama, TreeConfig.make("2x2", "iid", "rrs"), sampling)
    with pytest.raises(ValueError, match="prompt"):
        dec.generate([[3] * 47], seed=0)
    with pytest.raises(ValueError, match="prompt"):
        dec.generate([[VOCAB + 3]], seed=0)
    with pytest.raises(ValueError, match="vocabular"):
        load_pair(target=tiny["llama"][0], draft=tiny["wide"])
    wide = load_pair(target=tiny["wide"], draft=tiny["wide"])
    mixed = ModelPair(target=llama.target, draft=wide.draft, tokenizer=llama.tokenizer, name="x")
    with pytest.raises(ValueError, match="draft"):
        TreeDecoder(mixed, TreeConfig.make("2x2", "iid", "rrs"), sampling)


@pytest.mark.filterwarnings("ignore:acceptance at depth 1")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "law,verifier,tree,draft_vocab",
    [
        ("iid", "rrs", "1x3", None),
        ("without_replacement", "rrs_without_replacement", "1,1", (0, 2, 3, 5, 6, 7, 9, 11)),
        ("spechub", "spechub", "1x2", None),
        ("iid", "optimal", "1x4", (1, 2, 4, 5, 8, 10)),
        ("iid", "block", "1x3", None),
        ("without_replacement", "block", "1x2", (0, 2, 3, 5, 6, 7, 9, 11)),
    ],
)
def test_fast_chain_draws_what_the_general_loop_draws(request, family, law, verifier, tree, draft_vocab):
    """A chain of single-draft rejection sampling runs the lean loop (``draft_chain``,
    ``walk_chain``), which emits the tokens of the general loop (``draft_tree``, ``walk``) from
    the same seed: temperature 1, top-k, top-p and 0, with and without a draft vocabulary. So
    does a block-verified chain (``walk_chain_block`` in both loops). Where the chain is drafted
    and walked in compiled calls, the whole loop is one call (``_step_numba.chain_steps``), or
    one a step for a caller that streams (``chain_step``), and the lean loop's three calls
    (``fused_step`` False) emit the same tokens."""
    from mdsd.engine.vocab import as_draft_vocabulary

    pair = request.getfixturevalue(family)
    config = TreeConfig.make(tree, law, verifier)
    for sampling in (
        SamplingConfig(1.0, max_new_tokens=20, stop_on_eos=False),
        SamplingConfig(0.8, top_k=5, max_new_tokens=20, stop_on_eos=False),
        SamplingConfig(1.2, top_p=0.8, max_new_tokens=20, stop_on_eos=False),
        SamplingConfig(0.0, max_new_tokens=20, stop_on_eos=False),
    ):
        dec = TreeDecoder(pair, config, sampling)
        dec.use_draft_vocabulary(as_draft_vocabulary(draft_vocab, pair.draft))
        assert dec.fast_chain
        fast = dec.generate([PROMPT, [4, 4], [9]], seed=11)
        walked_from_logits = dec._walks_from_logits(dec.last_step.drafted)
        top_k_truncates = sampling.top_k is not None and sampling.top_k < (len(draft_vocab or ()) or VOCAB)
        truncated = top_k_truncates or (sampling.top_p or 1.0) < 1.0
        truncated_walk = sampling.compiled_transform and truncated
        assert walked_from_logits == ((sampling.softmax_only or truncated_walk) and family == "llama")
        assert dec.one_call_steps == walked_from_logits  # then every step is one compiled call
        stepped = dec.generate([PROMPT, [4, 4], [9]], seed=11, on_tokens=lambda i, tokens: None)
        dec.fused_step = False  # the lean loop's three calls
        three = dec.generate([PROMPT, [4, 4], [9]], seed=11)
        dec.fast_chain = False
        general = dec.generate([PROMPT, [4, 4], [9]], seed=11)
        for results in (fast, stepped, three):
            assert [r.token_ids for r in results] == [r.token_ids for r in general]
            assert [r.stats.depth_expected.tolist() for r in results] == [
                r.stats.depth_expected.tolist() for r in general
            ]


def _count_one_call_steps(monkeypatch):
    """Counters of the compiled paths' use: ``loops``, runs of many steps in one call
    (``TreeDecoder._compiled_steps``); ``steps``, steps in one call each
    (``_one_call_step``); ``unplanned``, trees' walks left to Python (a node not the plan's)."""
    from types import SimpleNamespace

    from mdsd.engine import decode

    calls = SimpleNamespace(loops=0, steps=0, unplanned=0)
    compiled_steps, one_call_step = TreeDecoder._compiled_steps, TreeDecoder._one_call_step
    walk_tree_softmax = decode.walk_tree_softmax

    def counted_loops(self, *args):
        ran, stop = compiled_steps(self, *args)
        calls.loops += ran
        return ran, stop

    def counted_steps(self, *args):
        emitted = one_call_step(self, *args)
        calls.steps += emitted is not None
        return emitted

    def counted_walks(*args, **kwargs):
        calls.unplanned += 1
        return walk_tree_softmax(*args, **kwargs)

    monkeypatch.setattr(TreeDecoder, "_compiled_steps", counted_loops)
    monkeypatch.setattr(TreeDecoder, "_one_call_step", counted_steps)
    monkeypatch.setattr(decode, "walk_tree_softmax", counted_walks)
    return calls


@pytest.mark.parametrize("draft_vocab", [None, (0, 2, 3, 5, 6, 7, 9, 11)])
def test_compiled_draft_chain_equals_level_by_level(llama, draft_vocab):
    """``draft_chain`` in one compiled call (``compiled_draft``) gives the tokens and q (ids and
    values) of level-by-level drafting, bit for bit, with and without top-k and top-p, at
    temperatures where no q underflows and where most of it does (temperature 0.002: q stored on
    its nonzero entries)."""
    from mdsd.engine.vocab import as_draft_vocabulary

    cases = (
        (1.0, None, None),
        (0.002, None, None),
        (0.8, 3, None),
        (0.002, 3, None),
        (1.0, None, 0.7),
        (0.8, 5, 0.6),
    )
    for temperature, top_k, top_p in cases:
        sampling = SamplingConfig(temperature, top_k, top_p, max_new_tokens=8, stop_on_eos=False)
        dec = TreeDecoder(llama, TreeConfig.make("1x4", "iid", "rrs"), sampling)
        dec.use_draft_vocabulary(as_draft_vocabulary(draft_vocab, llama.draft))
        drafted = {}
        for compiled in (True, False):
            dec.compiled_draft = compiled
            dec.draft.reset(32)
            drafted[compiled] = dec.draft_chain(list(PROMPT), np.random.default_rng(4))
        a, b = drafted[True], drafted[False]
        assert isinstance(a.draft_probs, _DraftedProbs) and not isinstance(b.draft_probs, _DraftedProbs)
        assert a.tokens.tolist() == b.tokens.tolist()
        assert a.draft_probs.keys() == b.draft_probs.keys()
        width = VOCAB if draft_vocab is None else len(draft_vocab)
        underflow = False
        for node, q in a.draft_probs.items():
            ref = b.draft_probs[node]
            assert (q.indices is None) == (ref.indices is None)
            assert q.indices is None or np.array_equal(q.indices, ref.indices)
            assert np.array_equal(q.values, ref.values) and q.vocab == ref.vocab
            underflow |= q.support_size < width
        if top_k is None and top_p is None:  # a top-3 q seldom underflows
            assert underflow == (temperature < 0.01)
        if top_p is not None:  # the nucleus is stored on its tokens
            assert all(q.indices is not None and q.support_size < width for q in a.draft_probs.values())


@pytest.mark.parametrize("draft_vocab", [None, (0, 2, 3, 5, 6, 7, 9, 11)])
@pytest.mark.parametrize(
    "law,verifier",
    [
        ("iid", "rrs"),
        ("without_replacement", "rrs_without_replacement"),
        ("greedy", "greedy"),
        ("spechub", "spechub"),
    ],
)
def test_compiled_draft_tree_equals_level_by_level(llama, draft_vocab, law, verifier):
    """``draft_tree`` in one compiled call (``StaticLlamaRunner.sample_tree``) gives the tokens,
    valid slots, rules and q (ids and values) of level-by-level drafting, bit for bit, the
    generator's state and the draft's cache after it too: trees of one to three levels, with and
    without top-k (top-2 under three slots: fewer distinct drafts than slots) and top-p, at temperatures
    where no q underflows and where most of it does (0.002: q stored on its nonzero entries, one
    draft where one token is left). Trees whose levels exceed a panel pass, and laws it does not
    draw, draft level by level."""
    from mdsd.engine.vocab import as_draft_vocabulary

    cases = [
        ((2, 2, 1), 1.0, None, None),
        ((3, 1), 0.002, None, None),
        ((3,), 0.8, 2, None),
        ((2, 3), 0.002, 3, None),
        ((3, 2), 1.3, 2, None),
        ((3, 2), 1.0, None, 0.6),
        ((2, 2, 1), 1.3, 4, 0.8),
    ]
    if law == "spechub":  # two drafts a node
        cases = [
            ((2, 1), 1.0, None, None),
            ((2, 1), 0.002, None, None),
            ((2,), 0.8, 1, None),
            ((2, 2, 1), 1.3, 2, None),
            ((2, 2, 1), 1.0, None, 0.7),
        ]
    for widths, temperature, top_k, top_p in cases:
        sampling = SamplingConfig(temperature, top_k, top_p, max_new_tokens=8, stop_on_eos=False)
        dec = TreeDecoder(llama, TreeConfig.make(widths, law, verifier), sampling)
        dec.use_draft_vocabulary(as_draft_vocabulary(draft_vocab, llama.draft))
        drafted, states, caches = {}, {}, {}
        for compiled in (True, False):
            dec.compiled_draft = compiled
            dec.draft.reset(32)
            rng = np.random.default_rng(4)
            drafted[compiled] = dec.draft_tree(list(PROMPT), rng)
            states[compiled] = rng.random()
            caches[compiled] = [c[:, :, : dec.draft.cached].copy() for c in dec.draft._cache_numpy]
        a, b = drafted[True], drafted[False]
        assert isinstance(a.draft_probs, _DraftedProbs) and not isinstance(b.draft_probs, _DraftedProbs)
        assert a.tokens.tolist() == b.tokens.tolist() and a.valid.tolist() == b.valid.tolist()
        assert states[True] == states[False]
        assert all(np.array_equal(x, y) for x, y in zip(caches[True], caches[False]))
        assert list(a.draft_probs) == list(b.draft_probs) == list(a.rules) == list(b.rules)
        for node, q in a.draft_probs.items():
            ref = b.draft_probs[node]
            assert (q.indices is None) == (ref.indices is None)
            assert q.indices is None or np.array_equal(q.indices, ref.indices)
            assert np.array_equal(q.values, ref.values) and q.vocab == ref.vocab
            assert a.rules[node] == b.rules[node]
        with pytest.raises(KeyError):
            a.rules[dec.tree.num_nodes - 1]  # a leaf drafts nothing
    dec.draft._panel_max_rows, rng = 2, np.random.default_rng(0)  # a level of 3 rows: no one call
    dec.draft.reset(32)
    assert dec.draft.sample_tree(np.array(PROMPT[:2]), dec.tree, False, rng, 1.0) is None
    assert rng.random() == np.random.default_rng(0).random()  # nothing drawn


@pytest.mark.filterwarnings("ignore:acceptance at depth 1")
@pytest.mark.parametrize("draft_vocab", [None, (0, 2, 3, 5, 6, 7, 9, 11)])
@pytest.mark.parametrize(
    "law,verifier,tree",
    [
        ("iid", "rrs", (2, 2, 1)),
        ("iid", "rrs", (4, 2, 1)),  # 20 nodes: one call where HEAD_BATCH_ROWS allows (AVX-512)
        ("without_replacement", "rrs_without_replacement", (3, 1)),
        ("iid", "rrs", (4,)),
        ("without_replacement", "optimal", (3, 1)),
        ("iid", "optimal", (2, 2, 1)),
        ("greedy", "greedy", (3, 1)),
        ("greedy", "greedy", (2, 2, 1)),
        ("iid", "kseq", (3, 1)),
        ("iid", "importance", (2, 2, 1)),
        ("without_replacement", "sample_check", (3, 1)),
        ("spechub", "spechub", (2, 2, 1)),
    ],
)
def test_compiled_tree_decoding_emits_what_the_general_loop_emits(
    tiny, llama, draft_vocab, law, verifier, tree, monkeypatch
):
    """Trees decoded in one compiled call (``_step_numba.tree_steps``), with one call a step
    (``tree_step``; a caller that streams the tokens), and trees drafted in one call
    (``sample_tree``) and walked in one more (``walk.walk_tree_softmax``: recursive
    rejection sampling, the other verifiers' samplers (greedy, SpecHub, K-SEQ, importance,
    sample_check),
    the optimal verifier's threshold nodes, or node by node where a node is not the plan's)
    emit the tokens, and record the acceptances, of level-by-level drafting and the node-by-node
    ``walk`` from the same seed:
    temperature 1, a top-k smaller than the width of the tree's widest node, a top-p, a
    temperature where q and p underflow; with and without a draft vocabulary; a draft that disagrees with the
    target (walks end at the root) and one that is the target (walks reach the leaves and draw
    bonus tokens)."""
    from mdsd.engine.decode import HEAD_BATCH_ROWS
    from mdsd.engine.vocab import as_draft_vocabulary

    config = TreeConfig.make(tree, law, verifier)
    if config.tree.num_nodes + 1 > HEAD_BATCH_ROWS:
        pytest.skip(f"{config.tree.num_nodes} nodes: more rows than HEAD_BATCH_ROWS on this CPU")
    agreeing = load_pair(target=tiny["llama"][0], draft=tiny["llama"][0])
    deep, calls = False, _count_one_call_steps(monkeypatch)
    prompts = [PROMPT, [4, 4], [9]]
    for pair in (llama, agreeing):
        for sampling in (
            SamplingConfig(1.0, max_new_tokens=20, stop_on_eos=False),
            SamplingConfig(0.8, top_k=2, max_new_tokens=20, stop_on_eos=False),
            SamplingConfig(1.0, top_p=0.7, max_new_tokens=20, stop_on_eos=False),
            SamplingConfig(0.002, max_new_tokens=20, stop_on_eos=False),
        ):
            dec = TreeDecoder(pair, config, sampling)
            dec.use_draft_vocabulary(as_draft_vocabulary(draft_vocab, pair.draft))
            assert dec.one_call_steps
            looped = dec.generate(prompts, seed=11)  # every step in one compiled call
            stepped = dec.generate(prompts, seed=11, on_tokens=lambda i, tokens: None)  # a call a step
            dec.fused_step, unplanned = False, calls.unplanned
            compiled = dec.generate(prompts, seed=11)
            calls.unplanned = unplanned  # the three calls walk every tree by walk_tree_softmax
            assert dec.last_step.drafted.tree_q is not None
            assert dec._walks_tree_from_logits(dec.last_step.drafted)
            dec.compiled_draft = False
            general = dec.generate(prompts, seed=11)
            assert dec.last_step.drafted.tree_q is None
            for results in (looped, stepped, compiled):
                assert [r.token_ids for r in results] == [r.token_ids for r in general]
                for r, g in zip(results, general):
                    assert r.stats.depth_expected.tolist() == g.stats.depth_expected.tolist()
                    assert r.stats.depth_tries.tolist() == g.stats.depth_tries.tolist()
                    assert (r.stats.steps, r.stats.step_tokens, r.stats.accepted) == (
                        g.stats.steps,
                        g.stats.step_tokens,
                        g.stats.accepted,
                    )
            deep |= any(r.stats.depth_expected[-1] > 0 for r in compiled)  # a leaf kept: a bonus token
    assert deep
    assert calls.loops >= 24 and calls.steps > 0  # (the prompts fit a panel pass)
    # only an optimal plan leaves nodes to Python (a node of another n or of a support the plan
    # does not serve: test_compiled_optimal_walks_unserved_nodes_in_python)
    assert calls.unplanned == 0 or verifier == "optimal"


@pytest.mark.filterwarnings("ignore:acceptance at depth 1")
@pytest.mark.parametrize("law", ["without_replacement", "iid"])
def test_compiled_optimal_serves_nodes_of_fewer_drafts(llama, law, monkeypatch):
    """A 3,2 tree (nodes of three drafts, then of two) and a 3x1 tree under a top-p whose
    nucleus often holds two tokens: the optimal plan's table (``RuleBook.plan_table``) serves
    the nodes of two drafts too, so every step runs in the compiled walk (none left to Python),
    with the general loop's tokens."""
    calls, drafted = _count_one_call_steps(monkeypatch), set()
    compiled_record = TreeDecoder._compiled_record

    def recorded(self, step, chain):
        record = compiled_record(self, step, chain)
        counts = record.drafted.tree_q[4]
        drafted.update(counts[counts > 1].tolist())
        return record

    monkeypatch.setattr(TreeDecoder, "_compiled_record", recorded)
    for tree, sampling in (
        ((3, 2), SamplingConfig(1.0, top_k=5, max_new_tokens=20, stop_on_eos=False)),
        ((3, 2), SamplingConfig(0.8, top_p=0.8, max_new_tokens=20, stop_on_eos=False)),
        ((3, 1), SamplingConfig(0.2, top_p=0.6, max_new_tokens=20, stop_on_eos=False)),
    ):
        dec = TreeDecoder(llama, TreeConfig.make(tree, law, "optimal"), sampling)
        stepped = dec.generate([PROMPT, [4, 4], [9]], seed=3, on_tokens=lambda i, tokens: None)
        dec.compiled_draft = False
        general = dec.generate([PROMPT, [4, 4], [9]], seed=3)
        assert [r.token_ids for r in stepped] == [r.token_ids for r in general]
    assert calls.unplanned == 0 and drafted == {2, 3}  # nodes of two and of three drafts


@pytest.mark.filterwarnings("ignore:acceptance at depth 1")
@pytest.mark.parametrize("law,tree", [("without_replacement", (3, 1)), ("iid", (2, 2, 1))])
def test_compiled_optimal_walks_unserved_nodes_in_python(llama, law, tree, monkeypatch):
    """Where the optimal plan's table serves only the nodes of the widest q support
    (``RuleBook.plan_table`` narrowed), the one-call loop leaves every tree with a node of
    another support to Python (``_walk_unplanned``), and the tokens are the general loop's all
    the same: under a top-p (q's support changes from step to step) and a top-k, with and
    without a draft vocabulary."""
    from dataclasses import replace

    from mdsd.engine.vocab import as_draft_vocabulary
    from mdsd.engine.walk import RuleBook

    plan_table = RuleBook.plan_table

    def widest_only(self, n, max_support):
        table = plan_table(self, n, max_support)
        served = np.zeros_like(table.served)
        served[:, max_support] = table.served[:, max_support]
        return replace(table, served=served)

    monkeypatch.setattr(RuleBook, "plan_table", widest_only)
    calls = _count_one_call_steps(monkeypatch)
    for draft_vocab in (None, (0, 2, 3, 5, 6, 7, 9, 11)):
        for sampling in (
            SamplingConfig(1.0, top_p=0.8, max_new_tokens=20, stop_on_eos=False),
            SamplingConfig(1.0, top_k=5, top_p=0.9, max_new_tokens=20, stop_on_eos=False),
        ):
            dec = TreeDecoder(llama, TreeConfig.make(tree, law, "optimal"), sampling)
            dec.use_draft_vocabulary(as_draft_vocabulary(draft_vocab, llama.draft))
            looped = dec.generate([PROMPT, [4, 4], [9]], seed=11)
            dec.compiled_draft = False
            general = dec.generate([PROMPT, [4, 4], [9]], seed=11)
            assert [r.token_ids for r in looped] == [r.token_ids for r in general]
            for r, g in zip(looped, general):
                assert r.stats.depth_expected.tolist() == g.stats.depth_expected.tolist()
    assert calls.unplanned > 0 and calls.loops > 0


@pytest.mark.filterwarnings("ignore:acceptance at depth 1")
@pytest.mark.parametrize(
    "tree,law,verifier",
    [
        ("2x2", "iid", "rrs"),
        ("3,1", "without_replacement", "optimal"),
        ("1x3", "iid", "rrs"),
        ("1x3", "iid", "block"),
        ("2x2", "greedy", "greedy"),
    ],
)
def test_compiled_loop_stops_where_the_step_loop_stops(llama, tree, law, verifier, monkeypatch):
    """Decoding in one compiled call (``TreeDecoder._compiled_steps``) stops where decoding a
    step at a time (a caller that streams the tokens) stops, with the same tokens, reason and
    statistics: at the budget, at an EOS (the step's tokens after it dropped) and at the
    models' context length (64 positions)."""
    calls = _count_one_call_steps(monkeypatch)
    reasons = set()
    for sampling, eos, prompt in (
        (SamplingConfig(1.0, top_k=6, max_new_tokens=13, stop_on_eos=False), set(), PROMPT),
        (SamplingConfig(1.0, top_k=6, max_new_tokens=40, stop_on_eos=True), {5, 9}, PROMPT),
        (SamplingConfig(0.9, max_new_tokens=200, stop_on_eos=True), set(), PROMPT * 3),
    ):
        dec = TreeDecoder(llama, TreeConfig.make(tree, law, verifier), sampling)
        dec.eos = eos
        looped = dec.generate([prompt] * 4, seed=3)
        stepped = dec.generate([prompt] * 4, seed=3, on_tokens=lambda i, tokens: None)
        for a, b in zip(looped, stepped):
            assert (a.token_ids, a.stop_reason) == (b.token_ids, b.stop_reason)
            assert (a.stats.steps, a.stats.step_tokens, a.stats.accepted) == (
                b.stats.steps,
                b.stats.step_tokens,
                b.stats.accepted,
            )
            assert a.stats.depth_tries.tolist() == b.stats.depth_tries.tolist()
            assert a.stats.target_calls == b.stats.target_calls
            assert a.stats.draft_calls == b.stats.draft_calls
            reasons.add(a.stop_reason)
            if a.stop_reason == "eos":
                assert a.token_ids[-1] in eos and not set(a.token_ids[:-1]) & eos
    assert reasons == {"length", "eos", "context"}
    assert calls.loops >= 12 and calls.steps > 0


def test_compiled_plain_sampling_draws_what_the_step_loop_draws(llama):
    """``Autoregressive`` in one compiled call (``_compiled_steps``: ``_step_numba.plain_steps``)
    draws the tokens of its Python loop (a caller that streams the tokens) from the same seed,
    and stops where it stops (budget, EOS, context), under the tempered softmax alone and after a
    top-k and / or a top-p, a prompt longer than one panel pass included (its forward then runs
    in Python)."""
    reasons = set()
    for sampling, eos, prompt in (
        (SamplingConfig(0.8, max_new_tokens=13, stop_on_eos=False), set(), PROMPT),
        (SamplingConfig(1.0, top_k=6, max_new_tokens=40, stop_on_eos=True), {5, 9}, PROMPT),
        (SamplingConfig(1.2, top_k=3, max_new_tokens=200, stop_on_eos=True), set(), PROMPT * 3),
        (SamplingConfig(0.002, max_new_tokens=30, stop_on_eos=False), set(), [4] * 40),
        (SamplingConfig(1.0, top_p=0.8, max_new_tokens=20, stop_on_eos=False), set(), PROMPT),
        (SamplingConfig(0.9, top_k=6, top_p=0.7, max_new_tokens=20, stop_on_eos=False), set(), PROMPT),
    ):
        dec = Autoregressive(llama, sampling)
        dec.eos = eos
        looped = dec.generate([prompt] * 4, seed=3)
        stepped = dec.generate([prompt] * 4, seed=3, on_tokens=lambda i, tokens: None)
        for a, b in zip(looped, stepped):
            assert (a.token_ids, a.stop_reason) == (b.token_ids, b.stop_reason)
            assert a.stats.target_calls == b.stats.target_calls == len(a.token_ids)
            reasons.add(a.stop_reason)
    assert reasons == {"length", "eos", "context"}


def test_fast_chain_only_for_single_draft_rejection_chains(llama):
    """Trees, other verifiers and sequence-level rules take the general loop; block verification
    of chains of one draw from q takes the lean loop."""
    sampling = SamplingConfig(1.0)
    for tree, law, verifier, fast in [
        ("1x3", "iid", "rrs", True),
        ("1x3", "without_replacement", "optimal", True),
        ("2x3", "iid", "rrs", False),
        ("1x3", "iid", "kseq", False),
        ("1x3", "greedy", "greedy", False),
        ("1x3", "iid", "block", True),
        ("1x3", "greedy", "block", False),
        ("2x3", "iid", "traversal", False),
    ]:
        dec = TreeDecoder(llama, TreeConfig.make(tree, law, verifier), sampling, check_attention=False)
        assert dec.fast_chain is fast, (tree, law, verifier)


def test_decode_stats_count_each_walk():
    """``DecodeStats.add_walk``: per step, the emitted tokens and accepted drafts; per visited
    depth a try and the expected acceptance; per accepted depth an acceptance."""
    from mdsd.engine.records import DecodeStats
    from mdsd.engine.walk import WalkResult

    stats = DecodeStats(depth=3)
    stats.add_walk(WalkResult([0, 1], [5, 6, 7], False, [1.0, 1.0, 0.0]))
    stats.add_walk(WalkResult([0, 1, 2], [5, 6, 7, 8], True, [1.0, 1.0, 1.0]))
    stats.add_walk(WalkResult([], [9], False, [0.25]))
    assert (stats.steps, stats.step_tokens, stats.accepted) == (3, 8, 5)
    assert stats.depth_tries.tolist() == [3.0, 2.0, 2.0]
    assert stats.depth_accepts.tolist() == [2.0, 2.0, 1.0]
    assert stats.depth_expected.tolist() == [2.25, 2.0, 1.0]


def test_plain_sampling_draws_the_transform_s_token(llama):
    """``Autoregressive``'s draw (``walk.softmax_token`` for the tempered softmax alone) is the
    token of ``row_probs`` then ``categorical`` at the same uniform, with the generator left in
    the same state, for float32 and float64 logits, with and without top-k and top-p."""
    from mdsd.sampling import categorical

    gen = np.random.default_rng(8)
    for sampling in (
        SamplingConfig(0.7),
        SamplingConfig(1.3),
        SamplingConfig(0.7, top_k=5),
        SamplingConfig(1.0, top_p=0.9),
    ):
        dec = Autoregressive(llama, sampling)
        for case in range(60):
            logits = gen.normal(size=int(gen.choice([7, 300, 8192]))) * gen.choice([0.5, 4.0])
            logits = logits.astype(np.float32 if case % 2 else np.float64)
            rng, ref_rng = np.random.default_rng(case), np.random.default_rng(case)
            probs = sampling.row_probs(logits)
            assert dec._sample(logits, rng) == probs.token(int(categorical(probs.values, ref_rng)))
            assert rng.random() == ref_rng.random()
