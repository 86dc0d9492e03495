"""Early-exit sampling (``EarlyExitVerifier.sample``) draws exactly pi(. | x) of ``output_law``.

Tiers:
1. exact: each sampler is a deterministic function of its uniforms (tests are thresholds in their
   uniform, the final draw is an inverse CDF, monotone in its uniform), so its conditional law is
   recovered exactly by locating those breakpoints by bisection on the float64 grid, then
   compared with ``output_law`` to 1e-12, for fixed drafts (the final draw runs along the token ids,
   along the rank order p / q for importance); summed over every draft tuple of the
   law it must give p (exactness of the fast path itself);
2. the compiled kernels, the batch-vectorised version (numpy and torch) and single vs batched
   calls draw the same tokens from the same uniforms / seed; ``check=False`` draws what
   ``check=True`` draws;
3. seeded G-tests of the empirical law of ``mdsd.verify`` (threshold p > 1e-4: each test fails by
   chance with probability 1e-4; the seeds are fixed, so the outcome is reproducible) and a
   total-variation sanity bound.
"""

import zlib

import numpy as np
import pytest
import torch

import mdsd
from mdsd.verifiers import VERIFIERS
from mdsd.verifiers import torch_api as tb
from mdsd.verifiers.base import EarlyExitVerifier
from mdsd.verifiers.classic_math import importance_rank

from conftest import edge_pairs, g_test_pvalue, law_accepts, random_pair

CLASSIC = [name for name, v in VERIFIERS.items() if isinstance(v, EarlyExitVerifier)]
PAIRS = [(v, law) for v in CLASSIC for law in VERIFIERS[v].laws]
EXACT_TOL = 1e-12
ONE_BITS = np.float64(1.0).view(np.int64)  # the bits of 1.0; doubles in [0, 1) order as their bits
P_THRESHOLD = 1e-4


def test_every_classic_verifier_exits_early():
    assert set(CLASSIC) == set(VERIFIERS) - {"optimal"}


# -- exact conditional law of a sampler, from its uniforms ----------------------------------------


def run_sampler(backend, name, p, q, drafts, law, uniforms):
    """(tokens, branch) as numpy, for rows [R, V], [R, V], [R, n] and uniforms [R, k]."""
    verifier = VERIFIERS[name]
    if backend == "torch":
        t = [torch.tensor(np.ascontiguousarray(a)) for a in (p, q, drafts, uniforms)]
        tokens, branch = verifier.sample_with_branch(t[0], t[1], t[2], law, t[3])
        return tokens.numpy(), branch.numpy()
    return verifier.sample_with_branch(p, q, drafts, law, uniforms, vectorised=backend == "vectorised")


def first_false(predicate, count):
    """For ``count`` predicates, each True on [0, b) and False on [b, 1) of the float64 grid:
    every b (1.0 when True on all of [0, 1)), by bisection on the bits. ``predicate(u [count])``
    returns the booleans [count]."""
    lo = np.full(count, -1, dtype=np.int64)  # predicate True at lo (virtually at -1)
    hi = np.full(count, ONE_BITS, dtype=np.int64)  # predicate False at hi (virtually at 1.0)
    while np.any(hi - lo > 1):
        open_ = hi - lo > 1
        mid = lo + (hi - lo) // 2
        value = predicate(np.maximum(mid, 0).view(np.float64)) & (mid >= 0)
        lo = np.where(open_ & value, mid, lo)
        hi = np.where(open_ & ~value, mid, hi)
    return hi.view(np.float64).copy()


