"""Tests of mdsd.experiments and ``mdsd measure`` / ``mdsd report``: exact per-position metrics,
the top-k cache layout, and a small end-to-end run on tiny random Llama models."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mdsd
from mdsd.acceptance import _enumerate_row
from mdsd.experiments import analysis, capture
from mdsd.experiments.analysis import BOUND_VERIFIER, EXACT_SLACK, clustered_mean, position_probs
from mdsd.experiments.capture import Positions, compress_logits, load_prompts
from mdsd.experiments.config import MeasureConfig
from mdsd.experiments.report import COLUMNS, findings, read_results, render_report
from mdsd.experiments.sweep import run_sweep
from mdsd.verifiers.classic import (
    importance_acceptance,
    rrs_wor_acceptance_tree,
    rrs_wor_acceptance_walk,
)

TINY_VOCAB = 32


# ---------------------------------------------------------------- exact pieces
def test_importance_acceptance_matches_enumeration(rng):
    for trial in range(60):
        vocab, n = int(rng.integers(2, 7)), int(rng.integers(1, 5))
        p, q = rng.dirichlet(np.full(vocab, 0.5)), rng.dirichlet(np.full(vocab, 0.5))
        if trial % 3 == 0:
            q[rng.integers(vocab)] = 0.0
            q /= q.sum()
        if trial % 4 == 0:
            p[rng.integers(vocab)] = 0.0
            p /= p.sum()
        if trial % 7 == 0:
            q = p.copy()
        exact = mdsd.acceptance_rate(p, q, n, "importance", method="enumeration").rate
        assert importance_acceptance(p[None], q[None], n)[0] == pytest.approx(exact, abs=1e-12)


def test_rrs_wor_walk_matches_tree_and_enumeration(rng):
    """The compiled draw-tree walk (the analysis' path for rrs_without_replacement, n >= 3) equals
    the numpy reference and enumeration of every draft sequence to 1e-12, zeros, ties and q = p
    included; on LLM-like top-k rows it matches the reference and refuses the same rows."""
    law, verifier = mdsd.get_law("without_replacement"), mdsd.get_verifier("rrs_without_replacement")
    for trial in range(80):
        vocab, n = int(rng.integers(2, 8)), int(rng.integers(1, 6))
        p, q = rng.dirichlet(np.full(vocab, 0.6)), rng.dirichlet(np.full(vocab, 0.6))
        if trial % 3 == 0:
            q[rng.integers(vocab)] = 0.0
            q /= q.sum()
        if trial % 4 == 0:
            p[rng.integers(vocab)] = 0.0
            p /= p.sum()
        if trial % 5 == 0:
            p = np.round(p * 4) / 4 + 1e-3  # ties between p and q
            p /= p.sum()
            q = np.round(q * 4) / 4 + 1e-3
            q /= q.sum()
        if trial % 7 == 0:
            q = p.copy()
        if np.count_nonzero(q) < n:
            continue
        exact = _enumerate_row(p, q, n, verifier, law)
        assert rrs_wor_acceptance_walk(p, q, n) == pytest.approx(exact, abs=1e-12)
        assert rrs_wor_acceptance_walk(p, q, n) == pytest.approx(rrs_wor_acceptance_tree(p, q, n), abs=1e-12)
    for _ in range(6):  # 40 tokens of a 200-token LLM-like pair: thousands of tree nodes
        logits = 3.0 * rng.standard_normal(200)
        p = mdsd.process_logits(logits, 1.0, 40)
        q = mdsd.process_logits(logits + 1.5 * rng.standard_normal(200), 1.0, 40)
        for n, max_rows in ((3, 10**6), (4, 10**6), (4, 5_000), (5, 20_000)):
            reference = rrs_wor_acceptance_tree(p, q, n, max_rows)
            walked = rrs_wor_acceptance_walk(p, q, n, max_rows)
            assert (walked is None) == (reference is None)
            if reference is not None:
                assert walked == pytest.approx(reference, abs=1e-12)


def test_sample_check_one_draft_without_replacement_is_closed_form(rng):
    """At n = 1 the without-replacement inclusion probabilities are q: sample_check's rate is
    sum p q in closed form, equal to enumeration."""
    p, q = rng.dirichlet(np.ones(6), size=4), rng.dirichlet(np.ones(6), size=4)
    q[0, 2] = 0.0
    q[0] /= q[0].sum()
    closed = mdsd.acceptance_rate(p, q, 1, "sample_check", "without_replacement")
    exact = mdsd.acceptance_rate(p, q, 1, "sample_check", "without_replacement", method="enumeration")
    assert closed.method == "closed_form"
    np.testing.assert_allclose(closed.rate, exact.rate, rtol=0, atol=1e-12)


def test_acceptance_ladder_knobs_used_by_the_analysis(rng, monkeypatch):
    """acceptance_rate's chunk_rows picks the method per chunk (the rates equal the unchunked
    ones); its batched Monte Carlo equals the one-row-at-a-time path draw for draw and is within
    5 standard errors of enumeration (per row: false-positive rate < 6e-7 each, 5 rows)."""
    import mdsd.acceptance as acceptance_module

    p, q = rng.dirichlet(np.ones(5), size=5), rng.dirichlet(np.ones(5), size=5)  # [5, 5]
    exact = mdsd.acceptance_rate(p, q, 3, "rrs_without_replacement", method="enumeration").rate
    chunked = mdsd.acceptance_rate(
        p, q, 3, "sample_check", "without_replacement", max_tuples=10**6, chunk_rows=2
    )
    whole = mdsd.acceptance_rate(p, q, 3, "sample_check", "without_replacement", max_tuples=10**6)
    assert chunked.method == whole.method == "enumeration"
    assert chunked.rate == pytest.approx(whole.rate, abs=1e-15)
    mixed = mdsd.acceptance_rate(p, q, 3, "sample_check", "without_replacement", max_tuples=0, chunk_rows=2)
    assert mixed.method == "monte_carlo" and np.all(mixed.stderr > 0)
    batched = mdsd.acceptance_rate(
        p, q, 3, "rrs_without_replacement", method="monte_carlo", rng=7, num_samples=3000
    )
    assert np.all(np.abs(batched.rate - exact) <= 5 * batched.stderr)
    monkeypatch.setattr(acceptance_module, "CHUNK_ELEMENTS", 64)  # forces one row at a time
    row_by_row = mdsd.acceptance_rate(
        p, q, 3, "rrs_without_replacement", method="monte_carlo", rng=7, num_samples=3000
    )
    assert np.array_equal(row_by_row.rate, batched.rate)
    assert np.array_equal(row_by_row.stderr, batched.stderr)


def test_topk_layout_is_exact(rng):
    """The union-of-top-k layout gives exactly process_logits(full logits, T, top_k)."""
    batch, vocab, k, temperature = 7, 40, 5, 0.7
    target, draft = rng.normal(size=(batch, vocab)) * 2, rng.normal(size=(batch, vocab)) * 2
    target[0, :] = draft[0, :]  # identical top-k sets in one row
    packed = {
        name: compress_logits(z.astype(np.float32), k) for name, z in (("target", target), ("draft", draft))
    }
    positions = Positions(
        "d",
        temperature,
        packed["target"]["logits"],
        packed["draft"]["logits"],
        packed["target"]["index"],
        packed["draft"]["index"],
        np.zeros(batch, int),
    )
    p, q = position_probs(positions)
    p_full = mdsd.process_logits(target.astype(np.float32), temperature, k)
    q_full = mdsd.process_logits(draft.astype(np.float32), temperature, k)
    for b in range(batch):
        # same multiset of masses, and the same alpha* and rates on the compressed rows
        assert np.sort(p[b][p[b] > 0]) == pytest.approx(np.sort(p_full[b][p_full[b] > 0]), abs=1e-15)
        assert np.sort(q[b][q[b] > 0]) == pytest.approx(np.sort(q_full[b][q_full[b] > 0]), abs=1e-15)
    for law in ("iid", "greedy", "without_replacement"):
        assert mdsd.optimal_acceptance(p, q, 3, law) == pytest.approx(
            mdsd.optimal_acceptance(p_full, q_full, 3, law), abs=1e-12
        )
    assert mdsd.acceptance_rate(p, q, 3, "kseq").rate == pytest.approx(
        mdsd.acceptance_rate(p_full, q_full, 3, "kseq").rate, abs=1e-12
    )


def test_clustered_mean():
    values = np.array([1.0, 1.0, 3.0, 3.0])
    mean, ci = clustered_mean(values, np.array([0, 0, 1, 1]))
    assert mean == 2.0
    # two clusters with sums of deviations -2 and +2: se = sqrt(2 * 8) / 4 = 1
    assert ci == pytest.approx(analysis.Z95 * 1.0)
    assert clustered_mean(np.array([0.5, 0.5]), np.array([0, 1]))[1] == 0.0


def test_load_prompts(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "domain": "x"}\n\n{"text": "c"}\n')
    rows = load_prompts(path, None)
    assert [(r.dataset, r.index, r.text) for r in rows] == [("mine", 0, "a"), ("x", 0, "b"), ("mine", 1, "c")]
    assert [r.text for r in load_prompts(path, 1)] == ["a", "b"]
    path.write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="prompt"):
        load_prompts(path, None)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl", None)


# ---------------------------------------------------------------- tiny models end to end
def _save_tiny(path, hidden: int, layers: int, seed: int):
    """A randomly initialised Llama (vocabulary 32) with a word-level tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, TINY_VOCAB)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper than the default init, so that p and q differ visibly
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pair")
    prompts = root / "prompts.jsonl"
    with prompts.open("w") as f:
        for dataset in ("alpha", "beta"):
            for i in range(2):
                words = " ".join(f"w{(5 * i + 3 * j + len(dataset)) % 30 + 2}" for j in range(6))
                f.write(json.dumps({"domain": dataset, "prompt": words}) + "\n")
    return {
        "target": _save_tiny(root / "target", 32, 2, 0),
        "draft": _save_tiny(root / "draft", 16, 1, 1),
        "prompts": str(prompts),
    }


