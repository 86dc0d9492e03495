"""Tests of mdsd.engine: tree structures, tree attention and KV caches, exactness of the decoded law.

Tiers:
1. tree structure (exact);
2. plumbing: tree-forward logits and the caches after accepted paths equal plain forwards;
3. exact law: the law of the first two (three) generated tokens, computed by enumerating every
   drafted tree with the engine's own rules (``walk.enumerate_children`` / ``walk.emission_law``),
   equals the target's autoregressive law to 1e-10, for every exact (law, verifier) pair;
4. end-to-end sampling: a seeded G-test on the engine's actual output (false-positive rate 1e-4);
5. temperature 0 = the target's greedy continuation; bad input raises ValueError.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder, build_tree, chain_tree, parse_tree
from mdsd.engine.decode import Autoregressive, DecodeStats
from mdsd.engine.walk import DraftedSlots, RuleBook, as_support, emission_law, enumerate_children
from mdsd.models import ModelPair, load_pair
from mdsd.verifiers import VERIFIERS

VOCAB = 12
TOP_K = 4
PROMPT = [3, 7, 5]
LOGIT_TOL = 1e-4
LAW_TOL = 1e-10
G_TEST_ALPHA = 1e-4


# ---------------------------------------------------------------- tiny models
def _save_tiny(path, kind: str, vocab: int, hidden: int, layers: int, seed: int):
    """A random tiny Llama or GPT-2 with a word-level tokenizer, saved to ``path``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    words = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, vocab)}
    tok = Tokenizer(WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=48,
                eos_token_id=1,
            )
        )
    else:
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=hidden,
                n_layer=layers,
                n_head=2,
                n_positions=48,
                eos_token_id=1,
                bos_token_id=1,
            )
        )
    with torch.no_grad():  # sharper random distributions than the default init
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(6.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is ~10x faster than several on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    dirs = {}
    for kind in ("llama", "gpt2"):
        dirs[kind] = (
            _save_tiny(root / f"{kind}_t", kind, VOCAB, 32, 2, 0),
            _save_tiny(root / f"{kind}_d", kind, VOCAB, 16, 1, 1),
        )
    dirs["wide"] = _save_tiny(root / "wide", "llama", VOCAB + 4, 16, 1, 2)
    return dirs


@pytest.fixture(scope="module")
def llama(tiny):
    return load_pair(target=tiny["llama"][0], draft=tiny["llama"][1])


@pytest.fixture(scope="module")
def gpt2(tiny):
    return load_pair(target=tiny["gpt2"][0], draft=tiny["gpt2"][1])


_LOGITS: dict = {}  # (model id, context) -> last-position logits, shared by every test


class Oracle:
    """p(. | context) and q(. | context) from plain full forwards (no cache, no tree)."""

    def __init__(self, pair, sampling):
        self.pair, self.sampling = pair, sampling
        self._probs = {}

    def logits(self, model, context):
        key = (id(model), tuple(context))
        if key not in _LOGITS:
            with torch.inference_mode():
                ids = torch.tensor([list(context)])
                _LOGITS[key] = model(input_ids=ids).logits[0, -1].float().numpy()
        return _LOGITS[key]

    def _processed(self, model, context):
        key = (id(model), tuple(context))
        if key not in self._probs:
            self._probs[key] = self.sampling.probs(self.logits(model, context))
        return self._probs[key]

    def p(self, context):
        return self._processed(self.pair.target, context)

    def q(self, context):
        return self._processed(self.pair.draft, context)


# ---------------------------------------------------------------- 1. tree structure
def test_build_tree_structure():
    t = build_tree((3, 2, 1))
    assert t.num_nodes == 3 + 6 + 6 and t.depth == 3
    assert t.parents[:3].tolist() == [-1, -1, -1]
    assert t.parents[3:9].tolist() == [0, 0, 1, 1, 2, 2]
    assert t.parents[9:].tolist() == list(range(3, 9))
    assert list(t.children(-1)) == [0, 1, 2] and list(t.children(4)) == [10]
    assert list(t.children(12)) == []
    # ancestor mask: node 11 (depth 3) sees the root, nodes 1 and 5 and itself
    assert np.flatnonzero(t.ancestor_mask[12]).tolist() == [0, 2, 6, 12]
    assert t.position_offsets.tolist() == [0] + t.depths.tolist()
    assert t.level_mask(2).shape == (6, 9)
    assert np.flatnonzero(t.level_mask(2)[3]).tolist() == [1, 6]  # node 6: parent 1, itself
    assert chain_tree(3, 4).widths == (3, 1, 1, 1) == parse_tree("3x4").widths
    assert parse_tree("2,2").widths == (2, 2)
    assert TreeConfig.make("2x2", "greedy").verifier == "greedy"
    assert (TreeConfig.make("2x2").law, TreeConfig.make("2x2").verifier) == (
        "without_replacement",
        "rrs_without_replacement",
    )
    assert TreeConfig.make("2x2", "without_replacement", "optimal").describe() == (
        "without_replacement/optimal 2x2"
    )
    for bad in ("", "0,1", "x", "3x0"):
        with pytest.raises(ValueError, match="tree|depth|drafts"):
            parse_tree(bad)


# ---------------------------------------------------------------- 2. plumbing
@pytest.mark.parametrize(
    "family,static_cache,matmul",
    [("llama", True, "numpy"), ("llama", True, "torch"), ("llama", False, "auto"), ("gpt2", True, "auto")],
)  # llama: the lean static-cache forward (both matmul backends) and Hugging Face's; gpt2: HF's
@pytest.mark.parametrize("widths", [(3, 2, 1), (2, 1, 1)])
def test_tree_logits_and_caches_match_plain_forward(request, family, static_cache, matmul, widths):
    pair = request.getfixturevalue(family)
    sampling = SamplingConfig(1.0)
    config = TreeConfig.make(widths, "iid", "rrs")
    dec = TreeDecoder(pair, config, sampling, static_cache=static_cache, matmul=matmul)
    expected_runner = "StaticLlamaRunner" if family == "llama" and static_cache else "ModelRunner"
    assert type(dec.target).__name__ == type(dec.draft).__name__ == expected_runner
    if expected_runner == "StaticLlamaRunner":
        assert dec.target.matmul == dec.draft.matmul == matmul
    oracle = Oracle(pair, sampling)
    rng = np.random.default_rng(0)
    seq, stats = list(PROMPT), DecodeStats(depth=len(widths))
    dec.target.reset(40)
    dec.draft.reset(40)
    with torch.inference_mode():
        for _ in range(4):
            emitted = dec.step(seq, rng, stats)
            drafted = dec.last_step.drafted
            logits = dec.target.logits(dec.last_step.target_hidden)
            tree = dec.tree
            for node in [-1] + list(np.flatnonzero(drafted.valid)):
                path = _path_tokens(tree, drafted, node)
                want = oracle.logits(pair.target, seq + path)
                np.testing.assert_allclose(logits[node + 1], want, atol=LOGIT_TOL, rtol=0)
                if node in drafted.draft_probs:  # q the children were drawn from
                    np.testing.assert_allclose(
                        as_support(drafted.draft_probs[node]).dense(),
                        oracle.q(seq + path),
                        atol=LOGIT_TOL,
                        rtol=0,
                    )
            seq += emitted
        # the caches now hold exactly the committed prefix: next logits = a full forward
        assert dec.target.cached == len(seq) - 1
        got_t = dec.target.causal(np.asarray(seq[dec.target.cached :]))[0]
        got_d = dec.draft.causal(np.asarray(seq[dec.draft.cached :]))[0]
    np.testing.assert_allclose(got_t, oracle.logits(pair.target, seq), atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(got_d, oracle.logits(pair.draft, seq), atol=LOGIT_TOL, rtol=0)


def _path_tokens(tree, drafted, node):
    path = []
    while node >= 0:
        path.append(int(drafted.tokens[node]))
        node = int(tree.parents[node])
    return path[::-1]


def test_matmul_backend_choice_and_errors(llama):
    from mdsd.engine.static_llama import choose_matmul

    assert choose_matmul(llama.target) == "numpy"  # float32 on the CPU
    assert choose_matmul(llama.target, "torch") == "torch"
    with pytest.raises(ValueError, match="matmul must be one of"):
        choose_matmul(llama.target, "blas")
    half = type(llama.target)(llama.target.config).to(torch.bfloat16)
    assert choose_matmul(half) == "torch"
    with pytest.raises(ValueError, match="matmul 'numpy' needs a float32 model"):
        choose_matmul(half, "numpy")
    with pytest.raises(ValueError, match="matmul must be one of"):
        Autoregressive(llama, SamplingConfig(1.0), matmul="fast")


# ---------------------------------------------------------------- 3. exact law
def _drafted_trees(tree, book, q_of, context):
    """Every drafted tree the engine can produce after ``context``, with its probability.

    Mirrors ``TreeDecoder.draft_tree``: nodes are expanded in breadth-first order, each from
    q(. | context + path) with ``enumerate_children`` (the engine's rule).
    """
    internal = [-1] + [i for i in range(tree.num_nodes) if tree.depths[i] < tree.depth]
    n = tree.num_nodes

    def rec(k, tokens, valid, rules, qs, prob):
        if k == len(internal):
            yield DraftedSlots(tokens.copy(), valid.copy(), dict(rules), dict(qs)), prob
            return
        node = internal[k]
        if node >= 0 and not valid[node]:
            yield from rec(k + 1, tokens, valid, rules, qs, prob)
            return
        q = q_of(context + _path_tokens(tree, DraftedSlots(tokens, valid, {}, {}), node))
        kids = tree.children(node)
        options, rule = enumerate_children(q, len(kids), book)
        for drafts, pr in options:
            tokens[kids.start : kids.start + drafts.size] = drafts
            valid[kids.start : kids.start + drafts.size] = True
            rules[node], qs[node] = rule, q
            yield from rec(k + 1, tokens, valid, rules, qs, prob * pr)
            valid[kids.start : kids.stop] = False
        rules.pop(node, None)
        qs.pop(node, None)

    yield from rec(0, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), {}, {}, 1.0)


def _step_law(tree, book, oracle, context, decoder=None):
    """Exact law of the tokens one engine step emits after ``context`` (with ``decoder``: its
    sequence-level rule, on the same drafted trees)."""
    from mdsd.sequence import tree_emission_law

    law = {}
    for drafted, prob in _drafted_trees(tree, book, oracle.q, context):

        def target_probs(node, drafted=drafted):
            return oracle.p(context + _path_tokens(tree, drafted, node))

        if decoder is not None and decoder.sequence_method is not None:
            sequence_tree, _ = decoder.sequence_tree(drafted, target_probs)
            emitted_law = tree_emission_law(sequence_tree, decoder.sequence_method)
        else:
            emitted_law = emission_law(tree, drafted, target_probs)
        for emitted, pr in emitted_law.items():
            law[emitted] = law.get(emitted, 0.0) + prob * pr
    return law


def _first_tokens_law(tree, book, oracle, context, k, decoder=None):
    """Exact law of the first k generated tokens (steps chained through the engine's rules)."""
    out = {}
    for emitted, prob in _step_law(tree, book, oracle, context, decoder).items():
        if len(emitted) >= k:
            key = emitted[:k]
            out[key] = out.get(key, 0.0) + prob
        else:
            rest = _first_tokens_law(tree, book, oracle, context + list(emitted), k - len(emitted), decoder)
            for tail, pr in rest.items():
                key = emitted + tail
                out[key] = out.get(key, 0.0) + prob * pr
    return out


def _autoregressive_law(oracle, context, k):
    if k == 0:
        return {(): 1.0}
    out = {}
    p = oracle.p(context)
    for y in np.flatnonzero(p > 0):
        for tail, pr in _autoregressive_law(oracle, context + [int(y)], k - 1).items():
            out[(int(y),) + tail] = p[y] * pr
    return out


def _assert_same_law(got, want, tol):
    keys = set(got) | set(want)
    worst = max(abs(got.get(k, 0.0) - want.get(k, 0.0)) for k in keys)
    assert worst < tol, f"laws differ by {worst:.3g}"


EXACT_PAIRS = sorted((law, name) for name, v in VERIFIERS.items() for law in v.laws)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("law,verifier", EXACT_PAIRS)
def test_first_two_tokens_follow_target_law(llama, law, verifier, temperature):
    sampling = SamplingConfig(temperature, top_k=TOP_K)
    oracle = Oracle(llama, sampling)
    want = _autoregressive_law(oracle, PROMPT, 2)
    trees = [(2, 1), (2, 2)] if law == "spechub" else [(2, 1), (3,)]
    for widths in trees:
        book = RuleBook(law, verifier, widths)
        got = _first_tokens_law(build_tree(widths), book, oracle, PROMPT, 2)
        _assert_same_law(got, want, LAW_TOL)


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
    got = _first_tokens_law(dec.tree, dec.book, oracle, PROMPT, 2, decoder=dec)
    _assert_same_law(got, _autoregressive_law(oracle, PROMPT, 2), LAW_TOL)
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
    for drafted, _ in itertools.islice(_drafted_trees(tree, book, models.q, []), 12):
        nodes = np.flatnonzero(drafted.valid)
        compact = {-1: -1} | {int(n): i for i, n in enumerate(nodes)}
        rows = [-1] + [int(n) for n in nodes]
        p = np.stack([models.p(_path_tokens(tree, drafted, r)) for r in rows])
        q = np.stack([drafted.draft_probs.get(r, np.zeros(5)) for r in rows])
        laws = [drafted.rules[r].law.name if r in drafted.rules else law for r in rows]
        parents = [compact[int(tree.parents[n])] for n in nodes]
        reference = tree_emission_law(
            drafted_tree(parents, drafted.tokens[nodes], p, q, laws), "node", verifier
        )
        fast = emission_law(tree, drafted, lambda node, d=drafted: models.p(_path_tokens(tree, d, node)))
        _assert_same_law(fast, reference, 1e-12)


def test_sequence_verifier_errors(llama):
    sampling = SamplingConfig(1.0)
    with pytest.raises(ValueError, match="block"):
        TreeDecoder(llama, TreeConfig.make((2, 1), "iid", "block"), sampling, check_attention=False)
    with pytest.raises(ValueError, match="law"):
        TreeDecoder(
            llama, TreeConfig.make((2,), "conditional_poisson", "traversal"), sampling, check_attention=False
        )


@pytest.mark.parametrize(
    "law,verifier", [("without_replacement", "rrs_without_replacement"), ("iid", "importance")]
)
def test_first_three_tokens_with_top_p(gpt2, law, verifier):
    sampling = SamplingConfig(0.8, top_k=TOP_K + 1, top_p=0.9)
    oracle = Oracle(gpt2, sampling)
    book = RuleBook(law, verifier, (3,))
    got = _first_tokens_law(build_tree((3,)), book, oracle, PROMPT, 3)
    _assert_same_law(got, _autoregressive_law(oracle, PROMPT, 3), LAW_TOL)


# ---------------------------------------------------------------- 4. end-to-end sampling
def _g_test_pvalue(counts: dict, law: dict) -> float:
    from scipy.stats import chi2

    n = sum(counts.values())
    g, cells = 0.0, 0
    for key, prob in law.items():
        if prob <= 0:
            continue
        cells += 1
        c = counts.get(key, 0)
        if c:
            g += 2.0 * c * math.log(c / (n * prob))
    assert set(counts) <= {k for k, v in law.items() if v > 0}, "impossible sequence sampled"
    return float(chi2.sf(g, max(cells - 1, 1)))


class SyntheticModels:
    """Random p(. | context), q(. | context) on a small vocabulary, fixed per context."""

    def __init__(self, vocab, seed, top_k=None):
        self.vocab, self.seed, self.top_k = vocab, seed, top_k

    def _probs(self, which, context):
        gen = np.random.default_rng([self.seed, which, len(context)] + list(context))
        logits = gen.normal(size=self.vocab) * 2.0
        return SamplingConfig(1.0, top_k=self.top_k).probs(logits)

    def p(self, context):
        return self._probs(0, context)

    def q(self, context):
        return self._probs(1, context)


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
    tests use (``enumerate_children``, ``emission_law``), by G-tests."""
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
    assert _g_test_pvalue(counts, want) > G_TEST_ALPHA
    # 2. verification walks over one fixed drafted tree
    drafted, _ = next(iter(_drafted_trees(tree, book, models.q, [])))

    def target_probs(node):
        return models.p(_path_tokens(tree, drafted, node))

    want = emission_law(tree, drafted, target_probs)
    assert abs(sum(want.values()) - 1.0) < LAW_TOL
    counts = {}
    for _ in range(2000):
        key = tuple(walk(tree, drafted, target_probs, rng).emitted)
        counts[key] = counts.get(key, 0) + 1
    assert _g_test_pvalue(counts, want) > G_TEST_ALPHA


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

    drafted_dense, _ = next(iter(_drafted_trees(tree, book, lambda c: q_row(c).dense(), [])))
    sparse_q = {node: q_row(_path_tokens(tree, drafted_dense, node)) for node in drafted_dense.draft_probs}
    drafted = DraftedSlots(drafted_dense.tokens, drafted_dense.valid, drafted_dense.rules, sparse_q)

    def target_probs(node):
        return p_row(_path_tokens(tree, drafted, node))

    want = emission_law(tree, drafted_dense, lambda node: target_probs(node).dense())
    rng = np.random.default_rng(5)
    counts = {}
    for _ in range(3000):
        key = tuple(walk(tree, drafted, target_probs, rng).emitted)
        counts[key] = counts.get(key, 0) + 1
    assert _g_test_pvalue(counts, want) > G_TEST_ALPHA


def test_engine_samples_follow_target_law(llama):
    """End to end: the engine's own sampled output, first two tokens, G-test."""
    sampling = SamplingConfig(1.0, top_k=TOP_K, max_new_tokens=2, stop_on_eos=False)
    dec = TreeDecoder(
        llama, TreeConfig.make((2, 1), "without_replacement", "rrs_without_replacement"), sampling
    )
    results = dec.generate([PROMPT] * 1200, seed=1234)
    counts = {}
    for r in results:
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    want = _autoregressive_law(Oracle(llama, sampling), PROMPT, 2)
    assert _g_test_pvalue(counts, want) > G_TEST_ALPHA


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


# ---------------------------------------------------------------- 5. greedy, errors
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


def test_unsupported_model_refused(llama):
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    pair = ModelPair(target=opt.eval(), draft=llama.draft, tokenizer=llama.tokenizer, name="x")
    with pytest.raises(ValueError, match="target model type 'opt'"):
        TreeDecoder(pair, TreeConfig.make("2x2", "iid", "rrs"), SamplingConfig(1.0))


# ---------------------------------------------------------------- 6. bench and CLI smoke tests
def test_bench_rows(llama):
    from mdsd.engine.bench import run_bench

    sampling = SamplingConfig(0.7, max_new_tokens=6, stop_on_eos=False)
    configs = [TreeConfig.make("1x2", "iid", "rrs"), TreeConfig.make("2x2", "greedy", "greedy")]
    rows = run_bench(llama, [PROMPT, [5, 6]], sampling, configs, seed=0)
    assert [r["method"] for r in rows][:2] == ["autoregressive", "hf_assisted"]
    for r in rows:
        assert r["new_tokens"] == 12 and r["target_calls"] >= 1
        assert r["speedup_vs_autoregressive"] > 0
    assert rows[0]["target_calls"] == 12  # one target call per autoregressive token
    for r in rows[2:]:  # the per-step profile of tree methods, in autoregressive steps
        for key in ("draft_level_ar_steps", "target_forward_ar_steps", "overhead_ar_steps"):
            assert r[key] > 0


def test_bench_auto_tree(llama, monkeypatch, tmp_path):
    from mdsd.engine.bench import run_bench

    monkeypatch.setenv("MDSD_CACHE_DIR", str(tmp_path))
    sampling = SamplingConfig(0.7, top_k=TOP_K, max_new_tokens=6, stop_on_eos=False)
    configs = [TreeConfig.make("auto", "without_replacement", "rrs_without_replacement")]
    rows = run_bench(llama, [PROMPT, [5, 6]], sampling, configs, seed=0, hf=False)
    auto_row = rows[-1]
    assert auto_row["method"].startswith("mdsd without_replacement/rrs_without_replacement auto (")
    assert auto_row["new_tokens"] == 12 and auto_row["predicted_tokens_per_second"] > 0
    assert auto_row["chosen_tree"] in auto_row["method"]
    assert list(tmp_path.glob("auto-tree/*.json"))  # the calibration was cached


def test_cli_generate_and_bench(tiny):
    import json

    from typer.testing import CliRunner

    from mdsd.cli import app

    target, draft = (str(p) for p in tiny["llama"])
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "generate",
            "w3 w4",
            "--target",
            target,
            "--draft",
            draft,
            "--threads",
            "1",
            "--tree",
            "2,1",
            "--law",
            "without_replacement",
            "-m",
            "5",
            "--ignore-eos",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index('{"prompt"') :].splitlines()[0])
    assert len(out["token_ids"]) == 5 and out["metrics"]["steps"] >= 1
    res = runner.invoke(
        app,
        [
            "generate",
            "w3",
            "--target",
            target,
            "--draft",
            draft,
            "--verifier",
            "rrs",
            "--law",
            "without_replacement",
        ],
    )
    assert res.exit_code == 2 and "exact only" in res.output