def sampler_law(backend, name, p, q, drafts, law):
    """The conditional law of the sampler's token given ``drafts`` [n], exactly (to rounding).

    Test j (of m) accepts iff u_j < a_j; with the earlier tests rejecting (u_i = the largest
    double below 1), a_j is the first u_j where branch j is not taken. The final draw's token is
    non-decreasing in u_m; its breakpoints give R. pi = sum_j reach_j a_j [t_j] + reach_m R."""
    verifier = VERIFIERS[name]
    law_obj = mdsd.get_law(law)
    n, vocab = drafts.size, p.size
    k = verifier.uniforms_per_row(n)
    m = k - 1
    below_one = np.nextafter(1.0, 0.0)

    def call(uniforms):
        rows = uniforms.shape[0]
        return run_sampler(
            backend,
            name,
            np.broadcast_to(p, (rows, vocab)),
            np.broadcast_to(q, (rows, vocab)),
            np.broadcast_to(drafts, (rows, n)),
            law_obj,
            uniforms,
        )

    def fixed(j, u):  # uniforms: earlier tests rejecting, test j at u, the rest at 1/2
        uniforms = np.full((u.size, k), 0.5)
        uniforms[:, :j] = below_one
        uniforms[:, j] = u
        return uniforms

    out = np.zeros(vocab)
    reach = 1.0
    if m:
        accept = first_false(
            lambda u: np.stack([call(fixed(j, u[j : j + 1]))[1][0] == j for j in range(m)]), m
        )
        tokens = [call(fixed(j, np.zeros(1)))[0][0] for j in range(m)]
        for j in range(m):
            out[tokens[j]] += reach * accept[j]
            reach *= 1.0 - accept[j]
    order = draw_order(name, p, q)  # the final draw is an inverse CDF along this order
    position = np.empty(vocab, dtype=np.int64)
    position[order] = np.arange(vocab)
    cuts = first_false(lambda u: position[call(fixed(m, u))[0]] <= np.arange(vocab), vocab)
    final = np.zeros(vocab)
    final[order] = np.diff(np.concatenate([[0.0], cuts]))
    return out + reach * final


def draw_order(name, p, q):
    """The token order of a verifier's final inverse-CDF draw: the rank order for importance
    (p / q decreasing, ties by lower id, q = 0 last), the token ids for the others."""
    if name == "importance":
        return importance_rank(p[None], q[None])[0]
    return np.arange(p.size)


def check_exact(backend, name, law, p, q, drafts):
    expected = mdsd.output_law(p, q, drafts, name, law)
    got = sampler_law(backend, name, p, q, drafts, law)
    np.testing.assert_allclose(got, expected, rtol=0, atol=EXACT_TOL)
    return got


def random_case(rng, law, vocab=None, n=None):
    """(p, q, drafts) on V = 3..7 (or ``vocab``), n = 1..4 (or ``n``; 2 for spechub), zeros in p
    or q at random, drafts drawn from the law; redrawn until the law can draw n drafts."""
    while True:
        size = int(rng.integers(3, 8)) if vocab is None else vocab
        count = (2 if law == "spechub" else int(rng.integers(1, 5))) if n is None else n
        p, q = random_pair(
            rng,
            size,
            concentration=float(rng.choice([0.3, 1.0])),
            zero_p=rng.random() < 0.3,
            zero_q=rng.random() < 0.3,
        )
        if law_accepts(law, q, count):
            return p, q, mdsd.get_law(law).sample(q, count, rng)


def seeded(*parts):
    return np.random.default_rng(zlib.crc32("-".join(map(str, parts)).encode()))


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_compiled_law_exact_on_random_cases(verifier, law):
    """Fixed drafts, V = 3..7, zeros in p or q: the compiled sampler's law is output_law."""
    rng = seeded("exact", verifier, law)
    for _ in range(6):
        check_exact("compiled", verifier, law, *random_case(rng, law))


EDGE_CASES = dict(edge_pairs())
EDGE_CASES["spechub_hub_near_one"] = (np.array([0.2, 0.5, 0.3]), np.array([0.99998, 1e-5, 1e-5]))
EDGE_CASES["q_one_hot"] = (np.array([0.3, 0.3, 0.4]), np.array([0.0, 1.0, 0.0]))
EDGE_CASES["tiny_both"] = (np.array([1e-30, 1e-30, 1.0 - 2e-30]), np.array([0.5, 1e-30, 0.5 - 1e-30]))


