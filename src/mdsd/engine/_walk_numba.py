"""Compiled steps of the engine's walk (``mdsd.engine.walk``).

``merge_supports``: every verified node is verified on the union of the supports of p and q
(``walk.common_support``); with ``np.union1d`` and two ``searchsorted`` calls that took several
microseconds per node, and tens of microseconds in the decoding loop, where the weights' stream has
evicted numpy's code. One merge of the two ascending id lists gives the same arrays (tested against
the numpy form, ``walk.common_support_reference``).

``rejection_node``, ``orders_node_on_union``, ``threshold_node_on_union``: a node verified by
recursive rejection sampling (``rrs``, ``rrs_without_replacement``, and every single-draft node of
the lean loop) or by the optimal verifier's compiled nodes, i.e. ``walk.verify_node_reference``'s
steps (the union support, then the verifier's kernel on it) in one call: the fast paths of
``walk.verify_node`` and ``walk.walk_chain``.

``softmax_chain_walk`` (and ``softmax_chain_block_walk``, block verification's draw):
``walk.walk_chain`` of a whole chain whose target rows are the tempered
softmax of their logits, in one call from the logits: each visited row's softmax, its node and the
bonus draw, with the generator's own uniforms in the reference's order (``mdsd.sampling.next_uniform``
draws the numbers numpy draws). It saves the Python around every visited node: wrapping p
and q, a closure, a dispatch per row and per node (the walk and cache bookkeeping of a 1x3
chain's step took 132 against 161 microseconds in the decoding loop, BENCHMARKS.md). A draft
is first tested against a lower bound on its p(x) from float32 exponentials
(``softmax_lower_bound``): the float64 softmax then runs only for the drafts that test does not
keep, with the reference's outcome either way (docs/engine.md, "Early acceptance").

``tree_walk``: ``walk.walk`` of a whole multi-draft tree drafted in one call
(``_llama_numba.sample_tree``) from the target's logits of its valid rows, every node verified
by ``rejection_node`` or by the optimal verifier's threshold node (docs/engine.md, "Trees in
three compiled calls").
"""

from __future__ import annotations

import math

import numba
import numpy as np

from mdsd._softmax_numba import tempered_softmax
from mdsd._topk_numba import MASK32, SHIFT32, _max_key
from mdsd._topp_numba import truncated_softmax, truncates
from mdsd.engine._llama_numba import exp_inplace, prefetch_positions
from mdsd.sampling import draw, next_uniform, next_uniforms
from mdsd.sequence.chain import _excess_and_deficit, _residual_draw
from mdsd.verifiers._early_exit import (
    _ratio,
    greedy_sample,
    importance_rows,
    kseq_sample,
    kseq_sample_pending,
    rrs_sample,
    spechub_sample,
)
from mdsd.verifiers.classic_math import INTERVAL_ITERATIONS
from mdsd.verifiers.optimal._orders_numba import orders_node
from mdsd.verifiers.optimal._threshold_numba import threshold_node
from mdsd.verifiers.optimal.threshold import NODE_UNIFORMS as THRESHOLD_UNIFORMS


@numba.njit(cache=True)
def merge_supports(p_ids, p_values, q_ids, q_values):
    """(tokens [K] ascending, p [K], q [K]) on the union of two ascending, duplicate-free id lists
    with their values; 0 where a token is in one support only."""
    size = p_ids.size + q_ids.size
    tokens = np.empty(size, dtype=np.int64)
    p_local, q_local = np.zeros(size), np.zeros(size)
    i = j = m = 0
    while i < p_ids.size or j < q_ids.size:
        if j == q_ids.size or (i < p_ids.size and p_ids[i] < q_ids[j]):
            tokens[m], p_local[m] = p_ids[i], p_values[i]
            i += 1
        elif i == p_ids.size or q_ids[j] < p_ids[i]:
            tokens[m], q_local[m] = q_ids[j], q_values[j]
            j += 1
        else:  # in both supports
            tokens[m], p_local[m], q_local[m] = p_ids[i], p_values[i], q_values[j]
            i += 1
            j += 1
        m += 1
    return tokens[:m], p_local[:m], q_local[:m]


@numba.njit(cache=True)
def _dense(ids, values, vocab):
    """``SupportProbs.dense``: values [V] as they are when ``ids`` is empty, else scattered."""
    if ids.size == 0:
        return values
    out = np.zeros(vocab)
    out[ids] = values
    return out


@numba.njit(cache=True)
def _on_union(p_ids, p_values, q_ids, q_values, vocab, drafts):
    """``walk.verify_node_reference``'s arrays: (tokens [K] ascending, empty when dense; p [K];
    q [K]; the drafts' positions in them [n]), on the union of the supports by
    ``merge_supports``, or both dense [V] when either is (an empty id array means dense)."""
    if p_ids.size == 0 or q_ids.size == 0:
        p_local, q_local = _dense(p_ids, p_values, vocab), _dense(q_ids, q_values, vocab)
        return np.empty(0, dtype=np.int64), p_local, q_local, np.ascontiguousarray(drafts)
    tokens, p_local, q_local = merge_supports(p_ids, p_values, q_ids, q_values)
    return tokens, p_local, q_local, np.searchsorted(tokens, drafts)


