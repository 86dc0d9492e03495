"""Tests of mdsd.testing (the losslessness audit) and ``mdsd audit``.

Tiers:
1. exact: the faulty example rules' losses by enumeration (the numbers docs/audit.md quotes);
   the statistics helpers on known inputs;
2. the audit catches each faulty rule (seeded, deterministic) and passes mdsd's verifiers, at
   token, tree and decoder level. Every audit here has a family-wise false-positive rate
   <= 1e-4 (Bonferroni over its cases), so a "passes" assertion fails spuriously with
   probability <= 1e-4 for a given seed -- and the seeds are fixed, so the outcome is stable;
3. bad input: one-line verdicts, never a crash; the CLI's exit codes 0 / 1 / 2.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import mdsd
from mdsd.cli import app
from mdsd.sequence import DraftedTree, tree_verify
from mdsd.testing import (
    AuditResult,
    WorstCase,
    assert_lossless,
    audit_tree_verifier,
    audit_verifier,
    faulty,
    node_by_node,
    replay,
    verifier_fn,
)
from mdsd.testing.stats import law_test, pool_bins

EXACT = 1e-12
SMALL = {"vocab_sizes": (3, 5), "trials": 1000}  # larger V: scripts/audit_false_alarms.py


def _marginal(law_of, p, q, law, n):
    """sum_x Pdraft(x) pi(. | x) and the acceptance, by enumerating draft tuples."""
    tuples, probs = mdsd.get_law(law).enumerate(q, n)
    out, acc = np.zeros_like(p), 0.0
    for x, w in zip(tuples, probs):
        cond = law_of(p, q, x)
        out += w * cond
        acc += w * cond[np.unique(x)].sum()
    return out, acc


# ---------------------------------------------------------------- 1. exact numbers
def test_faulty_rules_exact_losses():
    p, q = np.array([0.5, 0.0, 0.5]), np.array([0.4, 0.5, 0.1])
    out, _ = _marginal(faulty.rrs_skip_repeats_law, p, q, "iid", 2)
    np.testing.assert_allclose(out, [0.55, 0.0, 0.45], atol=EXACT)
    _, acc = _marginal(faulty.rrs_skip_repeats_law, p, q, "iid", 3)
    assert abs(acc - 0.735) < EXACT
    assert abs(mdsd.acceptance_rate(p, q, 3, verifier="rrs").rate - 0.685) < EXACT
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    top2 = faulty.top_drafts(q, 2, None)
    assert top2.tolist() == [2, 1]
    np.testing.assert_allclose(faulty.sibling_same_residual_law(p, q, top2), [0, 0.6, 0.4], atol=EXACT)
    out, _ = _marginal(faulty.sibling_same_residual_law, p, q, "iid", 2)
    np.testing.assert_allclose(out, [0.35, 0.39, 0.26], atol=EXACT)
    # hub shortcut: off by 1 - p(hub) in total variation; exact below the threshold
    p, q = np.array([0.9995, 0.0004, 0.0001]), np.array([0.6, 0.3, 0.1])
    out, _ = _marginal(faulty.spechub_hub_shortcut_law, p, q, "spechub", 2)
    assert abs(0.5 * np.abs(out - p).sum() - (1 - p[0])) < EXACT
    p = np.array([0.7, 0.2, 0.1])
    out, _ = _marginal(faulty.spechub_hub_shortcut_law, p, q, "spechub", 2)
    np.testing.assert_allclose(out, p, atol=EXACT)


def test_faulty_samplers_follow_their_laws():
    """Each faulty sampler draws from its stated conditional law (G-test, false-positive 1e-4)."""
    rng = np.random.default_rng(5)
    p, q = np.array([0.5, 0.1, 0.15, 0.25]), np.array([0.2, 0.4, 0.3, 0.1])
    drafts = np.array([1, 1, 2])
    for sampler, law_of in faulty.FAULTY.values():
        if sampler is faulty.spechub_hub_shortcut:
            x = np.array([1, 0])  # spechub: the hub argmax q = token 1 exactly once
        else:
            x = drafts
        want = law_of(p, q, x)
        counts = np.bincount([sampler(p, q, x, rng) for _ in range(3000)], minlength=4)
        assert law_test(counts, want, rng).pvalue > 1e-4, sampler.__name__


def test_pool_bins_and_g_test():
    probs = np.array([0.5, 0.3, 0.0, 1e-4, 2e-4, 0.1997, 1e-4])
    bins = pool_bins(probs, 1000)
    assert bins[2] == -1  # impossible
    assert len({bins[3], bins[4], bins[6]}) == 1  # small tokens pooled
    expected = np.bincount(bins[bins >= 0], probs[bins >= 0] * 1000)
    assert expected.min() >= 10
    rng = np.random.default_rng(0)
    assert law_test(np.array([500, 300, 1, 0, 0, 199, 0]), probs, rng).pvalue == 0.0  # impossible
    fit = law_test(np.array([700, 100, 0, 0, 0, 200, 0]), probs, rng)
    assert fit.pvalue < 1e-20 and fit.tv_low > 0.1
    # a loss confined to rare tokens (expected 18 of 20000): the TV keeps their short bin
    near_one = np.array([1 - 9e-4, 9e-4 - 5e-6, 5e-6])
    fit = law_test(np.array([20000, 0, 0]), near_one, rng)
    assert fit.pvalue < 1e-6 and abs(fit.tv - 9e-4) < EXACT


@pytest.mark.parametrize("vocab", [5, 50, 1000])
def test_tv_interval_covers_the_true_tv_at_any_vocab(vocab):
    """The TV interval (triangle inequality + bootstrap of the sampling error) covers the true
    binned TV: 0 for counts drawn from p itself (a lossless verifier, where the plug-in is biased
    upward: the former basic-bootstrap interval held 0 only 15% of the time at V = 1000), and about
    0.05 for a law moved 0.05 towards p's least likely token. 200 seeded draws each; coverage is
    about 0.93 at 0 and 1.0 at 0.05; a one-sided binomial test of coverage >= 0.88 at level 1e-4
    (false-positive rate <= 1e-4 per test while the coverage is >= 0.88)."""
    from scipy.stats import binom

    from mdsd.testing.cases import token_cases
    from mdsd.testing.stats import TV_MIN_EXPECTED

    rng = np.random.default_rng(vocab)
    target = token_cases(vocab, 0)[0].target_probs
    bins = pool_bins(target, 4000, TV_MIN_EXPECTED, keep_short=True)
    for shift in (0.0, 0.05):
        emitted = (1 - shift) * target + shift * np.eye(vocab)[np.argmin(target)]
        true_tv = 0.5 * np.abs(np.bincount(bins, emitted) - np.bincount(bins, target)).sum()
        covered = 0
        for _ in range(200):
            fit = law_test(rng.multinomial(4000, emitted), target, rng)
            covered += fit.tv_low <= true_tv <= fit.tv_high
            assert fit.tv_low <= fit.tv <= fit.tv_high
        assert binom.cdf(covered, 200, 0.88) > 1e-4, (shift, covered)


# ---------------------------------------------------------------- 2. token-level audits
@pytest.mark.parametrize(
    "name,law,n,drafter",
    [
        ("rrs_skip_repeats", "iid", 3, None),
        ("spechub_hub_shortcut", "spechub", 2, None),
        ("sibling_same_residual", "iid", 2, None),
        ("sibling_same_residual", None, 2, faulty.top_drafts),
    ],
)
def test_audit_catches_faulty_rules(name, law, n, drafter):
    fn = faulty.FAULTY[name][0]
    result = audit_verifier(fn, law=law, n=n, drafter=drafter, seed=0)
    assert not result.passed and result.status == "loss"
    assert result.verdict.startswith("LOSS FOUND")
    worst = result.worst
    assert worst.law_pvalue < result.threshold and worst.target_probs.size == 3  # a V = 3 repro
    assert "worst case" in result.summary() and "target_probs = [" in result.summary()
    if name == "sibling_same_residual":  # seeded: reproducible (checked on the cheapest rule)
        again = audit_verifier(fn, law=law, n=n, drafter=drafter, seed=0)
        assert [(r.name, r.law_pvalue, r.tv, r.acceptance) for r in again.rows] == [
            (r.name, r.law_pvalue, r.tv, r.acceptance) for r in result.rows
        ]


EXACT_PAIRS = sorted((law, v) for v, ver in mdsd.VERIFIERS.items() for law in ver.laws)


@pytest.mark.parametrize("law,verifier", EXACT_PAIRS)
def test_mdsd_verifiers_pass(law, verifier):
    n = 2 if law == "spechub" else 3
    result = audit_verifier(verifier_fn(verifier, law), law=law, n=n, batched=True, seed=1, **SMALL)
    assert result.passed, result.summary()
    assert all(r.status in ("ok", "skipped") for r in result.rows)


def test_spechub_without_shortcut_passes_one_call_at_a_time():
    exact = functools.partial(faulty.spechub_hub_shortcut, threshold=1.0)
    assert_lossless(exact, law="spechub", n=2, vocab_sizes=(3,), trials=1000)


def test_optimal_sample_reuses_fits_without_changing_draws():
    """OptimalVerifier.sample fits a run of equal rows once (what makes optimal audits cheap);
    the fit draws no randomness, so the tokens equal row-by-row sampling with the same stream."""
    verifier, law = mdsd.VERIFIERS["optimal"], mdsd.get_law("without_replacement")
    rows = np.random.default_rng(3).dirichlet(np.ones(6), size=(2, 2))  # two (p, q) positions
    order = [0] * 5 + [1] * 4 + [0] * 3
    p, q = rows[order, 0], rows[order, 1]  # [12, 6]
    drafts = law.sample(q, 3, np.random.default_rng(4))
    batched = verifier.sample(p, q, drafts, law, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    one_by_one = [
        verifier.sample(p[b : b + 1], q[b : b + 1], drafts[b : b + 1], law, rng)[0] for b in range(12)
    ]
    assert batched.tolist() == one_by_one


def test_conditional_poisson_batched_sampler_matches_enumeration():
    """The batched conditional-Poisson sampler (one DP per run of equal rows; the audit's draft
    sets) and its token-by-token reference ``_sample_row`` both follow the enumerated law of
    ordered draft tuples, for rows that alternate (one DP each) and a row with a tiny mass and a
    zero. G-tests, each with false-positive rate 1e-4 (4 tests: <= 4e-4 in all, seeded)."""
    the_law = mdsd.get_law("conditional_poisson")
    positions = np.array([[0.4, 0.3, 0.2, 0.1, 0.0], [0.05, 0.25, 1e-3, 0.35, 0.349]])
    rng = np.random.default_rng(11)
    batched = the_law.sample(positions[np.arange(12000) % 2], 3, rng)  # [12000, 3], runs of one row
    for i, q in enumerate(positions):
        tuples, probs = the_law.enumerate(q, 3)
        index = {t: k for k, t in enumerate(map(tuple, tuples.tolist()))}
        reference = [the_law._sample_row(q, 3, rng) for _ in range(2000)]
        for drawn in (batched[i::2], reference):
            counts = np.zeros(len(tuples))
            for t in map(tuple, np.asarray(drawn).tolist()):
                counts[index[t]] += 1  # a KeyError would be an impossible tuple
            assert law_test(counts, probs, rng).pvalue > 1e-4


def test_save_load_replay(tmp_path):
    result = audit_verifier(faulty.rrs_skip_repeats, law="iid", n=3)
    for suffix in (".npz", ".json"):
        path = result.worst.save(tmp_path / f"worst{suffix}")
        loaded = WorstCase.load(path)
        np.testing.assert_array_equal(loaded.target_probs, result.worst.target_probs)
        np.testing.assert_array_equal(loaded.observed, result.worst.observed)
        again = replay(faulty.rrs_skip_repeats, path)
        np.testing.assert_array_equal(again.worst.observed, result.worst.observed)  # same draws
        assert not again.passed
    assert isinstance(result.as_dict()["verdict"], str)
    json.dumps(result.as_dict())


def test_assert_lossless_raises_with_summary():
    with pytest.raises(AssertionError, match="LOSS FOUND"):
        assert_lossless(faulty.sibling_same_residual, law="iid", n=2)
    assert isinstance(
        assert_lossless(verifier_fn("rrs"), law="iid", n=2, vocab_sizes=(3,), trials=500), AuditResult
    )


# ---------------------------------------------------------------- 2b. tree-level audits
def correct_tree_verifier(tree, rng):
    """Node by node with mdsd.output_law on the DraftedTree's rows: descend while the emitted
    token is a child's."""
    row, emitted = 0, []
    while True:
        p, q = tree.target_probs[row], tree.draft_probs[row]
        drafts = tree.child_tokens(row)
        if drafts.size == 0:
            law = p
        else:
            law = mdsd.output_law(p, q, drafts, verifier="rrs_without_replacement")
        token = int(rng.choice(p.size, p=law))
        emitted.append(token)
        hits = np.flatnonzero(drafts == token)
        if hits.size == 0:
            return emitted
        row = tree.children[row][int(hits[0])] + 1


