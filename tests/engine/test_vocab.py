"""mdsd.engine.vocab: a draft output layer over part of the vocabulary.

The transform of the kept logits equals the full transform with every other logit at -inf; the
restricted output layers (lean runner, every matmul backend, and Hugging Face's) give the kept
columns of the full logits; the ranking follows its definition (recomputed without a KV cache);
the decoder's q is the restricted law and its output keeps the target's law (exact by
enumeration, and sampled: G-test, false-positive rate 1e-4); bad sizes and ids are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder, build_tree
from mdsd.engine.decode import Autoregressive
from mdsd.engine.vocab import DraftVocabulary, as_draft_vocabulary, draft_vocabulary
from mdsd.engine.walk import RuleBook
from mdsd.logits import process_logits
from mdsd.sampling import categorical

from .helpers import (
    G_TEST_ALPHA,
    LAW_TOL,
    PROMPT,
    RUNNER_CASES,
    TOP_K,
    VOCAB,
    Oracle,
    assert_draft_probs,
    assert_same_law,
    autoregressive_law,
    decoded_steps,
    first_tokens_law,
    g_test_pvalue_of,
)

KEPT = np.array([2, 3, 5, 7, 8, 11])  # the draft vocabulary of the law tests (6 of 12 tokens)


def _outside_at_minus_inf(logits: np.ndarray, kept: np.ndarray) -> np.ndarray:
    full = np.full(logits.shape[:-1] + (VOCAB,), -np.inf)
    full[..., kept] = logits[..., kept]
    return full


class RestrictedOracle(Oracle):
    """The oracle of ``helpers`` with q from the draft's logits outside ``kept`` set to -inf."""

    def __init__(self, pair, sampling, kept):
        super().__init__(pair, sampling)
        self.kept = kept

    def q(self, context):
        key = ("restricted", tuple(context))
        if key not in self._probs:
            logits = self.logits(self.pair.draft, context)
            self._probs[key] = self.sampling.probs(_outside_at_minus_inf(logits, self.kept))
        return self._probs[key]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("top_k,top_p", [(None, None), (2, None), (50, None), (None, 0.8), (3, 0.9)])
def test_row_probs_on_kept_tokens_equals_the_full_transform(temperature, top_k, top_p):
    rng = np.random.default_rng(7)
    sampling = SamplingConfig(temperature, top_k, top_p)
    for trial in range(20):
        logits = rng.normal(scale=4.0, size=VOCAB)
        if trial % 4 == 1:
            logits[KEPT[1]] = -np.inf  # a kept token the model rules out
        if trial % 4 == 2:
            logits[KEPT[2]] = logits[KEPT[0]]  # a tie
        if trial % 4 == 3:
            logits[KEPT[3]] = logits[KEPT[0]] - 800.0  # mass that underflows to 0
        got = sampling.row_probs(logits[KEPT].astype(np.float32), KEPT, VOCAB)
        want = process_logits(
            _outside_at_minus_inf(logits.astype(np.float32), KEPT), temperature, top_k, top_p
        )
        assert got.vocab == VOCAB
        np.testing.assert_allclose(got.dense(), want, atol=1e-15, rtol=1e-12)
        assert got.indices is not None and np.all(np.diff(got.indices) > 0) and np.all(got.values > 0)


