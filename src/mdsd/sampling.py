"""Categorical sampling by inverse CDF: the one implementation every layer uses (compiled).

``categorical(probs, rng)`` draws one token from each row of ``probs`` [..., V] (rows need not
be normalised: the uniform is scaled by the row total): the first token whose running sum
exceeds u * total, u = ``rng.random()``. Tokens of zero mass are never drawn; should rounding
leave the threshold unreached (probability ~1e-16), the last token of positive mass.

The kernels (``row_sum``, ``search``, ``draw``; numba, float64) are also the final draws of the
verifiers' early-exit samplers (``mdsd.verifiers._early_exit``). A row costs one vectorised sum
and a search that stops at the drawn token, several times less than ``np.cumsum`` (sequential
additions, ~3 ns a token) and ``np.searchsorted``; the sums add four interleaved partial sums,
the same value as numpy's to ~1e-16 relative.

>>> import numpy as np
>>> int(categorical(np.array([0.0, 1.0, 0.0]), np.random.default_rng(0)))
1
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


def categorical(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray | np.int64:
    """One draw per row of ``probs`` [..., V]; an int64 scalar for [V], else int64 [...]."""
    probs = np.ascontiguousarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        return np.int64(draw(probs, rng.random()))
    uniforms = rng.random(probs.shape[:-1])
    rows = probs.reshape(-1, probs.shape[-1])
    tokens = np.empty(rows.shape[0], dtype=np.int64)
    draw_rows(rows, uniforms.reshape(-1), tokens)
    return tokens.reshape(probs.shape[:-1])


def draws_without_replacement(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n sequential draws without replacement from each row of ``probs`` [..., V] (need not be
    normalised), in draw order: [..., n] int64. Draw i is ``categorical``'s inverse CDF at
    ``rng.random()`` over the row with the earlier draws' masses set to 0 (the remaining total is
    summed afresh, never 1 - q(drawn)). The caller ensures n <= the support of every row."""
    probs = np.ascontiguousarray(probs, dtype=np.float64)
    rows = probs.reshape(-1, probs.shape[-1])
    uniforms = rng.random((rows.shape[0], n))
    tokens = np.empty((rows.shape[0], n), dtype=np.int64)
    draw_rows_without_replacement(rows, uniforms, tokens)
    return tokens.reshape(probs.shape[:-1] + (n,))


@numba.njit(cache=True, fastmath=False)
def row_sum(values, lo, hi):
    """sum(values[lo:hi]) with four accumulators (independent add chains, ~4x a single one)."""
    s0 = s1 = s2 = s3 = 0.0
    stop = lo + (hi - lo) // 4 * 4
    for y in range(lo, stop, 4):
        s0 += values[y]
        s1 += values[y + 1]
        s2 += values[y + 2]
        s3 += values[y + 3]
    for y in range(stop, hi):
        s0 += values[y]
    return (s0 + s1) + (s2 + s3)


@numba.njit(cache=True, fastmath=False)
def search(values, threshold):
    """The first token whose running sum of ``values`` exceeds ``threshold`` (inverse CDF).

    Blocks of four are skipped on their block sum; inside the block that crosses, the running sum
    is walked token by token. If rounding leaves the threshold unreached, the last token of
    positive mass (never a zero-mass token)."""
    vocab = values.size
    acc = 0.0
    stop = vocab // 4 * 4
    for y in range(0, stop, 4):
        block = (values[y] + values[y + 1]) + (values[y + 2] + values[y + 3])
        if acc + block > threshold:
            for k in range(y, y + 4):
                acc += values[k]
                if acc > threshold and values[k] > 0.0:
                    return k
        else:
            acc += block
    for k in range(stop, vocab):
        acc += values[k]
        if acc > threshold and values[k] > 0.0:
            return k
    for k in range(vocab - 1, -1, -1):
        if values[k] > 0.0:
            return k
    return vocab - 1  # an all-zero row: cannot happen for validated inputs


@numba.njit(cache=True, fastmath=False)
def draw(values, u):
    """Inverse-CDF draw from ``values`` [V] (need not be normalised) at uniform u in [0, 1)."""
    return search(values, u * row_sum(values, 0, values.size))


@numba.njit(cache=True, fastmath=False)
def draw_rows(values, uniforms, tokens):
    """tokens[b] = draw(values[b], uniforms[b]) for values [B, V]."""
    for b in range(values.shape[0]):
        tokens[b] = draw(values[b], uniforms[b])


@numba.njit(cache=True, fastmath=False)
def draw_rows_without_replacement(values, uniforms, tokens):
    """tokens[b, i] = draw(values[b] with tokens[b, :i] zeroed, uniforms[b, i])."""
    work = np.empty(values.shape[1])
    for b in range(values.shape[0]):
        work[:] = values[b]
        for i in range(tokens.shape[1]):
            y = draw(work, uniforms[b, i])
            tokens[b, i] = y
            work[y] = 0.0


# ---------------------------------------------------------------------- uniforms in compiled code
def uniform_source(rng: np.random.Generator) -> tuple[int, int]:
    """(address of the bit generator's ``next_double``, address of its state): what compiled
    code needs to draw ``rng.random()`` itself (``next_uniform``), the generator advancing as
    numpy's calls advance it. numba takes a ``Generator`` argument too, but unboxes it for about
    7 microseconds a call, more than the draws it saves in the decoding loop. The draws bypass
    the generator's lock: one thread per generator, as for every sampler here."""
    interface = rng.bit_generator.ctypes  # built once per bit generator, then cached by numpy
    # the function pointer's value read from its storage: ``ctypes.cast`` calls through libffi
    # (0.63 against 0.16 microseconds hot, several times that in the decoding loop)
    function = ctypes.c_void_p.from_address(ctypes.addressof(interface.next_double)).value
    return function, interface.state_address


@intrinsic
def next_uniform(typingctx, function, state):
    """``rng.random()`` from compiled code: call ``next_double(state)`` at the addresses of
    ``uniform_source(rng)`` (numpy's ``Generator.random`` draws exactly this double)."""
    sig = types.float64(types.uintp, types.uintp)

    def codegen(context, builder, signature, args):
        byte_pointer = ir.IntType(8).as_pointer()
        function_type = ir.FunctionType(ir.DoubleType(), [byte_pointer])
        function_pointer = builder.inttoptr(args[0], function_type.as_pointer())
        return builder.call(function_pointer, [builder.inttoptr(args[1], byte_pointer)])

    return sig, codegen


@numba.njit(cache=True)
def next_uniforms(count, function, state):
    """``rng.random(count)`` from compiled code: ``count`` calls of ``next_uniform``."""
    out = np.empty(count)
    for i in range(count):
        out[i] = next_uniform(function, state)
    return out
