"""Deliberately WRONG verifiers, kept as test subjects for the audit (``mdsd audit``).

Each rule below is a plausible-looking simplification found in published speculative-decoding
code. None of them is lossless: the token they emit does not follow the target law p. They are
here so that ``mdsd.testing.audit_verifier`` can be shown (and tested) to catch them; never use
them to decode. Each comes in two forms:

* a sampler with the audit's calling convention, ``fn(target_probs [V], draft_probs [V],
  drafts [n], rng) -> int``, written the way such code is usually written (accept/reject loop);
* its conditional output law ``*_law(target_probs, draft_probs, drafts) -> [V]`` (the law of the
  emitted token given the drafts), from which the exact loss follows by enumerating draft tuples
  (``mdsd.laws.get_law(law).enumerate``); see ``docs/audit.md`` for the worked numbers.

The three faults:

``rrs_skip_repeats``   recursive rejection sampling (SpecInfer, arXiv:2305.09781) with i.i.d.
                       drafts that *skips* a draft equal to an earlier, already rejected one,
                       without updating the residual. The correct rule re-tests it against the
                       updated residual, where it is rejected for sure, and updates the residual
                       again. For p = (0.5, 0, 0.5), q = (0.4, 0.5, 0.1), n = 2 it emits token 0
                       with probability 0.55 instead of 0.5.
``spechub_hub_shortcut``  SpecHub (Sun et al., arXiv:2411.05289) with a "fast path" that accepts
                       the hub argmax q whenever p(hub) > 0.999: the emitted law is then one-hot
                       on the hub, off by 1 - p(hub) in total variation.
``sibling_same_residual``  sibling verification that tests each child with min(1, p/q) against
                       the *same* p and q (no residual update between siblings) and draws from
                       (p - q)+ when all fail. For p = (0.5, 0.3, 0.2), q = (0.2, 0.3, 0.5) it
                       emits (0, 0.6, 0.4) with the top-2 siblings and (0.35, 0.39, 0.26) with
                       two i.i.d. siblings.
"""

from __future__ import annotations

import numpy as np

from mdsd.sampling import categorical

HUB_SHORTCUT = 0.999  # the faulty fast path's threshold on p(hub)


def _positive_residual(target_probs: np.ndarray, draft_probs: np.ndarray) -> np.ndarray:
    """(p - q)+ normalised; p itself when p <= q everywhere (then p = q: the branch has no mass)."""
    diff = np.maximum(target_probs - draft_probs, 0.0)
    total = diff.sum()
    return diff / total if total > 0 else np.asarray(target_probs, dtype=np.float64)


# ------------------------------------------------------------------------- 1. rrs, skip repeats
def rrs_skip_repeats(target_probs, draft_probs, drafts, rng: np.random.Generator) -> int:
    """WRONG recursive rejection sampling: a repeated draft is skipped, the residual kept."""
    current = np.asarray(target_probs, dtype=np.float64)
    seen: set[int] = set()
    for x in (int(t) for t in drafts):
        if x in seen:
            continue  # the fault: the correct rule rejects it AND updates the residual again
        seen.add(x)
        if rng.random() < min(1.0, current[x] / draft_probs[x]):
            return x
        current = _positive_residual(current, draft_probs)
    return int(categorical(current, rng))


def rrs_skip_repeats_law(target_probs, draft_probs, drafts) -> np.ndarray:
    """Conditional output law of :func:`rrs_skip_repeats` given the drafts, [V]."""
    current = np.asarray(target_probs, dtype=np.float64)
    out, reach, seen = np.zeros_like(current), 1.0, set()
    for x in (int(t) for t in drafts):
        if x in seen:
            continue
        seen.add(x)
        accept = min(1.0, current[x] / draft_probs[x])
        out[x] += reach * accept
        reach *= 1.0 - accept
        current = _positive_residual(current, draft_probs)
    return out + reach * current


# ------------------------------------------------------------------------- 2. spechub shortcut
def _ratio(num: float, den: float) -> float:
    """min(1, num / den); 1 where den = 0 (that branch has no mass)."""
    return 1.0 if den <= 0 else min(1.0, num / den)