def test_tree_audit_hands_fn_a_drafted_tree():
    seen = []

    def spy(tree, rng):
        seen.append(tree)
        return [int(rng.integers(tree.vocab))]

    audit_tree_verifier(spy, law="iid", widths=(2, 1), vocab_sizes=(3,), trials=3, exhaustive=True)
    tree = seen[0]
    assert isinstance(tree, DraftedTree) and tree.laws == ("iid",) * 5
    assert tree.parents.tolist() == [-1, -1, 0, 1] and tree.children[0] == (0, 1)
    assert tree.target_probs.shape == (5, 3) and not tree.target_probs.flags.writeable


def test_tree_audit_passes_correct_and_catches_sibling_rule():
    good = audit_tree_verifier(correct_tree_verifier, law="without_replacement", vocab_sizes=(3,), trials=400)
    assert good.passed, good.summary()
    bad = audit_tree_verifier(node_by_node(faulty.sibling_same_residual), law="iid", vocab_sizes=(3, 4))
    assert not bad.passed and bad.worst.kind == "tree"
    assert bad.worst.labels[0] == "0-0-0"  # sequences of length depth + 1


@pytest.mark.parametrize(
    "method,law,widths",
    [
        ("node", "iid", (2, 1)),
        ("node", "conditional_poisson", (2, 1)),
        ("traversal", "without_replacement", (2, 1)),
        ("traversal", "spechub", (2, 2)),  # spechub draws exactly two
        ("traversal", "iid", (1, 1, 1)),  # a chain: block verification
        ("hybrid", "greedy", (2, 1)),
    ],
)
def test_tree_audit_passes_mdsd_sequence_rules(method, law, widths):
    """mdsd.tree_verify's rules (returning a TreeResult) pass the tree audit."""

    def rule(tree, rng):
        return tree_verify(tree, method, rng=rng)

    result = audit_tree_verifier(rule, law=law, widths=widths, vocab_sizes=(3,), trials=300, seed=2)
    assert result.passed, result.summary()
    assert any(row.status == "ok" for row in result.rows)


