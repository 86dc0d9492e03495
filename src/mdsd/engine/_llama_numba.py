"""The compiled decoder stack of ``StaticLlamaRunner(matmul="numba")`` (float32, CPU).

The torch / numpy forward of ``mdsd.engine.static_llama`` (the reference, tested against Hugging
Face's forward) pays ~15-40 microseconds of framework dispatch per small operation: about 0.6 ms
per decoder layer on the CPU of BENCHMARKS.md, as much as a one-token forward's weight reads. Here
each decoder layer is compiled, the whole stack one call (``decoder_stack``), with the same steps:

    h = rms_norm(x) ; q, k, v = h W_qkv (+ b) ; rotary(q), rotary(k) ; cache[start:end] = k, v
    a = softmax(q K^T / sqrt(d) + mask) V ; x = x + a W_o
    h = rms_norm(x) ; g, u = h W_gu ; x = x + (silu(g) * u) W_down

The projections of up to ``panel_max_rows`` rows (a one-token step, a draft tree's nodes) run on
the weight panels of ``mdsd.engine._panel_gemm`` (each weight read once for all rows, outputs in
registers), passed in as ``gemm``; more rows run ``decoder_layer_blas``: the same steps, the
products by numpy's BLAS from Python (numba's ``np.dot`` binds scipy's BLAS, whose many-row kernels
measured ~2x slower here). Attention of fewer than ``LOOP_ATTENTION_ROWS`` queries runs as
compiled loops (a BLAS call costs more than their arithmetic), and exponentials as a
vectorised float32 polynomial (``exp_inplace``). Results equal the reference forward to float32
rounding (tests/engine/test_runner.py).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mdsd._softmax_numba import bits_float, float_bits, row_max, tempered_softmax
from mdsd._topp_numba import truncated_softmax, truncates
from mdsd.engine._panel_gemm import host_width
from mdsd.engine.tree import TREE_LAWS
from mdsd.sampling import draw, next_uniform
from mdsd.verifiers.optimal._common_numba import numpy_sum

# Rows multiplied on the panels (the kernel runs passes of _panel_gemm.MAX_ROWS rows; more rows
# use the BLAS), by where the BLAS wins (``benchmarks/bench_matmul.py``, one thread): with AVX2
# (AMD Zen 3) 16 rows on float32 panels took ~1.6x numpy's time and 24 rows on float16 panels
# ~0.7x; with AVX-512 (then 16-float panels, passes of 24 rows) float32 panels beat the BLAS up
# to ~24 rows and float16 ones up to ~96 (64 rows: 0.74x) on an Intel Xeon, and with the kernel's
# software prefetch on an AMD Zen 5 up to at least 144 rows (every projection of the target: 96
# rows 0.72x, 144 rows 0.74x, ``bench_matmul.py`` table 1), which prefills the bundled prompts on
# the panels. With 32-float panels (passes of 14 rows) a 90-token prompt of the bundled target
# took 27 ms against 31-32 ms with 16-float ones on an AMD Zen 4 (ad hoc, one thread).
_WIDE = host_width() == 16  # a global of the compiled code: fixed per CPU, as numba's cache is
PANEL_MAX_ROWS_F32 = 24 if _WIDE else 12
PANEL_MAX_ROWS_16 = 160 if _WIDE else 24


@numba.njit(cache=True)
def panel_max_rows(itemsize):
    """The largest row count multiplied on panels of ``itemsize`` bytes per weight (16-bit and
    "q8" panels alike)."""
    return PANEL_MAX_ROWS_16 if itemsize <= 2 else PANEL_MAX_ROWS_F32


_JIT = {"cache": True, "boundscheck": False, "fastmath": {"contract"}}
_VEC = {"cache": True, "boundscheck": False, "fastmath": {"contract", "reassoc"}}  # sums reordered


@intrinsic
def _call_gemm(typingctx, gemm, x, panels, out, rows, n_panels, k_dim, out_stride):
    """Call the panel kernel at address ``gemm`` (``_panel_gemm.kernel_address``) with the
    arguments of ``_panel_gemm.GEMM_SIGNATURE`` (pointers as integers). The kernel travels as an
    integer, not as its ctypes function: numba's dispatcher types an integer argument in C, a
    ctypes function in Python on every call (about 1.3 microseconds, each decoder layer)."""
    pointer, count = types.uintp, types.int64
    sig = types.void(types.uintp, pointer, pointer, pointer, count, count, count, count)

    def codegen(context, builder, signature, args):
        byte_pointer, i64 = ir.IntType(8).as_pointer(), ir.IntType(64)
        kernel_type = ir.FunctionType(ir.VoidType(), [byte_pointer] * 3 + [i64] * 4)
        kernel = builder.inttoptr(args[0], kernel_type.as_pointer())
        pointers = [builder.inttoptr(a, byte_pointer) for a in args[1:4]]
        builder.call(kernel, pointers + list(args[4:]))
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(**_JIT)
def quantize_rows(x, padded):
    """Each row of x [m, K] as int8 q_x = round(x / s) with s = max |x| / 127 (1 for a zero row):
    (q_x + 128 as unsigned bytes [m, padded], the columns past K holding 128, i.e. q_x = 0;
    s [m] float32), the activations of "q8" panels (``_panel_gemm.FORMATS``)."""
    m, k_dim = x.shape
    codes = np.full((m, padded), 128, dtype=np.uint8)
    scales = np.empty(m, dtype=np.float32)
    for r in range(m):
        peak = row_max(np.abs(x[r]))  # k_dim >= 1
        scales[r] = peak / np.float32(127.0) if peak > 0 else np.float32(1.0)
        inverse = np.float32(1.0) / scales[r]
        for k in range(k_dim):
            codes[r, k] = np.uint8(np.int32(np.rint(x[r, k] * inverse)) + 128)
    return codes, scales


@numba.njit(**_JIT)
def project(x, panels, weight_t, bias, gemm):
    """x [m, in] @ W^T [in, out] (+ bias [out] when it is non-empty), W^T also given as
    panels [P, in, PANEL]: the panel kernel at address ``gemm`` up to ``panel_max_rows`` rows,
    else np.dot. "q8" panels (int8, [P, in / 4 + 2, PANEL, 4]): the rows quantized first
    (``quantize_rows``), W^T the weights the panels stand for (``_panel_gemm.int8_weights``)."""
    x = np.ascontiguousarray(x)
    m, k_dim = x.shape
    cols = weight_t.shape[1]
    q8 = panels.itemsize == 1
    if m <= panel_max_rows(panels.itemsize):
        n_panels = panels.shape[0]
        width = n_panels * panels.shape[2]
        out = np.empty((m, width), dtype=np.float32)
        if q8:
            codes, scales = quantize_rows(x, 4 * (panels.shape[1] - 2))
            _call_gemm(
                gemm,
                codes.ctypes.data,
                panels.ctypes.data,
                out.ctypes.data,
                m,
                n_panels,
                codes.shape[1],
                width,
            )
            for r in range(m):
                out[r] *= scales[r]
        else:
            _call_gemm(gemm, x.ctypes.data, panels.ctypes.data, out.ctypes.data, m, n_panels, k_dim, width)
        if width != cols:
            out = np.ascontiguousarray(out[:, :cols])
    else:
        if q8:  # the same quantized rows, by the BLAS
            codes, scales = quantize_rows(x, k_dim)
            x = (codes.astype(np.float32) - np.float32(128.0)) * scales.reshape(m, 1)
        out = np.dot(x, weight_t)
    if bias.size:
        out += bias
    return out


@numba.njit(**_JIT)
def rms_norm(x, weight, eps):
    """weight * x / sqrt(mean(x^2) + eps) per row of x [m, hidden] (float32 throughout)."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        total = np.float32(0.0)
        for j in range(x.shape[1]):
            total += x[r, j] * x[r, j]
        scale = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[1]) + np.float32(eps))
        for j in range(x.shape[1]):
            out[r, j] = weight[j] * (x[r, j] * scale)
    return out