@pytest.mark.parametrize("family,static_cache,matmul", RUNNER_CASES)
def test_restricted_output_layer_gives_the_kept_columns(request, family, static_cache, matmul):
    pair = request.getfixturevalue(family)
    dec = TreeDecoder(
        pair,
        TreeConfig.make("2x1", "iid", "rrs"),
        SamplingConfig(1.0),
        static_cache=static_cache,
        matmul=matmul,
    )
    runner = dec.draft
    with torch.inference_mode():
        runner.reset(16)
        hidden = runner.causal_hidden(np.asarray(PROMPT), keep=2)
        full = runner.logits(hidden)
        runner.restrict_output(KEPT)
        kept = runner.logits(hidden)
        runner.restrict_output(None)
        again = runner.logits(hidden)
    assert kept.shape == (2, KEPT.size)
    np.testing.assert_allclose(kept, full[:, KEPT], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(again, full)


def test_draft_vocabulary_follows_its_definition(llama):
    """The cached, batched ranking equals a recomputation by full forwards of each prefix."""
    got = draft_vocabulary(llama.draft, 5, sequences=4, length=6, seed=3)
    again = draft_vocabulary(llama.draft, 5, sequences=4, length=6, seed=3)
    np.testing.assert_array_equal(got.token_ids, again.token_ids)
    rng = np.random.default_rng(3)
    seqs = np.full((4, 1), llama.draft.config.bos_token_id)
    mean = np.zeros(VOCAB)
    with torch.inference_mode():
        for _ in range(6):
            logits = llama.draft(input_ids=torch.as_tensor(seqs)).logits[:, -1].double()
            probs = torch.softmax(logits, dim=-1).numpy()
            mean += probs.sum(axis=0)
            seqs = np.concatenate([seqs, categorical(probs, rng)[:, None]], axis=1)
    mean /= 24
    want = np.sort(np.argsort(-mean, kind="stable")[:5])
    np.testing.assert_array_equal(got.token_ids, want)
    assert got.vocab == VOCAB and got.size == 5
    assert got.coverage == pytest.approx(mean[want].sum(), rel=1e-6)  # float32 logits, cached or not
    # the kept tokens carry the largest mean probabilities
    assert mean[want].min() >= np.delete(mean, want).max() - 1e-12


def test_decoder_drafts_from_the_restricted_law(llama):
    sampling = SamplingConfig(1.0, top_k=TOP_K)
    config = TreeConfig.make((2, 1), "iid", "rrs")
    dec = TreeDecoder(llama, config, sampling)
    dec.use_draft_vocabulary(DraftVocabulary(KEPT, VOCAB))
    oracle = RestrictedOracle(llama, sampling, KEPT)
    with torch.inference_mode():
        for seq, drafted, _ in decoded_steps(dec, 4):
            assert set(drafted.tokens[drafted.valid].tolist()) <= set(KEPT.tolist())
            assert_draft_probs(dec.tree, drafted, seq, oracle.q)


@pytest.mark.parametrize(
    "law,verifier", [("iid", "rrs"), ("without_replacement", "rrs_without_replacement"), ("iid", "optimal")]
)
def test_first_two_tokens_follow_target_law_with_a_draft_vocabulary(llama, law, verifier):
    """Exact by enumeration: q over 6 of 12 tokens, the output law is still the target's."""
    sampling = SamplingConfig(1.0, top_k=TOP_K)
    oracle = RestrictedOracle(llama, sampling, KEPT)
    want = autoregressive_law(oracle, PROMPT, 2)
    for widths in [(2, 1), (3,)]:
        got = first_tokens_law(build_tree(widths), RuleBook(law, verifier, widths), oracle, PROMPT, 2)
        assert_same_law(got, want, LAW_TOL)


def test_engine_samples_follow_target_law_with_a_draft_vocabulary(llama):
    """End to end, the draft over 6 of 12 tokens: first two tokens, G-test (false-positive rate
    1e-4)."""
    sampling = SamplingConfig(1.0, top_k=TOP_K, max_new_tokens=2, stop_on_eos=False)
    dec = TreeDecoder(
        llama, TreeConfig.make((2, 1), "without_replacement", "rrs_without_replacement"), sampling
    )
    dec.use_draft_vocabulary(DraftVocabulary(KEPT, VOCAB))
    counts = {}
    for r in dec.generate([PROMPT] * 1200, seed=4321):
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    want = autoregressive_law(Oracle(llama, sampling), PROMPT, 2)
    assert g_test_pvalue_of(counts, want) > G_TEST_ALPHA


def test_config_size_ranks_the_draft_vocabulary(llama):
    sampling = SamplingConfig(0.0, max_new_tokens=6, stop_on_eos=False)
    config = TreeConfig.make("1x2", "iid", "rrs", draft_vocab=8)
    assert config.describe() == "iid/rrs 1x2 vocab 8"
    dec = TreeDecoder(llama, config, sampling)
    want = draft_vocabulary(llama.draft, 8)
    np.testing.assert_array_equal(dec.draft.output_ids, want.token_ids)
    # greedy decoding is still the target's greedy continuation
    got = dec.generate([PROMPT], seed=0)[0].token_ids
    assert got == Autoregressive(llama, sampling).generate([PROMPT], seed=0)[0].token_ids
    # the whole vocabulary is no restriction
    assert (
        TreeDecoder(llama, TreeConfig.make("1x2", "iid", "rrs", draft_vocab=VOCAB), sampling).draft_vocab
        is None
    )


def test_bad_draft_vocabularies_are_refused(llama):
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="draft_vocab"):
            TreeConfig.make("1x2", "iid", "rrs", draft_vocab=bad)
    sampling = SamplingConfig(1.0)
    with pytest.raises(ValueError, match="draft_vocab"):
        TreeDecoder(llama, TreeConfig.make("1x2", "iid", "rrs", draft_vocab=VOCAB + 1), sampling)
    for ids in ([], [1, 1], [0, VOCAB], [-1, 2], [[1, 2]], [0.5, 1.0]):
        with pytest.raises(ValueError, match="draft_vocab"):
            as_draft_vocabulary(np.asarray(ids), llama.draft)
    dec = TreeDecoder(llama, TreeConfig.make("1x2", "iid", "rrs"), sampling)
    with pytest.raises(ValueError, match="draft_vocab"):
        dec.use_draft_vocabulary(DraftVocabulary(np.arange(3), VOCAB + 4))


def test_start_token_falls_back_to_eos(llama):
    """Without a BOS the ranking samples after the EOS (a document separator); with neither it
    refuses, naming draft_vocab."""
    import copy

    from mdsd.engine.vocab import _start_token

    model = copy.deepcopy(llama.draft)
    model.config.bos_token_id = None
    model.config.eos_token_id = [1, 2]
    assert _start_token(model.config) == 1
    assert draft_vocabulary(model, 4, sequences=2, length=3).size == 4
    model.config.eos_token_id = None
    with pytest.raises(ValueError, match="draft_vocab"):
        draft_vocabulary(model, 4)