def _config(tiny, **changes):
    base = MeasureConfig(
        target=tiny["target"],
        draft=tiny["draft"],
        prompts=tiny["prompts"],
        num_prompts=2,
        max_new_tokens=6,
        temperatures=(0.5, 1.0),
        ns=(1, 2, 3),
        top_k=None,
        mc_samples=4,
        subsample=("optimal:without_replacement", "kseq", "rrs:iid:3"),
        subsample_positions=5,
    )
    return base.with_(**changes)


@pytest.fixture(scope="module")
def measured(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("measure")
    run = run_sweep(_config(tiny), out)
    return out, run


def test_outputs_exist_and_schema(measured):
    out, run = measured
    for name in (
        "results.csv",
        "results.json",
        "table1.md",
        "figure1_temperature.png",
        "figure1_temperature.svg",
        "figure2_drafts.png",
        "figure2_drafts.svg",
    ):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert {r["dataset"] for r in rows} == {"alpha", "beta", "all"}
    assert {float(r["temperature"]) for r in rows} == {0.5, 1.0}
    assert {int(r["n"]) for r in rows} == {1, 2, 3}
    verifiers = {r["verifier"] for r in rows}
    assert set(mdsd.VERIFIERS) <= verifiers | {"spechub"}  # the whole registry is measured
    assert BOUND_VERIFIER in verifiers
    assert {r["law"] for r in rows} >= {
        "iid",
        "without_replacement",
        "greedy",
        "conditional_poisson",
        "spechub",
    }
    assert run["generated_files"] == 2 * 2 * 2 and run["cached_files"] == 0
    assert run["positions_per_temperature"] > 0


def test_bounds_dominate_rates(measured):
    out, run = measured
    rows, stored_run = read_results(out)
    assert stored_run["checks"]["exact_above_bound_positions"] == 0
    assert stored_run["checks"]["wor_below_iid_positions"] == 0
    methods, mc_errors = set(), []
    for r in rows:
        methods.add(r["method"])
        assert r["positions"] > 0
        assert 0.0 <= r["acceptance"] <= 1.0
        if r["method"] == "monte_carlo":
            assert r["gap"] + r["gap_ci95"] >= 0.0
            mc_errors.append(r["mc_stderr"])
        else:
            assert r["max_excess"] <= EXACT_SLACK, r
            assert r["acceptance"] <= r["bound"] + EXACT_SLACK
    assert {"closed_form", "exact"} <= methods
    assert "monte_carlo" in methods  # rrs_without_replacement at n = 3 over 32 tokens
    assert min(mc_errors) >= 0.0 and max(mc_errors) > 0.0
    claims = {f["claim"]: f["holds"] for f in findings(rows, stored_run["checks"])}
    assert claims["without-replacement α* ≥ i.i.d. α*"] is True
    assert claims["every verifier ≤ the α* of its law"] is True


def test_rerun_uses_cache(measured, tiny, monkeypatch):
    out, _ = measured
    cache_files = sorted((out / "cache").rglob("*.npz"))
    stamps = [f.stat().st_mtime_ns for f in cache_files]

    def no_models(*args, **kwargs):
        raise AssertionError("models must not be loaded when everything is cached")

    monkeypatch.setattr("mdsd.models.load_pair", no_models)
    run = run_sweep(_config(tiny, ns=(2,)), out)  # re-analysis with other n: no model call
    assert run["generated_files"] == 0 and run["cached_files"] == 8
    assert [f.stat().st_mtime_ns for f in cache_files] == stamps


def test_resume_generates_only_missing(tiny, tmp_path):
    config = _config(tiny, temperatures=(1.0,), ns=(2,))
    run_sweep(config, tmp_path)
    files = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 4
    files[1].unlink()
    run = run_sweep(config, tmp_path)
    assert run["generated_files"] == 1 and run["cached_files"] == 3


def test_capture_is_deterministic(tiny, tmp_path):
    config = _config(tiny, temperatures=(1.0,), num_prompts=1)
    a = capture.capture(config, tmp_path / "a")
    b = capture.capture(config, tmp_path / "b")
    for fa, fb in zip(sorted(a.cache_dir.rglob("*.npz")), sorted(b.cache_dir.rglob("*.npz"))):
        with np.load(fa) as x, np.load(fb) as y:
            assert np.array_equal(x["tokens"], y["tokens"])
            assert np.array_equal(x["target_logits"], y["target_logits"])


def test_capture_on_processes_writes_the_same_files(tiny, tmp_path):
    """Two capture processes (one prompt each at a time) write byte-identical arrays to one
    process's: each prompt is generated alone from its own seeded generator."""
    config = _config(tiny)
    one = capture.capture(config, tmp_path / "one")
    seen = []
    two = capture.capture(
        config, tmp_path / "two", workers=2, progress=lambda step, label: seen.append(label)
    )
    assert (one.generated, one.positions) == (two.generated, two.positions) and two.generated == 8
    assert len(seen) == 4  # one progress call per prompt
    files_one, files_two = sorted(one.cache_dir.rglob("*.npz")), sorted(two.cache_dir.rglob("*.npz"))
    assert [f.relative_to(one.cache_dir) for f in files_one] == [
        f.relative_to(two.cache_dir) for f in files_two
    ]
    for fa, fb in zip(files_one, files_two):
        with np.load(fa) as x, np.load(fb) as y:
            assert sorted(x.files) == sorted(y.files)
            for name in x.files:
                assert np.array_equal(x[name], y[name]), (fa.name, name)
    assert json.loads((one.cache_dir / "meta.json").read_text()) == json.loads(
        (two.cache_dir / "meta.json").read_text()
    )


def test_cli_measure_topk_and_report(tiny, tmp_path):
    from mdsd.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "measure",
            "--target",
            tiny["target"],
            "--draft",
            tiny["draft"],
            "--prompts",
            tiny["prompts"],
            "--num-prompts",
            "1",
            "--max-new-tokens",
            "5",
            "--temperatures",
            "0.7",
            "--n",
            "2,3",
            "--top-k",
            "6",
            "--verifiers",
            "rrs,rrs_without_replacement,greedy",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    # not a terminal: plain progress lines, one per capture prompt and per analysis unit
    assert "capture: alpha prompt 0" in result.output and "analysis: alpha T=0.7 n=3" in result.output
    rows, run = read_results(tmp_path)
    assert run["config"]["top_k"] == 6
    assert {r["verifier"] for r in rows} == {"rrs", "rrs_without_replacement", "greedy", BOUND_VERIFIER}
    # top-k 6: every draft tuple can be enumerated, so nothing is Monte Carlo
    assert all(r["method"] != "monte_carlo" for r in rows)
    (tmp_path / "report.md").unlink()
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "Table 1" in text and "figure2_drafts.png" in text and "Findings" in text
    bad = runner.invoke(app, ["measure", "--laws", "nope", "--out", str(tmp_path)])
    assert bad.exit_code != 0


def test_render_report_from_csv_only(measured, tmp_path):
    out, _ = measured
    (tmp_path / "results.csv").write_text((out / "results.csv").read_text())
    path = render_report(tmp_path)
    assert "Table 1" in path.read_text()


def test_subsample_is_fixed_by_count_and_seed_and_paired(measured, tiny):
    """The subsampled pairs are rated on subsample_positions seeded positions per (dataset, T),
    the same for every n and law; their bound is over the same positions; other pairs on all."""
    out, _ = measured
    config = _config(tiny)  # (out's results files are rewritten by other tests: analyse again)
    rows, _ = analysis.analyse(config, capture.cache_dir_for(out / "cache", config))
    per_cell = [r for r in rows if r["dataset"] != "all"]
    bounds = {
        (r["dataset"], r["temperature"], r["n"], r["law"]): r
        for r in per_cell
        if r["verifier"] == BOUND_VERIFIER
    }
    sampled = [r for r in per_cell if r["subsampled"]]
    assert {(r["verifier"], r["law"]) for r in sampled} == {
        ("optimal", "without_replacement"),
        ("kseq", "iid"),
        ("rrs", "iid"),
    }
    assert {r["n"] for r in sampled if r["verifier"] == "rrs"} == {3}  # a verifier:law:n entry
    for r in sampled:
        assert r["positions"] == 5 < bounds[(r["dataset"], r["temperature"], r["n"], r["law"])]["positions"]
        assert r["acceptance"] <= r["bound"] + EXACT_SLACK
    assert all(not r["subsampled"] for r in per_cell if r["verifier"] in ("greedy", "importance"))
    rows_a = analysis.subsample_rows(config, "alpha", 0.5, 40)
    assert np.array_equal(rows_a, analysis.subsample_rows(config, "alpha", 0.5, 40))
    assert rows_a.size == 5 and np.all(np.diff(rows_a) > 0)
    assert not np.array_equal(rows_a, analysis.subsample_rows(config.with_(seed=1), "alpha", 0.5, 40))
    assert analysis.subsample_rows(config.with_(subsample_positions=None), "alpha", 0.5, 40).size == 40
    # paired: the kseq [iid] values at n = 2 and 3 are at the same positions
    positions = capture.load_positions(capture.cache_dir_for(out / "cache", config), config, "alpha", 0.5)
    p, q = position_probs(positions)
    small = config.with_(verifiers=("kseq",), laws=("iid",))
    got = [analysis.measure_n(p, q, n, small, dataset="alpha", temperature=0.5) for n in (2, 3)]
    rated = [np.flatnonzero(~np.isnan(m.rates[("kseq", "iid")].value)) for m in got]
    assert np.array_equal(rated[0], rated[1]) and rated[0].size == 5


def test_results_identical_for_any_number_of_workers(measured, tiny, tmp_path):
    """The rows are a function of the configuration and seed: 1 process, 2 processes and a Dask
    cluster give byte-identical results.csv (Monte Carlo included: mc_samples draws per stream)."""
    from mdsd.experiments.parallel import dask_runner, process_runner

    out, _ = measured
    config = _config(tiny, temperatures=(1.0,), ns=(2, 3), laws=("iid", "without_replacement"))
    cache = out / "cache"
    run_sweep(config, tmp_path / "one", cache_root=cache, runner=process_runner(1))
    run_sweep(config, tmp_path / "two", cache_root=cache, runner=process_runner(2))
    one = (tmp_path / "one" / "results.csv").read_bytes()
    assert one == (tmp_path / "two" / "results.csv").read_bytes()
    assert b"monte_carlo" in one  # the streams of sampled rates are covered too
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        run_sweep(config, tmp_path / "dask", cache_root=cache, runner=dask_runner(cluster))
    assert one == (tmp_path / "dask" / "results.csv").read_bytes()


def test_greedy_finding_ignores_subsampled_rows():
    """A verifier rated on a subsample averages other positions: it must not be the comparison."""

    def row(verifier, law, acceptance, subsampled=0):
        return {
            "dataset": "all",
            "temperature": 0.3,
            "n": 3,
            "verifier": verifier,
            "law": law,
            "acceptance": acceptance,
            "bound": 0.95,
            "gap": 0.95 - acceptance,
            "gap_ci95": 0.01,
            "positions": 100,
            "subsampled": subsampled,
            "method": "closed_form",
            "max_excess": -1.0,
            "bound_error": 0.0,
        }

    rows = [
        row("greedy", "greedy", 0.80),
        row("rrs", "iid", 0.78),
        row("optimal", "without_replacement", 0.94, subsampled=1),
    ]
    lead = [f for f in findings(rows) if f["claim"].startswith("greedy beats")]
    assert len(lead) == 1 and lead[0]["detail"] == "T=0.3: greedy − rrs = +0.0200"
