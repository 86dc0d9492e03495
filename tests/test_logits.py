"""The shared sampling transform: temperature, top-k, top-p, greedy, -inf logits."""

import numpy as np
import pytest

import mdsd


def test_temperature_softmax_float64():
    z = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    probs = mdsd.process_logits(z, temperature=0.5)
    expected = np.exp(z.astype(np.float64) / 0.5)
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-12)
    assert probs.dtype == np.float64


def test_greedy_is_one_hot_lowest_index_on_ties():
    assert mdsd.process_logits([1.0, 3.0, 3.0], temperature=0).tolist() == [0.0, 1.0, 0.0]


def test_top_k_and_top_p():
    z = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    top2 = mdsd.process_logits(z, top_k=2)
    np.testing.assert_allclose(top2, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    nucleus = mdsd.process_logits(z, top_p=0.8)  # 0.5 + 0.2 < 0.8, so 0.15 joins
    np.testing.assert_allclose(nucleus, np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    assert mdsd.process_logits(z, top_p=0.3).tolist() == [1.0, 0, 0, 0, 0]


def test_neg_inf_logits_get_zero_probability():
    probs = mdsd.process_logits([-np.inf, 0.0, 0.0])
    assert probs.tolist() == [0.0, 0.5, 0.5]


def test_pair_uses_identical_transform():
    rng = np.random.default_rng(0)
    zt, zd = rng.normal(size=(2, 3, 50))
    p, q = mdsd.probs_from_logits(zt, zd, temperature=0.7, top_k=10, top_p=0.9)
    np.testing.assert_array_equal(p, mdsd.process_logits(zt, 0.7, 10, 0.9))
    np.testing.assert_array_equal(q, mdsd.process_logits(zd, 0.7, 10, 0.9))
    assert np.all((p > 0).sum(axis=-1) <= 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mdsd.process_logits([0.0, 1.0], **kwargs)


def test_bad_logits():
    with pytest.raises(ValueError, match="NaN"):
        mdsd.process_logits([np.nan, 1.0])
    with pytest.raises(ValueError, match="every entry is -inf"):
        mdsd.process_logits([-np.inf, -np.inf])
    with pytest.raises(ValueError, match="same shape"):
        mdsd.probs_from_logits(np.zeros(3), np.zeros(4))


def test_process_logits_row_equals_process_logits():
    """The engine's per-row transform on the support keeps the same tokens with the same float64
    probabilities as ``process_logits``, ties at the top-k boundary and -inf logits included."""
    from mdsd.logits import process_logits, process_logits_row

    rng = np.random.default_rng(0)
    for _ in range(2000):
        vocab = int(rng.integers(1, 30))
        logits = (rng.normal(size=vocab) * 3).astype(np.float32)
        if rng.random() < 0.5:
            logits = np.round(logits)  # ties
        if rng.random() < 0.2 and vocab > 1:
            logits[rng.integers(0, vocab)] = -np.inf
        temperature = [0.0, 0.5, 1.0, 1.7][rng.integers(4)]
        top_k = [None, 1, 2, 5, 40][rng.integers(5)]
        top_p = [None, 0.3, 0.9, 1.0][rng.integers(4)]
        want = process_logits(logits, temperature, top_k, top_p)
        got = process_logits_row(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(got.dense() > 0, want > 0)
        np.testing.assert_allclose(got.dense(), want, rtol=0, atol=1e-15)
        assert got.support_size == np.count_nonzero(want)
        if got.indices is not None:
            assert np.all(np.diff(got.indices) > 0) and np.all(got.values > 0)


def _nucleus_rows(rng):
    """Probability rows for the top-p tests: peaked, flat, tied, with zeros and tiny masses."""
    for _ in range(600):
        vocab = int(rng.integers(1, 3000))
        kind = rng.integers(5)
        if kind == 0:  # a model-like row
            logits = rng.normal(size=vocab) * rng.uniform(0.5, 4)
        elif kind == 1:  # flat: the nucleus holds most of the row
            logits = rng.normal(size=vocab) * 0.01
        elif kind == 2:  # ties everywhere
            logits = np.round(rng.normal(size=vocab))
        elif kind == 3:  # entries whose exponential underflows to 0
            logits = rng.normal(size=vocab) * 400
        else:  # few distinct values, equal masses
            logits = np.zeros(vocab)
        yield logits


def test_compiled_top_p_keeps_the_reference_set():
    """``mdsd._topp_numba.top_p_kept`` (sorting only the candidates) keeps exactly the positions
    of ``top_p_kept_reference`` (a stable sort of the whole row), for top_p from tiny to within
    1e-12 of 1, on rows with ties, zeros and masses below the histogram's lowest bucket."""
    from mdsd._softmax_numba import tempered_softmax
    from mdsd._topp_numba import top_p_kept
    from mdsd.logits import top_p_kept_reference

    rng = np.random.default_rng(1)
    for logits in _nucleus_rows(rng):
        probs, _ = tempered_softmax(logits, 1.0)
        for top_p in (1e-9, 0.3, 0.5, 0.9, 0.95, 0.999, 1 - 1e-12, float(probs.max())):
            got = top_p_kept(probs, top_p)
            np.testing.assert_array_equal(got, top_p_kept_reference(probs, top_p))


def test_truncated_softmax_is_process_logits_row():
    """The engine's one-call transform of a float32 row (``_topp_numba.truncated_softmax``) gives
    ``process_logits_row``'s stored probabilities bit for bit: top-k, top-p, both, neither."""
    from mdsd._topp_numba import truncated_softmax
    from mdsd.logits import process_logits_row

    rng = np.random.default_rng(2)
    for logits in _nucleus_rows(rng):
        row = logits.astype(np.float32)
        temperature = float(rng.choice([0.5, 1.0, 1.3]))
        top_k = int(rng.choice([0, 1, 7, 50, 5000]))
        top_p = float(rng.choice([0.2, 0.9, 1.0]))
        ids, values, zeros = truncated_softmax(row, temperature, top_k, top_p)
        want = process_logits_row(row, temperature, top_k or None, top_p)
        if want.indices is None:
            assert ids.size == 0
            assert zeros == np.count_nonzero(want.values == 0)
        else:
            if zeros:
                ids, values = ids[values > 0], values[values > 0]
            np.testing.assert_array_equal(ids, want.indices)
        np.testing.assert_array_equal(values, want.values)


def test_top_k_indices_tie_rule():
    from mdsd.logits import top_k_indices

    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0])
    assert top_k_indices(logits, 1).tolist() == [1]
    assert top_k_indices(logits, 3).tolist() == [1, 2, 3]  # lower id wins among the tied 2.0s
    assert top_k_indices(logits, 4).tolist() == [1, 2, 3, 4]
    assert top_k_indices(logits, 9).tolist() == list(range(6))


@pytest.mark.parametrize("top_k_indices", ["compiled", "reference"])
def test_top_k_indices_signed_zero_and_inf_ties(top_k_indices):
    """-0.0 and +0.0 are one value (lower id wins between them); -inf entries fill in last."""
    from mdsd import logits as module

    top_k = module.top_k_indices if top_k_indices == "compiled" else module.top_k_indices_reference
    for dtype in (np.float32, np.float64):
        row = np.array([-np.inf, 0.0, -0.0, -1.0, -0.0, -np.inf], dtype=dtype)
        assert top_k(row, 2).tolist() == [1, 2]
        assert top_k(row, 3).tolist() == [1, 2, 4]
        assert top_k(row, 5).tolist() == [0, 1, 2, 3, 4]


def test_compiled_top_k_equals_reference():
    """``top_k_indices`` (``mdsd._topk_numba``) keeps the set of ``top_k_indices_reference`` on
    2,400 rows of 1 to 32,000 float32 / float64 logits: normal, few distinct values (ties
    across the boundary), sorted ascending (the bound's worst case) and descending, signed zeros
    with -inf, mostly -inf; k from 1 to V + 2."""
    from mdsd.logits import top_k_indices, top_k_indices_reference

    rng = np.random.default_rng(11)
    for trial in range(2400):
        vocab = int(rng.choice([1, 2, 3, 7, 50, 64, 200, 2048, 8192, 32_000]))
        kind = trial % 6
        if kind == 0:
            row = rng.normal(size=vocab) * 3
        elif kind == 1:
            row = rng.integers(-2, 2, size=vocab).astype(float)
        elif kind == 2:
            row = np.sort(rng.normal(size=vocab))
        elif kind == 3:
            row = np.sort(rng.normal(size=vocab))[::-1]
        elif kind == 4:
            row = rng.choice([0.0, -0.0, 1.0, -1.0, -np.inf], size=vocab)
        else:
            row = rng.normal(size=vocab)
            row[rng.random(vocab) < 0.7] = -np.inf
        row = row.astype(np.float32 if trial % 2 else np.float64)
        k = int(rng.integers(1, vocab + 3))
        if trial % 4 < 2:
            k = min(k, int(rng.choice([1, 2, 50, 64])))
        np.testing.assert_array_equal(top_k_indices(row, k), top_k_indices_reference(row, k))


def test_select_is_partition():
    """``mdsd._topk_numba.select`` (the quickselect of the compiled top-k) returns
    ``np.partition``'s rank-th smallest on int32 / int64 arrays of 1 to 500 entries: distinct,
    few distinct values (ties at the rank), sorted ascending and descending, every rank."""
    from mdsd._topk_numba import select

    rng = np.random.default_rng(5)
    for trial in range(600):
        size = int(rng.integers(1, 500)) if trial % 5 else int(rng.integers(1, 4))
        kind = trial % 4
        values = rng.integers(-3, 3, size) if kind == 0 else rng.integers(-(2**40), 2**40, size)
        if kind == 2:
            values = np.sort(values)
        elif kind == 3:
            values = np.sort(values)[::-1].copy()
        values = values.astype(np.int32 if trial % 2 else np.int64)
        for rank in {0, size - 1, int(rng.integers(0, size))}:
            assert select(values.copy(), rank) == np.partition(values, rank)[rank]


def test_compiled_exp_within_one_ulp_over_the_normal_range():
    """The polynomial exponential of ``mdsd._softmax_numba`` (``_exp_into``) is within 1 ulp of
    numpy's exp wherever the result is a normal number."""
    from mdsd import _softmax_numba as compiled

    x = np.concatenate([np.linspace(compiled.EXP64_LOW, 0.0, 400_001), np.linspace(0.0, 700.0, 10_001)])
    got = x.copy()
    assert compiled._exp_into(got) == 0
    want = np.exp(x)
    assert np.max(np.abs(got - want) / np.spacing(want)) <= 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_row_max_equals_numpy(dtype):
    """``row_max`` (the softmax's shift: eight compare chains, then the tail) is ``np.max`` on
    rows of 1 to 8,200 entries, with -inf entries, ties and the maximum in the tail."""
    from mdsd._softmax_numba import row_max

    rng = np.random.default_rng(11)
    for size in [*range(1, 18), 64, 1000, 8192, 8199]:
        for trial in range(4):
            row = rng.normal(size=size).astype(dtype)
            if trial == 1:
                row[rng.random(size) < 0.5] = -np.inf
                row[rng.integers(size)] = 0.0
            if trial == 2:
                row = np.round(row)  # ties
            if trial == 3:
                row[-1] = 9.0  # the maximum in the remainder past the last block of eight
            assert row_max(row) == np.max(row)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_softmax_equals_numpy(dtype):
    """``tempered_softmax`` = ``_softmax(row / T)`` to 1e-14 relative on rows of 1 to 40,000
    tokens, with -inf logits, ties, masses that underflow (zero exactly where numpy's are, also
    in the subnormal range, and counted) and temperatures from 0.05 to 5."""
    from mdsd._softmax_numba import tempered_softmax
    from mdsd.logits import _softmax

    rng = np.random.default_rng(3)
    for trial in range(300):
        vocab = int(rng.choice([1, 2, 7, 64, 2048, 8192, 40_000]))
        logits = (rng.normal(size=vocab) * rng.choice([0.5, 3.0, 30.0])).astype(dtype)
        if trial % 3 == 1 and vocab > 2:
            logits[rng.integers(0, vocab, size=vocab // 3)] = -np.inf
            logits[0] = 1.0
        if trial % 5 == 2 and vocab > 3:
            logits[1:3] = logits[0] - np.array([720.0, 800.0], dtype=dtype)  # subnormal, zero
        temperature = float(rng.choice([0.05, 0.7, 1.0, 5.0]))
        if trial % 5 == 2 and vocab > 3:
            temperature = 1.0
        want = _softmax(logits.astype(np.float64) / temperature)
        got, zeros = tempered_softmax(logits, temperature)
        assert zeros == np.count_nonzero(want == 0)
        np.testing.assert_array_equal(got > 0, want > 0)
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


def test_process_logits_row_drop_zeros_stores_the_support():
    """``drop_zeros=True``: a dense row whose masses underflow to 0 is stored on its nonzero
    entries (the same probabilities); without underflow it stays dense, as without the flag."""
    from mdsd.logits import process_logits_row

    logits = np.array([0.0, -900.0, 1.0, -np.inf, 2.0], dtype=np.float32)
    dense = process_logits_row(logits, 1.0)
    stored = process_logits_row(logits, 1.0, drop_zeros=True)
    assert dense.indices is None and stored.indices.tolist() == [0, 2, 4]
    np.testing.assert_array_equal(stored.dense(), dense.values)
    assert process_logits_row(logits[[0, 2, 4]], 1.0, drop_zeros=True).indices is None