@numba.njit(cache=True)
def rejection_node(p_ids, p_values, q_ids, q_values, vocab, drafts, uniforms, distinct):
    """The token emitted at a node with drafts ``drafts`` [n] (token ids, in draw order) by
    recursive rejection sampling on the union of the supports of p and q (``distinct``: without
    replacement, q losing each rejected draft), from ``uniforms`` [n + 1]. p and q as
    ``SupportProbs``: ascending ``*_ids`` with their ``*_values`` (an empty id array: dense
    values [V]). ``rrs_sample`` on ``_on_union``'s arrays: the token
    ``walk.verify_node_reference`` draws from the same uniforms (tested)."""
    tokens, p_local, q_local, local = _on_union(p_ids, p_values, q_ids, q_values, vocab, drafts)
    n = local.size
    out, branch = np.empty(1, dtype=np.int64), np.empty(1, dtype=np.int64)
    p_row, q_row = p_local.reshape(1, -1), q_local.reshape(1, -1)
    rrs_sample(p_row, q_row, local.reshape(1, n), uniforms.reshape(1, n + 1), distinct, out, branch)
    return out[0] if tokens.size == 0 else tokens[out[0]]


# How ``tree_walk`` verifies its nodes outside the optimal verifier's plan
# (``walk.walk_rule``): recursive rejection sampling, i.i.d. or without replacement
# (``rejection_node``), or one of the other verifiers' early-exit samplers (``classic_node``).
(
    RULE_RRS,
    RULE_RRS_WITHOUT_REPLACEMENT,
    RULE_GREEDY,
    RULE_KSEQ,
    RULE_IMPORTANCE,
    RULE_SAMPLE_CHECK,
    RULE_SPECHUB,
) = range(7)


@numba.njit(cache=True)
def node_uniforms(rule, n):
    """The uniforms a node of n drafts takes under ``rule``: the verifier's
    ``uniforms_per_row(n)``."""
    if rule == RULE_GREEDY or rule == RULE_IMPORTANCE:
        return 2
    if rule == RULE_SAMPLE_CHECK:
        return 1
    if rule == RULE_SPECHUB:
        return 3
    return n + 1


@numba.njit(cache=True)
def classic_node(p_ids, p_values, q_ids, q_values, vocab, drafts, uniforms, rule):
    """The token emitted at a node with drafts ``drafts`` [n] (draw order) by the verifier of
    ``rule`` on the union of the supports of p and q (``_on_union``), from ``uniforms``
    [``node_uniforms(rule, n)``]: its ``sample_with_branch`` on one row, the greedy law's
    verifier (``greedy_sample``), SpecHub (``spechub_sample``, two drafts), K-SEQ
    (``kseq_sample``, then ``kseq_sample_pending`` where its tests fall between the bounds),
    importance selection (``importance_rows``) or ``sample_check`` (y ~ p): the token
    ``walk.verify_node_reference`` draws from the same uniforms (tested)."""
    tokens, p_local, q_local, local = _on_union(p_ids, p_values, q_ids, q_values, vocab, drafts)
    if rule == RULE_SAMPLE_CHECK:
        y = draw(p_local, uniforms[0])
        return y if tokens.size == 0 else tokens[y]
    n = local.size
    out, branch = np.empty(1, dtype=np.int64), np.empty(1, dtype=np.int64)
    p_row, q_row = p_local.reshape(1, -1), q_local.reshape(1, -1)
    d_row, u_row = local.reshape(1, n), uniforms.reshape(1, uniforms.size)
    if rule == RULE_GREEDY:
        greedy_sample(p_row, q_row, d_row, u_row, out, branch)
    elif rule == RULE_SPECHUB:
        spechub_sample(p_row, q_row, d_row, u_row, out, branch)
    elif rule == RULE_KSEQ:
        unknown = np.full(1, np.nan)
        kseq_sample(p_row, q_row, d_row, u_row, unknown, unknown, out, branch)
        if branch[0] < 0:  # a test between the bounds, or all rejected: rho* first
            kseq_sample_pending(p_row, q_row, d_row, u_row, INTERVAL_ITERATIONS, out, branch)
    else:
        importance_rows(p_row, q_row, d_row, u_row, out, branch)
    return out[0] if tokens.size == 0 else tokens[out[0]]