@numba.njit(**_JIT)
def _rotate_into(dest, src, cos, sin):
    """dest [d] = src * cos + rotate_half(src) * sin (rotate_half(x) = [-x2, x1])."""
    half = src.shape[0] // 2
    for j in range(half):
        dest[j] = src[j] * cos[j] - src[j + half] * sin[j]
        dest[j + half] = src[j + half] * cos[j + half] + src[j] * sin[j + half]


# Queries per forward below which attention runs as explicit loops: a BLAS call from compiled
# code costs ~7 microseconds for these tiny products (two per head and layer), several times the
# arithmetic of a draft tree's few rows; a prompt's prefill keeps the BLAS.
LOOP_ATTENTION_ROWS = 16


@numba.njit(**_VEC)
def _scores_into(scores, q, keys, end, scale):
    """scores[j] = scale * <q, keys[j]> for keys 0..end-1 (q [d], keys [capacity, d]); the sum
    over d may be reordered (vectorised): float32 rounding, as the BLAS's."""
    for j in range(end):
        total = np.float32(0.0)
        for t in range(q.shape[0]):
            total += q[t] * keys[j, t]
        scores[j] = total * scale


# exp in float32 as a vectorisable polynomial (Cephes' expf): numba calls the C library's scalar
# expf per element (~2-5 ns here, without Intel's SVML), and a draft tree's rows take ~2,500
# exponentials per decoder layer (softmax over the keys, the SiLU gate). Relative error <= 2 ulp
# (tests/engine/test_runner.py); inputs below EXP_LOW give exactly 0 (masked keys, -inf), above
# EXP_HIGH exp(EXP_HIGH).
EXP_LOW = np.float32(-86.0)  # exp(-86) = 4.5e-38: the smallest power of two kept normal
EXP_HIGH = np.float32(88.3)  # below log(float32 max)


