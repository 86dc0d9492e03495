"""mdsd.verifiers.torch_api: the verifiers on torch tensors (CPU, CUDA) give the numpy
front door's output laws, exactly; float32 is promoted; verify is seeded; bad input is refused."""

import zlib

import numpy as np
import pytest
import torch

import mdsd
from mdsd.verifiers import VERIFIERS
from mdsd.verifiers import torch_api as tb

from conftest import random_pair

PAIRS = [(v, law) for v in VERIFIERS for law in VERIFIERS[v].laws if v != "optimal"]  # optimal: numpy only


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_batched_output_law_equals_single_numpy_rows(backend, verifier, law):
    """One batched call on each backend = the numpy front door called row by row (1e-12)."""
    rng = np.random.default_rng(zlib.crc32(f"{verifier}-{law}".encode()))
    the_law = mdsd.get_law(law)
    for i in range(6):
        vocab = int(rng.choice([3, 8, 200]))
        n = 2 if law == "spechub" else int(rng.integers(1, 5))
        p = rng.dirichlet(np.full(vocab, 0.4), size=5)  # [5, V]
        q = rng.dirichlet(np.full(vocab, 0.4), size=5)
        if i % 2:
            p[:, 0] = 0.0
            p /= p.sum(axis=1, keepdims=True)
        try:
            x = the_law.sample(q, n, rng)  # [5, n]
        except ValueError:
            continue
        expected = np.stack([mdsd.output_law(p[b], q[b], x[b], verifier, law) for b in range(5)])
        got = backend.output_law(p, q, x, verifier, law)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_batched_path_is_exact(backend, verifier, law):
    """sum_x Pdraft(x) pi(. | x) = p by enumeration, on each backend's batched path (rows = draft
    tuples)."""
    rng = np.random.default_rng(zlib.crc32(f"{law}/{verifier}".encode()))
    the_law = mdsd.get_law(law)
    for _ in range(5):
        vocab = int(rng.integers(3, 6))
        n = 2 if law == "spechub" else int(rng.integers(1, 4))
        p, q = random_pair(rng, vocab)
        try:
            tuples, probs = the_law.enumerate(q, n)
        except ValueError:
            continue
        rows = len(tuples)
        out = backend.output_law(
            np.broadcast_to(p, (rows, vocab)), np.broadcast_to(q, (rows, vocab)), tuples, verifier, law
        )  # [M, V]
        np.testing.assert_allclose(probs @ out, p, rtol=0, atol=1e-12)


def test_torch_float32_inputs_are_promoted():
    rng = np.random.default_rng(19)
    p, q = rng.dirichlet(np.ones(30), size=4), rng.dirichlet(np.ones(30), size=4)
    x = mdsd.get_law("iid").sample(q, 3, rng)
    p32, q32 = p.astype(np.float32), q.astype(np.float32)
    got = tb.output_law(torch.tensor(p32), torch.tensor(q32), torch.tensor(x), "kseq")
    assert got.dtype == torch.float64
    p64 = p32.astype(np.float64) / p32.astype(np.float64).sum(axis=1, keepdims=True)
    q64 = q32.astype(np.float64) / q32.astype(np.float64).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), mdsd.output_law(p64, q64, x, "kseq"), atol=1e-12)


def test_verify_is_seeded_and_samples_the_law(backend):
    """verify on each backend replays with the same seed, its tokens follow p (i.i.d. drafts, an
    exact verifier), and ``accepted`` says whether the token is among the drafts.

    The law check is a 6-sigma band per token (normal approximation of the binomial count):
    false-positive rate about 2e-9 per token, 1.2e-8 for the 6 tokens."""
    rng = np.random.default_rng(20)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    rows = 20000
    P, Q = np.broadcast_to(p, (rows, 6)), np.broadcast_to(q, (rows, 6))  # [R, V]
    x = mdsd.get_law("iid").sample(Q, 2, rng)  # [R, 2]
    tokens, accepted = backend.verify(P, Q, x, "rrs", "iid", seed=0)
    again, accepted_again = backend.verify(P, Q, x, "rrs", "iid", seed=0)
    np.testing.assert_array_equal(tokens, again)
    np.testing.assert_array_equal(accepted, accepted_again)
    freq = np.bincount(tokens, minlength=6) / rows
    assert np.all(np.abs(freq - p) < 6 * np.sqrt(p * (1 - p) / rows) + 1e-12)
    np.testing.assert_array_equal(accepted, (x == tokens[:, None]).any(axis=1))


def test_torch_refuses_bad_input():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="sum to 1"):
        tb.output_law(torch.tensor([0.5, 0.6]), p, torch.tensor([0]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tb.output_law(p, p, torch.tensor([2]))
    with pytest.raises(ValueError, match="repeat"):
        tb.output_law(p, p, torch.tensor([0, 0]), "rrs_without_replacement")
    if "optimal" in VERIFIERS:
        with pytest.raises(ValueError, match="no torch path"):
            tb.output_law(p, p, torch.tensor([0]), "optimal")