def edge_drafts(law, q, n, rng):
    """A few draft tuples of the law on an edge pair: its most probable ones and a sampled one."""
    tuples, probs = mdsd.get_law(law).enumerate(q, n)
    order = np.argsort(-probs, kind="stable")
    chosen = [tuples[i] for i in order[:3]] + [tuples[order[-1]], mdsd.get_law(law).sample(q, n, rng)]
    return chosen


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_law_exact_on_edge_cases(verifier, law):
    """Zeros, p = q, disjoint supports, one-hot p or q, masses 1e-30, q_a = 0.99998 (spechub):
    the compiled sampler's exact conditional law, for the most and least probable draft tuples."""
    rng = seeded("edge", verifier, law)
    checked = 0
    for p, q in EDGE_CASES.values():
        for n in (1, 2, 3):
            if (law == "spechub" and n != 2) or not law_accepts(law, q, n):
                continue
            for drafts in edge_drafts(law, q, n, rng):
                check_exact("compiled", verifier, law, p, q, drafts)
                checked += 1
    assert checked >= 10


SLOW_BACKEND_CASES = ("disjoint", "tiny_both", "spechub_hub_near_one", "zeros_both")


@pytest.mark.parametrize("backend", ["vectorised", "torch"])
@pytest.mark.parametrize("verifier,law", [(v, VERIFIERS[v].default_law) for v in CLASSIC])
def test_vectorised_law_exact(backend, verifier, law):
    """The batch-vectorised sampler (numpy, torch): exact conditional law on a random case and
    on a few edge pairs (n = 2)."""
    rng = seeded("vectorised", verifier, backend)
    check_exact(backend, verifier, law, *random_case(rng, law, n=2))
    for name in SLOW_BACKEND_CASES:
        p, q = EDGE_CASES[name]
        if law_accepts(law, q, 2):
            check_exact(backend, verifier, law, p, q, edge_drafts(law, q, 2, rng)[0])


def test_repeated_iid_drafts_exact():
    """i.i.d. drafts repeating one token: the second and later tests see the residuals."""
    p, q = np.array([0.1, 0.6, 0.3]), np.array([0.5, 0.3, 0.2])
    for name in ("rrs", "kseq", "importance", "sample_check"):
        for drafts in ([0, 0, 0], [0, 0, 2], [2, 0, 0, 0]):
            for backend in ("compiled", "torch"):
                check_exact(backend, name, "iid", p, q, np.array(drafts))


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_marginal_over_drafts_is_target(verifier, law):
    """Summed over every draft tuple with its probability, the sampler's law is p (to 1e-12)."""
    rng = seeded("marginal", verifier, law)
    for _ in range(2):
        p, q, drafts = random_case(rng, law, vocab=4, n=2)
        tuples, probs = mdsd.get_law(law).enumerate(q, drafts.size)
        marginal = sum(w * sampler_law("compiled", verifier, p, q, x, law) for x, w in zip(tuples, probs))
        np.testing.assert_allclose(marginal, p, rtol=0, atol=EXACT_TOL)


@pytest.mark.parametrize("verifier", ["rrs", "rrs_without_replacement", "kseq", "spechub"])
def test_first_test_reads_only_the_draft(verifier):
    """A first draft with p / q >= n is accepted without reading the vocabulary: the rest of the
    row may be garbage (NaN) and the token is still x_1."""
    law = mdsd.get_law(VERIFIERS[verifier].default_law)
    p = np.full((1, 8), np.nan)
    q = np.full((1, 8), np.nan)
    p[0, 3], q[0, 3] = 0.5, 0.1  # the first draft, ratio 5
    q[0, 5] = 0.8  # the hub for spechub (second)
    drafts = np.array([[3, 5]]) if verifier == "spechub" else np.array([[3, 1, 2, 4]])
    uniforms = np.full((1, VERIFIERS[verifier].uniforms_per_row(drafts.shape[1])), 0.999)
    for vectorised in (False, True):
        tokens, branch = VERIFIERS[verifier].sample_with_branch(p, q, drafts, law, uniforms, vectorised)
        assert (int(tokens[0]), int(branch[0])) == (3, 0)