@numba.njit(**_JIT)
def exp32(x):
    """exp(x) of a float32: exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (ln 2 in two
    parts), exp(r) by Cephes' degree-6 polynomial, 2^k added to the exponent bits (0 below
    EXP_LOW). Its error bound (2 ulp, tested on every float32 in [EXP_LOW, 0]) is part of
    ``_walk_numba.softmax_lower_bound``'s proof, which allows 8: a change here must keep it."""
    small = x < EXP_LOW
    x = min(max(x, EXP_LOW), EXP_HIGH)
    k = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
    y = np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)
    y = y * r + np.float32(8.3334519073e-3)
    y = y * r + np.float32(4.1665795894e-2)
    y = y * r + np.float32(1.6666665459e-1)
    y = y * r + np.float32(5.0000001201e-1)
    y = y * (r * r) + r + np.float32(1.0)
    return np.float32(0.0) if small else bits_float(np.int32(float_bits(y) + (np.int32(k) << 23)))


@numba.njit(**_JIT)
def exp_inplace(values):
    """values [n] = exp32(values) (one vectorised loop; the power of two added by a bitcast, where
    a second pass over an array of exponent bits took ~20% longer)."""
    for i in range(values.size):
        values[i] = exp32(values[i])


@numba.njit(**_VEC)
def _softmax_into(row):
    """row = softmax(row) in place (a -inf entry gets weight 0)."""
    row -= row_max(row)  # ``row.max()`` compiles to one compare chain
    exp_inplace(row)
    total = np.float32(0.0)
    for j in range(row.size):
        total += row[j]
    row /= total


@numba.njit(**_VEC)
def _weighted_sum_into(out, weights, values, end):
    """out [d] = sum_j weights[j] values[j] over keys 0..end-1, four keys per pass over out."""
    out[:] = 0.0
    j = 0
    while j + 4 <= end:
        w0, w1, w2, w3 = weights[j], weights[j + 1], weights[j + 2], weights[j + 3]
        for t in range(out.shape[0]):
            out[t] += (
                w0 * values[j, t] + w1 * values[j + 1, t] + w2 * values[j + 2, t] + w3 * values[j + 3, t]
            )
        j += 4
    for k in range(j, end):
        for t in range(out.shape[0]):
            out[t] += weights[k] * values[k, t]


@numba.njit(**_JIT)
def attention(qkv, keys, values, start, mask, causal, cos, sin, heads, kv_heads, scale):
    """Rotary q / k, the new keys / values written to the cache, softmax attention over it.

    qkv [m, (H + 2 H_kv) d]; keys / values [H_kv, capacity, d] (rows start..start+m-1 written);
    mask [m, start + m] additive (used when its size is non-zero), else ``causal`` (query i sees
    keys 0..start+i) or, for one query, every key; cos / sin [m, d]. Per head: scores = q K^T *
    scale + mask [m, start + m], row softmax, times V: loops per query for fewer than
    ``LOOP_ATTENTION_ROWS`` queries, else two BLAS products. Returns the heads' outputs [m, H d].
    """
    m = qkv.shape[0]
    d = keys.shape[2]
    end = start + m
    group = heads // kv_heads
    q = np.empty((heads, m, d), dtype=np.float32)
    for i in range(m):
        for h in range(heads):
            _rotate_into(q[h, i], qkv[i, h * d : (h + 1) * d], cos[i], sin[i])
        for h in range(kv_heads):
            k_at = (heads + h) * d
            v_at = (heads + kv_heads + h) * d
            _rotate_into(keys[h, start + i], qkv[i, k_at : k_at + d], cos[i], sin[i])
            values[h, start + i, :] = qkv[i, v_at : v_at + d]
    out = np.empty((m, heads * d), dtype=np.float32)
    if m < LOOP_ATTENTION_ROWS:
        row = np.empty(end, dtype=np.float32)
        for h in range(heads):
            kv = h // group
            for i in range(m):
                seen = start + i + 1 if causal and not mask.size else end
                _scores_into(row, q[h, i], keys[kv], seen, scale)
                if mask.size:
                    row[:seen] += mask[i]
                _softmax_into(row[:seen])
                _weighted_sum_into(out[i, h * d : (h + 1) * d], row, values[kv], seen)
        return out
    for h in range(heads):
        kv = h // group
        scores = np.dot(q[h], keys[kv, :end].T) * scale  # [m, end]
        if mask.size:
            scores += mask
        elif causal:
            for i in range(m):
                scores[i, start + i + 1 :] = -np.inf
        for i in range(m):
            _softmax_into(scores[i])
        out[:, h * d : (h + 1) * d] = np.dot(scores, values[kv, :end])  # [m, d]
    return out


