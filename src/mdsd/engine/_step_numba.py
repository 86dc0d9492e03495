"""The decoding loop in compiled code: a step in one call, and steps until a stop in one call.

``tree_step``: the three compiled calls of a tree's step (``_llama_numba.sample_tree``: the
draft's tree; ``_llama_numba.tree_logits``: the target's forward and the valid rows' logits;
``_walk_numba.tree_walk``: the verification walk) and the two caches' bookkeeping
(``gather_positions``) in one call, with the same arrays and draws:

    drafts      = sample_tree(draft's fresh tokens, tree)          # the draft's cache: + levels 0..D-1
    logits      = tree_logits(target's fresh tokens + drafts, rows = root + valid nodes)
    path, token = tree_walk(logits, drafts' q)                     # asks for the path's entries
    caches      : committed prefix + the accepted path (the draft's: nodes above depth D)

``chain_step`` does the same for the lean loop's chains (``sample_chain``, ``causal_logits``, the
chain's walk: rejection sampling node by node or block verification, under the tempered softmax
alone or after a top-k); their caches keep a prefix, nothing moves. ``tree_steps`` and
``chain_steps`` run those steps one after another, committing each step's tokens (``commit``:
``decode._finish``'s cut at the budget or an EOS) until decoding stops (``TreeDecoder.
_compiled_steps``).

Each step ends in the target's forward, which streams the target's weights through the CPU's
caches: the interpreter's code and data are cold when Python runs again, and the Python around
three calls a step took ~150-250 microseconds (arguments, dispatch, results, cache keeps,
records) where the same work hot takes ~40 (docs/engine.md, "The decoding loop in one call";
``benchmarks/bench_decode.py --unfused``). The seconds of each part are read inside the call
(``monotonic``: ``clock_gettime`` at the address ``clock_source`` gives), so the draft's and
target's model times stay separate from the rest.
"""

from __future__ import annotations

import ctypes
import functools
import time

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from mdsd._topp_numba import truncates
from mdsd.engine._llama_numba import (
    causal_logits,
    gather_positions,
    sample_chain,
    sample_tree,
    tree_logits,
)
from mdsd.engine._walk_numba import (
    _target_row,
    softmax_chain_block_walk,
    softmax_chain_walk,
    softmax_draw,
    tree_walk,
    truncated_chain_block_walk,
    truncated_chain_walk,
)
from mdsd.sampling import draw, next_uniform


@functools.cache
def clock_source() -> tuple[int, int]:
    """(address of the C library's ``clock_gettime``, ``CLOCK_MONOTONIC``): what ``monotonic``
    calls; (0, 0) where there is none (the step's parts are then timed as 0 seconds)."""
    try:
        function = ctypes.CDLL(None).clock_gettime
        return ctypes.cast(function, ctypes.c_void_p).value, int(time.CLOCK_MONOTONIC)
    except (AttributeError, OSError, TypeError):  # pragma: no cover - POSIX has both
        return 0, 0


@intrinsic
def _clock_gettime(typingctx, function, clock_id):
    """Seconds of ``clock_gettime(clock_id)`` called at the address ``function``."""
    sig = types.float64(types.uintp, types.int64)

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        timespec = ir.LiteralStructType([i64, i64])  # (seconds, nanoseconds)
        slot = builder.alloca(timespec)
        function_type = ir.FunctionType(i32, [i32, timespec.as_pointer()])
        pointer = builder.inttoptr(args[0], function_type.as_pointer())
        builder.call(pointer, [builder.trunc(args[1], i32), slot])
        zero = ir.Constant(i32, 0)
        seconds = builder.load(builder.gep(slot, [zero, zero]))
        nanoseconds = builder.load(builder.gep(slot, [zero, ir.Constant(i32, 1)]))
        whole = builder.sitofp(seconds, ir.DoubleType())
        part = builder.fmul(builder.sitofp(nanoseconds, ir.DoubleType()), ir.Constant(ir.DoubleType(), 1e-9))
        return builder.fadd(whole, part)

    return sig, codegen


@numba.njit(cache=True)
def monotonic(function, clock_id):
    """``time.perf_counter()`` from compiled code (``clock_source()``'s pair; 0.0 without one)."""
    if function == 0:
        return 0.0
    return _clock_gettime(function, clock_id)