# -- same draws: compiled, vectorised, torch; single vs batched; check=False ---------------------


def llm_rows(rng, rows, vocab):
    logits = -1.1 * np.log(np.arange(1, vocab + 1))[rng.permutation(vocab)]
    zp = logits + rng.normal(0, 0.7, (rows, vocab))
    zq = logits + rng.normal(0, 0.7, (rows, vocab))
    p, q = np.exp(zp - zp.max(1, keepdims=True)), np.exp(zq - zq.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_backends_draw_the_same_tokens(verifier, law):
    """From the same uniforms, the compiled kernels, the vectorised numpy version and torch draw
    the same tokens through the same branches (LLM-like rows, V = 300, n = 4; n = 2 for spechub)."""
    rng = seeded("backends", verifier, law)
    p, q = llm_rows(rng, 400, 300)
    n = 2 if law == "spechub" else 4
    drafts = mdsd.get_law(law).sample(q, n, rng)
    uniforms = rng.random((400, VERIFIERS[verifier].uniforms_per_row(n)))
    the_law = mdsd.get_law(law)
    compiled = run_sampler("compiled", verifier, p, q, drafts, the_law, uniforms)
    assert np.all(compiled[1] >= 0)
    for backend in ("vectorised", "torch"):
        other = run_sampler(backend, verifier, p, q, drafts, the_law, uniforms)
        np.testing.assert_array_equal(other[0], compiled[0])
        np.testing.assert_array_equal(other[1], compiled[1])


@pytest.mark.parametrize("verifier", CLASSIC)
def test_single_calls_draw_what_one_batched_call_draws(verifier):
    """B calls of one position with one generator = one batched call with a generator of the same
    seed (a fixed number of uniforms per row); also for the torch front door."""
    rng = seeded("batch", verifier)
    p, q = llm_rows(rng, 50, 200)
    law = VERIFIERS[verifier].default_law
    n = 2 if law == "spechub" else 3
    drafts = mdsd.get_law(law).sample(q, n, rng)
    batched, accepted = mdsd.verify(p, q, drafts, verifier, rng=np.random.default_rng(7))
    gen = np.random.default_rng(7)
    single = [mdsd.verify(p[b], q[b], drafts[b], verifier, rng=gen) for b in range(50)]
    assert [t for t, _ in single] == batched.tolist()
    assert [a for _, a in single] == accepted.tolist()
    trusted = mdsd.verify(p, q, drafts, verifier, rng=np.random.default_rng(7), check=False)
    np.testing.assert_array_equal(trusted[0], batched)
    tp, tq, tx = torch.tensor(p), torch.tensor(q), torch.tensor(drafts)
    t_batched = tb.verify(tp, tq, tx, verifier, generator=torch.Generator().manual_seed(3))[0]
    gen = torch.Generator().manual_seed(3)
    t_single = [int(tb.verify(tp[b], tq[b], tx[b], verifier, generator=gen)[0]) for b in range(50)]
    assert t_single == t_batched.tolist()


@pytest.mark.parametrize("verifier", CLASSIC)
def test_torch_verify_on_cpu_draws_what_the_vectorised_version_draws(verifier):
    """torch's front door on CPU tensors runs the compiled kernels on numpy views of the rows:
    from a generator of the same seed it draws what the batch-vectorised torch version draws from
    the same uniforms (batched and one row), returns int64 tensors, and ``accepted`` matches."""
    rng = seeded("torch-cpu", verifier)
    p, q = llm_rows(rng, 40, 300)
    the_verifier = VERIFIERS[verifier]
    law = mdsd.get_law(the_verifier.default_law)
    n = 2 if law.name == "spechub" else 3
    drafts = law.sample(q, n, rng)
    tp, tq, tx = torch.tensor(p), torch.tensor(q), torch.tensor(drafts)
    tokens, accepted = tb.verify(
        tp, tq, tx, verifier, generator=torch.Generator().manual_seed(5), check=False
    )
    shape = (40, the_verifier.uniforms_per_row(n))
    uniforms = torch.rand(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = the_verifier.sample_with_branch(tp, tq, tx, law, uniforms)[0]  # torch: vectorised
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, want)
    assert torch.equal(accepted, (tx == tokens[:, None]).any(dim=1))
    one = tb.verify(tp[7], tq[7], tx[7], verifier, generator=torch.Generator().manual_seed(5), check=False)
    first = the_verifier.sample_with_branch(tp[7:8], tq[7:8], tx[7:8], law, uniforms[:1])[0]
    assert one[0].ndim == 0 and int(one[0]) == int(first[0])


def test_verify_check_false_same_draws():
    """check=False skips validation and draws what check=True draws (normalised float64 input)."""
    rng = np.random.default_rng(11)
    for verifier in CLASSIC:
        law = VERIFIERS[verifier].default_law
        p, q = llm_rows(rng, 1, 100)
        n = 2 if law == "spechub" else 4
        drafts = mdsd.get_law(law).sample(q[0], n, rng)
        for seed in range(20):
            checked = mdsd.verify(p[0], q[0], drafts, verifier, rng=seed)
            trusted = mdsd.verify(p[0], q[0], drafts, verifier, rng=seed, check=False)
            assert checked == trusted
            assert isinstance(trusted[0], int) and isinstance(trusted[1], bool)


def test_verify_still_validates():
    with pytest.raises(ValueError, match="draft_probs"):
        mdsd.verify([0.5, 0.5], [0.5, 0.7], [0], rng=0)
    with pytest.raises(ValueError, match="drafts"):
        mdsd.verify([0.5, 0.5], [0.5, 0.5], [2], rng=0)


# -- seeded statistical tests ----------------------------------------------------------------------


DRAWS = 20000
TV_BOUND = 0.03  # sqrt(V / DRAWS) ~ 0.016 for V = 5; a sanity bound, far above the noise


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_verify_samples_output_law(backend, verifier, law):
    """Seeded G-test (p > 1e-4: false-positive rate 1e-4) of DRAWS tokens from verify on each
    backend (fixed drafts) against output_law, and a total-variation sanity bound."""
    rng = seeded("gtest", verifier, law, backend.name)
    p = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    q = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
    n = 2 if law == "spechub" else 3
    drafts = mdsd.get_law(law).sample(q, n, rng)
    expected = mdsd.output_law(p, q, drafts, verifier, law)
    P, Q, X = np.tile(p, (DRAWS, 1)), np.tile(q, (DRAWS, 1)), np.tile(drafts, (DRAWS, 1))  # [R, .]
    tokens, accepted = backend.verify(P, Q, X, verifier, law, seed=int(rng.integers(2**31)))
    counts = np.bincount(tokens, minlength=5)
    assert g_test_pvalue(counts, expected) > P_THRESHOLD
    assert 0.5 * np.abs(counts / DRAWS - expected).sum() < TV_BOUND
    np.testing.assert_array_equal(accepted, np.isin(tokens, drafts))


@pytest.mark.parametrize("verifier,law", PAIRS)
def test_marginal_of_sampled_drafts_is_target(verifier, law):
    """Drafts drawn afresh for every row: the tokens follow p (seeded G-test, p > 1e-4:
    false-positive rate 1e-4)."""
    rng = seeded("marginal-sampled", verifier, law)
    p = np.array([0.05, 0.4, 0.3, 0.0, 0.25])
    q = np.array([0.3, 0.1, 0.3, 0.2, 0.1])
    n = 2 if law == "spechub" else 3
    Q = np.tile(q, (DRAWS, 1))
    drafts = mdsd.get_law(law).sample(Q, n, rng)
    tokens, _ = mdsd.verify(np.tile(p, (DRAWS, 1)), Q, drafts, verifier, law, rng=rng)
    counts = np.bincount(tokens, minlength=5)
    assert g_test_pvalue(counts, p) > P_THRESHOLD
    assert 0.5 * np.abs(counts / DRAWS - p).sum() < TV_BOUND
