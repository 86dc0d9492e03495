"""What every verifier shares: the interface, the residual, and the draft checks.

A verifier maps (p, q, drafts) to the *conditional output law* pi(. | x) of the emitted token
(spec section 1). Sampling is one categorical draw from it; exactness is the identity
sum_x Pdraft(x) pi(. | x) = p; the acceptance given x is sum_{y in set(x)} pi(y | x).

Terms used throughout: a draft is *accepted* when the emitted token is one of the drafts (in a
tree: descend into that child); otherwise the emitted token is the *recovered* token drawn from a
residual law, and the step ends.

All arrays here are float64 [B, V] (target_probs, draft_probs) and int64 [B, n] (drafts); the
public functions in ``mdsd.verifiers`` add and remove the batch axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdsd.laws import DraftLaw, top_tokens

# Below this total mass a residual is treated as empty: the rejection that would use it has
# probability ~0, and we fall back to emitting from the current target law (see ``residual``).
EMPTY_MASS = 1e-300


def residual(target: np.ndarray, draft: np.ndarray) -> np.ndarray:
    """resid(a, b) = max(a - b, 0) / sum max(a - b, 0), row-wise.  [B, V] x [B, V] -> [B, V]

    If a row's positive part is (numerically) empty, a equals b to rounding and the rejection
    leading here has probability ~0; that row returns ``target`` unchanged so the law stays valid.
    """
    diff = np.maximum(target - draft, 0.0)
    total = diff.sum(axis=-1, keepdims=True)
    safe = np.where(total > EMPTY_MASS, total, 1.0)
    return np.where(total > EMPTY_MASS, diff / safe, target)


def safe_ratio(num: np.ndarray, den: np.ndarray, when_zero: float = 1.0) -> np.ndarray:
    """min(1, num / den), with ``when_zero`` where den = 0 (the branch then has no mass)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(den > 0, num / np.where(den > 0, den, 1.0), when_zero)
    return np.minimum(r, 1.0)


def gather(values: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """values[b, tokens[b]] for [B, V] and [B] (or [B, k]) -> [B] (or [B, k])."""
    if tokens.ndim == 1:
        return np.take_along_axis(values, tokens[:, None], axis=1)[:, 0]
    return np.take_along_axis(values, tokens, axis=1)


def scatter_add(out: np.ndarray, tokens: np.ndarray, amount: np.ndarray) -> None:
    """out[b, tokens[b]] += amount[b], in place."""
    out[np.arange(out.shape[0]), tokens] += amount


def draft_set_mask(drafts: np.ndarray, vocab: int) -> np.ndarray:
    """Boolean [B, V]: token y is among the drafts of row b."""
    mask = np.zeros((drafts.shape[0], vocab), dtype=bool)
    np.put_along_axis(mask, drafts, True, axis=1)
    return mask


def accepted_mass(output_law: np.ndarray, drafts: np.ndarray) -> np.ndarray:
    """Acceptance given the drafts: sum_{y in set(x)} pi(y | x).  -> [B]"""
    return np.where(draft_set_mask(drafts, output_law.shape[1]), output_law, 0.0).sum(axis=1)


@dataclass(frozen=True)
class Verifier:
    """A multi-draft verifier.

    name:  registry name (``mdsd.output_law(..., verifier=name)``).
    laws:  the draft laws it is exact for; using it with another law raises ValueError.
    """

    name: str = ""
    laws: tuple[str, ...] = ()

    @property
    def default_law(self) -> str:
        return self.laws[0]

    def output_law(self, target_probs, draft_probs, drafts, law: DraftLaw) -> np.ndarray:
        """pi(. | x) for a batch: [B, V], [B, V], [B, n] -> [B, V] float64."""
        raise NotImplementedError

    def acceptance(self, target_probs, draft_probs, n: int, law: DraftLaw):
        """Exact acceptance rate in closed form, [B] -- or None where there is none."""
        return None


def check_drafts_for_law(draft_probs: np.ndarray, drafts: np.ndarray, law: DraftLaw) -> None:
    """Refuse drafts that the law cannot produce (they would make the output law wrong)."""
    drafted_mass = np.take_along_axis(draft_probs, drafts, axis=1)
    if np.any(drafted_mass <= 0):
        b, i = np.argwhere(drafted_mass <= 0)[0]
        raise ValueError(
            f"drafts[{b}, {i}] = {drafts[b, i]} has draft_probs 0: it cannot have been drawn from "
            f"the draft distribution (was q processed differently for drafting?)"
        )
    n = drafts.shape[1]
    if law.distinct and n > 1:
        ordered = np.sort(drafts, axis=1)
        if np.any(ordered[:, 1:] == ordered[:, :-1]):
            raise ValueError(f"drafts repeat a token, but law {law.name!r} draws distinct tokens")
    if law.name == "greedy" and n > 1:
        top = np.sort(top_tokens(draft_probs, n - 1), axis=1)
        if np.any(np.sort(drafts[:, :-1], axis=1) != top):
            raise ValueError(
                "drafts[:, :n-1] must be the n-1 most probable tokens of draft_probs (ties by "
                "lower index) for law 'greedy'"
            )
    if law.name == "spechub":
        hub = np.argmax(draft_probs, axis=1)
        if np.any((drafts[:, 0] == hub) == (drafts[:, 1] == hub)):
            raise ValueError(
                "law 'spechub' drafts hold the hub argmax(draft_probs) exactly once"
            )