def test_cli_generate_notes_full_vocabulary_optimal(tiny):
    """optimal with priority orders (>= 3 drafts without replacement) and no top-k: a note
    suggests --top-k; with a top-k, or with two drafts (closed form), no note."""
    from typer.testing import CliRunner

    from mdsd.cli import app

    target, draft = (str(p) for p in tiny["llama"])
    base = [
        "generate",
        "w3",
        "--target",
        target,
        "--draft",
        draft,
        "--threads",
        "1",
        "--law",
        "without_replacement",
        "--verifier",
        "optimal",
        "-m",
        "2",
        "--ignore-eos",
    ]
    runner = CliRunner()
    for extra, noted in (
        (["--tree", "3,1"], True),
        (["--tree", "3,1", "--top-k", "8"], False),
        (["--tree", "2,1"], False),
    ):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 0, res.output
        assert ("--top-k 50" in res.output) == noted, (extra, res.output)


# ---------------------------------------------------------------- 6. auto trees
def _calibration(rates, draft_s, target_s=(1.0, 1.1, 1.3, 1.6, 2.2, 3.4, 5.8)):
    from mdsd.engine.auto import AcceptanceProfile, Calibration, CostModel

    tokens = (1, 2, 4, 8, 16, 32, 64)
    draft = tuple(draft_s * np.asarray(tokens) ** 0.2)
    cost = CostModel(tokens, tuple(target_s), draft, 0.01, (0.01,) * 4, 0.0, target_s[0])
    return Calibration(AcceptanceProfile(tuple(rates), 100), cost)


