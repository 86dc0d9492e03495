"""Helpers of the engine tests: the tiny models' constants, an oracle of p and q by plain forwards,
and the exact law of the engine's output by enumerating every drafted tree with the engine's own
rules (``walk.enumerate_children`` / ``walk.emission_law``)."""

from __future__ import annotations

import numpy as np
import torch

from mdsd.engine import SamplingConfig
from mdsd.engine.records import DecodeStats
from mdsd.engine.walk import DraftedSlots, as_support, emission_law, enumerate_children

from conftest import g_test_pvalue

VOCAB = 12
TOP_K = 4
PROMPT = [3, 7, 5]
LOGIT_TOL = 1e-4
LAW_TOL = 1e-10
G_TEST_ALPHA = 1e-4  # threshold of every G-test here: each fails a correct engine with probability 1e-4


# (model id, context) -> (model, last-position logits), shared by every test; holding the model
# keeps its id from being reused by a later model while the entry exists
_LOGITS: dict = {}


class Oracle:
    """p(. | context) and q(. | context) from plain full forwards (no cache, no tree)."""

    def __init__(self, pair, sampling):
        self.pair, self.sampling = pair, sampling
        self._probs = {}

    def logits(self, model, context):
        key = (id(model), tuple(context))
        if key not in _LOGITS:
            with torch.inference_mode():
                ids = torch.tensor([list(context)], device=model.device)
                _LOGITS[key] = (model, model(input_ids=ids).logits[0, -1].float().cpu().numpy())
        return _LOGITS[key][1]

    def _processed(self, model, context):
        key = (id(model), tuple(context))
        if key not in self._probs:
            self._probs[key] = self.sampling.probs(self.logits(model, context))
        return self._probs[key]

    def p(self, context):
        return self._processed(self.pair.target, context)

    def q(self, context):
        return self._processed(self.pair.draft, context)


# (family, static_cache, matmul): the lean static-cache Llama forward on every matmul backend,
# Hugging Face's Llama forward, and GPT-2 (Hugging Face's forward)
RUNNER_CASES = [
    ("llama", True, "numba"),
    ("llama", True, "numpy"),
    ("llama", True, "torch"),
    ("llama", False, "auto"),
    ("gpt2", True, "auto"),
]


def decoded_steps(dec, steps: int, seed: int = 0):
    """Run ``steps`` decoder steps after PROMPT (fresh caches, numpy seed ``seed``; the caller
    holds ``torch.inference_mode``); yields, per step, the committed tokens before it, its
    drafted tree and its emitted tokens (``dec.last_step`` holds the rest)."""
    rng = np.random.default_rng(seed)
    seq, stats = list(PROMPT), DecodeStats(depth=dec.tree.depth)
    dec.target.reset(40)
    dec.draft.reset(40)
    for _ in range(steps):
        emitted = dec.step(seq, rng, stats)
        yield list(seq), dec.last_step.drafted, emitted
        seq += emitted


def assert_draft_probs(tree, drafted, context, q_of) -> None:
    """Every q the drafted tree's children were drawn from equals ``q_of(context + path)``."""
    for node, q in drafted.draft_probs.items():
        path = path_tokens(tree, drafted, node)
        np.testing.assert_allclose(as_support(q).dense(), q_of(context + path), atol=LOGIT_TOL, rtol=0)


def path_tokens(tree, drafted, node):
    path = []
    while node >= 0:
        path.append(int(drafted.tokens[node]))
        node = int(tree.parents[node])
    return path[::-1]


def drafted_trees(tree, book, q_of, context):
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
        q = q_of(context + path_tokens(tree, DraftedSlots(tokens, valid, {}, {}), node))
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


def step_law(tree, book, oracle, context, decoder=None):
    """Exact law of the tokens one engine step emits after ``context`` (with ``decoder``: its
    sequence-level rule, on the same drafted trees)."""
    from mdsd.sequence import tree_emission_law

    law = {}
    for drafted, prob in drafted_trees(tree, book, oracle.q, context):

        def target_probs(node, drafted=drafted):
            return oracle.p(context + path_tokens(tree, drafted, node))

        if decoder is not None and decoder.sequence_method is not None:
            sequence_tree, _ = decoder.sequence_tree(drafted, target_probs)
            emitted_law = tree_emission_law(sequence_tree, decoder.sequence_method)
        else:
            emitted_law = emission_law(tree, drafted, target_probs)
        for emitted, pr in emitted_law.items():
            law[emitted] = law.get(emitted, 0.0) + prob * pr
    return law


def first_tokens_law(tree, book, oracle, context, k, decoder=None):
    """Exact law of the first k generated tokens (steps chained through the engine's rules)."""
    out = {}
    for emitted, prob in step_law(tree, book, oracle, context, decoder).items():
        if len(emitted) >= k:
            key = emitted[:k]
            out[key] = out.get(key, 0.0) + prob
        else:
            rest = first_tokens_law(tree, book, oracle, context + list(emitted), k - len(emitted), decoder)
            for tail, pr in rest.items():
                key = emitted + tail
                out[key] = out.get(key, 0.0) + prob * pr
    return out


def autoregressive_law(oracle, context, k):
    if k == 0:
        return {(): 1.0}
    out = {}
    p = oracle.p(context)
    for y in np.flatnonzero(p > 0):
        for tail, pr in autoregressive_law(oracle, context + [int(y)], k - 1).items():
            out[(int(y),) + tail] = p[y] * pr
    return out


def assert_same_law(got, want, tol):
    keys = set(got) | set(want)
    worst = max(abs(got.get(k, 0.0) - want.get(k, 0.0)) for k in keys)
    assert worst < tol, f"laws differ by {worst:.3g}"


def g_test_pvalue_of(counts: dict, law: dict) -> float:
    """G-test p-value of sampled sequences ``counts`` {sequence: count} against the exact law
    {sequence: probability} (``conftest.g_test_pvalue``: a threshold t is a false-positive rate t)."""
    assert set(counts) <= {k for k, v in law.items() if v > 0}, "impossible sequence sampled"
    support = [k for k, v in law.items() if v > 0]
    return g_test_pvalue([counts.get(k, 0) for k in support], [law[k] for k in support])


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