# The early acceptance of ``softmax_chain_walk``: a lower bound on p(x) from float32
# exponentials (``softmax_lower_bound``; the error analysis: docs/engine.md, "Early
# acceptance"). Error terms, relative: float32's exp by ``exp_inplace`` (at most 1.41 ulp on
# every float32 in [-86, 0], tested exhaustively; 8 allowed), the float32 exponent z (three
# roundings of (l - max) / T: 3.1 ulp of |z|), a term flushed to 0 below ``EXP_LOW`` (at most
# exp(-86 + 1e-6) < 2.5e-38 each).
EXP32_ERROR = 8.0 * 2.0**-24
Z32_ERROR = 3.1 * 2.0**-24
FLUSHED_TERM = 2.5e-38
FLOAT32_NORMAL = 1.1754944e-38  # the smallest normal float32
EARLY_MAX_SHIFT = 4.0e9  # |max l / T| above this: float64's rounding of z is not negligible
EARLY_MIN_EXPONENT = -600.0  # z_x below this: no early acceptance (p(x) < 3e-261, kept normal)


@numba.njit(cache=True, boundscheck=False)
def _row_max32(logits):
    """max(logits) of a float32 row without NaN, by integer keys (``mdsd._topk_numba``: the
    compiler vectorises a maximum of integers, not one of floats)."""
    key = _max_key(logits.view(np.int32), SHIFT32, MASK32)
    bits = np.empty(1, dtype=np.int32)
    bits[0] = key if key >= 0 else (key - 1) ^ 0x7FFFFFFF  # the key's inverse
    return bits.view(np.float32)[0]


@numba.njit(cache=True, boundscheck=False, fastmath={"reassoc"})
def _exp_sums(e, z):
    """(sum e, sum e |z|) in float64 over float32 e [n] >= 0 and z [n] <= 0 (|z| capped at 100:
    where it is larger, e = 0)."""
    total = weighted = 0.0
    for i in range(e.size):
        value = np.float64(e[i])
        total += value
        weighted += value * min(-np.float64(z[i]), 100.0)
    return total, weighted


@numba.njit(cache=True, boundscheck=False)
def _float32_exps(logits, temperature):
    """(ok, max l, |max l / T|, z [V], e [V]) for a float32 row ``logits`` [V] (no NaN; some entry
    finite): z_i = (l_i - max l) / T and e_i = exp(z_i) in float32 (``exp_inplace``), the terms of
    ``softmax_lower_bound`` and ``softmax_draw``; ok is False (z, e empty) where their error bound
    does not apply: 1/T outside float32's normal range or |max l / T| > ``EARLY_MAX_SHIFT``."""
    empty = np.empty(0, dtype=np.float32)
    inv = np.float32(1.0 / temperature)
    top = _row_max32(logits)
    shift = abs(np.float64(top) / temperature)
    if not (inv >= FLOAT32_NORMAL and inv < np.inf) or shift > EARLY_MAX_SHIFT:
        return False, top, shift, empty, empty
    n = logits.size
    z = np.empty(n, dtype=np.float32)
    e = np.empty(n, dtype=np.float32)
    for i in range(n):
        zi = (logits[i] - top) * inv
        z[i] = zi
        e[i] = zi
    exp_inplace(e)
    return True, top, shift, z, e


@numba.njit(cache=True)
def _sum_error(total, weighted, shift, n):
    """delta: a bound on the relative error of S32 = ``total`` (the float32 terms e_i summed) as
    the reference's normaliser, its own rounding included, from ``weighted`` = sum e_i |z_i|
    (docs/engine.md, "Early acceptance")."""
    error = Z32_ERROR * weighted + (EXP32_ERROR + 2.0**-51 * (shift + 1.0)) * total + n * FLUSHED_TERM
    return 1.01 * (error / total + (2 * n + 16) * 2.0**-53)


@numba.njit(cache=True, boundscheck=False)
def softmax_lower_bound(logits, temperature, token):
    """A number <= ``tempered_softmax(logits, temperature)[0][token]`` for a float32 row
    ``logits`` [V] (no NaN; some entry finite): exp(z_x) / S (1 - delta), S = sum_i exp(z_i)
    by float32 exponentials of z_i = (l_i - max l) / T summed in float64, z_x exactly as
    ``tempered_softmax`` forms it, and delta a bound on the relative error of S and of the
    reference's own rounding; 0.0 where the bound does not apply (1/T outside float32's normal
    range, |max l / T| > ``EARLY_MAX_SHIFT``, delta >= 1e-3, z_x < ``EARLY_MIN_EXPONENT``: all
    quantities stay normal floats, whose rounding the bound covers). One pass of float32
    arithmetic (16 lanes) where the float64 softmax takes several (8 lanes)."""
    ok, top, shift, z, e = _float32_exps(logits, temperature)
    if not ok:
        return 0.0
    total, weighted = _exp_sums(e, z)
    delta = _sum_error(total, weighted, shift, logits.size)
    if delta >= 1e-3:
        return 0.0
    z_token = np.float64(logits[token]) / temperature - np.float64(top) / temperature
    if z_token < EARLY_MIN_EXPONENT:  # p(x) near float64's subnormals, whose rounding is coarse
        return 0.0
    return math.exp(z_token) / total * (1.0 - delta) * (1.0 - 2.0**-50)


DRAW_BLOCK = 256  # ``softmax_draw``'s partial sums: one per block of this many terms


