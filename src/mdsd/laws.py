"""Draft laws: how the n drafts of one position are drawn from the draft distribution q.

Each law can
- ``sample`` n drafts (in draw order) with a ``numpy.random.Generator``,
- ``enumerate`` every draft tuple with its probability (small vocabularies; tests and the LP),
- give ``Qall(H) = P(all n drafts lie in H)`` for the prefixes of a token order (what the
  sort-and-scan bound needs; greedy and spechub use their closed form for alpha* instead).

Laws (docs/theory.md §2):

``iid``                  x_i i.i.d. ~ q.                       Qall(H) = q(H)^n.
``without_replacement``  x_1 ~ q, x_k ~ q restricted to the tokens not yet drawn (sequential;
                         = Gumbel-top-n, = arrival order of an exponential race). Qall by the race
                         integral (``mdsd._race``).
``greedy``               x_1..x_{n-1} = the n-1 most probable tokens T of q (ties by index),
                         x_n ~ q' = q restricted to V \\ T, renormalised.  Qall(H) = [T in H] q'(H).
``spechub``              n = 2; hub a = argmax q. x_1 ~ q; if x_1 = a, x_2 ~ q without a, else x_2 = a.
``conditional_poisson``  an n-subset S with P(S) proportional to prod_{i in S} q_i, in uniformly
                         random order.  Qall(H) = e_n(q_H) / e_n(q) (elementary symmetric
                         polynomials). This ratio is *not* Qall for ``without_replacement``.

The module is one place for the five laws (~540 lines): each law's sampler, enumeration and
closed forms sit together in its class, and the shared base (validation, batching) above them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from mdsd._optional import compiled_module
from mdsd._race import tail_masses, wor_qall_prefixes, wor_qall_window
from mdsd._validate import check_choice, check_n
from mdsd.sampling import categorical, draws_without_replacement

TOP_SELECT_MAX = 64  # top_tokens selects by partition up to this k, else it sorts
TOP_ARGMAX_MAX = 4  # top_tokens takes up to this many tokens by rounds of argmax
SEQUENTIAL_DRAWS_MAX = 8  # without replacement: sequential compiled draws up to this n, then Gumbel
# Three draws without replacement: Qall of the prefixes in closed form (O(K^2)) up to this many
# tokens, the race quadrature (O(K x nodes), ~150 nodes) beyond.
THREE_DRAFT_CLOSED_MAX = 256


def top_tokens(draft_probs: np.ndarray, k: int) -> np.ndarray:
    """The k most probable tokens of each row, most probable first, ties by lower index.

    draft_probs: [..., V] -> [..., k] int64. O(V) per row for small k, vectorised over the rows:
    the k-th largest value v of each row is found by partition; the tokens above v and then the
    lowest-index tokens equal to v are taken (the same tokens and order as a stable descending
    sort, ``top_tokens_reference``).
    """
    q = np.asarray(draft_probs)
    vocab = q.shape[-1]
    if k <= 0:
        return np.zeros(q.shape[:-1] + (0,), dtype=np.int64)
    if k >= vocab or k > TOP_SELECT_MAX:
        return np.argsort(-q, axis=-1, kind="stable")[..., :k]
    rows = q.reshape(-1, vocab)  # [R, V]
    if k <= TOP_ARGMAX_MAX:
        return _top_by_argmax(rows, k).reshape(q.shape[:-1] + (k,))
    threshold = np.partition(rows, vocab - k, axis=-1)[:, vocab - k, None]  # [R, 1] k-th largest
    above = rows > threshold  # [R, V]
    equal = rows == threshold
    room = k - np.count_nonzero(above, axis=-1, keepdims=True)  # [R, 1] places left for ties
    chosen = above | (equal & (np.cumsum(equal, axis=-1) <= room))  # exactly k per row
    index = np.nonzero(chosen)[1].reshape(-1, k)  # [R, k] ascending ids
    order = np.argsort(-np.take_along_axis(rows, index, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(index, order, axis=-1).reshape(q.shape[:-1] + (k,))


def _top_by_argmax(rows: np.ndarray, k: int) -> np.ndarray:
    """``top_tokens`` of rows [R, V] for a few k (< V): k rounds of ``np.argmax``, which returns
    the lowest index among equal maxima, each round's token then set below every probability
    (-inf) in a copy. One vectorised pass a round (~2 us at V = 8192) where the partition path
    takes ~3 cumulative sums."""
    left = rows.astype(np.float64, copy=True)  # [R, V]
    top = np.empty((rows.shape[0], k), dtype=np.int64)
    for j in range(k):
        top[:, j] = np.argmax(left, axis=-1)
        np.put_along_axis(left, top[:, j, None], -np.inf, axis=-1)
    return top


def top_tokens_reference(draft_probs: np.ndarray, k: int) -> np.ndarray:
    """top_tokens by one stable argsort per row (the plain reference)."""
    return np.argsort(-np.asarray(draft_probs), axis=-1, kind="stable")[..., :k]


def support_size(draft_probs: np.ndarray) -> np.ndarray:
    """Tokens of positive mass per row of [..., V] (an int for one row: counting without an axis
    is several times faster)."""
    if np.ndim(draft_probs) == 1:
        return np.count_nonzero(draft_probs > 0)
    return np.count_nonzero(draft_probs > 0, axis=-1)


def complement_renormalised(draft_probs: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """q restricted to the tokens not in ``excluded`` ([..., k] ids), renormalised.

    The normaliser is summed over the kept tokens (not computed as 1 - q(excluded)), which keeps
    full relative precision when q(excluded) is close to 1.
    """
    rest = np.array(draft_probs, dtype=np.float64, copy=True)
    np.put_along_axis(rest, excluded, 0.0, axis=-1)
    return rest / rest.sum(axis=-1, keepdims=True)


def others_mass(draft_probs: np.ndarray) -> np.ndarray:
    """sum_{b != a} q_b for every token a of a row [V] (the 1 - q_a of sampling without
    replacement: the mass the next draw is taken from once a is drawn).

    1 - q_a loses all precision when q_a is close to 1; only one token can exceed 1/2, and for it
    the others are summed directly.
    """
    total = draft_probs.sum()
    out = total - draft_probs
    top = int(np.argmax(draft_probs))
    if draft_probs[top] > 0.5:
        out[top] = np.delete(draft_probs, top).sum()
    return out


def int_power(values: np.ndarray, n: int) -> np.ndarray:
    """values ** n for an integer n >= 1 by repeated squaring (numpy's float power is slower).

    The compiled kernels use the scalar twin ``mdsd._race_numba._power`` (same squaring order).
    """
    result, base = None, values
    while n:
        if n & 1:
            result = base.copy() if result is None else result * base
        n >>= 1
        if n:
            base = base * base
    return result


def prefix_mass(draft_probs_ordered: np.ndarray) -> np.ndarray:
    """q of the prefixes, [B, V] -> [B, V + 1]: 0, q_0, q_0 + q_1, ..., capped at 1 (rounding)."""
    mass = np.zeros((draft_probs_ordered.shape[0], draft_probs_ordered.shape[1] + 1))
    np.cumsum(draft_probs_ordered, axis=1, out=mass[:, 1:])
    return np.minimum(mass, 1.0, out=mass)


def _three_draft_closed(size: int) -> bool:
    """Qall of three draws without replacement over ``size`` tokens goes by the closed form."""
    return size <= THREE_DRAFT_CLOSED_MAX and compiled_module("mdsd._wor_numba") is not None


def three_draft_qall_window(draft_probs_ordered: np.ndarray, k_lo: int, k_hi: int) -> np.ndarray | None:
    """Qall of the prefixes k = k_lo..k_hi for three draws without replacement, in closed form
    (``mdsd._wor_numba.three_draft_qall``). [V] -> [k_hi - k_lo + 1]; None without numba."""
    kernel = compiled_module("mdsd._wor_numba")
    if kernel is None:  # pragma: no cover - numba is a dependency
        return None
    out = np.empty(k_hi - k_lo + 1)
    kernel.three_draft_qall(np.ascontiguousarray(draft_probs_ordered, dtype=np.float64), k_lo, k_hi, out)
    return out


def two_draft_qall_prefixes(draft_probs_ordered: np.ndarray) -> np.ndarray:
    """Qall of the prefixes for two draws without replacement, in closed form. [V] -> [V + 1].

    Qall(H) = sum_{a in H} q_a (q(H) - q_a) / (1 - q_a); adding token b to H adds
    q_b (sum_{a in H} q_a / (1 - q_a) + q(H) / (1 - q_b)) >= 0, so the prefixes are grown with
    non-negative increments and nothing cancels. Needs >= 2 tokens with q > 0 (so 1 - q_a > 0).
    """
    q = draft_probs_ordered
    left = others_mass(q)  # 1 - q_a
    before_q = np.zeros(q.size)
    np.cumsum(q[:-1], out=before_q[1:])
    before_odds = np.zeros(q.size)
    np.cumsum(q[:-1] / left[:-1], out=before_odds[1:])
    qall = np.zeros(q.size + 1)
    np.cumsum(q * (before_odds + before_q / left), out=qall[1:])
    return np.minimum(qall, 1.0, out=qall)


@dataclass(frozen=True)
class DraftLaw:
    """Base class; see the module docstring for the laws."""

    name: str = ""
    distinct: bool = True  # drafts are distinct tokens, so the law needs |supp q| >= n
    prefix_scan: bool = True  # an optimal H* is a prefix of the tokens sorted by q/p

    def check(self, draft_probs: np.ndarray, n: int) -> int:
        """Validate n for this law and q ([..., V]); raises ValueError naming the argument."""
        n = check_n(n)
        if self.distinct:
            smallest = int(np.min(support_size(draft_probs)))
            if n > smallest:
                raise ValueError(
                    f"n = {n} drafts are more than the support of draft_probs ({smallest} tokens "
                    f"with positive mass); law {self.name!r} draws distinct tokens"
                )
        return n

    # -- sampling ---------------------------------------------------------------------------
    def sample(self, draft_probs, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw n drafts in draw order. draft_probs [..., V] -> drafts [..., n] int64."""
        q = np.asarray(draft_probs, dtype=np.float64)
        n = self.check(q, n)
        return self._sample(q, n, rng)

    def sample_trusted(self, draft_probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """``sample`` without its checks, for a caller that has validated n against q: float64
        draft_probs [..., V] with at least n tokens of positive mass where the law draws distinct
        tokens (the engine's ``walk.RuleBook`` sizes n by q's support). The same draws."""
        return self._sample(draft_probs, n, rng)

    def _sample(self, q, n, rng):
        raise NotImplementedError

    # -- enumeration ------------------------------------------------------------------------
    def enumerate(self, draft_probs, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Every draft tuple with positive probability: (tuples [M, n] int64, probs [M])."""
        q = np.asarray(draft_probs, dtype=np.float64)
        if q.ndim != 1:
            raise ValueError(f"draft_probs must be 1-D for enumeration, got shape {q.shape}")
        n = self.check(q, n)
        tuples, probs = self._enumerate(q, n)
        return np.asarray(tuples, dtype=np.int64).reshape(-1, n), np.asarray(probs, np.float64)

    def _enumerate(self, q, n):
        raise NotImplementedError

    def num_tuples(self, draft_probs, n: int) -> int:
        """How many tuples ``enumerate`` would list (without listing them)."""
        s = int(support_size(np.asarray(draft_probs)))
        return self._num_tuples(s, n)

    def _num_tuples(self, s, n):
        raise NotImplementedError

    # -- Qall ---------------------------------------------------------------------------------
    def qall_prefixes(self, draft_probs_ordered: np.ndarray, n: int, order=None) -> np.ndarray:
        """Qall(first k tokens of the order), k = 0..V. [B, V] (q permuted) -> [B, V + 1].

        ``order`` (position -> token id) matters only for laws whose draft set depends on token
        ids through tie-breaking (greedy, spechub); the others depend on the masses alone.
        """
        raise NotImplementedError(f"law {self.name!r} has no Qall of prefixes")

    def qall_by_quadrature(self, n: int, size: int) -> bool:
        """True when ``qall_prefixes`` integrates numerically (costly per prefix) for n drafts
        over ``size`` tokens, so a scan should evaluate only the prefixes that can attain its
        minimum (``qall_window``)."""
        return False

    def qall_window(
        self, draft_probs_ordered: np.ndarray, n: int, k_lo: int, k_hi: int, order=None
    ) -> np.ndarray:
        """Qall(first k tokens of the order), k = k_lo..k_hi, for one row: [V] -> [k_hi - k_lo + 1].

        The same numbers as ``qall_prefixes(row[None])[0, k_lo : k_hi + 1]``; laws with a
        windowed kernel skip the prefixes outside the window and the batch bookkeeping.
        """
        row = np.asarray(draft_probs_ordered)[None, :]
        return self.qall_prefixes(row, n, order=order)[0, k_lo : k_hi + 1]

    def inclusion_probs(self, draft_probs: np.ndarray, n: int) -> np.ndarray:
        """P(token y is among the drafts), for every y. [..., V] -> [..., V]."""
        raise NotImplementedError(f"no closed-form inclusion probabilities for law {self.name!r}")


@dataclass(frozen=True)
class IID(DraftLaw):
    name: str = "iid"
    distinct: bool = False

    def check(self, draft_probs, n):
        return check_n(n)

    def _sample(self, q, n, rng):
        expanded = np.broadcast_to(q[..., None, :], q.shape[:-1] + (n, q.shape[-1]))
        return categorical(expanded, rng)

    def _enumerate(self, q, n):
        support = np.flatnonzero(q > 0)
        tuples = list(itertools.product(support.tolist(), repeat=n))
        probs = [math.prod(q[list(t)]) for t in tuples]
        return tuples, probs

    def _num_tuples(self, s, n):
        return s**n

    def qall_prefixes(self, draft_probs_ordered, n, order=None):
        """Qall(H) = q(H)^n."""
        return self.qall_of_mass(prefix_mass(np.asarray(draft_probs_ordered, dtype=np.float64)), n)

    @staticmethod
    def qall_of_mass(mass: np.ndarray, n: int) -> np.ndarray:
        """q(H)^n from q(H) (any shape; q(H) <= 1). Also an upper bound on Qall(H) of the other
        laws, used to prune the without-replacement scan."""
        return int_power(mass, n)

    def inclusion_probs(self, draft_probs, n):
        # 1 - (1 - q)^n, via log1p/expm1 to keep precision for tiny q
        with np.errstate(divide="ignore"):
            return -np.expm1(n * np.log1p(-np.minimum(draft_probs, 1.0)))


@dataclass(frozen=True)
class WithoutReplacement(DraftLaw):
    name: str = "without_replacement"

    def _sample(self, q, n, rng):
        # Up to SEQUENTIAL_DRAWS_MAX drafts: n compiled draws (a sum and a search each over the
        # row, the earlier draws zeroed), faster than the Gumbel keys' O(V) random numbers and
        # logarithms; more drafts: Gumbel-top-n. Both are sequential sampling without replacement.
        if n <= SEQUENTIAL_DRAWS_MAX:
            return draws_without_replacement(q, n, rng)
        return self._sample_gumbel(q, n, rng)

    @staticmethod
    def _sample_gumbel(q, n, rng):
        """Gumbel-top-n: the top-n keys log q + Gumbel, in decreasing key order, are sequential
        draws without replacement in draw order (top_tokens: O(V) selection, the same tokens and
        order as a stable argsort)."""
        with np.errstate(divide="ignore"):
            keys = np.log(q) + rng.gumbel(size=q.shape)
        return top_tokens(keys, n)

    def _enumerate(self, q, n):
        support = np.flatnonzero(q > 0).tolist()
        tuples, probs = [], []
        for t in itertools.permutations(support, n):
            prob, remaining = 1.0, set(support)
            for x in t:
                prob *= q[x] / math.fsum(q[list(remaining)])
                remaining.discard(x)
            tuples.append(t)
            probs.append(prob)
        return tuples, probs

    def _num_tuples(self, s, n):
        return math.perm(s, n)

    def qall_prefixes(self, draft_probs_ordered, n, order=None):
        """n = 1: q(H); n = 2: the closed form ``two_draft_qall_prefixes``; n = 3 on up to
        ``THREE_DRAFT_CLOSED_MAX`` tokens: the closed form ``three_draft_qall_window``; else the
        race integral."""
        rows = np.asarray(draft_probs_ordered, dtype=np.float64)
        if n == 2:
            return np.stack([two_draft_qall_prefixes(row) for row in rows])
        if n == 3 and rows.ndim == 2 and _three_draft_closed(rows.shape[1]):
            closed = [three_draft_qall_window(row, 0, row.size) for row in rows]
            if all(c is not None for c in closed):
                return np.stack(closed)
        return wor_qall_prefixes(draft_probs_ordered, n)

    def qall_by_quadrature(self, n, size):
        return n >= 4 or (n == 3 and not _three_draft_closed(size))

    def inclusion_probs(self, draft_probs, n):
        """n = 1: q itself (renormalised, as ``enumerate``); for n >= 2 the inclusion
        probabilities of successive sampling have no closed form here."""
        if n != 1:
            return super().inclusion_probs(draft_probs, n)
        q = np.asarray(draft_probs, dtype=np.float64)
        return q / q.sum(axis=-1, keepdims=True)

    def qall_window(self, draft_probs_ordered, n, k_lo, k_hi, order=None):
        row = np.ascontiguousarray(draft_probs_ordered, dtype=np.float64)
        if n == 2:
            return two_draft_qall_prefixes(row)[k_lo : k_hi + 1]
        if n == 3 and _three_draft_closed(row.size):
            closed = three_draft_qall_window(row, k_lo, k_hi)
            if closed is not None:
                return closed
        return wor_qall_window(row, tail_masses(row[None, :])[0], n, k_lo, k_hi)[0]


@dataclass(frozen=True)
class Greedy(DraftLaw):
    name: str = "greedy"
    prefix_scan: bool = False

    def _sample(self, q, n, rng):
        top = top_tokens(q, n - 1)
        rest = complement_renormalised(q, top)
        last = categorical(rest, rng)
        return np.concatenate([top, last[..., None]], axis=-1)

    def _enumerate(self, q, n):
        top = top_tokens(q, n - 1).tolist()
        rest = complement_renormalised(q, np.asarray(top, dtype=np.int64))
        support = np.flatnonzero(rest > 0)
        return [tuple(top) + (int(x),) for x in support], rest[support].tolist()

    def _num_tuples(self, s, n):
        return s - (n - 1)

    def qall_prefixes(self, draft_probs_ordered, n, order=None):
        """Qall(first k tokens of the order) = [T within them] * q'(first k), k = 0..V.

        draft_probs_ordered: [B, V], q permuted by ``order`` ([B, V] or [V]: position -> token
        id; None = the identity). T = top-(n-1) of q with ties by lower *token id*, so the order
        is needed to place T when q has ties. Returns [B, V + 1].
        """
        q_ordered = np.asarray(draft_probs_ordered, dtype=np.float64)
        batch, vocab = q_ordered.shape
        if order is None:
            order = np.arange(vocab)
        order = np.broadcast_to(np.asarray(order, dtype=np.int64), (batch, vocab))
        q = np.empty_like(q_ordered)
        np.put_along_axis(q, order, q_ordered, axis=1)  # back to token order
        top = top_tokens(q, n - 1)  # [B, n-1] token ids
        rest = np.take_along_axis(complement_renormalised(q, top), order, axis=1)  # q', ordered
        position = np.empty_like(order)
        np.put_along_axis(position, order, np.arange(vocab)[None, :].repeat(batch, 0), axis=1)
        need = np.take_along_axis(position, top, axis=1).max(axis=1, initial=-1) + 1  # [B]
        qall = np.zeros((batch, vocab + 1))
        qall[:, 1:] = np.minimum(np.cumsum(rest, axis=1), 1.0)
        qall[np.arange(vocab + 1)[None, :] < need[:, None]] = 0.0
        return qall

    def inclusion_probs(self, draft_probs, n):
        top = top_tokens(draft_probs, n - 1)
        incl = complement_renormalised(draft_probs, top)
        np.put_along_axis(incl, top, 1.0, axis=-1)
        return incl


@dataclass(frozen=True)
class SpecHub(DraftLaw):
    name: str = "spechub"
    prefix_scan: bool = False

    def check(self, draft_probs, n):
        n = check_n(n)
        if n != 2:
            raise ValueError(f"law 'spechub' is defined for n = 2 drafts only, got n = {n}")
        return super().check(draft_probs, n)

    def _sample(self, q, n, rng):
        hub = np.argmax(q, axis=-1)  # ties by lower index
        first = categorical(q, rng)
        without_hub = complement_renormalised(q, hub[..., None])
        other = categorical(without_hub, rng)
        second = np.where(first == hub, other, hub)
        return np.stack([first, second], axis=-1)

    def _enumerate(self, q, n):
        hub = int(np.argmax(q))
        others = [i for i in np.flatnonzero(q > 0).tolist() if i != hub]
        not_hub = math.fsum(q[others])  # 1 - q_a, summed for precision
        tuples = [(i, hub) for i in others] + [(hub, i) for i in others]
        probs = [q[i] for i in others] + [q[hub] * q[i] / not_hub for i in others]
        return tuples, probs

    def _num_tuples(self, s, n):
        return 2 * (s - 1)

    def qall_prefixes(self, draft_probs_ordered, n, order=None):
        """Qall of prefixes; the unordered draft set has the greedy law with n = 2."""
        if n != 2:
            raise ValueError(f"law 'spechub' is defined for n = 2 drafts only, got n = {n}")
        return Greedy().qall_prefixes(draft_probs_ordered, 2, order)

    def inclusion_probs(self, draft_probs, n):
        self.check(draft_probs, n)
        return Greedy().inclusion_probs(draft_probs, 2)


def _elementary_symmetric_scaled(q_rows: np.ndarray, n: int):
    """Prefix elementary symmetric polynomials e_0..e_n, with a running log scale.

    Returns (values [B, V + 1, n + 1], log_scale [B, V + 1]) with
    e_m(first k tokens) = values[:, k, m] * exp(log_scale[:, k]). The DP is
    e_m(H + x) = e_m(H) + q_x e_{m-1}(H); each step is rescaled by its largest entry so that
    nothing overflows or underflows for tiny masses or large n.
    """
    batch, vocab = q_rows.shape
    values = np.zeros((batch, vocab + 1, n + 1))
    log_scale = np.zeros((batch, vocab + 1))
    state = np.zeros((batch, n + 1))
    state[:, 0] = 1.0
    scale = np.zeros(batch)
    values[:, 0] = state
    for k in range(vocab):
        state = state.copy()
        state[:, 1:] += q_rows[:, k, None] * state[:, :-1]
        top = state.max(axis=1)
        state /= top[:, None]
        scale = scale + np.log(top)
        values[:, k + 1] = state
        log_scale[:, k + 1] = scale
    return values, log_scale


@dataclass(frozen=True)
class ConditionalPoisson(DraftLaw):
    name: str = "conditional_poisson"

    def _sample(self, q, n, rng):
        """The sequential inclusion of ``_sample_row``, run for all rows at once: one backward DP
        per run of equal rows of q, then one pass over the tokens deciding every row's inclusion of
        token k together. [B, V] -> [B, n], each row a uniformly permuted subset."""
        vocab = q.shape[-1]
        flat = q.reshape(-1, vocab)
        if flat.shape[0] == 0:
            return np.zeros(q.shape[:-1] + (n,), dtype=np.int64)
        # one DP per run of equal consecutive rows (batches often repeat one position)
        starts = np.concatenate([[True], (flat[1:] != flat[:-1]).any(axis=1)])  # [B]
        which = np.cumsum(starts) - 1  # row -> its run
        values, log_scale = _elementary_symmetric_scaled(flat[starts][:, ::-1], n)  # j = tokens from the end
        chosen = np.zeros((flat.shape[0], n), dtype=np.int64)
        need = np.full(flat.shape[0], n, dtype=np.int64)
        for k in range(vocab):
            active = np.flatnonzero(need > 0)
            if active.size == 0:
                break
            row, m, j = which[active], need[active], vocab - k
            total = values[row, j, m]  # e_m(tokens k..V-1), scaled
            take = (
                flat[active, k]
                * values[row, j - 1, m - 1]
                * np.exp(log_scale[row, j - 1] - log_scale[row, j])
            )
            hit = active[(total > 0) & (rng.random(active.size) * total < take)]
            chosen[hit, n - need[hit]] = k
            need[hit] -= 1
        return rng.permuted(chosen, axis=1).reshape(q.shape[:-1] + (n,))

    @staticmethod
    def _sample_row(q, n, rng):
        """One row [V] -> [n]: the plain reference of ``_sample`` (token by token)."""
        # Backward DP suffix[k, m] = e_m(q_k..q_{V-1}) (scaled); then include token k with
        # probability q_k e_{m-1}(suffix after k) / e_m(suffix from k).
        vocab = q.size
        values, log_scale = _elementary_symmetric_scaled(q[::-1][None, :], n)
        values, log_scale = values[0], log_scale[0]  # index j = number of tokens from the end
        chosen, need = [], n
        for k in range(vocab):
            if need == 0:
                break
            j = vocab - k  # tokens k..V-1
            total = values[j, need]
            take = q[k] * values[j - 1, need - 1] * math.exp(log_scale[j - 1] - log_scale[j])
            if total > 0 and rng.random() * total < take:
                chosen.append(k)
                need -= 1
        return rng.permutation(np.asarray(chosen, dtype=np.int64))

    def _enumerate(self, q, n):
        support = np.flatnonzero(q > 0).tolist()
        subsets = list(itertools.combinations(support, n))
        weights = np.array([math.prod(q[list(s)]) for s in subsets])
        weights /= math.fsum(weights)
        per_order = 1.0 / math.factorial(n)
        tuples, probs = [], []
        for s, w in zip(subsets, weights):
            for t in itertools.permutations(s):
                tuples.append(t)
                probs.append(w * per_order)
        return tuples, probs

    def _num_tuples(self, s, n):
        return math.comb(s, n) * math.factorial(n)

    def qall_prefixes(self, draft_probs_ordered, n, order=None):
        """e_n(first k tokens) / e_n(all), k = 0..V, by the compiled prefix recurrence
        (``mdsd._esp_numba``; ``qall_prefixes_reference`` is the numpy one)."""
        from mdsd._esp_numba import prefix_log_en  # lazy: importing numba costs ~0.3 s

        q = np.ascontiguousarray(draft_probs_ordered, dtype=np.float64)
        log_en = prefix_log_en(q, int(n))
        return np.minimum(np.exp(log_en - log_en[:, -1:]), 1.0)

    def qall_prefixes_reference(self, draft_probs_ordered, n, order=None):
        values, log_scale = _elementary_symmetric_scaled(draft_probs_ordered, n)
        ratio = values[:, :, n] * np.exp(log_scale - log_scale[:, -1:]) / values[:, -1:, n]
        return np.minimum(ratio, 1.0)

    def inclusion_probs(self, draft_probs, n):
        # pi_y = q_y e_{n-1}(q without y) / e_n(q), from prefix and suffix DPs.
        q = np.atleast_2d(np.asarray(draft_probs, dtype=np.float64))
        vocab = q.shape[-1]
        pre, pre_log = _elementary_symmetric_scaled(q, n)
        suf, suf_log = _elementary_symmetric_scaled(q[:, ::-1], n)
        out = np.zeros_like(q)
        total_log = pre_log[:, -1] + np.log(pre[:, -1, n])
        for y in range(vocab):
            # e_{n-1}(all but y) = sum_m e_m(first y tokens) e_{n-1-m}(last V-1-y tokens)
            left, right = pre[:, y], suf[:, vocab - 1 - y]
            conv = np.einsum("bm,bm->b", left[:, :n], right[:, n - 1 :: -1])
            log_conv = np.log(np.maximum(conv, 1e-300)) + pre_log[:, y] + suf_log[:, vocab - 1 - y]
            out[:, y] = np.where(conv > 0, q[:, y] * np.exp(log_conv - total_log), 0.0)
        return out.reshape(np.shape(draft_probs))


LAWS: dict[str, DraftLaw] = {
    law.name: law for law in (IID(), WithoutReplacement(), Greedy(), SpecHub(), ConditionalPoisson())
}


def get_law(law) -> DraftLaw:
    """Look a law up by name (or pass a DraftLaw through)."""
    if isinstance(law, DraftLaw):
        return law
    return LAWS[check_choice(law, LAWS, "law")]
