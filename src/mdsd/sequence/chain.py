"""Verifying one drafted chain: token-by-token speculative sampling and block verification.

A chain of k drafts x_1..x_k was drawn from the draft model: x_{i+1} ~ q_i = q(. | context,
x_1..x_i). The target gives p_i = p(. | context, x_1..x_i) for i = 0..k. A chain verifier keeps
the first j drafts and emits one more token y: the block z = (x_1..x_j, y), j in 0..k (y is the
*bonus* token when j = k, else the *recovered* token). It is lossless when the block, continued by
target sampling, has the target's law (see docs/tree_verification.md).

``token``  (Leviathan et al., arXiv 2211.17192): keep x_i with probability
           min(1, p_{i-1}(x_i) / q_{i-1}(x_i)) in turn; at the first rejection emit
           y ~ resid(p_{i-1}, q_{i-1}); if all are kept, y ~ p_k.
``block``  (Sun et al., arXiv 2403.10444): weights w_0 = 1, w_i = min(1, w_{i-1} p_{i-1}(x_i) /
           q_{i-1}(x_i)); for i < k the residual mass r_i = sum_y max(w_i p_i(y) - q_i(y), 0) and
           h_i = r_i / (r_i + 1 - w_i) (= 1 when w_i = 1), h_k = w_k. j is the largest i with
           eta_i = 1, where eta_0 = 1 and eta_i ~ Bernoulli(h_i) independently; y ~ the residual
           max(w_j p_j - q_j, 0) normalised (j < k) or y ~ p_k (j = k). It maximises the expected
           block length over all lossless chain verifiers (Sun et al.; Thomas & Pal, arXiv
           2602.16961); ``mdsd.lp.tree_optimum`` on widths (1, ..., 1) reproduces its value.

``chain_emission_law`` gives the exact law of the block as an array [k + 1, V]: entry [j, y] =
P(keep exactly the first j drafts, then emit y). ``chain_verify`` samples it, deciding from the
deepest draft down (block) or the first draft up (token) and touching the vocabulary only where
it needs a residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from mdsd._validate import as_drafts, as_probs, check_choice
from mdsd.sampling import categorical, draw, search
from mdsd.verifiers._early_exit import _residual_into
from mdsd.verifiers.base import EMPTY_MASS, residual

CHAIN_VERIFIERS = ("token", "block")


@dataclass(frozen=True)
class ChainResult:
    """One verified chain: ``accepted`` = j drafts kept, ``tokens`` = (x_1..x_j, y).

    ``bonus`` is True when every draft was kept (y drawn from p_k).
    """

    accepted: int
    tokens: tuple[int, ...]
    bonus: bool


@dataclass(frozen=True)
class _Chain:
    target_probs: np.ndarray  # [k + 1, V]
    draft_probs: np.ndarray  # [k, V]
    drafts: np.ndarray  # [k]

    @property
    def length(self) -> int:
        return int(self.drafts.size)

    def ratios(self) -> np.ndarray:
        """p_{i-1}(x_i) / q_{i-1}(x_i), i = 1..k.  -> [k] (q > 0 is checked on input)."""
        rows = np.arange(self.length)
        return self.target_probs[rows, self.drafts] / self.draft_probs[rows, self.drafts]


def _as_chain(target_probs, draft_probs, drafts, *, normalize: bool = False) -> _Chain:
    p = as_probs(target_probs, "target_probs", normalize=normalize)
    q = as_probs(draft_probs, "draft_probs", normalize=normalize)
    if p.ndim != 2:
        raise ValueError(f"target_probs must be [k + 1, V], got shape {p.shape}")
    if q.ndim != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"draft_probs must be [k, V] with V = {p.shape[1]}, got shape {q.shape}")
    x = as_drafts(drafts, p.shape[1])
    if x.ndim != 1:
        raise ValueError(f"drafts must be [k] (one chain), got shape {x.shape}")
    k = x.size
    if q.shape[0] != k:
        raise ValueError(f"draft_probs must have k = {k} rows (one per draft), got {q.shape[0]}")
    if p.shape[0] != k + 1:
        raise ValueError(f"target_probs must have k + 1 = {k + 1} rows, got {p.shape[0]}")
    drafted_mass = q[np.arange(k), x]
    if np.any(drafted_mass <= 0):
        i = int(np.flatnonzero(drafted_mass <= 0)[0])
        raise ValueError(
            f"drafts[{i}] = {int(x[i])} has draft_probs[{i}] mass 0: it cannot have been drawn "
            f"from the draft distribution"
        )
    return _Chain(p, q, x)


# -- block verification --------------------------------------------------------------------
def block_weights(chain: _Chain) -> np.ndarray:
    """w_0 = 1, w_i = min(1, w_{i-1} p_{i-1}(x_i) / q_{i-1}(x_i)).  -> [k + 1]"""
    return _weights(chain.ratios())


def _weights(ratios) -> np.ndarray:
    """``block_weights`` from the ratios p_{i-1}(x_i) / q_{i-1}(x_i), i = 1..k.  -> [k + 1]"""
    w = np.ones(len(ratios) + 1)
    for i, ratio in enumerate(ratios, start=1):
        w[i] = min(1.0, w[i - 1] * ratio)
    return w


def _block_stop_probability(p_row: np.ndarray, q_row: np.ndarray, weight: float) -> float:
    """h = r / (r + 1 - w), r = sum max(w p - q, 0); the denominator is summed as
    sum max(q - w p, 0) (equal, since sum (w p - q) = w - 1) to keep precision. w = 1: h = 1."""
    if weight >= 1.0:
        return 1.0
    excess, deficit = _excess_and_deficit(p_row, q_row, weight)  # deficit >= 1 - w > 0
    return excess / deficit


@numba.njit(cache=True, fastmath=False)
def _excess_and_deficit(p_row, q_row, weight):
    """(sum max(w p - q, 0), sum max(q - w p, 0)) of rows [V], in one pass (the decoding loop
    calls this once per draft it leaves: numpy's five passes took ~4x as long at V = 8192)."""
    excess = deficit = 0.0
    for y in range(p_row.size):
        gap = weight * p_row[y] - q_row[y]
        if gap > 0.0:
            excess += gap
        else:
            deficit -= gap
    return excess, deficit


@numba.njit(cache=True, fastmath=False)
def _residual_draw(p_row, q_row, weight, u):
    """``categorical``'s draw at uniform u from ``_block_residual(p_row, q_row, weight)``:
    from max(w p - q, 0) unnormalised (the early-exit samplers' residual pass, which returns its
    total), or from p where that is empty (always when w = 0)."""
    gap = np.empty(p_row.size)
    total = _residual_into(p_row, weight, q_row, 1.0, gap)
    if total <= EMPTY_MASS:
        return draw(p_row, u)
    return search(gap, u * total)


def _block_residual(p_row: np.ndarray, q_row: np.ndarray, weight: float) -> np.ndarray:
    """max(w p - q, 0) normalised; p itself if that is all zero (then h = 0 or w = p = q)."""
    return residual((weight * p_row)[None, :], q_row[None, :])[0] if weight > 0 else p_row


def block_stop_probabilities(chain: _Chain, weights: np.ndarray) -> np.ndarray:
    """h_0..h_k of block verification.  -> [k + 1]"""
    k = chain.length
    h = np.empty(k + 1)
    for i in range(k):
        h[i] = _block_stop_probability(chain.target_probs[i], chain.draft_probs[i], weights[i])
    h[k] = weights[k]
    return h


def _block_law(chain: _Chain) -> np.ndarray:
    k, vocab = chain.length, chain.target_probs.shape[1]
    w = block_weights(chain)
    h = block_stop_probabilities(chain, w)
    out = np.zeros((k + 1, vocab))
    none_deeper = 1.0  # P(eta_l = 0 for every l > i)
    for i in range(k, -1, -1):
        stop = none_deeper * h[i]
        if stop > 0:
            if i == k:
                out[i] = stop * chain.target_probs[k]
            else:
                row = _block_residual(chain.target_probs[i], chain.draft_probs[i], w[i])
                out[i] = stop * row
        none_deeper *= 1.0 - h[i]
    return out


def _block_sample(chain: _Chain, rng: np.random.Generator) -> tuple[int, int]:
    return block_sample(chain.ratios(), chain.target_probs.__getitem__, chain.draft_probs.__getitem__, rng)


def block_sample(ratios, target_row, draft_row, rng: np.random.Generator) -> tuple[int, int]:
    """One draw (j, y) of block verification, deciding from the deepest draft down: keep all k
    drafts with probability w_k (then y ~ p_k); else for i = k-1, ..., 1 stop at i with
    probability h_i, and at 0 surely (then y ~ max(w_i p_i - q_i, 0) normalised).

    Args:
        ratios: [k] p_{i-1}(x_i) / q_{i-1}(x_i), i = 1..k.
        target_row: i -> p_i [V] float64 (i = 0..k), draft_row: i -> q_i [V] (i < k); called
            only for the rows the draw reads: row k for a bonus, row i < k once every deeper
            draft was left. The decoding loop passes rows it computes on demand.
        rng: the generator; one uniform per test, one per token drawn.
    """
    k = len(ratios)
    w = _weights(ratios)
    if rng.random() < w[k]:
        return k, int(categorical(target_row(k), rng))
    for i in range(k - 1, -1, -1):
        p_row, q_row = target_row(i), draft_row(i)
        if i == 0 or rng.random() < _block_stop_probability(p_row, q_row, w[i]):
            return i, int(_residual_draw(p_row, q_row, w[i], rng.random()))
    raise AssertionError("unreachable: h_0 = 1")


# -- token verification --------------------------------------------------------------------
def _token_law(chain: _Chain) -> np.ndarray:
    k, vocab = chain.length, chain.target_probs.shape[1]
    accept = np.minimum(chain.ratios(), 1.0)
    out = np.zeros((k + 1, vocab))
    reach = 1.0  # P(the first i drafts were kept)
    for i in range(k):
        reject = reach * (1.0 - accept[i])
        if reject > 0:
            out[i] = reject * residual(chain.target_probs[i : i + 1], chain.draft_probs[i : i + 1])[0]
        reach *= accept[i]
    out[k] = reach * chain.target_probs[k]
    return out


def _token_sample(chain: _Chain, rng: np.random.Generator) -> tuple[int, int]:
    for i, ratio in enumerate(chain.ratios()):
        if rng.random() >= min(1.0, ratio):
            resid = residual(chain.target_probs[i : i + 1], chain.draft_probs[i : i + 1])[0]
            return i, int(categorical(resid, rng))
    return chain.length, int(categorical(chain.target_probs[chain.length], rng))


# -- front doors ---------------------------------------------------------------------------
_LAWS = {"token": _token_law, "block": _block_law}
_SAMPLERS = {"token": _token_sample, "block": _block_sample}


def chain_emission_law(target_probs, draft_probs, drafts, verifier="block", *, normalize=False):
    """Exact law of the emitted block of one drafted chain.

    Args:
        target_probs: [k + 1, V]; row i is p(. | context, x_1..x_i).
        draft_probs: [k, V]; row i is q(. | context, x_1..x_i), the law x_{i+1} was drawn from.
        drafts: [k] token ids x_1..x_k.
        verifier: ``"token"`` (token-by-token speculative sampling) or ``"block"`` (Sun et al.,
            arXiv 2403.10444).

    Returns float64 [k + 1, V]: entry [j, y] = P(keep exactly the first j drafts, then emit y);
    row k is the bonus-token row. The whole array sums to 1; the expected number of tokens per
    step is 1 + sum_j j * out[j].sum().

    The binary example of Sun et al.: p = (1/3, 2/3), q = (2/3, 1/3) everywhere, drafts (0, 1).
    Token verification keeps x_1 with probability 1/2 (then x_2 surely); block verification has
    w_2 = min(1, (1/2) * 2) = 1 and keeps both:

    >>> p, q = [[1 / 3, 2 / 3]] * 3, [[2 / 3, 1 / 3]] * 2
    >>> [chain_expected_length(chain_emission_law(p, q, [0, 1], v)) for v in ("token", "block")]
    [2.0, 3.0]
    """
    chain = _as_chain(target_probs, draft_probs, drafts, normalize=normalize)
    return _LAWS[check_choice(verifier, _LAWS, "verifier")](chain)


def chain_verify(target_probs, draft_probs, drafts, verifier="block", rng=None, *, normalize=False):
    """Verify one drafted chain: a draw from ``chain_emission_law``, with early exit.

    ``rng`` is a ``numpy.random.Generator`` or an int seed (None: fresh entropy).
    Returns a :class:`ChainResult`.
    """
    chain = _as_chain(target_probs, draft_probs, drafts, normalize=normalize)
    sampler = _SAMPLERS[check_choice(verifier, _SAMPLERS, "verifier")]
    j, y = sampler(chain, np.random.default_rng(rng))
    return ChainResult(
        accepted=j, tokens=tuple(int(t) for t in chain.drafts[:j]) + (y,), bonus=j == chain.length
    )


def chain_expected_length(emission_law: np.ndarray) -> float:
    """Expected tokens per step, 1 + E[j], of a law from ``chain_emission_law``."""
    law = np.asarray(emission_law, dtype=np.float64)
    return float(law.sum(axis=1) @ np.arange(1, law.shape[0] + 1))
