"""Decoder-level audit: does a whole speculative decoder sample the target's law?

The audit builds a tiny random Hugging Face Llama target and a draft (a perturbed copy, so the
two agree often), runs ``generate_fn(target_model, draft_model, input_ids, max_new_tokens,
temperature, seed) -> list[int]`` many times for k = 2 or 3 new tokens, and G-tests the law of the
k-token continuations against the target's exact law, computed by batched forwards over every
continuation: p(s) = prod_i p(s_i | prompt, s_<i) with the same temperature transform
(``mdsd.logits.process_logits``). Each run gets its own integer seed (derived from ``seed``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from mdsd.logits import process_logits
from mdsd.testing._calls import FnError, as_token, describe_call_error
from mdsd.testing.result import CaseRow, WorstCase
from mdsd.testing.stats import law_test
from mdsd.testing.token import DEFAULT_ALPHA, finish

DEFAULT_DECODER_VOCAB = 8
DEFAULT_RUNS = 1500
DEFAULT_PROMPT = (3, 5, 2)
WEIGHT_STD = 0.12  # std of the random weight matrices (sharper than the default init)
DRAFT_NOISE = 0.5  # the draft's weights = target's + this x their std x N(0, 1)


def tiny_llama_pair(vocab: int = DEFAULT_DECODER_VOCAB, seed: int = 0):
    """(target, draft): random ``LlamaForCausalLM`` models in eval mode, float32, on the CPU.

    Weights come from a ``torch.Generator`` seeded by ``seed`` (no global seed is touched): the
    target has 2 layers of width 32; the draft is the target with every weight matrix perturbed.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    gen = torch.Generator().manual_seed(int(seed))
    target, draft = LlamaForCausalLM(config), LlamaForCausalLM(config)
    with torch.no_grad():
        for (_, t_param), (_, d_param) in zip(
            sorted(target.named_parameters()), sorted(draft.named_parameters())
        ):
            if t_param.dim() > 1:
                t_param.copy_(torch.randn(t_param.shape, generator=gen) * WEIGHT_STD)
                noise = torch.randn(t_param.shape, generator=gen) * WEIGHT_STD * DRAFT_NOISE
                d_param.copy_(t_param + noise)
            else:
                d_param.copy_(t_param)
    return target.eval(), draft.eval()


def exact_continuation_law(target, prompt: Sequence[int], k: int, temperature: float):
    """Every k-token continuation s and p(s | prompt): (sequences, probs [V^k]).

    One batched forward per length d = 0..k-1 over all V^d contexts of that length.
    """
    import torch

    vocab = int(target.config.vocab_size)
    cond = {}
    with torch.inference_mode():
        for length in range(k):
            prefixes = list(itertools.product(range(vocab), repeat=length))
            ids = torch.tensor([list(prompt) + list(c) for c in prefixes], dtype=torch.long)
            logits = target(input_ids=ids).logits[:, -1].double().numpy()
            probs = process_logits(logits, temperature)
            cond.update({c: probs[i] for i, c in enumerate(prefixes)})
    seqs = list(itertools.product(range(vocab), repeat=k))
    law = np.array([np.prod([cond[s[:i]][s[i]] for i in range(k)]) for s in seqs])
    return seqs, law