@numba.njit(cache=True, boundscheck=False)
def _certified_draw(logits, temperature, u):
    """``softmax_draw``'s float32 path: the token, or -1 where it cannot certify it."""
    ok, _, shift, z, e = _float32_exps(logits, temperature)
    if not ok:
        return -1
    n = logits.size
    blocks = (n + DRAW_BLOCK - 1) // DRAW_BLOCK
    block_sums = np.empty(blocks)
    weighted = 0.0
    for b in range(blocks):
        start, stop = b * DRAW_BLOCK, min(n, (b + 1) * DRAW_BLOCK)
        block_sums[b], block_weighted = _exp_sums(e[start:stop], z[start:stop])
        weighted += block_weighted
    total = 0.0
    for b in range(blocks):
        total += block_sums[b]
    delta = _sum_error(total, weighted, shift, n)
    if delta >= 1e-3:
        return -1
    margin = 2.0 * (2.0 * delta + (4 * n + 64) * 2.0**-53)  # on the prefix sums of p
    threshold = u * total
    before = 0.0  # the partial sum of the blocks before block b
    for b in range(blocks):
        if before + block_sums[b] > threshold or b == blocks - 1:
            break
        before += block_sums[b]
    for j in range(b * DRAW_BLOCK, min(n, (b + 1) * DRAW_BLOCK)):
        after = before + np.float64(e[j])
        if after > threshold:  # the prefix crosses u at j: certify both sides
            if before / total <= u - margin and after / total >= u + margin:
                return j
            return -1
        before = after
    return -1


@numba.njit(cache=True)
def softmax_draw(logits, temperature, u, early):
    """``draw(tempered_softmax(logits, temperature)[0], u)``: the token the reference draws at
    uniform u, for logits [V] (no NaN; some entry finite). With ``early`` (float32 logits) it is
    first located from the float32 terms of ``softmax_lower_bound`` (z_i and e_i = exp(z_i), S32
    their sum, partial sums by blocks of ``DRAW_BLOCK``): the first j whose prefix sum P_j =
    sum_{i <= j} e_i / S32 exceeds u. Every prefix sum of the reference's p differs from P_j by at
    most 2 delta (its terms and its normaliser each by delta, relative to S32) plus the rounding of
    both prefix sums and of the reference's threshold u sum(p) ((4V + 64) 2^-53 in all; margin m:
    twice their sum). Where P_{j-1} <= u - m and P_j >= u + m, the reference's running sums are
    below its threshold before j and above it at j (and p_j > 0): it returns j, which is returned
    without the float64 softmax. Else (u within m of a prefix sum, probability ~2m; or the bound
    does not apply) the reference itself decides. Tested draw for draw."""
    if early:
        token = _certified_draw(logits, temperature, u)
        if token >= 0:
            return np.int64(token)
    p, _ = tempered_softmax(logits, temperature)
    return np.int64(draw(p, u))


@numba.njit(cache=True)
def _prob_at(q_ids, q_row, token):
    """The probability of ``token`` in p or q stored on ``q_ids`` (ascending; empty: dense), as
    ``rejection_node`` reads them."""
    if q_ids.size == 0:
        return q_row[token]
    j = np.searchsorted(q_ids, token)
    return q_row[j] if j < q_ids.size and q_ids[j] == token else 0.0


@numba.njit(cache=True)
def _bonus(logits, temperature, uniform, state, early):
    """The bonus token of a chain whose drafts were all kept: a draw from softmax(logits / T)
    [V] at the generator's next uniform (``walk_chain``'s and ``block_sample``'s last draw), by
    ``softmax_draw``."""
    return softmax_draw(logits, temperature, next_uniform(uniform, state), early)


@numba.njit(cache=True)
def softmax_chain_walk(logits, temperature, q_ids, q_values, tokens, uniform, state, early):
    """(kept, token): ``walk.walk_chain`` of a chain of k = ``tokens.size`` drafts whose node
    i - 1 has p = softmax(logits[i] / ``temperature``) (dense; ``tempered_softmax``, the
    transform of ``SamplingConfig.row_probs`` without top-k / top-p) and q = ``q_values[i]`` on
    ``q_ids`` (``rejection_node``'s form; empty: dense), for logits [k + 1, V] and q_values
    [k, K]. Draft i is checked by ``rejection_node`` (one draft, ``rng.random(2)``) while the
    drafts before it were kept; returns the number kept and the recovered token, or k and the
    bonus token drawn from the last row at ``rng.random()``: the tokens and the generator's
    state of ``walk_chain`` on the same rows (tested). ``uniform, state``: the generator's
    ``mdsd.sampling.uniform_source``; ``early``: float32 logits, whose drafts are first tested
    against ``softmax_lower_bound`` (u < lower / q(x) <= p(x) / q(x): the reference keeps x
    too), the float64 softmax computed only for a draft that test does not keep."""
    k, vocab = tokens.size, logits.shape[1]
    dense = np.empty(0, dtype=np.int64)
    uniforms = np.empty(2)
    for i in range(k):
        uniforms[0] = next_uniform(uniform, state)
        uniforms[1] = next_uniform(uniform, state)
        if early:
            lower = softmax_lower_bound(logits[i], temperature, tokens[i])
            if uniforms[0] < _ratio(lower, _prob_at(q_ids, q_values[i], tokens[i])):
                continue  # kept: rejection_node keeps it at this uniform
        p, _ = tempered_softmax(logits[i], temperature)
        token = rejection_node(dense, p, q_ids, q_values[i], vocab, tokens[i : i + 1], uniforms, False)
        if token != tokens[i]:
            return i, token
    return k, _bonus(logits[k], temperature, uniform, state, early)