def spechub_hub_shortcut(
    target_probs, draft_probs, drafts, rng: np.random.Generator, *, threshold: float = HUB_SHORTCUT
) -> int:
    """WRONG SpecHub: accept the hub outright when p(hub) > threshold, else the exact SpecHub.

    The exact part is SpecHub's accept/reject procedure for the draft pair (hub a = argmax q),
    written out as such code usually is; ``threshold=1.0`` turns the shortcut off (then exact).
    """
    p, q = np.asarray(target_probs, np.float64), np.asarray(draft_probs, np.float64)
    hub = int(np.argmax(q))
    if p[hub] > threshold:
        return hub  # the fault: the other tokens' 1 - p(hub) of mass is never emitted
    other = int(drafts[1]) if int(drafts[0]) == hub else int(drafts[0])
    rest = np.ones(p.size, dtype=bool)
    rest[hub] = False
    pair = np.where(rest, q[hub] * q / q[rest].sum(), 0.0)  # Q(a, i), 1 - q_a summed
    p1 = np.where(rest, np.maximum(p - q, 0.0), 0.0)
    left_other = float(np.where(rest, np.maximum(q - p, 0.0), 0.0).sum())
    left_hub = float(np.maximum(pair - p1, 0.0).sum())
    p_hub_left = max(p[hub] - left_hub, 0.0)
    if int(drafts[0]) == hub:
        accept_other, accept_hub = _ratio(p1[other], pair[other]), _ratio(p[hub], left_hub)
    else:
        accept_other, accept_hub = _ratio(p[other], q[other]), _ratio(p_hub_left, left_other)
    if rng.random() < accept_other:
        return other
    if rng.random() < accept_hub:
        return hub
    recovered = np.maximum(p1 - pair, 0.0)
    recovered[hub] = max(p_hub_left - left_other, 0.0)
    return int(categorical(recovered if recovered.sum() > 0 else p, rng))


def spechub_hub_shortcut_law(target_probs, draft_probs, drafts) -> np.ndarray:
    """Conditional output law of :func:`spechub_hub_shortcut` given the drafts, [V]."""
    from mdsd.verifiers import output_law

    hub = int(np.argmax(draft_probs))
    if target_probs[hub] > HUB_SHORTCUT:
        return np.eye(len(target_probs))[hub]
    return output_law(target_probs, draft_probs, drafts, verifier="spechub")


# ------------------------------------------------------------------------- 3. siblings, same p/q
def sibling_same_residual(target_probs, draft_probs, drafts, rng: np.random.Generator) -> int:
    """WRONG sibling verification: every child against the same p and q, then (p - q)+."""
    p = np.asarray(target_probs, dtype=np.float64)
    for x in (int(t) for t in drafts):
        if rng.random() < min(1.0, p[x] / draft_probs[x]):
            return x
    return int(categorical(_positive_residual(p, draft_probs), rng))


def sibling_same_residual_law(target_probs, draft_probs, drafts) -> np.ndarray:
    """Conditional output law of :func:`sibling_same_residual` given the drafts, [V]."""
    p = np.asarray(target_probs, dtype=np.float64)
    out, reach = np.zeros_like(p), 1.0
    for x in (int(t) for t in drafts):
        accept = min(1.0, p[x] / draft_probs[x])
        out[x] += reach * accept
        reach *= 1.0 - accept
    return out + reach * _positive_residual(p, draft_probs)


def top_drafts(draft_probs, n: int, rng: np.random.Generator) -> np.ndarray:
    """Deterministic drafter: the n most probable tokens of q (ties by lower index), [..., n].

    Same calling convention as ``DraftLaw.sample``; ``rng`` is unused. Not a fault in itself
    (``sample_check`` is exact for it); it is the drafter of the top-2 sibling example.
    """
    from mdsd.laws import top_tokens

    return top_tokens(np.asarray(draft_probs, dtype=np.float64), n)


FAULTY = {
    "rrs_skip_repeats": (rrs_skip_repeats, rrs_skip_repeats_law),
    "spechub_hub_shortcut": (spechub_hub_shortcut, spechub_hub_shortcut_law),
    "sibling_same_residual": (sibling_same_residual, sibling_same_residual_law),
}