@numba.njit(**_JIT)
def silu_gate(gate_up):
    """silu(g) * u = g / (1 + exp(-g)) * u for gate_up [m, 2 I] = [g | u] -> [m, I]."""
    m, width = gate_up.shape
    inner = width // 2
    out = np.empty((m, inner), dtype=np.float32)
    for r in range(m):
        decay = -gate_up[r, :inner]  # a copy: exp(-g) in place
        exp_inplace(decay)
        for j in range(inner):
            out[r, j] = gate_up[r, j] / (np.float32(1.0) + decay[j]) * gate_up[r, inner + j]
    return out


@numba.njit(**_JIT)
def decoder_layer(x, weights, keys, values, start, mask, causal, cos, sin, heads, kv_heads, eps, gemm):
    """One decoder layer on x [m, hidden] in place of the reference's ~20 framework calls.

    weights: (input_norm, qkv_panels, qkv_t, qkv_bias, out_panels, out_t, out_bias, post_norm,
    gate_up_panels, gate_up_t, down_panels, down_t) of the layer."""
    (norm1, qkv_p, qkv_t, qkv_b, o_p, o_t, o_b, norm2, gu_p, gu_t, down_p, down_t) = weights
    scale = np.float32(1.0 / np.sqrt(keys.shape[2]))
    h = rms_norm(x, norm1, eps)
    qkv = project(h, qkv_p, qkv_t, qkv_b, gemm)
    a = attention(qkv, keys, values, start, mask, causal, cos, sin, heads, kv_heads, scale)
    x = x + project(a, o_p, o_t, o_b, gemm)
    no_bias = np.empty(0, dtype=np.float32)
    gate_up = project(rms_norm(x, norm2, eps), gu_p, gu_t, no_bias, gemm)
    return x + project(silu_gate(gate_up), down_p, down_t, no_bias, gemm)


@numba.njit(**_JIT)
def decoder_stack(x, layers, keys, values, start, mask, causal, cos, sin, heads, kv_heads, eps, gemm):
    """Every decoder layer on x [m, hidden] in one compiled call (``decoder_layer`` per layer):
    layers is a tuple of ``decoder_layer``'s weight tuples, keys / values the cache
    [layers, kv_heads, capacity, head_dim]. One call instead of one per layer saves the
    dispatcher's typing of every layer's arguments and the Python loop (8-10 microseconds per
    one-token forward of the bundled target; BENCHMARKS.md, ad hoc)."""
    for i in range(len(layers)):
        x = decoder_layer(
            x, layers[i], keys[i], values[i], start, mask, causal, cos, sin, heads, kv_heads, eps, gemm
        )
    return x


def decoder_layer_blas(x, weights, keys, values, start, mask, causal, cos, sin, heads, kv_heads, eps, gemm):
    """``decoder_layer`` for many rows: the same steps, the products by numpy's BLAS (``gemm``
    unused: the signature is ``decoder_layer``'s)."""
    (norm1, _, qkv_t, qkv_b, _, o_t, o_b, norm2, _, gu_t, _, down_t) = weights
    scale = np.float32(1.0 / np.sqrt(keys.shape[2]))
    qkv = rms_norm(x, norm1, eps) @ qkv_t
    if qkv_b.size:
        qkv += qkv_b
    a = attention(qkv, keys, values, start, mask, causal, cos, sin, heads, kv_heads, scale) @ o_t
    x = x + (a + o_b if o_b.size else a)
    gate_up = rms_norm(x, norm2, eps) @ gu_t
    return x + silu_gate(gate_up) @ down_t


@numba.njit(**_JIT)
def causal_logits(ids, rows, models, keys, values, start, cos_table, sin_table, heads, kv_heads, eps, gemm):
    """The output layer's logits [rows, out] of the last ``rows`` of a causal forward of ``ids``
    [m] (rows <= m <= ``panel_max_rows``) at positions start .. start + m - 1:
    ``StaticLlamaRunner``'s ``causal_hidden`` then ``logits``, with the same arrays and kernels.
    models: a ``numba.typed.List`` holding the model, (embed [V, hidden], layers, final_norm
    [hidden], out_panels, out_t, out_bias): the dispatcher then types and unboxes one object
    instead of every weight array (~80 for the bundled target: 5.5 against 2 microseconds a call,
    hot; the kernels called from Python all take it so)."""
    return _causal_logits(
        ids, rows, models[0], keys, values, start, cos_table, sin_table, heads, kv_heads, eps, gemm
    )