def test_tree_audit_reports_bad_blocks():
    result = audit_tree_verifier(lambda tree, rng: [0, 0, 0, 0], law="iid", vocab_sizes=(3,), trials=10)
    assert result.status == "error" and "4 tokens" in result.error


# ---------------------------------------------------------------- 2c. decoder-level audits
@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_decoder_audit_engine_passes_naive_faulty_fails(one_thread):
    from mdsd.testing import audit_decoder, engine_generate_fn, naive_generate_fn

    engine = audit_decoder(engine_generate_fn("2,1", "without_replacement"), runs=300)
    assert engine.passed, engine.summary()
    # one new token: 8 cells, where the sibling rule is off by 0.147 in total variation
    bad = audit_decoder(naive_generate_fn(faulty.sibling_same_residual, "iid", 2), runs=300, max_new_tokens=1)
    assert not bad.passed and bad.worst.kind == "decoder"


def test_decoder_audit_reports_wrong_length(one_thread):
    from mdsd.testing import audit_decoder

    def with_prompt(target, draft, input_ids, k, temperature, seed):
        return input_ids[0].tolist() + [0] * k

    result = audit_decoder(with_prompt, runs=5)
    assert result.status == "error" and "not the prompt" in result.error


# ---------------------------------------------------------------- 3. bad input
def _raises(p, q, drafts, rng):
    raise ZeroDivisionError("division by zero")


