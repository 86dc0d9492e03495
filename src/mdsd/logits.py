"""From logits to the probabilities the bound and the verifiers use.

The target's p and the draft's q must go through the *same* sampling transform, and q must be the
law the drafts were actually drawn from (a classic engine bug verifies against the raw q while
drafting from a top-k q). ``process_logits`` is that transform; ``probs_from_logits`` applies it to
both models at once.

Transform, in order (as in Hugging Face's samplers):
1. temperature T: logits / T; T = 0 means greedy: a one-hot on the argmax (ties: lowest index);
2. top-k: keep the k largest logits of each row (ties at the boundary: lower index wins);
3. top-p: keep the smallest prefix of the tokens sorted by probability whose mass reaches top_p
   (at least one token);
4. softmax in float64 over the kept tokens; dropped tokens get probability exactly 0.
"""

from __future__ import annotations

import numpy as np

from mdsd._validate import _to_numpy


def process_logits(
    logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """Sampling probabilities (float64, [..., V]) from logits [..., V]; see the module docstring.

    >>> process_logits([0.0, 0.0, 10.0], temperature=0).tolist()
    [0.0, 0.0, 1.0]
    """
    z = np.array(_to_numpy(logits), dtype=np.float64)
    if z.ndim == 0 or z.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary axis, got shape {z.shape}")
    if np.any(np.isnan(z)) or np.any(z == np.inf):
        raise ValueError("logits contain NaN or +inf")
    if np.any(np.all(z == -np.inf, axis=-1)):
        raise ValueError("logits has a row where every entry is -inf (no token is possible)")
    if temperature is None or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")

    if temperature == 0:
        out = np.zeros_like(z)
        np.put_along_axis(out, np.argmax(z, axis=-1)[..., None], 1.0, axis=-1)
        return out
    z = z / temperature
    vocab = z.shape[-1]
    if top_k is not None and top_k < vocab:
        order = np.argsort(-z, axis=-1, kind="stable")
        drop = order[..., int(top_k) :]
        np.put_along_axis(z, drop, -np.inf, axis=-1)
    probs = _softmax(z)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = mass_before < top_p  # the first token is always kept
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        z = np.where(keep, z, -np.inf)
        probs = _softmax(z)
    return probs


def _softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(shifted)  # exp(-inf) = 0 exactly
    return e / e.sum(axis=-1, keepdims=True)


def probs_from_logits(
    target_logits,
    draft_logits,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
):
    """(p, q) from target and draft logits with the identical transform (float64).

    Each model's distribution is truncated by its own top-k / top-p set, as each is sampled from.
    """
    target_logits, draft_logits = _to_numpy(target_logits), _to_numpy(draft_logits)
    if np.shape(target_logits) != np.shape(draft_logits):
        raise ValueError(
            f"target_logits and draft_logits must have the same shape (same vocabulary), got "
            f"{np.shape(target_logits)} and {np.shape(draft_logits)}"
        )
    return (
        process_logits(target_logits, temperature, top_k, top_p),
        process_logits(draft_logits, temperature, top_k, top_p),
    )