def audit_decoder(
    generate_fn: Callable,
    *,
    max_new_tokens: int = 2,
    runs: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    vocab: int = DEFAULT_DECODER_VOCAB,
    prompt: Sequence[int] = DEFAULT_PROMPT,
    alpha: float = DEFAULT_ALPHA,
    name: str | None = None,
):
    """Audit a whole decoder for losslessness on a tiny random Llama pair.

    Args:
        generate_fn: ``generate_fn(target_model, draft_model, input_ids [1, L] torch.long,
            max_new_tokens, temperature, seed: int) -> list[int]``, the *new* tokens only,
            exactly ``max_new_tokens`` of them (EOS must not stop it; the models have none).
        max_new_tokens: k = 1..3 (the test has vocab^k cells).
        runs: generations (default 1500).
        temperature: > 0, the sampling temperature both models' logits are divided by.
        seed: seeds the models' weights and every run's seed.
        vocab, prompt: the tiny models' vocabulary and the prompt's token ids.

    Returns an :class:`AuditResult` with one case ("tiny_llama").
    """
    if not callable(generate_fn):
        raise ValueError(f"generate_fn must be callable, got {type(generate_fn).__name__}")
    if int(max_new_tokens) != max_new_tokens or not 1 <= max_new_tokens <= 3:
        raise ValueError(f"max_new_tokens must be 1, 2 or 3, got {max_new_tokens!r}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    runs = DEFAULT_RUNS if runs is None else int(runs)
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    prompt = [int(t) for t in prompt]
    if not prompt or min(prompt) < 0 or max(prompt) >= vocab:
        raise ValueError(f"prompt must be non-empty token ids in [0, {vocab}), got {prompt!r}")
    import torch

    target, draft = tiny_llama_pair(vocab, seed)
    seqs, law = exact_continuation_law(target, prompt, max_new_tokens, temperature)
    cell = {s: i for i, s in enumerate(seqs)}
    counts = np.zeros(len(seqs))
    run_seeds = np.random.SeedSequence([int(seed), 1]).generate_state(runs, dtype=np.uint32)
    where = f"(V = {vocab}, prompt {prompt}, temperature {temperature:g})"
    error = None
    label = name or f"{getattr(generate_fn, '__module__', '')}:{getattr(generate_fn, '__qualname__', '?')}"
    try:
        for run_seed in run_seeds:
            ids = torch.tensor([prompt], dtype=torch.long)
            out = _call(generate_fn, target, draft, ids, max_new_tokens, temperature, int(run_seed), where)
            counts[cell[tuple(out)]] += 1
    except FnError as err:
        error = str(err)
    if error:
        return finish("decoder", label, None, None, seed, [], alpha, error)
    fit = law_test(counts, law, np.random.default_rng([int(seed), 2]))
    row = CaseRow("tiny_llama", vocab, runs, fit.pvalue, fit.tv, fit.tv_low, fit.tv_high, fit.impossible)
    worst = WorstCase(
        kind="decoder",
        name="tiny_llama",
        law=None,
        n=None,
        trials=runs,
        case_seed=(int(seed),),
        target_probs=np.zeros(0),
        draft_probs=np.zeros(0),
        labels=tuple("-".join(map(str, s)) for s in seqs),
        observed=counts / runs,
        expected=law,
        law_pvalue=fit.pvalue,
        tv=fit.tv,
        details={"prompt": prompt, "temperature": temperature, "max_new_tokens": max_new_tokens},
    )
    return finish("decoder", label, None, None, seed, [(row, worst)], alpha, None)


def _call(generate_fn, target, draft, ids, k, temperature, run_seed, where) -> list[int]:
    try:
        value = generate_fn(target, draft, ids, k, temperature, run_seed)
    except Exception as err:  # noqa: BLE001 -- generate_fn is user code
        raise FnError(f"generate_fn raised {describe_call_error(err)} {where}") from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise FnError(f"generate_fn returned {type(value).__name__} {where}; expected a list of token ids")
    if len(value) != k:
        hint = " (return only the new tokens, not the prompt)" if len(value) == k + ids.shape[1] else ""
        raise FnError(f"generate_fn returned {len(value)} tokens {where}; expected {k}{hint}")
    vocab = int(target.config.vocab_size)
    return [as_token(v, vocab, where) for v in value]


# ---------------------------------------------------------------------------- adapters
class _IdTokenizer:
    """The engine needs a tokenizer only to decode text and look up EOS: ids as words, no EOS."""

    eos_token_id = None

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)


def engine_generate_fn(tree="2,1", law: str | None = None, verifier: str | None = None) -> Callable:
    """mdsd's tree decoder (``mdsd.engine.TreeDecoder``) with the audit's calling convention.

    ``tree``, ``law`` and ``verifier`` as in ``TreeConfig.make``. Decoders are built once per
    (models, max_new_tokens, temperature) and reused.
    """
    from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder
    from mdsd.models import ModelPair

    config = TreeConfig.make(tree, law, verifier)
    decoders: dict = {}

    def generate(target_model, draft_model, input_ids, max_new_tokens, temperature, seed) -> list[int]:
        key = (id(target_model), id(draft_model), int(max_new_tokens), float(temperature))
        if key not in decoders:
            pair = ModelPair(target_model, draft_model, _IdTokenizer(), "audit")
            sampling = SamplingConfig(temperature, max_new_tokens=int(max_new_tokens), stop_on_eos=False)
            decoders[key] = TreeDecoder(pair, config, sampling)
        prompt = [int(t) for t in np.asarray(input_ids).reshape(-1)]
        out = decoders[key].generate_one(prompt, np.random.default_rng(seed))
        return list(out.token_ids)

    generate.__module__ = "mdsd.engine"
    generate.__qualname__ = f"TreeDecoder[{config.describe()}]"
    return generate


def naive_generate_fn(token_verifier: Callable, law: str = "iid", n: int = 2) -> Callable:
    """A plain speculative decoder around any token-level verifier (no cache, one level).

    Each step: q and p from full forwards on the context (same temperature), n drafts from
    ``law``, one token y = token_verifier(p, q, drafts, rng) appended. Lossless exactly when the
    token verifier is; used to show what the decoder audit catches.
    """
    from mdsd.laws import get_law

    the_law = get_law(law)

    def generate(target_model, draft_model, input_ids, max_new_tokens, temperature, seed) -> list[int]:
        import torch

        rng = np.random.default_rng(seed)
        context = [int(t) for t in np.asarray(input_ids).reshape(-1)]
        out = []
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                ids = torch.tensor([context + out])
                p = process_logits(target_model(input_ids=ids).logits[0, -1].double().numpy(), temperature)
                q = process_logits(draft_model(input_ids=ids).logits[0, -1].double().numpy(), temperature)
                drafts = the_law.sample(q, n, rng)
                out.append(int(token_verifier(p, q, drafts, rng)))
        return out

    generate.__qualname__ = f"naive_generate_fn({getattr(token_verifier, '__qualname__', 'fn')})"
    return generate


__all__ = [
    "audit_decoder",
    "engine_generate_fn",
    "exact_continuation_law",
    "naive_generate_fn",
    "tiny_llama_pair",
]
