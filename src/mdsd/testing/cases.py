"""The (p, q) pairs a token-level audit verifies on: LM-like random pairs and edge cases.

Every family is built for each vocabulary size V from a generator seeded by (seed, V), so an
audit depends on its arguments and seed only. LM-like logits follow ``mdsd.io.random_pair``:
target logits z ~ N(0, s^2), draft logits z + N(0, (s/2)^2). The edge cases are the places
where verifiers break in practice: zeros in p or q (top-k / top-p truncation), p = q, one-hot
q (temperature 0 drafting), one-hot p, disjoint supports, a target mass just above common
shortcut thresholds (1 - 9e-4) and at 1 - 1e-6, ties, and a peaked q whose mode p lacks (many
repeated i.i.d. drafts, all to be rejected).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEAR_ONE_GAPS = (9e-4, 1e-6)  # 1 - p(top) of the near-deterministic cases
NEAR_ONE_WEIGHT = 5  # trials multiplier where the deviation to find is ~1e-3 of mass


@dataclass(frozen=True)
class TokenCase:
    """One position to audit: p, q ([V] float64), and a trials multiplier (``weight``)."""

    name: str
    target_probs: np.ndarray
    draft_probs: np.ndarray
    weight: int = 1

    @property
    def vocab(self) -> int:
        return int(self.target_probs.size)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / x.sum()


def _lm_like(rng: np.random.Generator, vocab: int, spread: float = 3.0):
    target_logits = spread * rng.standard_normal(vocab)
    draft_logits = target_logits + 0.5 * spread * rng.standard_normal(vocab)
    return _softmax(target_logits), _softmax(draft_logits)


def _zero_out(probs: np.ndarray, tokens) -> np.ndarray:
    out = probs.copy()
    out[np.asarray(tokens, dtype=np.int64)] = 0.0
    return _normalised(out)


def _top_k(probs: np.ndarray, k: int) -> np.ndarray:
    keep = np.argsort(-probs, kind="stable")[:k]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return _normalised(out)


def _near_one(rng: np.random.Generator, vocab: int, gap: float):
    """p(top) = 1 - gap, q(top) = 0.6 at the same token; the rest LM-like."""
    p_rest, q_rest = _lm_like(rng, vocab - 1)
    top = int(rng.integers(vocab))
    p = np.insert(p_rest * gap, top, 1.0 - gap)
    q = np.insert(q_rest * 0.4, top, 0.6)
    return p, q


def token_cases(vocab: int, seed: int) -> list[TokenCase]:
    """The audit's pairs for one vocabulary size (V >= 2), in a fixed order."""
    rng = np.random.default_rng([seed, vocab])
    cases = []

    def add(name, p, q, weight=1):
        cases.append(TokenCase(name, np.asarray(p, np.float64), np.asarray(q, np.float64), weight))

    add("lm_like", *_lm_like(rng, vocab))
    add("lm_like_flat", *_lm_like(rng, vocab, spread=1.0))
    add("dirichlet", rng.dirichlet(np.full(vocab, 0.7)), rng.dirichlet(np.full(vocab, 0.7)))
    third = max(1, vocab // 3)
    p, q = _lm_like(rng, vocab)
    q_mode = int(np.argmax(q))
    others = rng.permutation(np.delete(np.arange(vocab), q_mode))[: third - 1]
    add("zeros_in_p", _zero_out(p, np.append(others, q_mode)), q)
    p, q = _lm_like(rng, vocab)
    p_mode = int(np.argmax(p))
    others = rng.permutation(np.delete(np.arange(vocab), p_mode))[: third - 1]
    add("zeros_in_q", p, _zero_out(q, np.append(others, p_mode)))
    p, _ = _lm_like(rng, vocab)
    add("p_equals_q", p, p.copy())
    p, _ = _lm_like(rng, vocab, spread=1.0)
    add("one_hot_q", p, np.eye(vocab)[int(rng.integers(vocab))])
    _, q = _lm_like(rng, vocab, spread=1.0)
    add("one_hot_p", np.eye(vocab)[int(rng.integers(vocab))], q)
    order = rng.permutation(vocab)
    half = max(1, vocab // 2)
    p, q = np.zeros(vocab), np.zeros(vocab)
    p[order[:half]] = rng.dirichlet(np.ones(half))
    q[order[half:]] = rng.dirichlet(np.ones(vocab - half))
    add("disjoint", p, q)
    for gap in NEAR_ONE_GAPS:
        weight = NEAR_ONE_WEIGHT if gap > 1e-4 else 1  # at 1e-6 only robustness is testable
        add(f"near_one_{gap:g}", *_near_one(rng, vocab, gap), weight=weight)
    ties = np.full(vocab, 1.0 / vocab)
    q = np.full(vocab, 0.5 / max(vocab - 2, 1))
    q[:2] = 0.25 if vocab > 2 else 0.5
    add("ties", ties, _normalised(q))
    p, _ = _lm_like(rng, vocab, spread=1.0)
    q = np.full(vocab, 0.2 / max(vocab - 1, 1))
    mode = int(rng.integers(vocab))
    q[mode] = 0.8 if vocab > 1 else 1.0
    add("peaked_q_repeats", _zero_out(p, [mode]) if vocab > 2 else p, _normalised(q))
    if vocab >= 20:
        p, q = _lm_like(rng, vocab)
        add("top_k_truncated", _top_k(p, vocab // 10), _top_k(q, vocab // 5))
    return cases


def all_token_cases(vocab_sizes, seed: int) -> list[TokenCase]:
    return [case for vocab in vocab_sizes for case in token_cases(int(vocab), seed)]
