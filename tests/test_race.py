"""mdsd._race: the fast exponential-race quadrature of Qall (numba and torch kernels) equals the
fine-step reference, on awkward draft laws (ties, zeros, tiny masses, one big token), LLM-like
vocabularies, windows and float32 input."""

import numpy as np
import pytest
import torch

import mdsd._race as race
from mdsd._race import tail_masses, wor_qall_prefixes, wor_qall_prefixes_reference, wor_qall_window

from conftest import FINE_STEP, RACE_KERNELS, awkward_draft, llm_like_pair

QALL_TOLERANCE = 1e-10  # the fast quadrature targets ~1e-11 (mdsd._race.FAST_TOLERANCE)


@pytest.mark.parametrize("kernel", RACE_KERNELS)
@pytest.mark.parametrize("kind", ["plain", "ties", "zeros", "tiny", "one_big"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 11, 16])
def test_fast_qall_equals_reference(kind, n, kernel):
    rng = np.random.default_rng(100 * n + len(kind))
    for vocab in (n + 1, 7, 60, 400):
        q = awkward_draft(rng, vocab, kind)
        if np.count_nonzero(q) < n:
            continue
        fast = wor_qall_prefixes(q[None, :], n, kernel=kernel)
        slow = wor_qall_prefixes_reference(q[None, :], n, step=FINE_STEP)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=QALL_TOLERANCE)


@pytest.mark.parametrize("kernel", RACE_KERNELS)
def test_fast_qall_llm_like_large_vocabulary(kernel):
    rng = np.random.default_rng(7)
    _, q = llm_like_pair(rng, 3000)
    order = rng.permutation(3000)
    fast = wor_qall_prefixes(q[None, order], 8, kernel=kernel)
    slow = wor_qall_prefixes_reference(q[None, order], 8, step=FINE_STEP)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=QALL_TOLERANCE)