@numba.njit(**_JIT)
def _causal_logits(ids, rows, model, keys, values, start, cos_table, sin_table, heads, kv_heads, eps, gemm):
    """``causal_logits`` of the model tuple itself."""
    m = ids.size
    cos, sin = cos_table[start : start + m], sin_table[start : start + m]
    no_mask = np.zeros((0, 0), dtype=np.float32)
    picked = np.arange(m - rows, m)
    return _rows_logits(
        model, ids, picked, no_mask, m > 1, cos, sin, keys, values, start, heads, kv_heads, eps, gemm
    )


@numba.njit(**_JIT)
def _rows_logits(model, ids, picked, mask, causal, cos, sin, keys, values, start, heads, kv_heads, eps, gemm):
    """The output layer's logits [len(picked), out] of rows ``picked`` of a forward of ``ids`` [m]
    from cache position ``start`` (``decoder_stack`` with ``mask`` or ``causal``, RoPE ``cos``,
    ``sin`` [m, d]), the final norm on those rows only: the one forward from token ids of
    ``causal_logits``, ``tree_logits`` and ``sample_tree``."""
    embed, layers, final_norm, out_p, out_t, out_b = model
    x = np.empty((ids.size, embed.shape[1]), dtype=np.float32)
    for r in range(ids.size):
        x[r] = embed[ids[r]]
    x = decoder_stack(x, layers, keys, values, start, mask, causal, cos, sin, heads, kv_heads, eps, gemm)
    hidden = np.empty((picked.size, x.shape[1]), dtype=np.float32)
    for j in range(picked.size):
        hidden[j] = x[picked[j]]
    return project(rms_norm(hidden, final_norm, eps), out_p, out_t, out_b, gemm)


@numba.njit(**_JIT)
def gather_positions(keys, values, base, extra):
    """Cache entries base .. base + k - 1 <- the entries at ``extra`` [k], in keys and values
    [layers, kv_heads, capacity, head_dim] (C arrays; every source read before any entry is
    written): ``_gather_rows`` on each; nothing where every entry is already in place."""
    moves = False
    for i in range(extra.size):
        moves |= extra[i] != base + i
    if not moves:
        return
    kept = np.empty((extra.size, keys.shape[3]), dtype=keys.dtype)
    _gather_rows(keys, base, extra, kept)
    _gather_rows(values, base, extra, kept)


@numba.njit(**_JIT)
def _gather_rows(cache, base, extra, kept):
    """``gather_positions`` on one cache [layers, kv_heads, capacity, head_dim], a (layer, head)
    block at a time: its k source rows into ``kept`` [k, head_dim], then into rows base .. base +
    k - 1; a row already in place (extra[i] = base + i: no other row moves there) is neither
    read nor written. Plain loops over contiguous rows, which the compiler vectorises, where
    slice assignments of whole [layers, kv_heads, head_dim] entries went through numba's strided
    copy and a [k, layers, kv_heads, head_dim] temporary: 1.2x faster from the core's caches, at
    numpy's speed (``benchmarks/bench_cache_move.py``)."""
    layers, heads, _, width = cache.shape
    for layer in range(layers):
        for head in range(heads):
            for i in range(extra.size):
                if extra[i] != base + i:
                    for j in range(width):
                        kept[i, j] = cache[layer, head, extra[i], j]
            for i in range(extra.size):
                if extra[i] != base + i:
                    for j in range(width):
                        cache[layer, head, base + i, j] = kept[i, j]