@numba.njit(cache=True)
def keep_path(keys, values, base, extra):
    """``StaticLlamaRunner.keep_positions``' move: cache entries base .. base + k - 1 <- the
    entries at positions ``extra`` [k] (``gather_positions``, which leaves entries in place
    alone). Returns base + k, the length."""
    gather_positions(keys, values, base, extra)
    return base + extra.size


@numba.njit(cache=True)
def tree_step(
    draft_ids, target_ids, base, widths, level_starts, child_starts, depths, level_masks, target_mask,
    law, temperature, top_k, top_p, q_ids, token_ids, draft_models, draft_forward, target_models,
    target_forward, hidden_value,
    rule, optimal, plan_served, plan_races, head, tail, uniform, state, clock,
):  # fmt: skip
    """One step of tree decoding after a committed sequence of ``base`` tokens.

    ``draft_ids`` / ``target_ids``: the committed tokens each cache lacks. The tree:
    ``DraftTree``'s ``widths``, ``level_starts``, ``child_starts``, ``depths``, the draft's
    per-level masks (``StaticLlamaRunner.tree_arrays``) and the target's additive mask over its
    nodes [N, N]. The law (its ``mdsd.engine.tree.TREE_LAWS`` code), the transform
    (``temperature``, ``top_k``: 0 none, ``top_p``: 1 none), the draft's output ids (``q_ids``:
    empty for the whole vocabulary; ``token_ids``: its K tokens). ``*_models``, ``*_forward``:
    each runner's model and (keys, values, cache length, cos table, sin table, heads, kv_heads,
    eps, gemm)
    (``StaticLlamaRunner.compiled_forward``). The verifier (``walk.tree_walk_verifier``):
    ``tree_walk``'s ``rule`` (``walk.walk_rule``: rejection sampling, i.i.d. or without
    replacement, greedy, SpecHub, K-SEQ, importance, sample_check), or with ``optimal`` the
    threshold ``NodePlan`` (``head``, ``tail``) and the nodes it serves (``plan_served``, ``plan_races``).
    The generator (``uniform``, ``state``); the clock (``clock_source()``).

    Returns the drafted tree (``sample_tree``'s seven arrays), the target's logits [1 + valid
    nodes, V] of the root and the valid nodes, the walk (path [k], token, bonus: ``tree_walk``'s),
    the caches' lengths after the step (the target's, the draft's) and the seconds of the draft,
    the target's forward and the walk with the caches' moves [3]. Where ``tree_walk`` draws
    nothing (token -1: a node not the plan's), the caches hold the whole tree: lengths (-1, -1)."""
    seconds = np.zeros(3)
    began = monotonic(*clock)
    d_keys, d_values, d_start, d_cos, d_sin, d_heads, d_kv_heads, d_eps, d_gemm = draft_forward
    tokens, valid, nodes, drafted, probs, zeros, kept = sample_tree(
        draft_ids, widths, level_starts, child_starts, depths, level_masks, law, uniform, state,
        temperature, top_k, top_p, q_ids.size > 0, token_ids, draft_models, d_keys, d_values, d_start, d_cos,
        d_sin, d_heads, d_kv_heads, d_eps, d_gemm,
    )  # fmt: skip
    drafted_at = monotonic(*clock)
    t_keys, t_values, t_start, t_cos, t_sin, t_heads, t_kv_heads, t_eps, t_gemm = target_forward
    rows = np.empty(1 + np.count_nonzero(valid), dtype=np.int64)  # the root's row, then valid nodes'
    rows[0] = 0
    rows[1:] = 1 + np.flatnonzero(valid)
    ids = np.concatenate((target_ids, tokens))
    logits = tree_logits(
        ids, target_ids.size, target_mask, depths, base - 1, rows, hidden_value, target_models, t_keys,
        t_values, t_start, t_cos, t_sin, t_heads, t_kv_heads, t_eps, t_gemm,
    )  # fmt: skip
    forwarded_at = monotonic(*clock)
    path, token, bonus = tree_walk(
        logits, temperature, top_k, top_p, widths, child_starts, depths, tokens, valid, q_ids, probs, zeros,
        kept, drafted, rule, optimal, plan_served, plan_races, head, tail, uniform, state, True, t_keys,
        t_values, base,
    )  # fmt: skip
    lengths = (-1, -1)
    if token >= 0:  # keep the committed prefix and the accepted path (the draft: above depth D)
        cached = path[depths[path] < widths.size]
        lengths = (
            keep_path(t_keys, t_values, base, base + path),
            keep_path(d_keys, d_values, base, base + cached),
        )
    seconds[0] = drafted_at - began
    seconds[1] = forwarded_at - drafted_at
    seconds[2] = monotonic(*clock) - forwarded_at
    drafts = (tokens, valid, nodes, drafted, probs, zeros, kept)
    return drafts, logits, rows, path, token, bonus, lengths, seconds