@numba.njit(cache=True)
def _truncated_probs(logits, temperature, top_k, top_p):
    """``SamplingConfig.row_probs`` of a float32 row [V] under a top-k (0 < top_k < V) and / or a
    top-p (< 1) in ``rejection_node``'s form: (the kept token ids, ascending; their
    probabilities), the entries that underflowed to 0 dropped (``mdsd.logits.process_logits_row``
    by ``mdsd._topp_numba.truncated_softmax``)."""
    ids, values, zeros = truncated_softmax(logits, temperature, top_k, top_p)
    if zeros:
        nonzero = np.flatnonzero(values)
        return ids[nonzero], values[nonzero]
    return ids, values


@numba.njit(cache=True)
def _stored_q(q_ids, kept, values):
    """A truncated draft q of one level as ``decode._DraftedProbs`` stores it: its token ids (the
    output layer's ``q_ids`` at the positions ``kept``, or the positions themselves where
    ``q_ids`` is empty: the whole vocabulary) and values, entries of mass 0 dropped."""
    ids = kept if q_ids.size == 0 else q_ids[kept]
    nonzero = np.flatnonzero(values)
    if nonzero.size < values.size:
        return ids[nonzero], values[nonzero]
    return ids, values


@numba.njit(cache=True)
def truncated_chain_walk(logits, temperature, top_k, top_p, q_ids, q_kept, q_values, tokens, uniform, state):
    """``softmax_chain_walk`` under a transform that truncates (``truncates``: a top-k, a top-p):
    (kept, token) of ``walk.walk_chain`` for a chain of k = ``tokens.size`` drafts whose node
    i - 1 has p = the truncated softmax of ``logits[i]`` (``_truncated_probs``) and the q of
    level i drawn in one call
    (``_stored_q`` of ``q_kept[i]`` and ``q_values[i]`` over ``q_ids``): per draft
    ``rejection_node`` at two uniforms while the drafts before it were kept, then the bonus drawn
    from the last row's p at the next: the tokens and the generator's state of ``walk_chain``
    (tested). The truncated softmax reads each row a few times, so no early bound is needed."""
    k, vocab = tokens.size, logits.shape[1]
    uniforms = np.empty(2)
    for i in range(k):
        uniforms[0] = next_uniform(uniform, state)
        uniforms[1] = next_uniform(uniform, state)
        p_ids, p_values = _truncated_probs(logits[i], temperature, top_k, top_p)
        d_ids, d_values = _stored_q(q_ids, q_kept[i], q_values[i])
        token = rejection_node(p_ids, p_values, d_ids, d_values, vocab, tokens[i : i + 1], uniforms, False)
        if token != tokens[i]:
            return i, token
    p_ids, p_values = _truncated_probs(logits[k], temperature, top_k, top_p)
    return k, p_ids[draw(p_values, next_uniform(uniform, state))]


@numba.njit(cache=True)
def _target_row(logits, temperature, top_k, top_p):
    """p of one target row as ``SamplingConfig.row_probs`` makes it, in ``rejection_node``'s
    form: the truncated softmax on its nonzero entries (``_truncated_probs``) where top-k or
    top-p truncates, else the dense tempered softmax (empty ids)."""
    if truncates(top_k, top_p, logits.size):
        return _truncated_probs(logits, temperature, top_k, top_p)
    return np.empty(0, dtype=np.int64), tempered_softmax(logits, temperature)[0]


@numba.njit(cache=True)
def _drafted_row(q_ids, kept, values, zeros):
    """Row r of a tree drafted in one call as ``decode._DraftedProbs`` stores it: ``_stored_q``
    where a top-k truncated q (``kept`` [W] non-empty), else over ``q_ids`` (empty: dense, as
    is), on its nonzero entries where ``zeros`` of them underflowed."""
    if kept.size:
        return _stored_q(q_ids, kept, values)
    if q_ids.size == 0 or zeros == 0:
        return q_ids, values
    nonzero = np.flatnonzero(values)
    return q_ids[nonzero], values[nonzero]