def test_auto_tree_model():
    from mdsd.engine.auto import choose_tree, expected_tokens, predict

    rates = (0.6, 0.75, 0.82, 0.86)
    # E = 1 + a + a^2 for a chain of two single drafts; + a_2 * a_1 for widths (2, 1)
    assert expected_tokens((1, 1), rates) == pytest.approx(1 + 0.6 + 0.36)
    assert expected_tokens((2, 1), rates) == pytest.approx(1 + 0.75 + 0.75 * 0.6)
    cheap = choose_tree(_calibration(rates, draft_s=0.02))
    assert cheap.widths and cheap.predicted_speedup > 1.0
    # the choice is the best of every enumerated shape
    for widths in [(1,), (2, 1), (3, 1, 1), (4, 2, 1, 1), (2, 2, 2)]:
        assert predict(widths, _calibration(rates, draft_s=0.02)).tokens_per_s <= cheap.tokens_per_s + 1e-12
    # a draft as slow as the target cannot pay: plain sampling (depth 0)
    assert choose_tree(_calibration(rates, draft_s=1.0)).widths == ()
    assert choose_tree(_calibration((0.01, 0.02, 0.03, 0.04), draft_s=0.02)).widths == ()


def test_auto_tree_decoder(llama, tmp_path, monkeypatch):
    sampling = SamplingConfig(1.0, top_k=TOP_K, max_new_tokens=6, stop_on_eos=False)
    config = TreeConfig.make("auto", "without_replacement", "rrs_without_replacement")
    assert config.tree is None and config.describe().endswith(" auto")
    dec = TreeDecoder(llama, config, sampling)
    with pytest.raises(ValueError, match="prompts"):
        dec.choose_tree([], cache_dir=tmp_path)
    choice = dec.choose_tree([PROMPT, [4, 4, 2]], cache_dir=tmp_path)
    assert choice.tokens_per_s >= choice.autoregressive_tokens_per_s
    assert (dec.tree is None) == (choice.widths == ())
    out = dec.generate([PROMPT], seed=0)[0]
    assert len(out.token_ids) == 6
    # the calibration is cached: a second decoder loads it instead of measuring again
    import mdsd.engine.auto as auto

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated again instead of loading the cache")

    monkeypatch.setattr(auto, "calibrate", refuse)
    again = TreeDecoder(llama, config, sampling).choose_tree([PROMPT, [4, 4, 2]], cache_dir=tmp_path)
    assert again == choice
