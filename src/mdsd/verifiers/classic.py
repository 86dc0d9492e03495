"""The published exact verifiers (spec section 4), as conditional output laws.

Shapes: target_probs p and draft_probs q are float64 [B, V]; drafts are int64 [B, n] in draw
order; every ``output_law`` returns pi(. | x) as float64 [B, V].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdsd.laws import complement_renormalised, top_tokens
from mdsd.verifiers.base import Verifier, gather, residual, safe_ratio, scatter_add

ROOT_ITERATIONS = 80  # bisection steps for K-SEQ's rho*: interval [1, n] shrinks below 1e-22


def at_least_one(beta: np.ndarray, n: int) -> np.ndarray:
    """1 - (1 - beta)^n, accurate for tiny beta (log1p/expm1) and exact 1 at beta = 1."""
    with np.errstate(divide="ignore"):
        return -np.expm1(n * np.log1p(-np.minimum(beta, 1.0)))


@dataclass(frozen=True)
class RRS(Verifier):
    """Recursive rejection sampling (SpecInfer), for i.i.d. drafts.

    cur = p. For i = 1..n: accept x_i with probability min(1, cur(x_i) / q(x_i)); on rejection
    cur <- resid(cur, q). If all are rejected, emit y ~ cur. Acceptance in closed form:
    alpha = 1 - prod_{k=1..n} (1 - sum_x min(p_k(x), q(x))), p_1 = p, p_{k+1} = resid(p_k, q).
    """

    name: str = "rrs"
    laws: tuple[str, ...] = ("iid",)

    def output_law(self, p, q, drafts, law):
        out = np.zeros_like(p)
        reach = np.ones(p.shape[0])  # P(all earlier drafts rejected)
        cur = p
        for i in range(drafts.shape[1]):
            x = drafts[:, i]
            accept = safe_ratio(gather(cur, x), gather(q, x))
            scatter_add(out, x, reach * accept)
            reach = reach * (1.0 - accept)
            cur = residual(cur, q)
        return out + reach[:, None] * cur

    def acceptance(self, p, q, n, law):
        reject_all = np.ones(p.shape[0])
        cur = p
        for _ in range(n):
            reject_all = reject_all * (1.0 - np.minimum(cur, q).sum(axis=1))
            cur = residual(cur, q)
        return 1.0 - reject_all


@dataclass(frozen=True)
class RRSWithoutReplacement(Verifier):
    """Recursive rejection sampling for drafts sampled without replacement (verify in draw order).

    cur = p, q_cur = q. For i = 1..n: accept x_i with probability min(1, cur(x_i) / q_cur(x_i));
    on rejection cur <- resid(cur, q_cur), then q_cur <- q_cur without x_i, renormalised.
    If all are rejected, emit y ~ cur.
    """

    name: str = "rrs_without_replacement"
    laws: tuple[str, ...] = ("without_replacement",)

    def output_law(self, p, q, drafts, law):
        out = np.zeros_like(p)
        reach = np.ones(p.shape[0])
        cur, q_cur = p, q
        n = drafts.shape[1]
        for i in range(n):
            x = drafts[:, i]
            accept = safe_ratio(gather(cur, x), gather(q_cur, x))
            scatter_add(out, x, reach * accept)
            reach = reach * (1.0 - accept)
            cur = residual(cur, q_cur)
            if i < n - 1:
                q_cur = complement_renormalised(q_cur, x[:, None])
        return out + reach[:, None] * cur


def kseq_rho(p: np.ndarray, q: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """K-SEQ's rho* in [1, n] with 1 - (1 - beta)^n = rho * beta, beta(rho) = sum min(q, p / rho).

    Bisection keeping g(lo) > 0 >= g(hi), g(rho) = 1 - (1 - beta)^n - rho beta; returns
    (rho, beta) at the ``hi`` end, where the residual p - min(q, p/rho) c is non-negative, so the
    verifier stays exact whatever the root-finder's tolerance (it may only lose ~1e-16 acceptance).
    """

    def beta(rho):
        return np.minimum(q, p / rho[:, None]).sum(axis=1)

    def g(rho):
        b = beta(rho)
        return at_least_one(b, n) - rho * b

    lo = np.ones(p.shape[0])
    hi = np.full(p.shape[0], float(n))
    at_one = g(lo) <= 0  # root at rho = 1 (n = 1, p = q, or disjoint supports)
    hi = np.where(at_one, lo, hi)
    for _ in range(ROOT_ITERATIONS):
        mid = 0.5 * (lo + hi)
        positive = g(mid) > 0
        lo = np.where(positive, mid, lo)
        hi = np.where(positive, hi, mid)
    return hi, beta(hi)


@dataclass(frozen=True)
class KSEQ(Verifier):
    """K-SEQ (SpecTr, Sun et al. 2023), for i.i.d. drafts.

    beta(rho) = sum_x min(q_x, p_x / rho); rho* in [1, n] solves 1 - (1 - beta)^n = rho beta.
    Accept the first x_i that passes probability min(1, p(x_i) / (rho* q(x_i))); if none, emit
    y ~ [p(y) - min(q_y, p_y / rho*) (1 - (1 - beta)^n) / beta] / (1 - beta)^n.
    Acceptance 1 - (1 - beta(rho*))^n (at least (1 - 1/e) alpha*).
    """

    name: str = "kseq"
    laws: tuple[str, ...] = ("iid",)

    def output_law(self, p, q, drafts, law):
        n = drafts.shape[1]
        rho, beta = kseq_rho(p, q, n)
        out = np.zeros_like(p)
        reach = np.ones(p.shape[0])
        for i in range(n):
            x = drafts[:, i]
            accept = safe_ratio(gather(p, x), rho * gather(q, x))
            scatter_add(out, x, reach * accept)
            reach = reach * (1.0 - accept)
        accepted_total = at_least_one(beta, n)
        # c = (1 - (1-beta)^n) / beta, whose limit as beta -> 0 is n (disjoint supports).
        c = np.where(beta > 0, accepted_total / np.where(beta > 0, beta, 1.0), float(n))
        leftover = p - np.minimum(q, p / rho[:, None]) * c[:, None]
        # leftover >= 0 up to rounding (rho is on the safe side of the root); clip, then normalise.
        recovered = residual(np.maximum(leftover, 0.0), np.zeros_like(p))
        return out + reach[:, None] * recovered

    def acceptance(self, p, q, n, law):
        _, beta = kseq_rho(p, q, n)
        return at_least_one(beta, n)


@dataclass(frozen=True)
class GreedyVerifier(Verifier):
    """The optimal verifier of the greedy law (Hu et al., ICLR 2025).

    Drafts are T = top-(n-1) of q plus x_n ~ q'. Single-draft speculative sampling of p against q'
    on x_n: accept x_n with probability min(1, p(x_n) / q'(x_n)), else emit y ~ resid(p, q').
    q' is 0 on T, so the residual keeps T's target mass, and T's tokens are drafts: they count as
    accepted. Acceptance = alpha* of the law = p(T) + sum_{x not in T} min(p_x, q'_x).
    """

    name: str = "greedy"
    laws: tuple[str, ...] = ("greedy",)

    def output_law(self, p, q, drafts, law):
        n = drafts.shape[1]
        rest = complement_renormalised(q, top_tokens(q, n - 1))  # q'
        last = drafts[:, -1]
        accept = safe_ratio(gather(p, last), gather(rest, last))
        out = (1.0 - accept)[:, None] * residual(p, rest)
        scatter_add(out, last, accept)
        return out

    def acceptance(self, p, q, n, law):
        top = top_tokens(q, n - 1)
        rest = complement_renormalised(q, top)
        in_top = np.zeros(p.shape, dtype=bool)
        np.put_along_axis(in_top, top, True, axis=1)
        return np.where(in_top, p, np.minimum(p, rest)).sum(axis=1)


@dataclass(frozen=True)
class SpecHubVerifier(Verifier):
    """SpecHub (Sun et al., EMNLP 2024) for n = 2 drafts with hub a = argmax q.

    Q(a, i) = q_a q_i / (1 - q_a); p1(i) = max(p_i - q_i, 0); p2(i) = max(p1(i) - Q(a, i), 0);
    Q'(i, a) = max(q_i - p_i, 0); Q'(a, i) = max(Q(a, i) - p1(i), 0); pa1 = max(p_a - sum Q'(a, .), 0).
    Pair (i, a): accept i w.p. min(1, p_i / q_i), then a w.p. min(1, pa1 / sum Q'(., a)).
    Pair (a, i): accept i w.p. min(1, p1(i) / Q(a, i)), then a w.p. min(1, p_a / sum Q'(a, .)).
    Otherwise emit from p2 on i != a and max(pa1 - sum Q'(., a), 0) on a, normalised.
    Attains alpha* of its law (= greedy with n = 2). 1 - q_a is summed from the other entries, so
    q_a close to 1 keeps its precision.
    """

    name: str = "spechub"
    laws: tuple[str, ...] = ("spechub",)

    def _tables(self, p, q):
        rows = np.arange(p.shape[0])
        hub = np.argmax(q, axis=1)
        not_hub = np.ones_like(q, dtype=bool)
        not_hub[rows, hub] = False
        q_hub, p_hub = q[rows, hub], p[rows, hub]
        q_rest = np.where(not_hub, q, 0.0).sum(axis=1)  # 1 - q_a, summed for precision
        pair_hub_first = np.where(not_hub, q_hub[:, None] * q / q_rest[:, None], 0.0)  # Q(a, i)
        p1 = np.where(not_hub, np.maximum(p - q, 0.0), 0.0)
        p2 = np.maximum(p1 - pair_hub_first, 0.0)
        left_i_first = np.where(not_hub, np.maximum(q - p, 0.0), 0.0).sum(axis=1)  # sum Q'(., a)
        left_hub_first = np.maximum(pair_hub_first - p1, 0.0).sum(axis=1)  # sum Q'(a, .)
        p_hub_left = np.maximum(p_hub - left_hub_first, 0.0)  # pa1
        recovered = p2.copy()
        recovered[rows, hub] = np.maximum(p_hub_left - left_i_first, 0.0)
        return hub, pair_hub_first, p1, left_i_first, left_hub_first, p_hub, p_hub_left, recovered

    def output_law(self, p, q, drafts, law):
        rows = np.arange(p.shape[0])
        hub, pair_hub_first, p1, left_i, left_hub, p_hub, p_hub_left, recovered = self._tables(p, q)
        hub_first = drafts[:, 0] == hub
        other = np.where(hub_first, drafts[:, 1], drafts[:, 0])  # the non-hub draft i
        # pair (i, a): i first
        accept_i_if_i_first = safe_ratio(p[rows, other], q[rows, other])
        accept_a_if_i_first = safe_ratio(p_hub_left, left_i)
        # pair (a, i): hub first
        accept_i_if_a_first = safe_ratio(p1[rows, other], pair_hub_first[rows, other])
        accept_a_if_a_first = safe_ratio(p_hub, left_hub)
        accept_i = np.where(hub_first, accept_i_if_a_first, accept_i_if_i_first)
        accept_a = np.where(hub_first, accept_a_if_a_first, accept_a_if_i_first)
        reach = (1.0 - accept_i) * (1.0 - accept_a)
        out = reach[:, None] * residual(recovered, np.zeros_like(p))
        scatter_add(out, other, accept_i)
        scatter_add(out, hub, (1.0 - accept_i) * accept_a)
        return out

    def acceptance(self, p, q, n, law):
        return GreedyVerifier().acceptance(p, q, 2, law)


def importance_law(p: np.ndarray, q: np.ndarray, n: int) -> np.ndarray:
    """Law p_I of the draft picked by max-importance selection from n i.i.d. drafts.

    Tokens are ranked by importance weight p/q (decreasing; ties by lower index); the picked draft
    is the best-ranked one. With G(k) = q(tokens of rank >= k) (summed from the tail):
    p_I(token of rank k) = G(k)^n - G(k+1)^n.   [B, V] -> [B, V]
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(q > 0, p / np.where(q > 0, q, 1.0), -np.inf)
    order = np.argsort(-weight, axis=1, kind="stable")
    q_sorted = np.take_along_axis(q, order, axis=1)
    tail = np.minimum(np.cumsum(q_sorted[:, ::-1], axis=1)[:, ::-1], 1.0)  # G(k)
    after = np.concatenate([tail[:, 1:], np.zeros((q.shape[0], 1))], axis=1)  # G(k + 1)
    picked_sorted = tail**n - after**n
    picked = np.empty_like(q)
    np.put_along_axis(picked, order, picked_sorted, axis=1)
    return np.where(q > 0, np.maximum(picked, 0.0), 0.0)


@dataclass(frozen=True)
class Importance(Verifier):
    """Importance selection + single-draft speculative sampling (Khisti et al., ICLR 2025 form).

    Rule: pick the draft with the largest importance weight p(x)/q(x) (ties by lower token id), a
    deterministic member of Khisti et al.'s canonical family. Its exact law p_I has the closed form
    of ``importance_law``; then accept the picked token s with probability min(1, p(s)/p_I(s)),
    else emit y ~ resid(p, p_I). Exact for i.i.d. drafts for any p, q.
    """

    name: str = "importance"
    laws: tuple[str, ...] = ("iid",)

    def output_law(self, p, q, drafts, law):
        picked_law = importance_law(p, q, drafts.shape[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = gather(p, drafts) / gather(q, drafts)  # [B, n], q > 0 on drafts
        # best weight, ties by lower token id
        best = np.lexsort((drafts, -weight), axis=1)[:, 0]
        picked = drafts[np.arange(drafts.shape[0]), best]
        accept = safe_ratio(gather(p, picked), gather(picked_law, picked))
        out = (1.0 - accept)[:, None] * residual(p, picked_law)
        scatter_add(out, picked, accept)
        return out


@dataclass(frozen=True)
class SampleCheck(Verifier):
    """Draw y ~ p and accept iff y is a draft. Exact for every law; the baseline.

    Acceptance = sum_y p(y) P(y in set(x)) (inclusion probabilities of the law); optimal for
    deterministic top-n drafts, where it is p(top-n).
    """

    name: str = "sample_check"
    laws: tuple[str, ...] = (
        "iid",
        "without_replacement",
        "greedy",
        "spechub",
        "conditional_poisson",
    )

    def output_law(self, p, q, drafts, law):
        return p.copy()

    def acceptance(self, p, q, n, law):
        try:
            inclusion = law.inclusion_probs(q, n)
        except NotImplementedError:
            return None
        return (p * inclusion).sum(axis=1)
