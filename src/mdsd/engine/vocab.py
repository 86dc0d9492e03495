"""A draft output layer over part of the vocabulary (frequency-ranked drafting).

A small draft model spends most of its time in its output layer: the bundled draft's layer
[8192 x 256] holds 2.1M of its 3.0M weights. FR-Spec (Zhao et al., "FR-Spec: Accelerating
Large-Vocabulary Language Models via Frequency-Ranked Speculative Sampling", arXiv 2502.14856)
computes the draft's logits for the K most frequent tokens only. The draft's distribution
becomes

    q_S(x) = softmax(l_S / T)(x)   for x in S,      q_S(x) = 0 otherwise,

the sampling transform applied to the draft's logits with every token outside S at -inf.
Speculative decoding is exact for *any* draft distribution that the verifier is given, so
decoding with q_S keeps the target's law exactly; it only lowers the acceptance by the mass q
puts outside S (docs/engine.md, "Draft vocabulary").

``draft_vocabulary`` ranks tokens by the draft's own mean probability over text it samples
from its start token: no corpus is needed and the ranking is a function of the model and the
seed only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mdsd.engine.runner import cache_keyword
from mdsd.sampling import categorical

SAMPLE_SEQUENCES = 64  # sequences sampled from the draft to rank its vocabulary
SAMPLE_LENGTH = 128  # tokens per sequence


@dataclass(frozen=True)
class DraftVocabulary:
    """The tokens a draft output layer keeps.

    token_ids: [K] int64 ascending ids.
    vocab:     V, the full vocabulary size.
    coverage:  mean draft probability (temperature 1) of the kept tokens over the positions
               they were ranked on (nan for a given id list).
    """

    token_ids: np.ndarray
    vocab: int
    coverage: float = float("nan")

    @property
    def size(self) -> int:
        return int(self.token_ids.size)


def draft_vocabulary(
    draft_model,
    size: int,
    *,
    sequences: int = SAMPLE_SEQUENCES,
    length: int = SAMPLE_LENGTH,
    seed: int = 0,
) -> DraftVocabulary:
    """The ``size`` tokens of highest mean draft probability over text sampled from the draft.

    From the model's start token (``bos_token_id``, else ``eos_token_id``), ``sequences``
    sequences of ``length`` tokens are drawn at temperature 1 (numpy Generator ``seed``); the
    draft's probabilities at every position are averaged in float64 and the ``size`` largest
    kept (ties: lower id).
    """
    vocab = int(draft_model.config.vocab_size)
    _check_size(size, vocab)
    start = _start_token(draft_model.config)
    if start is None:
        raise ValueError(
            "draft_vocab: the draft model has neither a bos_token_id nor an eos_token_id to sample "
            "from; pass the token ids to keep"
        )
    rng = np.random.default_rng(seed)
    mean = np.zeros(vocab)
    from transformers import DynamicCache

    device = draft_model.device
    ids = torch.full((sequences, 1), int(start), dtype=torch.long, device=device)
    cache = {cache_keyword(draft_model): DynamicCache(config=draft_model.config)}  # grows in place
    with torch.inference_mode():
        for _ in range(length):
            out = draft_model(input_ids=ids, use_cache=True, **cache)
            probs = torch.softmax(out.logits[:, -1].double(), dim=-1).cpu().numpy()  # [sequences, V]
            mean += probs.sum(axis=0)
            ids = torch.as_tensor(categorical(probs, rng), device=device)[:, None]
    mean /= sequences * length
    kept = np.sort(np.argsort(-mean, kind="stable")[:size])
    return DraftVocabulary(kept.astype(np.int64), vocab, float(mean[kept].sum()))


def as_draft_vocabulary(draft_vocab, draft_model) -> DraftVocabulary | None:
    """``TreeDecoder``'s ``draft_vocab`` argument: None (the whole vocabulary), a size K
    (``draft_vocabulary``) or the token ids to keep."""
    if draft_vocab is None or isinstance(draft_vocab, DraftVocabulary):
        return draft_vocab
    vocab = int(draft_model.config.vocab_size)
    if np.ndim(draft_vocab) == 0:
        if isinstance(draft_vocab, bool) or int(draft_vocab) != draft_vocab:
            raise ValueError(f"draft_vocab must be an integer size or token ids, got {draft_vocab!r}")
        _check_size(int(draft_vocab), vocab)
        if int(draft_vocab) == vocab:
            return None
        return draft_vocabulary(draft_model, int(draft_vocab))
    ids = np.asarray(draft_vocab)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError("draft_vocab must be a non-empty 1-D array of integer token ids")
    if ids.min() < 0 or ids.max() >= vocab or np.unique(ids).size != ids.size:
        raise ValueError(f"draft_vocab token ids must be distinct and in [0, {vocab})")
    return DraftVocabulary(np.sort(ids).astype(np.int64), vocab)


def _start_token(config) -> int | None:
    """The token text starts after: the model's BOS, else its EOS (the separator between the
    documents of most pretraining corpora); the first of a list."""
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(config, name, None)
        if isinstance(token, list | tuple):
            token = token[0] if token else None
        if token is not None:
            return int(token)
    return None


def _check_size(size: int, vocab: int) -> None:
    if isinstance(size, bool) or int(size) != size or not 1 <= size <= vocab:
        raise ValueError(f"draft_vocab must be an integer in [1, {vocab}] (the vocabulary), got {size!r}")
