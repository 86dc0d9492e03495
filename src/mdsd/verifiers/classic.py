"""The published exact verifiers (docs/theory.md §5), as conditional output laws.

Shapes: target_probs p and draft_probs q are float64 [B, V]; drafts are int64 [B, n] in draw
order; every ``output_law`` returns pi(. | x) as float64 [B, V]. Every verifier is written once
against ``mdsd._array_ops`` and runs on numpy arrays and on torch tensors (CPU or CUDA).

Sampling (``sample``, ``sample_with_branch``) exits early: the drafts are tested in order from
their ratios, and the vocabulary is read only after a rejection (``mdsd.verifiers._early_exit``:
the compiled numpy kernels; ``mdsd.verifiers._early_exit_batch``: the dispatch to them and the
batch-vectorised versions for torch). The closed forms and solvers the verifiers use (K-SEQ's
rho*, the importance law, exact acceptance rates) are in ``mdsd.verifiers.classic_math``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mdsd._array_ops import backend, complement_renormalised, top_mask
from mdsd.verifiers._early_exit_batch import (
    early_exit_kernels,
    greedy_vectorised,
    importance_vectorised,
    kseq_vectorised,
    rrs_vectorised,
    run_kernel,
    spechub_vectorised,
)
from mdsd.verifiers.base import (
    EarlyExitVerifier,
    gather,
    inverse_cdf,
    residual,
    safe_ratio,
    scatter_add,
)
from mdsd.verifiers.classic_math import (
    INTERVAL_ITERATIONS,
    at_least_one,
    drop_token,
    importance_acceptance,
    importance_law,
    kseq_rho,
    picked_draft,
    rrs_wor_acceptance_two,
    rrs_wor_acceptance_walk,
)


def single_draft_law(p, proposal, token):
    """Law of single-draft speculative sampling of ``token`` [B] drawn from ``proposal`` [B, V]:
    accept it with probability min(1, p(token) / proposal(token)), else y ~ resid(p, proposal).
    [B, V] -> [B, V]; the last step of ``greedy`` (proposal q') and ``importance`` (p_I)."""
    accept = safe_ratio(gather(p, token), gather(proposal, token))
    out = residual(p, proposal)
    out *= (1.0 - accept)[:, None]
    scatter_add(out, token, accept)
    return out


@dataclass(frozen=True)
class RecursiveRejection(EarlyExitVerifier):
    """Recursive rejection sampling, the rule shared by ``RRS`` (``distinct`` False: q_cur = q
    throughout) and ``RRSWithoutReplacement`` (``distinct`` True: q_cur loses each rejected
    draft, renormalised). Each subclass adds its laws and acceptance."""

    distinct: ClassVar[bool] = False

    def output_law(self, p, q, drafts, law):
        ops = backend(p)
        out = ops.zeros_like(p)
        reach = ops.ones_rows(p)  # P(all earlier drafts rejected)
        cur, q_cur = p, q
        n = drafts.shape[1]
        for i in range(n):
            x = drafts[:, i]
            accept = safe_ratio(gather(cur, x), gather(q_cur, x))
            scatter_add(out, x, reach * accept)
            reach = reach * (1.0 - accept)
            cur = residual(cur, q_cur)
            if self.distinct and i < n - 1:
                q_cur = drop_token(q_cur, x)
        out += reach[:, None] * cur
        return out

    def uniforms_per_row(self, n):
        return n + 1

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = early_exit_kernels(p, vectorised)
        if kernels is None:
            return rrs_vectorised(p, q, drafts, uniforms, distinct=self.distinct)
        return run_kernel(kernels.rrs_sample, p, q, drafts, uniforms, self.distinct)


@dataclass(frozen=True)
class RRS(RecursiveRejection):
    """Recursive rejection sampling (SpecInfer), for i.i.d. drafts.

    cur = p. For i = 1..n: accept x_i with probability min(1, cur(x_i) / q(x_i)); on rejection
    cur <- resid(cur, q). If all are rejected, emit y ~ cur. Acceptance in closed form:
    alpha = 1 - prod_{k=1..n} (1 - sum_x min(p_k(x), q(x))), p_1 = p, p_{k+1} = resid(p_k, q).
    """

    name: str = "rrs"
    laws: tuple[str, ...] = ("iid",)

    def acceptance(self, p, q, n, law):
        ops = backend(p)
        reject_all = ops.ones_rows(p)
        cur = p
        for _ in range(n):
            reject_all = reject_all * (1.0 - ops.row_sum(ops.minimum(cur, q)))
            cur = residual(cur, q)
        return 1.0 - reject_all


@dataclass(frozen=True)
class RRSWithoutReplacement(RecursiveRejection):
    """Recursive rejection sampling for drafts sampled without replacement (verify in draw order).

    cur = p, q_cur = q. For i = 1..n: accept x_i with probability min(1, cur(x_i) / q_cur(x_i));
    on rejection cur <- resid(cur, q_cur), then q_cur <- q_cur without x_i, renormalised.
    If all are rejected, emit y ~ cur.

    ``acceptance``: exact for n = 2 in O(V log V) (``rrs_wor_acceptance_two``); otherwise None
    (``mdsd.acceptance_rate`` then enumerates small supports or estimates).
    """

    name: str = "rrs_without_replacement"
    laws: tuple[str, ...] = ("without_replacement",)
    distinct: ClassVar[bool] = True

    def acceptance(self, p, q, n, law):
        ops = backend(p)
        if n == 1:
            return ops.row_sum(ops.minimum(p, q))
        if n == 2:
            return rrs_wor_acceptance_two(p, q)
        if ops.name != "numpy":
            return None
        rates = []
        for pr, qr in zip(p, q):
            rate = rrs_wor_acceptance_walk(pr, qr, n)
            if rate is None:
                return None
            rates.append(rate)
        return np.array(rates)

    def acceptance_method(self, n):
        return "closed_form" if n <= 2 else "enumeration"


@dataclass(frozen=True)
class KSEQ(EarlyExitVerifier):
    """K-SEQ (SpecTr, Sun et al. 2023), for i.i.d. drafts.

    beta(rho) = sum_x min(q_x, p_x / rho); rho* in [1, n] solves 1 - (1 - beta)^n = rho beta.
    Accept the first x_i that passes probability min(1, p(x_i) / (rho* q(x_i))); if none, emit
    y ~ [p(y) - min(q_y, p_y / rho*) (1 - (1 - beta)^n) / beta] / (1 - beta)^n.
    Acceptance 1 - (1 - beta(rho*))^n (at least (1 - 1/e) alpha*).
    """

    name: str = "kseq"
    laws: tuple[str, ...] = ("iid",)

    def output_law(self, p, q, drafts, law):
        ops = backend(p)
        n = drafts.shape[1]
        rho, beta = kseq_rho(p, q, n)
        out = ops.zeros_like(p)
        reach = ops.ones_rows(p)
        for i in range(n):
            x = drafts[:, i]
            accept = safe_ratio(gather(p, x), rho * gather(q, x))
            scatter_add(out, x, reach * accept)
            reach = reach * (1.0 - accept)
        accepted_total = at_least_one(beta, n)
        # c = (1 - (1-beta)^n) / beta, whose limit as beta -> 0 is n (disjoint supports).
        c = ops.divide_safe(accepted_total, beta, float(n))
        leftover = p - ops.minimum(q, p / rho[:, None]) * c[:, None]
        # leftover >= 0 up to rounding (rho is on the safe side of the root); clip, then normalise.
        recovered = residual(ops.positive_part(leftover), 0.0)
        out += reach[:, None] * recovered
        return out

    def uniforms_per_row(self, n):
        return n + 1

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = early_exit_kernels(p, vectorised)
        if kernels is None:
            return kseq_vectorised(p, q, drafts, uniforms)
        unknown = np.full(p.shape[0], np.nan)
        tokens, branch = run_kernel(kernels.kseq_sample, p, q, drafts, uniforms, unknown, unknown)
        if np.any(branch < 0):  # a test between the bounds, or all rejected: rho* row by row
            pending = kernels.kseq_sample_pending
            run_kernel(pending, p, q, drafts, uniforms, INTERVAL_ITERATIONS, out=(tokens, branch))
        return tokens, branch

    def acceptance(self, p, q, n, law):
        _, beta = kseq_rho(p, q, n)
        return at_least_one(beta, n)


@dataclass(frozen=True)
class GreedyVerifier(EarlyExitVerifier):
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
        rest = complement_renormalised(q, top_mask(q, n - 1))  # q'
        return single_draft_law(p, rest, drafts[:, -1])

    def uniforms_per_row(self, n):
        return 2

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = early_exit_kernels(p, vectorised)
        if kernels is None:
            return greedy_vectorised(p, q, drafts, uniforms)
        return run_kernel(kernels.greedy_sample, p, q, drafts, uniforms)

    def acceptance(self, p, q, n, law):
        ops = backend(p)
        in_top = top_mask(q, n - 1)
        rest = complement_renormalised(q, in_top)
        return ops.row_sum(ops.where(in_top, p, ops.minimum(p, rest)))


@dataclass(frozen=True)
class SpecHubVerifier(EarlyExitVerifier):
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
        ops = backend(p)
        rows = ops.rows(p)
        hub = ops.argmax(q)
        not_hub = q == q  # all True, [B, V]
        ops.put(not_hub, hub, False)
        zero = 0.0
        q_hub, p_hub = q[rows, hub], p[rows, hub]
        q_rest = ops.row_sum(ops.where(not_hub, q, zero))  # 1 - q_a, summed for precision
        pair_hub_first = ops.where(not_hub, q_hub[:, None] * q / q_rest[:, None], zero)  # Q(a, i)
        p1 = ops.where(not_hub, ops.positive_part(p - q), zero)
        p2 = ops.positive_part(p1 - pair_hub_first)
        left_i_first = ops.row_sum(ops.where(not_hub, ops.positive_part(q - p), zero))  # sum Q'(., a)
        left_hub_first = ops.row_sum(ops.positive_part(pair_hub_first - p1))  # sum Q'(a, .)
        p_hub_left = ops.positive_part(p_hub - left_hub_first)  # pa1
        recovered = ops.copy(p2)
        ops.put(recovered, hub, ops.positive_part(p_hub_left - left_i_first))
        return hub, pair_hub_first, p1, left_i_first, left_hub_first, p_hub, p_hub_left, recovered

    def output_law(self, p, q, drafts, law):
        ops = backend(p)
        rows = ops.rows(p)
        hub, pair_hub_first, p1, left_i, left_hub, p_hub, p_hub_left, recovered = self._tables(p, q)
        hub_first = drafts[:, 0] == hub
        other = ops.where(hub_first, drafts[:, 1], drafts[:, 0])  # the non-hub draft i
        # pair (i, a): i first
        accept_i_if_i_first = safe_ratio(p[rows, other], q[rows, other])
        accept_a_if_i_first = safe_ratio(p_hub_left, left_i)
        # pair (a, i): hub first
        accept_i_if_a_first = safe_ratio(p1[rows, other], pair_hub_first[rows, other])
        accept_a_if_a_first = safe_ratio(p_hub, left_hub)
        accept_i = ops.where(hub_first, accept_i_if_a_first, accept_i_if_i_first)
        accept_a = ops.where(hub_first, accept_a_if_a_first, accept_a_if_i_first)
        reach = (1.0 - accept_i) * (1.0 - accept_a)
        out = residual(recovered, 0.0)
        out *= reach[:, None]
        scatter_add(out, other, accept_i)
        scatter_add(out, hub, (1.0 - accept_i) * accept_a)
        return out

    def uniforms_per_row(self, n):
        return 3

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = early_exit_kernels(p, vectorised)
        if kernels is None:
            return spechub_vectorised(self, p, q, drafts, uniforms)
        return run_kernel(kernels.spechub_sample, p, q, drafts, uniforms)

    def acceptance(self, p, q, n, law):
        return GreedyVerifier().acceptance(p, q, 2, law)


@dataclass(frozen=True)
class Importance(EarlyExitVerifier):
    """Importance selection + single-draft speculative sampling (Khisti et al., ICLR 2025 form).

    Rule: pick the draft with the largest importance weight p(x)/q(x) (ties by lower token id), a
    deterministic member of Khisti et al.'s canonical family. Its exact law p_I has the closed form
    of ``importance_law``; then accept the picked token s with probability min(1, p(s)/p_I(s)),
    else emit y ~ resid(p, p_I). Exact for i.i.d. drafts for any p, q.
    Sampling draws the residual token by inverse CDF along the rank order (p / q decreasing, ties
    by lower id, q = 0 last), which the compiled path refines only where the draw lands
    (``mdsd.verifiers._importance_residual``: no sort of the vocabulary).
    """

    name: str = "importance"
    laws: tuple[str, ...] = ("iid",)

    def output_law(self, p, q, drafts, law):
        picked_law = importance_law(p, q, drafts.shape[1])
        return single_draft_law(p, picked_law, picked_draft(p, q, drafts))

    def uniforms_per_row(self, n):
        return 2

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        kernels = early_exit_kernels(p, vectorised)
        if kernels is None:
            return importance_vectorised(p, q, drafts, uniforms)
        return run_kernel(kernels.importance_rows, p, q, drafts, uniforms)  # rejected rows: no sort

    def acceptance(self, p, q, n, law):
        return importance_acceptance(np.asarray(p), np.asarray(q), n)


@dataclass(frozen=True)
class SampleCheck(EarlyExitVerifier):
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
        return backend(p).copy(p)

    def uniforms_per_row(self, n):
        return 1

    def sample_with_branch(self, p, q, drafts, law, uniforms, vectorised=False):
        """y ~ p directly (one sum, one search): no test, branch 0 for every row."""
        kernels = early_exit_kernels(p, vectorised)
        if kernels is None:
            tokens = inverse_cdf(p, uniforms[:, 0])
        else:
            tokens = np.empty(p.shape[0], dtype=np.int64)
            kernels.categorical_draw(np.ascontiguousarray(p, dtype=np.float64), uniforms[:, 0], tokens)
        return tokens, tokens * 0

    def acceptance(self, p, q, n, law):
        try:
            inclusion = law.inclusion_probs(np.asarray(q), n)
        except NotImplementedError:
            return None
        return (np.asarray(p) * inclusion).sum(axis=1)
