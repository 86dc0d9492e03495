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
