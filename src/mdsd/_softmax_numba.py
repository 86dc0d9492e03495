"""The compiled softmax of ``mdsd.logits.process_logits_row`` (numba, float64).

``tempered_softmax(logits, temperature)`` is ``mdsd.logits._softmax(logits / temperature)`` for
one row (and the number of its zero entries): z = logits / T in float64, z - max(z), exp,
normalised by the sum (times its reciprocal). numpy pays a call and a temporary per step (a
float64 copy, the division, the max, the shift, exp, the sum, the division); here the steps are
vectorised loops of one compiled call, and the exponential is a polynomial the compiler
vectorises (numba would call the C library's scalar ``exp`` per element, slower than numpy's SIMD
one).

exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (ln 2 in two parts, Cephes' split), |r|
<= ln 2 / 2, and exp(r) by its Taylor polynomial of degree 13 (truncation error < 5e-18
relative), in Horner form: within 1 ulp of numpy's exp (tests/test_logits.py).
2^k is added to the exponent bits, which holds while the result is a normal number; the rare
arguments below ``EXP64_LOW`` (results that are subnormal or 0: masses below 1e-307) are
recomputed by the C library's ``exp``, so zero masses are zero exactly where numpy's are.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

EXP64_LOW = -708.0  # exp(-708) = 3.3e-308: 2^k stays a normal power of two above this
LN2_HI = 6.93145751953125e-1  # ln 2 = LN2_HI + LN2_LO (Cephes: k * LN2_HI is exact)
LN2_LO = 1.42860682030941723212e-6
LOG2_E = 1.4426950408889634


@intrinsic
def float_bits(typingctx, x):
    """The bits of a float32 / float64 as an int32 / int64 (a bitcast; vectorises)."""
    width = x.bitwidth
    sig = getattr(types, f"int{width}")(x)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(width))

    return sig, codegen


@intrinsic
def bits_float(typingctx, bits):
    """The float32 / float64 whose bits an int32 / int64 holds (a bitcast; vectorises)."""
    width = bits.bitwidth
    sig = getattr(types, f"float{width}")(bits)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType() if width == 32 else ir.DoubleType())

    return sig, codegen


@numba.njit(cache=True, boundscheck=False, fastmath={"contract"})
def _exp_into(values):
    """values[i] = exp(values[i]), 2^k added to the exponent bits by a bitcast; returns how many
    arguments were below EXP64_LOW (their results are not exp's: ``tempered_softmax`` recomputes
    those entries with the C library's exp)."""
    rare = 0
    for i in range(values.size):
        x = values[i]
        rare += x < EXP64_LOW
        x = min(max(x, EXP64_LOW), 709.0)
        k = np.floor(x * LOG2_E + 0.5)
        r = (x - k * LN2_HI) - k * LN2_LO
        y = 1.6059043836821613e-10  # 1 / 13!
        y = y * r + 2.08767569878681e-09  # 1 / 12!
        y = y * r + 2.505210838544172e-08  # 1 / 11!
        y = y * r + 2.755731922398589e-07  # 1 / 10!
        y = y * r + 2.7557319223985893e-06  # 1 / 9!
        y = y * r + 2.48015873015873e-05  # 1 / 8!
        y = y * r + 0.0001984126984126984  # 1 / 7!
        y = y * r + 0.001388888888888889  # 1 / 6!
        y = y * r + 0.008333333333333333  # 1 / 5!
        y = y * r + 0.041666666666666664  # 1 / 4!
        y = y * r + 0.16666666666666666  # 1 / 3!
        y = y * r + 0.5  # 1 / 2!
        y = y * r + 1.0  # 1 / 1!
        y = y * r + 1.0  # 1 / 0!
        values[i] = bits_float(float_bits(y) + (np.int64(k) << 52))
    return rare


@numba.njit(cache=True, boundscheck=False)
def row_max(values):
    """max(values) of a row [n >= 1] without NaN (float32 or float64), in eight independent
    compare-and-select chains: the compiler vectorises neither a float maximum nor its
    ``fastmath`` form here, and one chain waits on each comparison (~6x slower on 8,192 entries).
    The value is the row's largest entry, as any order of comparisons finds it."""
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = values[0]
    stop = values.size // 8 * 8
    for i in range(0, stop, 8):
        t0 = values[i] if values[i] > t0 else t0
        t1 = values[i + 1] if values[i + 1] > t1 else t1
        t2 = values[i + 2] if values[i + 2] > t2 else t2
        t3 = values[i + 3] if values[i + 3] > t3 else t3
        t4 = values[i + 4] if values[i + 4] > t4 else t4
        t5 = values[i + 5] if values[i + 5] > t5 else t5
        t6 = values[i + 6] if values[i + 6] > t6 else t6
        t7 = values[i + 7] if values[i + 7] > t7 else t7
    top = max(max(max(t0, t1), max(t2, t3)), max(max(t4, t5), max(t6, t7)))
    for i in range(stop, values.size):
        top = max(top, values[i])
    return top


@numba.njit(cache=True, boundscheck=False, fastmath={"reassoc"})
def _sum(values):
    """sum(values), vectorised (partial sums in vector lanes, like numpy's pairwise blocks). Not
    ``mdsd.sampling.row_sum``: the samplers keep its fixed order of four add chains, which takes
    ~5x this time on a row of 8,192 (a normalisation needs no particular order)."""
    total = 0.0
    for i in range(values.size):
        total += values[i]
    return total


@numba.njit(cache=True, boundscheck=False)
def tempered_softmax(logits, temperature):
    """(softmax(logits / temperature) of one row [k] as float64 [k], how many of its entries are
    0) for logits float32 or float64 (-inf entries get 0, no NaN) and ``temperature`` > 0. At
    least one entry must be finite. An entry is 0 only when its exponential underflows (below
    EXP64_LOW; the others are >= exp(EXP64_LOW) / k > 0), so the count costs nothing otherwise."""
    n = logits.size
    out = np.empty(n, dtype=np.float64)
    top = np.float64(row_max(logits)) / temperature  # = max(logits / T): x -> x / T is monotone
    for i in range(n):
        out[i] = np.float64(logits[i]) / temperature - top
    rare = _exp_into(out)
    zeros = 0
    if rare:
        for i in range(n):
            x = np.float64(logits[i]) / temperature - top
            if x < EXP64_LOW:
                out[i] = math.exp(x)
                zeros += out[i] == 0.0
    scale = 1.0 / _sum(out)
    for i in range(n):
        out[i] *= scale
    return out, zeros