@numba.njit(cache=True)
def _plan_fits(drafted, zeros, width, plan_served):
    """Whether the plan serves every row of k > 1 drafts whose q has s nonzero entries
    (``width`` - its zeros): ``plan_served[k, s]`` (``walk.RuleBook.plan_table``)."""
    rows, columns = plan_served.shape
    for r in range(drafted.size):
        k, support = drafted[r], width - zeros[r]
        if k > 1 and not (k < rows and support < columns and plan_served[k, support]):
            return False
    return True


@numba.njit(cache=True)
def _plan_of(head, tail, races, n, support):
    """The threshold node's (head, tail) for a node of n drafts on a q of ``support`` tokens: the
    plan's, with n and the race settings of (n, support) (``walk.RuleBook.plan_table``)."""
    chord_tolerance, margin, ratios, shares, _ = tail
    at = races[n, support]
    race = (at[0], at[1], at[2], at[3], at[4])
    return (n, head[1]), (chord_tolerance, margin, ratios, shares, race)


@numba.njit(cache=True)
def _prefetch_move(keys, values, base, node, k):
    """Ask for the cache lines of the path's move of an accepted ``node`` (its entry at base +
    node, the path's k-th slot base + k it moves to) in the cache (``keys``, ``values``), where
    it moves (node != k) and there is a cache (``keys`` not empty). Walking after the target's
    forward, the move's entries are in memory: asked for here, their transfer overlaps the rest
    of the walk. Asking for a whole tree's entries before the walk instead (16 nodes, 295 kB of
    the bundled target) cost 8-10 us a step (BENCHMARKS.md, "The path's move asked for as the
    walk accepts")."""
    if keys.size and node != k:
        prefetch_positions(keys, values, base + node, 1)
        prefetch_positions(keys, values, base + k, 1)


@numba.njit(cache=True)
def tree_walk(
    logits, temperature, top_k, top_p, widths, child_starts, depths, tokens, valid, q_ids, q_values, q_zeros,
    q_kept, q_drafted, rule, optimal, plan_served, plan_races, head, tail, uniform, state, early, cache_keys,
    cache_values, cache_base,
):  # fmt: skip
    """``walk.walk`` of a tree drafted in one call, in one call: (the accepted path [k] of nodes, the
    emitted token after it, whether it is a bonus token), or (empty, -1, False) without drawing
    anything where ``optimal`` and the plan table does not serve some node of several drafts.

    Rows of ``logits`` [1 + valid nodes, V] and of the draft's q (``q_values`` [R, W], ``q_zeros``
    [R], ``q_kept`` [R, W] or empty, ``q_drafted`` [R] its node's drafts;
    ``_llama_numba.sample_tree``'s rows) are the root's, then the valid nodes' in ascending order:
    node i's row is 1 + the valid nodes before it. Node i's p is ``_target_row`` of its logits,
    its q ``_drafted_row``, its children the ``widths[depth]`` slots from ``child_starts[i + 1]``,
    those ``valid`` verified with their ``tokens``: by recursive rejection sampling
    (``rejection_node`` at ``rng.random(n + 1)``; ``rule`` ``RULE_RRS_WITHOUT_REPLACEMENT``:
    without replacement), by another verifier's sampler (``classic_node`` at
    ``rng.random(node_uniforms(rule, n))``, every node: greedy, K-SEQ, importance, sample_check;
    SpecHub's nodes of two drafts, its nodes of one taking classic sampling as ``walk.RuleBook``
    rules them), or, with ``optimal``, nodes of several drafts by the optimal verifier's threshold
    node (``threshold_node_on_union`` with ``head``, ``tail`` of the ``NodePlan`` for ``plan_n``
    drafts, and for nodes of fewer drafts its kernel with their n and race settings, on the
    (drafts, q support) pairs ``plan_served`` marks, at ``rng.random(4)``) and nodes of one draft by
    classic speculative sampling (``walk.RuleBook``'s single-draft rule). Then the descent into
    the first child holding the emitted token, or, at a node without valid children, the bonus
    drawn from p at the next uniform: the tokens and the generator's state of ``walk`` (tested).
    ``early`` (float32 logits, p the tempered softmax alone): as in ``softmax_chain_walk``, a node
    verified by rejection sampling first tests its first draft against ``softmax_lower_bound``
    (kept there: kept by the reference too) and the bonus is drawn by ``softmax_draw``, so the
    float64 softmax of a row runs only where needed.

    ``cache_keys``, ``cache_values`` [layers, kv_heads, capacity, head_dim]: the target's cache,
    node i's entry at ``cache_base`` + i, or empty: each accepted child's entry and the path slot
    it moves to (``_prefetch_move``) are asked for as the walk goes on, so the path's move after
    the walk (``_step_numba.keep_path``) finds them near the core; a hint that changes nothing."""
    path = np.empty(widths.size, dtype=np.int64)
    if optimal and not _plan_fits(q_drafted, q_zeros, q_values.shape[1], plan_served):
        return path[:0], np.int64(-1), False
    node, k, vocab = -1, 0, logits.shape[1]
    kids, untruncated = np.empty(widths.max(), dtype=np.int64), np.empty(0, dtype=np.int64)
    while True:
        r = 0 if node < 0 else 1 + np.count_nonzero(valid[:node])  # the node's row
        row, dense = logits[r], not truncates(top_k, top_p, vocab)  # dense: p the tempered softmax alone
        d, n = (0 if node < 0 else depths[node]), 0
        if d < widths.size:
            first = child_starts[node + 1]
            for c in range(first, first + widths[d]):
                if valid[c]:
                    kids[n] = c
                    n += 1
        if n == 0 and dense:  # an accepted leaf: the bonus token
            return path[:k], softmax_draw(row, temperature, next_uniform(uniform, state), early), True
        if n == 0:
            p_ids, p_values = _target_row(row, temperature, top_k, top_p)
            return path[:k], p_ids[draw(p_values, next_uniform(uniform, state))], True
        drafts = tokens[kids[:n]]
        kept = q_kept[r] if q_kept.size else untruncated
        d_ids, d_values = _drafted_row(q_ids, kept, q_values[r], q_zeros[r])
        if optimal and n > 1:
            uniforms = next_uniforms(THRESHOLD_UNIFORMS, uniform, state)
            p_ids, p_values = _target_row(row, temperature, top_k, top_p)
            support = q_values.shape[1] - q_zeros[r]
            node_head, node_tail = _plan_of(head, tail, plan_races, n, support)
            token = threshold_node_on_union(
                p_ids, p_values, d_ids, d_values, vocab, drafts, uniforms, node_head, node_tail
            )
        elif rule > RULE_RRS_WITHOUT_REPLACEMENT and (n > 1 or rule != RULE_SPECHUB):
            uniforms = next_uniforms(node_uniforms(rule, n), uniform, state)
            p_ids, p_values = _target_row(row, temperature, top_k, top_p)
            token = classic_node(p_ids, p_values, d_ids, d_values, vocab, drafts, uniforms, rule)
        else:
            uniforms = next_uniforms(n + 1, uniform, state)
            keep_first = False
            if dense and early:
                lower = softmax_lower_bound(row, temperature, drafts[0])
                keep_first = uniforms[0] < _ratio(lower, _prob_at(d_ids, d_values, drafts[0]))
            if keep_first:  # kept below p's lower bound: rejection_node keeps it too
                token = drafts[0]
            else:
                p_ids, p_values = _target_row(row, temperature, top_k, top_p)
                distinct = rule == RULE_RRS_WITHOUT_REPLACEMENT and n > 1
                token = rejection_node(p_ids, p_values, d_ids, d_values, vocab, drafts, uniforms, distinct)
        child = -1
        for i in range(n):
            if drafts[i] == token:
                child = kids[i]
                break
        if child < 0:  # rejected: the recovered token ends the step
            return path[:k], token, False
        path[k] = node = child
        _prefetch_move(cache_keys, cache_values, cache_base, child, k)
        k += 1