@numba.njit(cache=True)
def chain_step(
    draft_ids, target_ids, base, depth, temperature, top_k, top_p, q_ids, token_ids, block, draft_models,
    draft_forward, target_models, target_forward, uniform, state, clock,
):  # fmt: skip
    """One step of the lean loop's chain of ``depth`` drafts after ``base`` committed tokens.

    ``draft_ids`` / ``target_ids``: the committed tokens each cache lacks; the transform
    (``temperature``; ``top_k``: 0 none, else a top-k that truncates the draft's q too; ``top_p``:
    1 none); the
    draft's output ids (``q_ids``: empty for the whole vocabulary; ``token_ids``: its K tokens);
    ``block``: block verification, else rejection sampling node by node; the runners' models
    and forwards, the generator and the clock as ``tree_step``'s. Steps:
    ``_llama_numba.sample_chain``, ``causal_logits`` of the fresh tokens and the chain (the root's
    and every node's row), the walk (``_walk_numba``'s ``softmax_chain_walk``,
    ``softmax_chain_block_walk``, ``truncated_chain_walk`` or ``truncated_chain_block_walk``), the
    caches' lengths.

    Returns the chain (``sample_chain``'s four arrays), the target's logits [depth + 1, V], the
    drafts kept, the emitted token after them, the caches' lengths after the step (the target's,
    the draft's: the draft never caches the last level) and the seconds of the draft, the
    target's forward and the walk [3]."""
    seconds = np.zeros(3)
    began = monotonic(*clock)
    d_keys, d_values, d_start, d_cos, d_sin, d_heads, d_kv_heads, d_eps, d_gemm = draft_forward
    chain = sample_chain(
        draft_ids, depth, uniform, state, temperature, top_k, top_p, q_ids.size > 0, token_ids, draft_models,
        d_keys, d_values, d_start, d_cos, d_sin, d_heads, d_kv_heads, d_eps, d_gemm,
    )  # fmt: skip
    tokens, probs, zeros, kept = chain
    drafted_at = monotonic(*clock)
    t_keys, t_values, t_start, t_cos, t_sin, t_heads, t_kv_heads, t_eps, t_gemm = target_forward
    ids = np.concatenate((target_ids, tokens))
    logits = causal_logits(
        ids, depth + 1, target_models, t_keys, t_values, t_start, t_cos, t_sin, t_heads, t_kv_heads, t_eps,
        t_gemm,
    )  # fmt: skip
    forwarded_at = monotonic(*clock)
    truncated = top_k > 0 or top_p < 1.0
    if truncated and block:
        accepted, token = truncated_chain_block_walk(
            logits, temperature, top_k, top_p, q_ids, kept, probs, tokens, uniform, state
        )
    elif truncated:
        accepted, token = truncated_chain_walk(
            logits, temperature, top_k, top_p, q_ids, kept, probs, tokens, uniform, state
        )
    elif block:
        accepted, token = softmax_chain_block_walk(
            logits, temperature, q_ids, probs, tokens, uniform, state, True
        )
    else:
        accepted, token = softmax_chain_walk(logits, temperature, q_ids, probs, tokens, uniform, state, True)
    seconds[0] = drafted_at - began
    seconds[1] = forwarded_at - drafted_at
    seconds[2] = monotonic(*clock) - forwarded_at
    lengths = (base + accepted, base + min(accepted, depth - 1))
    return chain, logits, accepted, token, lengths, seconds


