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

``softmax_chain_walk``: ``walk.walk_chain`` of a whole chain whose target rows are the tempered
softmax of their logits, in one call from the logits: each visited row's softmax, its node and the
bonus draw, with the generator's own uniforms in the reference's order (``mdsd.sampling.next_uniform``
draws the numbers numpy draws). It saves the Python around every visited node: wrapping p
and q, a closure, a dispatch per row and per node (the walk and cache bookkeeping of a 1x3
chain's step took 132 against 161 microseconds in the decoding loop, BENCHMARKS.md).
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd._softmax_numba import tempered_softmax
from mdsd.sampling import draw, next_uniform
from mdsd.verifiers._early_exit import rrs_sample
from mdsd.verifiers.optimal._orders_numba import orders_node
from mdsd.verifiers.optimal._threshold_numba import threshold_node


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


@numba.njit(cache=True)
def softmax_chain_walk(logits, temperature, q_ids, q_values, tokens, uniform, state):
    """(kept, token): ``walk.walk_chain`` of a chain of k = ``tokens.size`` drafts whose node
    i - 1 has p = softmax(logits[i] / ``temperature``) (dense; ``tempered_softmax``, the
    transform of ``SamplingConfig.row_probs`` without top-k / top-p) and q = ``q_values[i]`` on
    ``q_ids`` (``rejection_node``'s form; empty: dense), for logits [k + 1, V] and q_values
    [k, K]. Draft i is checked by ``rejection_node`` (one draft, ``rng.random(2)``) while the
    drafts before it were kept; returns the number kept and the recovered token, or k and the
    bonus token drawn from the last row at ``rng.random()``: the tokens and the generator's
    state of ``walk_chain`` on the same rows (tested). ``uniform, state``: the generator's
    ``mdsd.sampling.uniform_source``."""
    k, vocab = tokens.size, logits.shape[1]
    dense = np.empty(0, dtype=np.int64)
    uniforms = np.empty(2)
    for i in range(k):
        p, _ = tempered_softmax(logits[i], temperature)
        uniforms[0] = next_uniform(uniform, state)
        uniforms[1] = next_uniform(uniform, state)
        token = rejection_node(dense, p, q_ids, q_values[i], vocab, tokens[i : i + 1], uniforms, False)
        if token != tokens[i]:
            return i, token
    p, _ = tempered_softmax(logits[k], temperature)
    return k, np.int64(draw(p, next_uniform(uniform, state)))


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