@numba.njit(cache=True)
def _block_step(p_row, q_row, weight, i, uniform, state):
    """Block verification's walk down at draft i (``block_sample``): -1 where it goes on (i > 0
    and the next uniform is not below h_i = sum max(w p - q, 0) / sum max(q - w p, 0), 1 where
    w = 1), else the token drawn from max(w p - q, 0) at the next uniform (surely at i = 0)."""
    if i > 0:
        u = next_uniform(uniform, state)
        if weight >= 1.0:
            stop = 1.0
        else:
            excess, deficit = _excess_and_deficit(p_row, q_row, weight)
            stop = excess / deficit
        if not u < stop:
            return np.int64(-1)
    return np.int64(_residual_draw(p_row, q_row, weight, next_uniform(uniform, state)))


@numba.njit(cache=True)
def truncated_chain_block_walk(
    logits, temperature, top_k, top_p, q_ids, q_kept, q_values, tokens, uniform, state
):
    """``softmax_chain_block_walk`` under a truncating transform (``truncated_chain_walk``'s
    arguments): block verification of the chain with p_i the truncated softmax of ``logits[i]``
    and q_i the level's
    stored q, the rows a draw reads made dense as ``walk.walk_chain_block`` makes them, so that
    every sum runs in its order: (kept, token), the tokens and the generator's state of
    ``walk_chain_block`` (tested)."""
    k, vocab = tokens.size, logits.shape[1]
    u = next_uniform(uniform, state)
    p = [_truncated_probs(logits[i], temperature, top_k, top_p) for i in range(k)]  # (ids, values)
    q = [_stored_q(q_ids, q_kept[i], q_values[i]) for i in range(k)]
    weights = np.ones(k + 1)
    for i in range(k):
        ratio = _prob_at(p[i][0], p[i][1], tokens[i]) / _prob_at(q[i][0], q[i][1], tokens[i])
        weights[i + 1] = min(1.0, weights[i] * ratio)
    if u < weights[k]:
        p_ids, p_values = _truncated_probs(logits[k], temperature, top_k, top_p)
        return k, np.int64(draw(_dense(p_ids, p_values, vocab), next_uniform(uniform, state)))
    for i in range(k - 1, -1, -1):
        p_row, q_row = _dense(p[i][0], p[i][1], vocab), _dense(q[i][0], q[i][1], vocab)
        token = _block_step(p_row, q_row, weights[i], i, uniform, state)
        if token >= 0:
            return i, token
    return 0, np.int64(-1)  # unreachable: the walk stops at 0 surely


