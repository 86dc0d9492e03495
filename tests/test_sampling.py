"""mdsd.sampling.categorical: the compiled inverse-CDF draw against numpy's cumsum / searchsorted
(the same token at every uniform away from rounding ties), zero-mass tokens never drawn, the
multi-row path against row-by-row draws, and a G-test of seeded draws; compiled code's draws
from a numpy generator (``uniform_source``, ``next_uniform``) against the generator's own."""

from __future__ import annotations

import numpy as np
import pytest

from mdsd.sampling import categorical, next_uniforms, uniform_source

from conftest import g_test_pvalue, inverse_cdf_reference


class FixedUniforms:
    """An rng whose ``random`` returns the given numbers in order (a scalar, or an array shaped
    as asked)."""

    def __init__(self, values):
        self.values = list(np.ravel(values))

    def random(self, shape=None):
        if shape is None:
            return self.values.pop(0)
        count = int(np.prod(shape))
        out, self.values = self.values[:count], self.values[count:]
        return np.asarray(out).reshape(shape)


@pytest.mark.parametrize("vocab", [1, 3, 4, 7, 64, 8192])
def test_draw_equals_the_cumsum_reference(vocab):
    """At 2,000 uniforms per vector (unnormalised, with zeros), the compiled draw is numpy's
    inverse CDF wherever u * total is not within 1e-12 of a cumulative boundary (where the two
    summation orders may round differently)."""
    gen = np.random.default_rng(vocab)
    probs = gen.gamma(0.3, size=vocab) * 7.0
    probs[gen.random(vocab) < 0.3] = 0.0
    probs[0] = max(probs[0], 0.1)
    cdf = np.cumsum(probs)
    uniforms = np.concatenate([gen.random(2000), [0.0, np.nextafter(1.0, 0.0)]])
    for u in uniforms:
        if np.min(np.abs(cdf - u * cdf[-1])) < 1e-12 * cdf[-1]:
            continue
        assert int(categorical(probs, FixedUniforms([u]))) == inverse_cdf_reference(probs, u)


def test_zero_mass_never_drawn():
    """Zero-mass tokens, the last one included, are never drawn, even at u just below 1 where
    rounding can leave the running sum short of u * total."""
    probs = np.array([0.0, 0.1, 0.2, 0.0, 0.7, 0.0, 0.0])
    for u in (0.0, 0.05, np.nextafter(1.0, 0.0)):
        assert probs[int(categorical(probs, FixedUniforms([u])))] > 0
    tiny = np.array([1e-300, 0.0, 1e-300])
    assert int(categorical(tiny, FixedUniforms([np.nextafter(1.0, 0.0)]))) == 2


def test_rows_draw_as_single_rows():
    """probs [2, 3, V] draws each row at the uniforms ``rng.random((2, 3))`` gives, as
    single-row calls at the same uniforms; float32 and integer input are read as float64."""
    gen = np.random.default_rng(3)
    probs = gen.random((2, 3, 10))
    got = categorical(probs, np.random.default_rng(9))
    uniforms = np.random.default_rng(9).random((2, 3))
    want = [[inverse_cdf_reference(probs[i, j], uniforms[i, j]) for j in range(3)] for i in range(2)]
    assert got.shape == (2, 3) and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    assert int(categorical(np.array([0, 0, 3]), np.random.default_rng(0))) == 2
    assert int(categorical(np.array([0.0, 1.0], dtype=np.float32), np.random.default_rng(0))) == 1


def test_seeded_draws_follow_the_law():
    """G-test of 40,000 seeded draws from a 12-token law with zeros and one token of mass 1e-3:
    a correct sampler fails with probability 1e-4 (fixed seed: reproducible)."""
    probs = np.array([0.3, 0.0, 0.2, 0.1, 1e-3, 0.0, 0.15, 0.05, 0.1, 0.049, 0.05, 0.0])
    gen = np.random.default_rng(11)
    draws = [int(categorical(probs, gen)) for _ in range(20_000)]
    draws += categorical(np.tile(probs, (20_000, 1)), gen).tolist()
    counts = np.bincount(draws, minlength=probs.size)
    assert g_test_pvalue(counts, probs) > 1e-4


@pytest.mark.parametrize(
    "bit_generator",
    [np.random.PCG64, np.random.PCG64DXSM, np.random.MT19937, np.random.Philox, np.random.SFC64],
)
def test_compiled_uniforms_are_the_generators(bit_generator):
    """``next_uniform`` (by ``next_uniforms``) at ``uniform_source(rng)`` draws what
    ``rng.random()`` draws and advances the generator as numpy's calls do, interleaved with
    numpy's own draws, for every bit generator numpy ships."""
    compiled, reference = (np.random.Generator(bit_generator(7)) for _ in range(2))
    for n in (1, 2, 5, 64):
        assert np.array_equal(next_uniforms(n, *uniform_source(compiled)), reference.random(n))
        assert compiled.random() == reference.random()
        assert compiled.integers(1 << 40) == reference.integers(1 << 40)
