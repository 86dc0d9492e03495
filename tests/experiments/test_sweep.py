"""mdsd.experiments.sweep and ``mdsd measure`` / ``mdsd report``: a small end-to-end run on tiny
random Llama models (schema, bounds dominate rates, cache reuse, resume, subsampling, workers)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

import mdsd
from mdsd.experiments import analysis, capture
from mdsd.experiments.analysis import BOUND_VERIFIER, EXACT_SLACK, position_probs
from mdsd.experiments.report import COLUMNS, findings, read_results
from mdsd.experiments.sweep import run_sweep

from .conftest import measure_config


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
        if r["method"] == "monte_carlo":  # noise only: below alpha* + the 95% CI (false-positive
            # rate <= 2.5% per row, and only for a rule attaining alpha*; these are well below; seeded)
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
    run = run_sweep(measure_config(tiny, ns=(2,)), out)  # re-analysis with other n: no model call
    assert run["generated_files"] == 0 and run["cached_files"] == 8
    assert [f.stat().st_mtime_ns for f in cache_files] == stamps


def test_resume_generates_only_missing(tiny, tmp_path):
    config = measure_config(tiny, temperatures=(1.0,), ns=(2,))
    run_sweep(config, tmp_path)
    files = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 4
    files[1].unlink()
    run = run_sweep(config, tmp_path)
    assert run["generated_files"] == 1 and run["cached_files"] == 3


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


def test_subsample_is_fixed_by_count_and_seed_and_paired(measured, tiny):
    """The subsampled pairs are rated on subsample_positions seeded positions per (dataset, T),
    the same for every n and law; their bound is over the same positions; other pairs on all."""
    out, _ = measured
    config = measure_config(tiny)  # (out's results files are rewritten by other tests: analyse again)
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
    config = measure_config(tiny, temperatures=(1.0,), ns=(2, 3), laws=("iid", "without_replacement"))
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


def test_warm_kernels_changes_no_result(tiny, tmp_path):
    """Compiling the analysis kernels on a process of their own during the capture
    (``warm_kernels=True``) leaves results.csv byte-identical; the warm-up itself runs on both
    cache forms (top-k and the full vocabulary)."""
    from mdsd.experiments.parallel import warm_kernels, warm_positions

    config = measure_config(tiny, temperatures=(1.0,), ns=(2, 3), laws=("iid", "without_replacement"))
    run_sweep(config, tmp_path / "plain", cache_root=tmp_path / "cache-plain")
    run = run_sweep(config, tmp_path / "warm", cache_root=tmp_path / "cache-warm", warm_kernels=True)
    assert run["generated_files"] == 4 and run["warm_up_wait_s"] >= 0
    assert (tmp_path / "plain" / "results.csv").read_bytes() == (
        tmp_path / "warm" / "results.csv"
    ).read_bytes()
    for top_k in (None, 8):
        positions = warm_positions(config.with_(top_k=top_k), 1.0)
        assert (positions.target_index is None) == (top_k is None) and positions.count > 0
        assert warm_kernels(config.with_(top_k=top_k)) > 0