@pytest.mark.parametrize("n", [2, 5, 8, 13])
def test_race_kernels_agree_on_windows(n):
    """numba and torch kernels on random windows k_lo..k_hi (incl. k_lo = 0, k_hi = V, one prefix):
    the same nodes and step, so values agree far below the quadrature error, and so do the error
    estimates; both equal the reference on the window."""
    rng = np.random.default_rng(40 + n)
    for i in range(8):
        vocab = int(rng.choice([n + 2, 50, 700]))
        if i % 2:
            _, q = llm_like_pair(rng, vocab, noise=float(rng.choice([0.3, 2.0])))
        else:
            q = awkward_draft(rng, vocab, ["plain", "zeros", "tiny", "one_big"][i // 2])
        if np.count_nonzero(q) < n:
            continue
        q = q[rng.permutation(vocab)]
        tail = tail_masses(q[None, :])[0]
        windows = [(0, vocab), (0, 0), (vocab, vocab), (vocab // 2, vocab // 2)]
        windows += [tuple(sorted(rng.integers(0, vocab + 1, size=2))) for _ in range(3)]
        slow = wor_qall_prefixes_reference(q[None, :], n, step=FINE_STEP)[0]
        for k_lo, k_hi in windows:
            k_lo, k_hi = int(k_lo), int(k_hi)
            compiled, error_numba = wor_qall_window(q, tail, n, k_lo, k_hi, kernel="numba")
            plain, error_torch = wor_qall_window(
                torch.from_numpy(q), torch.from_numpy(tail), n, k_lo, k_hi, kernel="torch"
            )
            assert compiled.shape == (k_hi - k_lo + 1,)
            np.testing.assert_allclose(compiled, plain.numpy(), rtol=0, atol=1e-13)
            np.testing.assert_allclose(compiled, slow[k_lo : k_hi + 1], rtol=0, atol=QALL_TOLERANCE)
            # an estimate (a difference of two sums): the kernels drop different negligible terms
            assert error_numba == pytest.approx(error_torch, rel=1e-3, abs=1e-14)


def test_racenumba_kernel_tiny_masses_and_saturation():
    """Many surely-arrived tokens (q t clamped) then tiny ones: nodes saturate and are dropped,
    lower levels of the state underflow (flushed to 0), tiny q = 1e-30 still count."""
    for n in (2, 8, 16):
        q = np.concatenate([np.full(20, 0.04), np.full(200, 1e-30), np.full(100, 2e-3)])
        q /= q.sum()
        for kernel in RACE_KERNELS:
            fast = wor_qall_prefixes(q[None, :], n, kernel=kernel)
            slow = wor_qall_prefixes_reference(q[None, :], n, step=FINE_STEP)
            np.testing.assert_allclose(fast, slow, rtol=0, atol=QALL_TOLERANCE)


def test_fast_qall_on_every_backend(backend):
    """Qall prefixes from a numpy array or a torch tensor (CPU, CUDA): the result has the input's
    type and equals the reference; on the CPU a tensor takes the numpy path (same values)."""
    rng = np.random.default_rng(3)
    q = rng.dirichlet(np.full(50, 0.4))
    got = wor_qall_prefixes(backend.array(q[None, :]), 4)
    assert isinstance(got, torch.Tensor) == backend.is_torch
    reference = wor_qall_prefixes_reference(q[None, :], 4, step=FINE_STEP)
    np.testing.assert_allclose(backend.numpy(got), reference, rtol=0, atol=QALL_TOLERANCE)
    if backend.device != "cuda":  # CUDA runs the torch kernel: equal to the quadrature error only
        np.testing.assert_allclose(backend.numpy(got), wor_qall_prefixes(q[None, :], 4), rtol=0, atol=1e-15)


def test_fast_qall_float32_promotion():
    rng = np.random.default_rng(3)
    q32 = rng.dirichlet(np.full(50, 0.4)).astype(np.float32)
    promoted_q = q32[None, :].astype(np.float64) / q32.astype(np.float64).sum()
    reference = wor_qall_prefixes_reference(promoted_q, 4, step=FINE_STEP)
    for kernel in RACE_KERNELS:
        promoted = wor_qall_prefixes(promoted_q, 4, kernel=kernel)
        np.testing.assert_allclose(promoted, reference, rtol=0, atol=QALL_TOLERANCE)


def test_race_kernel_choice():
    q = np.array([0.5, 0.3, 0.2])
    tail = tail_masses(q[None, :])[0]
    with pytest.raises(ValueError, match="kernel"):
        wor_qall_window(q, tail, 2, 0, 3, kernel="cython")
    assert race.numba_kernel() is not None  # numba is a dependency
    # Qall of the first two tokens for sequential draws: 0.5 * 0.3/0.5 + 0.3 * 0.5/0.7
    for kernel in RACE_KERNELS:
        assert wor_qall_window(q, tail, 2, 2, 2, kernel=kernel)[0][0] == pytest.approx(
            0.3 + 0.15 / 0.7, abs=1e-12
        )


def test_race_window_resumes_from_a_kept_prefix_state():
    """``race_window_from`` with the state kept at k_lo (SAVE), then resumed (RESUME) for rows
    that share the first k_lo masses and the nodes but differ after them, gives the plain scan's
    outputs and error bit for bit: windows inside and across scan segments, a node set that
    saturates before k_lo (tiny and large masses), and the vertex cache of the compiled Wolfe
    loop (``wor_window_cached``) against ``wor_window``."""
    from mdsd._race_numba import RESUME, SAVE, SEGMENT, race_prefix_state, race_window, race_window_from
    from mdsd.verifiers.optimal import _orders_numba

    gen = np.random.default_rng(12)
    for trial in range(40):
        size = int(gen.integers(4, 3 * SEGMENT))
        n = int(gen.integers(2, 6))
        q = gen.dirichlet(np.full(size, 0.3 if trial % 2 else 3.0))
        k_lo = int(gen.integers(1, size))
        k_hi = int(gen.integers(k_lo, size + 1))
        step, first_even, clamp, saturated, right_cut = 0.05, 0, race.CLAMP, race.SATURATED, race.RIGHT_CUT
        t = np.exp(step * np.arange(-60, 200 if trial % 2 else 40))  # the wide set saturates
        state = race_prefix_state(t.size, n)
        rows = [q] + [np.concatenate([q[:k_lo], gen.permutation(q[k_lo:])]) for _ in range(3)]
        for i, row in enumerate(rows):
            lam = tail_masses(row[None])[0][k_lo : k_hi + 1].copy()  # [k_hi - k_lo + 1]
            want = np.empty(lam.size)
            error = race_window(
                row, lam, t, n, k_lo, k_hi, step, first_even, clamp, saturated, right_cut, want
            )
            got = np.empty(lam.size)
            mode = SAVE if i == 0 else RESUME
            args = (
                row,
                lam,
                t,
                n,
                k_lo,
                k_hi,
                step,
                first_even,
                clamp,
                saturated,
                right_cut,
                got,
                state,
                mode,
            )
            assert race_window_from(*args) == error
            np.testing.assert_array_equal(got, want)
        settings = _orders_numba.race_settings(n, size)
        cache = _orders_numba.empty_race_cache()
        for row in rows:
            want = _orders_numba.wor_window(row, n, k_lo, k_hi, *settings)
            got, cache = _orders_numba.wor_window_cached(row, n, k_lo, k_hi, settings, cache)
            np.testing.assert_array_equal(got, want)