@pytest.mark.parametrize(
    "fn,batched,message",
    [
        (_raises, False, "fn raised ZeroDivisionError: division by zero"),
        (lambda p, q, x, rng: 1.0, False, "fn returned float"),
        (lambda p, q, x, rng: p.size, False, "outside the vocabulary"),
        (lambda p, q, x, rng: True, False, "bool"),
        (lambda p, q, x, rng: x[:, :2], True, "shape"),
        (lambda p, q, x, rng: x[:, 0].astype(float), True, "dtype float64"),
    ],
)
def test_bad_fn_gives_one_line_error(fn, batched, message):
    result = audit_verifier(fn, law="iid", n=2, batched=batched, vocab_sizes=(3,), trials=50)
    assert result.status == "error" and not result.passed
    assert message in result.error and "\n" not in result.error
    assert result.verdict.startswith("ERROR:")


def test_bad_arguments_raise_value_error():
    good = verifier_fn("rrs")
    with pytest.raises(ValueError, match="law"):
        audit_verifier(good, law=None, n=2)
    with pytest.raises(ValueError, match="law"):
        audit_verifier(good, law="nope", n=2)
    with pytest.raises(ValueError, match="n must"):
        audit_verifier(good, law="iid", n=0)
    with pytest.raises(ValueError, match="trials"):
        audit_verifier(good, law="iid", n=2, trials=0)
    with pytest.raises(ValueError, match="vocab_sizes"):
        audit_verifier(good, law="iid", n=2, vocab_sizes=(1,))
    with pytest.raises(ValueError, match="fn must be callable"):
        audit_verifier(3, law="iid", n=2)
    with pytest.raises(ValueError, match="widths"):
        audit_tree_verifier(node_by_node(good), law="iid", widths=(0,))