# ``tree_steps`` / ``chain_steps``: why the loop stopped (``decode._finish``'s reasons, then the
# two that hand the next step to Python)
RUNNING, LENGTH, EOS, CONTEXT, PAUSED, UNPLANNED = 0, 1, 2, 3, 4, 5
RECORD_FIELDS = 5  # per step: drafts kept, bonus (0 / 1), draft, target and walk seconds


def stop_reason(status: int) -> str | None:
    """The stop reason of a loop's status as ``decode._finish`` names it ("length", "eos",
    "context"), or None where decoding goes on (PAUSED, UNPLANNED)."""
    return {LENGTH: "length", EOS: "eos", CONTEXT: "context"}.get(int(status))


@numba.njit(cache=True)
def commit(seq, length, emitted, stop_length, eos, stop_on_eos):
    """``decode._finish`` in place: append a step's ``emitted`` tokens to ``seq[:length]``, cut
    at the budget (``stop_length`` tokens in all) or after the first of ``eos`` [E] within it
    (``stop_on_eos``). Returns (the new length, RUNNING, EOS or LENGTH)."""
    budget, count, status = stop_length - length, emitted.size, RUNNING
    if stop_on_eos:
        for i in range(min(emitted.size, budget)):
            if np.any(eos == emitted[i]):
                count, status = i + 1, EOS
                break
    if status == RUNNING and emitted.size >= budget:
        count, status = budget, LENGTH
    seq[length : length + count] = emitted[:count]
    return length + count, status


@numba.njit(cache=True)
def _next_status(status, steps, length, context_end, limit, lookahead, records):
    """RUNNING where another step may run: no stop reason yet, the context not exceeded (as
    ``TreeDecoder.generate_one`` checks it), room for one more record and in the caches."""
    if status != RUNNING:
        return status
    if length > context_end:
        return CONTEXT
    if steps == records.shape[0] or length + lookahead > limit:
        return PAUSED
    return RUNNING


@numba.njit(cache=True)
def _forward_at(forward, start):
    """A runner's forward tuple (``tree_step``'s ``*_forward``) with the cache length ``start``."""
    keys, values, _, cos, sin, heads, kv_heads, eps, gemm = forward
    return keys, values, start, cos, sin, heads, kv_heads, eps, gemm


@numba.njit(cache=True)
def tree_steps(
    seq, length, stop_length, context_end, limit, eos, stop_on_eos, records, draft_cached, target_cached,
    widths, level_starts, child_starts, depths, level_masks, target_mask, law, temperature, top_k, top_p,
    q_ids, token_ids, draft_models, draft_forward, target_models, target_forward, hidden_value, rule,
    optimal, plan_served, plan_races, head, tail, uniform, state, clock,
):  # fmt: skip
    """``tree_step`` after ``seq[:length]``, step after step, each step's tokens committed into
    ``seq`` (``commit``), until the budget (``stop_length``), an EOS, the context (a length past
    ``context_end``), the records [S, RECORD_FIELDS] (one per step) or the caches (``limit``
    entries) end, or a node the plan table does not serve (its step left to Python, undrawn): the
    decoding loop of ``TreeDecoder.generate_one`` with no Python between steps. The caches hold
    ``draft_cached`` / ``target_cached`` entries; the other arguments are ``tree_step``'s.

    Returns (the last step's ``tree_step`` result, the length, steps run, status: LENGTH, EOS,
    CONTEXT, PAUSED or UNPLANNED, the caches' lengths: after an UNPLANNED step each holds the
    whole tree)."""
    lookahead = depths.size + 1
    steps = 0
    while True:
        draft_at = _forward_at(draft_forward, draft_cached)
        target_at = _forward_at(target_forward, target_cached)
        out = tree_step(
            seq[draft_cached:length], seq[target_cached:length], length, widths, level_starts, child_starts,
            depths, level_masks, target_mask, law, temperature, top_k, top_p, q_ids, token_ids, draft_models,
            draft_at, target_models, target_at, hidden_value, rule, optimal, plan_served,
            plan_races, head, tail, uniform, state, clock,
        )  # fmt: skip
        drafts, _, _, path, token, bonus, lengths, seconds = out
        records[steps, 0], records[steps, 1], records[steps, 2:] = path.size, bonus, seconds
        steps += 1
        if token < 0:  # the step's walk is Python's; the caches hold the whole tree
            status = UNPLANNED
            draft_cached, target_cached = length + level_starts[widths.size - 1], length + depths.size
            break
        emitted = np.append(drafts[0][path], token)
        length, status = commit(seq, length, emitted, stop_length, eos, stop_on_eos)
        target_cached, draft_cached = lengths
        status = _next_status(status, steps, length, context_end, limit, lookahead, records)
        if status != RUNNING:
            break
    return out, length, steps, status, draft_cached, target_cached


