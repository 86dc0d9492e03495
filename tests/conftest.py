"""Helpers and fixtures shared by the whole test tree.

The tree mirrors the package: ``tests/test_<module>.py`` for the top-level modules of ``mdsd``,
``tests/<subpackage>/test_<module>.py`` for the subpackages (``verifiers``, ``engine``,
``sequence``, ``testing``, ``experiments``, ``cli``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import chi2

import mdsd

ALL_LAWS = list(mdsd.LAWS)
CUDA = torch.cuda.is_available()
FINE_STEP = 0.15  # step of the reference race quadrature: exact to ~1e-15 on the tested cases
RACE_KERNELS = ["numba", "torch"]  # the two CPU kernels of the fast race quadrature (mdsd._race)


# ---------------------------------------------------------------- random and edge-case pairs
def random_pair(rng, vocab, concentration=0.7, zero_p=False, zero_q=False):
    """A random (p, q) on `vocab` tokens, optionally with a zero in p and/or q."""
    p = rng.dirichlet(np.full(vocab, concentration))
    q = rng.dirichlet(np.full(vocab, concentration))
    if zero_p:
        p[rng.integers(vocab)] = 0.0
        p /= p.sum()
    if zero_q:
        q[rng.integers(vocab)] = 0.0
        q /= q.sum()
    return p, q


def llm_like_pair(rng, vocab, zipf=1.1, noise=0.7):
    """Zipf-shaped logits shared by p and q plus independent Gaussian noise (LLM-like tails)."""
    base = -zipf * np.log(np.arange(1, vocab + 1))[rng.permutation(vocab)]
    zp, zq = base + rng.normal(0, noise, vocab), base + rng.normal(0, noise, vocab)
    p, q = np.exp(zp - zp.max()), np.exp(zq - zq.max())
    return p / p.sum(), q / q.sum()


def awkward_draft(rng, vocab, kind):
    """q with ties, zeros, tiny masses, or one token holding all but ~1e-9."""
    q = rng.dirichlet(np.full(vocab, 0.5))
    if kind == "ties":
        q = np.round(q * 8) + 1.0
    elif kind == "zeros":
        q[rng.choice(vocab, vocab // 3, replace=False)] = 0.0
    elif kind == "tiny":
        q[rng.choice(vocab, vocab // 3, replace=False)] = 1e-30
    elif kind == "one_big":
        q *= 1e-9 / q.sum()
        q[rng.integers(vocab)] = 1.0 - 1e-9
    return q / q.sum()


def law_accepts(law, q, n):
    """True when the law can draw n drafts from q (support large enough, spechub n = 2)."""
    try:
        mdsd.get_law(law).check(q, n)
    except ValueError:
        return False
    return True


def edge_pairs():
    """Edge cases (docs/theory.md §6): zeros, p = q, disjoint supports, one-hot p or q, ties."""
    u5 = np.full(5, 0.2)
    return {
        "p_equals_q": (np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.1, 0.2, 0.3, 0.4])),
        "disjoint": (np.array([0.5, 0.5, 0.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.2, 0.3, 0.5])),
        "one_hot_p": (np.array([0.0, 1.0, 0.0, 0.0]), np.array([0.4, 0.3, 0.2, 0.1])),
        "one_hot_q_like": (np.array([0.3, 0.3, 0.4]), np.array([0.98, 0.01, 0.01])),
        "uniform_ties": (u5, u5),
        "zeros_both": (np.array([0.0, 0.5, 0.5, 0.0, 0.0]), np.array([0.25, 0.25, 0.0, 0.25, 0.25])),
        "tiny_mass": (np.array([1e-30, 0.5, 0.5 - 1e-30]), np.array([0.5, 1e-30, 0.5 - 1e-30])),
    }


# ---------------------------------------------------------------- statistics
def inverse_cdf_reference(probs, u: float) -> int:
    """The numpy inverse CDF: the first token whose cumulative mass exceeds u * total (the
    reference of ``mdsd.sampling``'s compiled draws)."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(probs) - 1)


def g_test_pvalue(counts, probs) -> float:
    """p-value of the G-test (likelihood-ratio goodness of fit) of ``counts`` [K] against the law
    ``probs`` [K], on the cells with probs > 0; a count in a cell of zero probability fails the
    test outright (an impossible outcome was drawn).

    A test asserting ``pvalue > threshold`` fails a correct sampler with probability
    ``threshold`` (asymptotically); the seeds are fixed, so the outcome is reproducible.
    """
    counts, probs = np.asarray(counts, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    support = probs > 0
    assert counts[~support].sum() == 0, "an outcome of zero probability was drawn"
    observed = counts[support]
    expected = observed.sum() * probs[support] / probs[support].sum()
    hit = observed > 0
    statistic = 2.0 * float(np.sum(observed[hit] * np.log(observed[hit] / expected[hit])))
    return float(chi2.sf(statistic, max(int(support.sum()) - 1, 1)))


# ---------------------------------------------------------------- numpy / torch backends
@dataclass(frozen=True)
class Backend:
    """An array backend of the verifiers: numpy, or torch on a device ("cpu", "cuda")."""

    name: str  # "numpy", "torch" (CPU) or "cuda"
    device: str | None  # the torch device; None for numpy

    @property
    def is_torch(self) -> bool:
        return self.device is not None

    def array(self, values):
        """numpy (or anything array-like) -> this backend (float64 stays float64)."""
        if not self.is_torch:
            return np.asarray(values)
        return torch.from_numpy(np.array(values)).to(self.device)  # a writable copy

    def numpy(self, values) -> np.ndarray:
        """This backend -> numpy."""
        return values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)

    def output_law(self, target_probs, draft_probs, drafts, verifier, law=None):
        """pi(. | x) through this backend's front door (``mdsd.output_law`` or the torch one)."""
        from mdsd.verifiers import torch_api

        args = (self.array(target_probs), self.array(draft_probs), self.array(drafts))
        if not self.is_torch:
            return mdsd.output_law(*args, verifier, law)
        return self.numpy(torch_api.output_law(*args, verifier, law))

    def verify(self, target_probs, draft_probs, drafts, verifier, law, seed: int):
        """(tokens, accepted) as numpy from this backend's ``verify``, seeded by ``seed``."""
        from mdsd.verifiers import torch_api

        args = (self.array(target_probs), self.array(draft_probs), self.array(drafts))
        if not self.is_torch:
            return mdsd.verify(*args, verifier, law, rng=np.random.default_rng(seed))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens, accepted = torch_api.verify(*args, verifier, law, generator=generator)
        return self.numpy(tokens), self.numpy(accepted)


BACKENDS = [Backend("numpy", None), Backend("torch", "cpu")] + ([Backend("cuda", "cuda")] if CUDA else [])


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request) -> Backend:
    """Each array backend in turn: numpy, torch on the CPU, and torch on CUDA when there is one."""
    return request.param


# ---------------------------------------------------------------- tiny Hugging Face models
def save_tiny_model(
    path,
    *,
    vocab: int,
    hidden: int,
    layers: int,
    seed: int,
    kind: str = "llama",
    max_positions: int = 64,
    tie_embeddings: bool = False,
    weight_scale: float = 1.0,
    head_scale: float = 1.0,
):
    """A randomly initialised tiny Llama or GPT-2 with a word-level tokenizer (``<unk>``,
    ``<eos>``, ``w2`` .. ``w{vocab-1}``), saved to ``path``; returns ``path``.

    ``weight_scale`` multiplies every matrix and ``head_scale`` the output head (sharper random
    distributions than the default init, so that target and draft differ visibly).
    """
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    words = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, vocab)}
    tok = Tokenizer(WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=tie_embeddings,
            eos_token_id=1,
        )
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=2,
            n_positions=max_positions,
            eos_token_id=1,
            bos_token_id=1,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"kind must be 'llama' or 'gpt2', got {kind!r}")
    with torch.no_grad():
        if weight_scale != 1.0:
            for param in model.parameters():
                if param.dim() > 1:
                    param.mul_(weight_scale)
        if head_scale != 1.0:
            model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for the module (tiny models are ~10x faster so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