def test_cli_exit_codes(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app, ["audit", "mdsd:rrs", "--law", "iid", "-n", "2", "--vocab-sizes", "3,5", "--trials", "500"]
    )
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output
    worst = tmp_path / "worst.json"
    res = runner.invoke(
        app, ["audit", "mdsd.testing.faulty:sibling_same_residual", "--law", "iid", "-n", "2", "--json",
              "--save-worst", str(worst)],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    out = json.loads(res.output)
    assert out["status"] == "loss" and out["verdict"].startswith("LOSS FOUND")
    assert WorstCase.load(worst).kind == "token"
    user_file = tmp_path / "myverifier.py"
    user_file.write_text("def verify(p, q, drafts, rng):\n    return int(drafts[0])\n")
    res = runner.invoke(app, ["audit", f"{user_file}:verify", "--law", "iid", "-n", "2"])
    assert res.exit_code == 1 and "LOSS FOUND" in res.output
    for args, message in (
        (["audit", "no_such_module:f", "--law", "iid"], "cannot import module"),
        (["audit", f"{user_file}:missing", "--law", "iid"], "has no attribute"),
        (["audit", "nocolon", "--law", "iid"], "MODULE:FUNCTION"),
        (["audit", "mdsd:rrs", "--law", "iid", "--kind", "nope"], "--kind"),
        (["audit", "mdsd:rrs"], "--law is required"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and "Traceback" not in res.output
    res = runner.invoke(
        app, ["audit", f"{user_file}:verify", "--kind", "tree", "--law", "iid", "--trials", "5"]
    )
    assert res.exit_code == 1 and "ERROR" in res.output
    res = runner.invoke(
        app, ["audit", "mdsd:traversal", "--kind", "tree", "--law", "iid", "--vocab-sizes", "3",
              "--trials", "200"],
    )  # fmt: skip
    assert res.exit_code == 0 and "PASSED" in res.output, res.output
