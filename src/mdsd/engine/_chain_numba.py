"""A draft chain in one compiled call: the fast path of ``TreeDecoder.draft_tree`` for chains
(tree widths 1, ..., 1) on a compiled draft runner (``StaticLlamaRunner(matmul="numba")``).

The reference drafts level by level from Python: per level a forward (``causal_hidden`` for the
committed tokens the draft has not seen, ``tree_hidden`` for each drafted node), the output layer,
the sampling transform (``SamplingConfig.row_probs``) and one draw (``walk.draft_children``). On
the bundled pair the compiled forward of a level takes ~55 us and the Python around these calls
another ~40-70 us (BENCHMARKS.md). Here the D levels run in one call with the same compiled
steps, in the same order:

    for level d = 0..D-1:
        h = decoder_stack(x) ; logits = rms_norm(h[-1]) W_out^T        (x: the fresh tokens, then
        q_d = softmax(top_k(logits) / T), zeros dropped as row_probs   the token drawn last)
        token_{d+1} = draw(q_d, rng.random())                          (``mdsd.sampling.draw``)

A chain node sees every cached key, so a drafted node's forward is the one-token causal forward
(the reference adds its all-zero tree mask, which changes no score). Each step is the function the
reference calls (``decoder_stack``, ``rms_norm``, ``project``, ``tempered_softmax`` /
``top_k_softmax``, ``draw``) and the draws take the same uniforms of the same generator (numba
draws ``rng.random()`` from the generator's own bit stream): the tokens, the draft probabilities
and the cache equal the reference's bit for bit (tests/engine/test_decode.py).

Shapes: x [m, hidden] float32; layers, keys, values, cos / sin tables as for ``decoder_stack``;
the output layer as ``project``'s (panels, W^T [hidden, K], bias) over its K columns, whose
token ids are ``output_ids`` [K] (empty: column j is token j).
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd._softmax_numba import tempered_softmax
from mdsd._topk_numba import top_k_softmax
from mdsd.engine._llama_numba import decoder_stack, project, rms_norm
from mdsd.sampling import draw

FLOAT32_KEY_SHIFT, FLOAT32_KEY_MASK = 31, 2**31 - 1  # ``mdsd.logits._key_bits`` of float32 rows


@numba.njit(cache=True, boundscheck=False)
def transform_row(logits, temperature, top_k, drop_zeros):
    """``mdsd.logits.process_logits_row`` of one float32 row [K] for temperature > 0, no top-p:
    (kept columns [s] ascending, probabilities float64 [s], whether the row is kept whole).
    ``top_k`` 0 means none; ``drop_zeros`` drops entries whose mass underflows to 0 even when
    no top-k truncates (the reference's ``drop_zeros``, set for a restricted output layer)."""
    n = logits.size
    whole = True
    if top_k > 0 and top_k < n:
        bits = logits.view(np.int32)
        columns, probs, zeros = top_k_softmax(
            logits, bits, top_k, FLOAT32_KEY_SHIFT, FLOAT32_KEY_MASK, temperature
        )
        whole = False
    else:
        probs, zeros = tempered_softmax(logits, temperature)
        columns = np.arange(n)
    if zeros and (not whole or drop_zeros):
        nonzero = np.flatnonzero(probs)
        columns, probs = columns[nonzero], probs[nonzero]
        whole = False
    return columns, probs, whole


@numba.njit(cache=True, boundscheck=False)
def draft_chain(
    x,
    start,
    depth,
    layers,
    keys,
    values,
    embed,
    cos_table,
    sin_table,
    heads,
    kv_heads,
    eps,
    gemm,
    final_norm,
    head_panels,
    head_t,
    head_b,
    output_ids,
    temperature,
    top_k,
    drop_zeros,
    rng,
):
    """Draft ``depth`` tokens after the fresh tokens x [m, hidden] (cache positions from
    ``start``); returns (tokens [D] vocabulary ids, columns [D, K], probs [D, K], sizes [D],
    whole [D]): level d's draft law is probs[d, :sizes[d]] on the output columns
    columns[d, :sizes[d]] (all K of them, in order, where whole[d]). The cache then holds the
    fresh tokens and drafted tokens 1..D-1."""
    cols = head_t.shape[1]
    tokens = np.empty(depth, dtype=np.int64)
    columns_out = np.zeros((depth, cols), dtype=np.int64)
    probs_out = np.zeros((depth, cols), dtype=np.float64)
    sizes = np.empty(depth, dtype=np.int64)
    whole_out = np.empty(depth, dtype=np.bool_)
    no_mask = np.zeros((0, 0), dtype=np.float32)
    for level in range(depth):
        m = x.shape[0]
        cos, sin = cos_table[start : start + m], sin_table[start : start + m]
        h = decoder_stack(
            x, layers, keys, values, start, no_mask, m > 1, cos, sin, heads, kv_heads, eps, gemm
        )
        last = rms_norm(np.ascontiguousarray(h[m - 1 :]), final_norm, eps)  # [1, hidden]
        logits = project(last, head_panels, head_t, head_b, gemm)[0]  # [K]
        columns, probs, whole = transform_row(logits, temperature, top_k, drop_zeros)
        column = columns[draw(probs, rng.random())]
        token = output_ids[column] if output_ids.size else column
        size = probs.size
        tokens[level], sizes[level], whole_out[level] = token, size, whole
        columns_out[level, :size] = columns
        probs_out[level, :size] = probs
        start += m
        x = embed[token : token + 1].copy()
    return tokens, columns_out, probs_out, sizes, whole_out