@numba.njit(cache=True)
def softmax_chain_block_walk(logits, temperature, q_ids, q_values, tokens, uniform, state, early):
    """(kept, token): ``walk.walk_chain_block`` (block verification, Sun et al., arXiv
    2403.10444) of a chain of k = ``tokens.size`` drafts from the target's logits [k + 1, V],
    with ``softmax_chain_walk``'s arguments: p_i = softmax(logits[i] / ``temperature``), the
    ratios p_i(x_i) / q_i(x_i), the weights w_i = min(1, w_{i-1} ratio_i); all k kept with
    probability w_k (the bonus drawn from p_k), else from the deepest draft down stop at i with
    probability h_i = sum max(w_i p_i - q_i, 0) / sum max(q_i - w_i p_i, 0) (1 where w_i = 1;
    surely at 0), the token drawn from max(w_i p_i - q_i, 0). The uniforms, in
    ``mdsd.sequence.chain.block_sample``'s order, and so the result and the generator's state
    are the reference's (tested). ``early`` (float32 logits): the whole block is first tested
    against w_k computed from ``softmax_lower_bound``'s p(x) <= the softmax's: the ratios, their
    products (rounded, as the reference's) and min(1, .) are monotone, so that w_k is at most the
    reference's, and a uniform below it keeps every draft in the reference too; the float64
    softmax of the drafts' rows then never runs. The test stops at the first row whose product
    is not above the uniform (the later factors are at most 1)."""
    k, vocab = tokens.size, logits.shape[1]
    u = next_uniform(uniform, state)
    q_x = np.empty(k)  # q_i(x_i)
    for i in range(k):
        q_x[i] = _prob_at(q_ids, q_values[i], tokens[i])
    if early:
        lower = 1.0
        for i in range(k):
            lower = min(1.0, lower * (softmax_lower_bound(logits[i], temperature, tokens[i]) / q_x[i]))
            if not u < lower:  # the products only fall: the test fails, the later rows unread
                break
        if u < lower:
            return k, _bonus(logits[k], temperature, uniform, state, early)
    p = [tempered_softmax(logits[i], temperature)[0] for i in range(k)]
    weights = np.ones(k + 1)
    for i in range(k):
        weights[i + 1] = min(1.0, weights[i] * (p[i][tokens[i]] / q_x[i]))
    if u < weights[k]:
        return k, _bonus(logits[k], temperature, uniform, state, early)
    q_row = np.empty(vocab)
    for i in range(k - 1, -1, -1):
        if q_ids.size == 0:
            q_row[:] = q_values[i]
        else:
            q_row[:] = 0.0
            q_row[q_ids] = q_values[i]
        token = _block_step(p[i], q_row, weights[i], i, uniform, state)
        if token >= 0:
            return i, token
    return 0, np.int64(-1)  # unreachable: the walk stops at 0 surely


@numba.njit(cache=True)
def orders_node_on_union(p_ids, p_values, q_ids, q_values, vocab, drafts, uniforms, head, tail):
    """The optimal verifier's orders node (``_orders_numba.orders_node``, with the arguments of
    ``verifier.node_plan``) on ``_on_union``'s arrays: the token ``walk.verify_node_reference``
    draws (tested)."""
    tokens, p_local, q_local, local = _on_union(p_ids, p_values, q_ids, q_values, vocab, drafts)
    n, law = head
    race, match_tol, gap_tol, floor, short_budget, full_budget, plain_first = tail
    y = orders_node(
        p_local, q_local, n, law, local, uniforms, race, match_tol, gap_tol, floor, short_budget, full_budget,
        plain_first,
    )  # fmt: skip
    return y if tokens.size == 0 else tokens[y]


@numba.njit(cache=True)
def threshold_node_on_union(p_ids, p_values, q_ids, q_values, vocab, drafts, uniforms, head, tail):
    """The optimal verifier's threshold node (``_threshold_numba.threshold_node``, with the
    arguments of ``verifier.node_plan``) on ``_on_union``'s arrays: the token
    ``walk.verify_node_reference`` draws (tested)."""
    tokens, p_local, q_local, local = _on_union(p_ids, p_values, q_ids, q_values, vocab, drafts)
    n, without_replacement = head
    chord_tolerance, margin, ratios, shares, race = tail
    y = threshold_node(
        p_local,
        q_local,
        n,
        without_replacement,
        local,
        uniforms,
        chord_tolerance,
        margin,
        ratios,
        shares,
        race,
    )
    return y if tokens.size == 0 else tokens[y]