@numba.njit(cache=True)
def chain_steps(
    seq, length, stop_length, context_end, limit, eos, stop_on_eos, records, draft_cached, target_cached,
    depth, temperature, top_k, top_p, q_ids, token_ids, block, draft_models, draft_forward, target_models,
    target_forward, uniform, state, clock,
):  # fmt: skip
    """``tree_steps`` for the lean loop's chains: ``chain_step`` after step, the same stops
    (never UNPLANNED). Returns (the last step's ``chain_step`` result, the length, steps run,
    status, the caches' lengths)."""
    steps = 0
    while True:
        out = chain_step(
            seq[draft_cached:length], seq[target_cached:length], length, depth, temperature, top_k, top_p,
            q_ids, token_ids, block, draft_models, _forward_at(draft_forward, draft_cached), target_models,
            _forward_at(target_forward, target_cached), uniform, state, clock,
        )  # fmt: skip
        chain, _, kept, token, lengths, seconds = out
        records[steps, 0], records[steps, 1], records[steps, 2:] = kept, kept == depth, seconds
        steps += 1
        emitted = np.append(chain[0][:kept], token)
        length, status = commit(seq, length, emitted, stop_length, eos, stop_on_eos)
        target_cached, draft_cached = lengths
        status = _next_status(status, steps, length, context_end, limit, depth + 1, records)
        if status != RUNNING:
            break
    return out, length, steps, status, draft_cached, target_cached


@numba.njit(cache=True)
def plain_steps(
    seq, length, stop_length, context_end, limit, eos, stop_on_eos, records, cached, temperature, top_k,
    top_p, models, forward, uniform, state, clock,
):  # fmt: skip
    """``Autoregressive.generate_one``'s loop after ``seq[:length]`` in one call: per token the
    causal forward of the tokens the cache lacks (``causal_logits``, the last row), the token at
    the generator's next uniform from the tempered softmax (``softmax_draw``) or, where a top-k
    (0 < ``top_k`` < V) or a top-p (``top_p`` < 1) truncates it, from the truncated softmax
    (``_target_row``; ``Autoregressive._sample``'s draws), committed as
    ``tree_steps`` commits (the same stops; ``context_end`` as the loop checks it). The cache
    holds ``cached`` entries; ``models``, ``forward``, the generator and the clock as
    ``tree_step``'s; records [S, RECORD_FIELDS]: per token the forward's and the draw's seconds
    (columns 3, 4, as ``tree_steps``' target and walk). Returns (the length, tokens drawn,
    status, the cache's length)."""
    steps = 0
    while True:
        began = monotonic(*clock)
        keys, values, _, cos, sin, heads, kv_heads, eps, gemm = forward
        logits = causal_logits(
            seq[cached:length], 1, models, keys, values, cached, cos, sin, heads, kv_heads, eps, gemm
        )[0]  # fmt: skip
        forwarded = monotonic(*clock)
        u = next_uniform(uniform, state)
        if truncates(top_k, top_p, logits.size):
            p_ids, p_values = _target_row(logits, temperature, top_k, top_p)
            token = p_ids[draw(p_values, u)]
        else:
            token = softmax_draw(logits, temperature, u, True)
        cached = length
        length, status = commit(seq, length, np.full(1, token), stop_length, eos, stop_on_eos)
        records[steps, 3], records[steps, 4] = forwarded - began, monotonic(*clock) - forwarded
        steps += 1
        status = _next_status(status, steps, length, context_end, limit, 1, records)
        if status != RUNNING:
            break
    return length, steps, status, cached
