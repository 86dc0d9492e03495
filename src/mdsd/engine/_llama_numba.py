"""The compiled decoder stack of ``StaticLlamaRunner(matmul="numba")`` (float32, CPU).

The torch / numpy forward of ``mdsd.engine.static_llama`` (the reference, tested against Hugging
Face's forward) pays ~15-40 microseconds of framework dispatch per small operation: about 0.6 ms
per decoder layer on the CPU of BENCHMARKS.md, as much as a one-token forward's weight reads. Here
each decoder layer is one compiled call with the same steps:

    h = rms_norm(x) ; q, k, v = h W_qkv (+ b) ; rotary(q), rotary(k) ; cache[start:end] = k, v
    a = softmax(q K^T / sqrt(d) + mask) V ; x = x + a W_o
    h = rms_norm(x) ; g, u = h W_gu ; x = x + (silu(g) * u) W_down

The projections of up to ``panel_max_rows`` rows (a one-token step, a draft tree's nodes) run on
the weight panels of ``mdsd.engine._panel_gemm`` (each weight read once for all rows, outputs in
registers), passed in as ``gemm``; more rows run ``decoder_layer_blas``: the same steps, the
products by numpy's BLAS from Python (numba's ``np.dot`` binds scipy's BLAS, whose many-row kernels
measured ~2x slower here). Results equal the reference forward to float32 rounding
(tests/engine/test_runner.py).
"""

from __future__ import annotations

import numba
import numpy as np

from mdsd.engine._panel_gemm import PANEL, host_width

# Rows multiplied on the panels (the kernel runs passes of _panel_gemm.MAX_ROWS rows; more rows
# use the BLAS), by where the BLAS wins (``benchmarks/bench_matmul.py``, one thread): with AVX2
# (AMD Zen 3) 16 rows on float32 panels took ~1.6x numpy's time and 24 rows on float16 panels
# ~0.7x; with AVX-512 (passes of 24 rows) float32 panels beat the BLAS up to ~24 rows and float16
# ones up to ~96 (64 rows: 0.74x), which also makes a prompt's prefill ~25% faster.
_WIDE = host_width() == 16  # a global of the compiled code: fixed per CPU, as numba's cache is
PANEL_MAX_ROWS_F32 = 24 if _WIDE else 12
PANEL_MAX_ROWS_16 = 64 if _WIDE else 24


@numba.njit(cache=True)
def panel_max_rows(itemsize):
    """The largest row count multiplied on panels of ``itemsize`` bytes per weight."""
    return PANEL_MAX_ROWS_16 if itemsize == 2 else PANEL_MAX_ROWS_F32


_JIT = {"cache": True, "boundscheck": False, "fastmath": {"contract"}}


@numba.njit(**_JIT)
def project(x, panels, weight_t, bias, gemm):
    """x [m, in] @ W^T [in, out] (+ bias [out] when it is non-empty), W^T also given as
    panels [P, in, PANEL]: the panel kernel ``gemm`` up to ``panel_max_rows`` rows, else np.dot."""
    x = np.ascontiguousarray(x)
    m, k_dim = x.shape
    cols = weight_t.shape[1]
    if m <= panel_max_rows(panels.itemsize):
        n_panels = panels.shape[0]
        width = n_panels * PANEL
        out = np.empty((m, width), dtype=np.float32)
        gemm(x.ctypes.data, panels.ctypes.data, out.ctypes.data, m, n_panels, k_dim, width)
        if width != cols:
            out = np.ascontiguousarray(out[:, :cols])
    else:
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


@numba.njit(**_JIT)
def attention(qkv, keys, values, start, mask, causal, cos, sin, heads, kv_heads, scale):
    """Rotary q / k, the new keys / values written to the cache, softmax attention over it.

    qkv [m, (H + 2 H_kv) d]; keys / values [H_kv, capacity, d] (rows start..start+m-1 written);
    mask [m, start + m] additive (used when its size is non-zero), else ``causal`` (query i sees
    keys 0..start+i) or, for one query, every key; cos / sin [m, d]. Per head: scores = q K^T *
    scale + mask [m, start + m], row softmax, times V. Returns the heads' outputs [m, H d].
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
    for h in range(heads):
        kv = h // group
        scores = np.dot(q[h], keys[kv, :end].T) * scale  # [m, end]
        if mask.size:
            scores += mask
        elif causal:
            for i in range(m):
                scores[i, start + i + 1 :] = -np.inf
        for i in range(m):
            row = scores[i]
            row -= row.max()
            np.exp(row, row)
            row /= row.sum()
        out[:, h * d : (h + 1) * d] = np.dot(scores, values[kv, :end])  # [m, d]
    return out


@numba.njit(**_JIT)
def silu_gate(gate_up):
    """silu(g) * u for gate_up [m, 2 I] = [g | u] -> [m, I]."""
    m, width = gate_up.shape
    inner = width // 2
    out = np.empty((m, inner), dtype=np.float32)
    for r in range(m):
        for j in range(inner):
            g = gate_up[r, j]
            out[r, j] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[r, inner + j]
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
