"""mdsd.engine.runner and static_llama: tree-forward logits and the KV caches after accepted paths
equal plain forwards (Hugging Face and the lean static-cache Llama, both matmul backends); model
checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder
from mdsd.engine.decode import Autoregressive
from mdsd.engine.records import DecodeStats
from mdsd.engine.walk import as_support
from mdsd.models import ModelPair

from .helpers import LOGIT_TOL, PROMPT, VOCAB, Oracle, path_tokens


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
                path = path_tokens(tree, drafted, node)
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


def test_rotary_table_equals_the_models_rotary_module(llama):
    """The lean forward's cos / sin lookup holds the module's numbers bit for bit."""
    from mdsd.engine.static_llama import StaticLlamaRunner

    runner = StaticLlamaRunner(llama.target)
    runner.reset(40)
    positions = torch.tensor([[0, 5, 17, 39]])
    with torch.inference_mode():
        cos, sin = runner._rotary(torch.zeros(1), positions)  # [1, 4, d]
    table_cos, table_sin = runner._rotary_table
    assert torch.equal(table_cos[positions[0], 0], cos[0])
    assert torch.equal(table_sin[positions[0], 0], sin[0])


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