@intrinsic
def _prefetch_for_write(typingctx, array, index):
    """Ask the CPU for the cache line of ``array[index]`` (a 1-d C array) before it is read and
    written (LLVM's ``prefetch``: write, kept near the core: locality 2, data): a hint that never
    faults and changes no result."""
    sig = types.void(array, types.intp)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]], wraparound=False)
        pointer = builder.bitcast(pointer, cgutils.voidptr_t)
        i32 = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32, i32])
        # named as numba names its memcpy (``declare_intrinsic``: "p0i8"), which LLVMs with
        # opaque pointers rename ("p0") as they read it
        function = builder.module.declare_intrinsic("llvm.prefetch", [cgutils.voidptr_t], function_type)
        builder.call(function, [pointer, ir.Constant(i32, 1), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(**_JIT)
def prefetch_positions(keys, values, first, count):
    """Request every cache line of the entries first .. first + count - 1 of keys and values
    [layers, kv_heads, capacity, head_dim] (C arrays) for writing: ``gather_positions``' sources
    and destinations, asked for as the verification walk accepts them
    (``_walk_numba._prefetch_move``) so that their transfer overlaps the rest of the walk (after
    the target's forward they are in memory, not in the core's caches)."""
    layers, heads, capacity, width = keys.shape
    line = max(1, 64 // keys.itemsize)  # entries of a 64-byte cache line
    flat_keys, flat_values = keys.reshape(-1), values.reshape(-1)
    for block in range(layers * heads):
        start = (block * capacity + first) * width
        for i in range(0, count * width, line):
            _prefetch_for_write(flat_keys, start + i)
            _prefetch_for_write(flat_values, start + i)


@numba.njit(**_JIT)
def tree_logits(
    ids, num_causal, tree_mask, node_depths, root_position, rows, hidden_value, models, keys, values, start,
    cos_table, sin_table, heads, kv_heads, eps, gemm,
):  # fmt: skip
    """The output layer's logits [len(rows), out] of ``rows`` (0: the root, i + 1: node i) of a
    tree forward: ``ids`` [m] = ``num_causal`` committed tokens (causal among themselves, the
    root last; they never see the tree) then T tree nodes (every committed key visible, the
    tree's keys by ``tree_mask`` [T, C] additive), at positions start .. and root_position +
    ``node_depths`` [T]; m <= ``panel_max_rows``. ``ModelRunner.tree_hidden`` (its mask with
    ``hidden_value``, its positions) then ``logits`` on those rows, with the same arrays and
    kernels (``causal_logits``' ``models``)."""
    m = ids.size
    end = start + m
    mask = np.zeros((m, end), dtype=np.float32)
    for i in range(num_causal):
        mask[i, start + i + 1 :] = hidden_value
    mask[num_causal:, end - tree_mask.shape[1] :] = tree_mask
    positions = np.empty(m, dtype=np.int64)
    for i in range(num_causal):
        positions[i] = start + i
    positions[num_causal:] = root_position + node_depths
    cos, sin = cos_table[positions], sin_table[positions]
    picked = m - node_depths.size - 1 + rows  # the root's row, then the nodes'
    return _rows_logits(
        models[0], ids, picked, mask, False, cos, sin, keys, values, start, heads, kv_heads, eps, gemm
    )


@numba.njit(**_JIT)
def next_logits(ids, model, keys, values, start, cos_table, sin_table, heads, kv_heads, eps, gemm):
    """``causal_logits`` of the last row: logits [out] (``model``: the tuple itself)."""
    return _causal_logits(
        ids, 1, model, keys, values, start, cos_table, sin_table, heads, kv_heads, eps, gemm
    )[0]


@numba.njit(**_JIT)
def level_q(logits, temperature, top_k, top_p, kept_row, probs_row):
    """One level's q from the output layer's logits [K] into ``probs_row``, as
    ``mdsd.logits.process_logits_row`` makes it: softmax(logits / T) (``probs_row`` [K];
    ``mdsd._softmax_numba.tempered_softmax``) where nothing truncates, else
    (``mdsd._topp_numba.truncated_softmax``: for 0 < ``top_k`` < K the ``top_k`` largest logits,
    for ``top_p`` < 1 the nucleus of those) the kept entries' positions in ``kept_row`` and their
    probabilities in ``probs_row`` ([W], W = ``top_k`` or K), ascending, in front; the places
    after them hold position 0 and probability 0. Returns the number of entries of probability
    0 (underflowed, or places not kept)."""
    if not truncates(top_k, top_p, logits.size):
        probs_row[:], zeros = tempered_softmax(logits, temperature)
        return zeros
    ids, values, zeros = truncated_softmax(logits, temperature, top_k, top_p)
    kept_row[: ids.size], probs_row[: ids.size] = ids, values
    kept_row[ids.size :], probs_row[ids.size :] = 0, 0.0
    return zeros + probs_row.size - ids.size


LAW_IID, LAW_WITHOUT_REPLACEMENT, LAW_GREEDY, LAW_SPECHUB = (
    TREE_LAWS[name] for name in ("iid", "without_replacement", "greedy", "spechub")
)


@numba.njit(**_JIT)
def draw_drafts(probs_row, compact, n, law, uniform, state, out):
    """n drafts of the law with code ``law`` (``TREE_LAWS``) from q = ``probs_row``, as
    positions in ``probs_row`` into ``out[:n]``, from q's nonzero entries where ``compact`` (as
    ``SamplingConfig.row_probs`` stores q: truncated, or over part of the vocabulary, with some
    mass underflowed) else from the whole row: the arrays the reference draws from, so the same
    tokens. i.i.d.: n inverse-CDF draws (``mdsd.sampling.draw``, ``categorical``) at the
    generator's next n uniforms; without replacement: the same draws with the earlier drafts'
    masses set to 0 (``draws_without_replacement``); greedy (n > 1): ``_greedy_drafts``;
    spechub (n = 2): ``_spechub_drafts``."""
    positions = np.flatnonzero(probs_row) if compact else np.arange(probs_row.size)
    values = probs_row[positions] if compact else probs_row
    if law == LAW_GREEDY and n > 1:
        _greedy_drafts(values, n, next_uniform(uniform, state), out)
    elif law == LAW_SPECHUB and n > 1:
        first = next_uniform(uniform, state)
        _spechub_drafts(values, first, next_uniform(uniform, state), out)
    else:
        _sequential_draws(values, n, law == LAW_WITHOUT_REPLACEMENT and n > 1, uniform, state, out)
    for i in range(n):
        out[i] = positions[out[i]]


@numba.njit(**_JIT)
def _sequential_draws(values, n, distinct, uniform, state, out):
    """n inverse-CDF draws from ``values`` at the generator's next n uniforms into ``out[:n]``,
    i.i.d., or with ``distinct`` each earlier draw's mass set to 0 in a copy."""
    if distinct:
        values = values.copy()
    for i in range(n):
        out[i] = draw(values, next_uniform(uniform, state))
        if distinct:
            values[out[i]] = 0.0


@numba.njit(**_JIT)
def _greedy_drafts(values, n, u, out):
    """``mdsd.laws.Greedy``'s draws at uniform u into ``out[:n]``: the n - 1 largest of
    ``values``, largest first, ties by lower position (rounds of argmax, as
    ``laws.top_tokens``), then one inverse-CDF draw from the rest renormalised by its sum in
    numpy's order (``complement_renormalised``): the same numbers."""
    left = values.copy()  # the argmax rounds' copy: each round's pick below every mass
    rest = values.copy()
    for j in range(n - 1):
        out[j] = np.argmax(left)
        left[out[j]] = -np.inf
        rest[out[j]] = 0.0
    out[n - 1] = draw(_renormalised(rest), u)


@numba.njit(**_JIT)
def _spechub_drafts(values, u_first, u_other, out):
    """``mdsd.laws.SpecHub``'s two draws at uniforms (u_first, u_other) into ``out[:2]``: the
    hub a = the largest of ``values`` (ties by lower position, ``np.argmax``), the first draft
    drawn from q, the other from q off the hub renormalised (``complement_renormalised``; drawn
    whatever the first, as the reference does); the second draft is the hub unless the first
    is: the same numbers."""
    hub = np.argmax(values)
    rest = values.copy()
    rest[hub] = 0.0
    out[0] = draw(values, u_first)
    other = draw(_renormalised(rest), u_other)
    out[1] = other if out[0] == hub else hub


@numba.njit(**_JIT)
def _renormalised(rest):
    """``rest`` divided by its sum in numpy's order (``complement_renormalised``), in place."""
    total = numpy_sum(rest)
    for i in range(rest.size):
        rest[i] = rest[i] / total
    return rest


@numba.njit(**_JIT)
def drafts_of(support, width, law):
    """n_eff: the drafts a node with ``width`` child slots draws from a q of ``support`` nonzero
    entries (``walk.RuleBook.rule``): 1 where support <= 1, at most the support for a law of
    distinct drafts (every law but i.i.d.), else the width."""
    if support <= 1:
        return 1
    return min(width, support) if law != LAW_IID else width


@numba.njit(cache=True)
def sample_chain(
    ids, depth, uniform, state, temperature, top_k, top_p, drop_zeros, token_ids, models, keys, values, start,
    cos, sin, heads, kv_heads, eps, gemm,
):  # fmt: skip
    """A chain of D = ``depth`` tokens drafted by the model: level 0 forwards ``ids`` (the tokens
    the cache lacks), level d > 0 the token drawn at level d - 1; each level's q by ``level_q``
    over the output layer's tokens ``token_ids`` [K] (ascending), and its token drawn
    (``draw_drafts``, one draft) at the generator's next uniform (``uniform, state``:
    ``mdsd.sampling.uniform_source``; level d reads the d-th number of ``rng.random(D)``), from
    q's nonzero entries where q is truncated (a top-k, a top-p) or ``drop_zeros``. Returns
    (tokens [D] ids, q [D, W] float64, zeros [D]: entries of each q of probability 0, kept
    [D, W]: the positions in ``token_ids`` of q's entries (``level_q``); W = ``top_k`` where it
    truncates, else K, and kept empty where nothing truncates). The cache then holds ``ids``
    and tokens 0 .. D - 2."""
    model, truncated = models[0], truncates(top_k, top_p, token_ids.size)
    width = top_k if 0 < top_k < token_ids.size else token_ids.size
    tokens = np.empty(depth, dtype=np.int64)
    probs = np.empty((depth, width))
    zeros = np.empty(depth, dtype=np.int64)
    kept = np.empty((depth if truncated else 0, width if truncated else 0), dtype=np.int64)
    at = np.empty(1, dtype=np.int64)
    for d in range(depth):
        logits = next_logits(ids, model, keys, values, start, cos, sin, heads, kv_heads, eps, gemm)
        zeros[d] = level_q(logits, temperature, top_k, top_p, kept[d] if truncated else at, probs[d])
        draw_drafts(probs[d], zeros[d] > 0 and (truncated or drop_zeros), 1, LAW_IID, uniform, state, at)
        tokens[d] = token_ids[kept[d, at[0]] if truncated else at[0]]
        start += ids.size
        ids = tokens[d : d + 1]
    return tokens, probs, zeros, kept


@numba.njit(cache=True)
def sample_tree(
    ids, widths, level_starts, child_starts, depths, masks, law, uniform, state, temperature, top_k, top_p,
    drop_zeros, token_ids, models, keys, values, start, cos_table, sin_table, heads, kv_heads, eps, gemm,
):  # fmt: skip
    """A draft tree (``mdsd.engine.tree.DraftTree``'s ``widths``, ``level_starts``,
    ``child_starts``, ``depths``) drafted by the model in one call: level 0 forwards ``ids`` (the
    tokens the cache lacks) causally and gives the root's q; level d > 0 forwards every depth-d
    slot at once, under the tree mask ``masks[d - 1, :m_d, :level_starts[d]]`` (additive, over
    the tree's keys; committed keys visible) at positions root + d, and gives the q of its valid
    nodes (the output layer on those rows only). Each q by ``level_q``, over ``token_ids`` [K]
    (ascending); each node's drafts by ``draw_drafts`` (n_eff = ``drafts_of``; the law of code
    ``law``, ``TREE_LAWS``), nodes in breadth-first order, the unused slots of a
    node holding a copy of its first draft: ``TreeDecoder.draft_tree``'s forwards, q and draws,
    the same numbers (tested). Returns (tokens [N], valid [N], nodes [R]: the node (-1: root) of
    each q row, drafted [R]: its n_eff, q [R, W], zeros [R], kept [R, W], as ``sample_chain``'s).
    The cache then holds ``ids`` and the slots of depths 1 .. D - 1."""
    model = models[0]  # ``causal_logits``' ``models``
    depth, truncated = widths.size, truncates(top_k, top_p, token_ids.size)
    width = top_k if 0 < top_k < token_ids.size else token_ids.size
    rows = 1 + level_starts[depth - 1]  # the root and every node above the last level
    tokens, valid = np.zeros(depths.size, dtype=np.int64), np.zeros(depths.size, dtype=np.bool_)
    nodes, drafted = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
    probs, zeros = np.empty((rows, width)), np.empty(rows, dtype=np.int64)
    kept = np.empty((rows if truncated else 0, width if truncated else 0), dtype=np.int64)
    no_kept, at = np.empty(0, dtype=np.int64), np.empty(widths.max(), dtype=np.int64)
    root = start + ids.size - 1  # the position of the last committed token
    logits = next_logits(ids, model, keys, values, start, cos_table, sin_table, heads, kv_heads, eps, gemm)
    level_logits, frontier = logits.reshape(1, -1), np.full(1, -1, dtype=np.int64)
    start += ids.size
    r = 0
    for d in range(depth):
        for j in range(frontier.size):  # the level's valid nodes, ascending
            node, slots = frontier[j], widths[d]
            zeros[r] = level_q(
                level_logits[j], temperature, top_k, top_p, kept[r] if truncated else no_kept, probs[r]
            )
            n = drafts_of(width - zeros[r], slots, law)
            draw_drafts(probs[r], zeros[r] > 0 and (truncated or drop_zeros), n, law, uniform, state, at)
            first = child_starts[node + 1]
            for i in range(slots):
                pick = at[i if i < n else 0]  # an unused slot: the first draft, never verified
                tokens[first + i] = token_ids[kept[r, pick] if truncated else pick]
                valid[first + i] = i < n
            nodes[r], drafted[r] = node, n
            r += 1
        if d == depth - 1:
            break
        lo, hi = level_starts[d], level_starts[d + 1]  # the depth d + 1 slots
        m = hi - lo
        mask = np.zeros((m, start + m), dtype=np.float32)
        mask[:, start + m - hi :] = masks[d, :m, :hi]
        positions = root + depths[lo:hi]
        cos, sin = cos_table[positions], sin_table[positions]
        picked = np.flatnonzero(valid[lo:hi])  # the output layer on the valid slots only
        level_logits = _rows_logits(
            model,
            tokens[lo:hi],
            picked,
            mask,
            False,
            cos,
            sin,
            keys,
            values,
            start,
            heads,
            kv_heads,
            eps,
            gemm,
        )
        start += m
        frontier = lo + picked
    return tokens, valid, nodes[:r], drafted[:r], probs[:r], zeros[:r], kept[:r]
