"""``mdsd bound`` / ``mdsd compare`` (mdsd.cli.core) run on random and file inputs and print valid
JSON; bad input is refused with one line and exit code 2 (checked on the exact command
lines, in a separate process)."""

import json

import numpy as np
import pytest

import mdsd as mdsd_lib
from mdsd.engine.tree import parse_tree

from .helpers import assert_refused, mdsd, run


def test_bound_random_json():
    result = run(
        "bound", "--random", "64", "--seed", "3", "-n", "2,4", "--law", "without_replacement", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [row["n"] for row in data["bounds"]] == [2, 4]
    assert data["bounds"][0]["alpha_star"] <= data["bounds"][1]["alpha_star"] + 1e-12


def test_compare_from_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    path = tmp_path / "pair.npz"
    np.savez(path, p=p, q=q)
    result = run("compare", str(path), "-n", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    (res,) = data["results"]
    assert set(res["bounds"]) == {"iid", "without_replacement", "greedy", "spechub", "conditional_poisson"}
    for row in res["verifiers"]:
        # Monte Carlo rows within 4 standard errors above alpha* (one-sided false-positive rate
        # <= 3.2e-5 per row, and only for a rule attaining alpha*; seeded)
        assert row["acceptance"] <= row["bound"] + 4 * row["stderr"] + 1e-12
    greedy = next(r for r in res["verifiers"] if r["verifier"] == "greedy")
    assert greedy["gap"] == pytest.approx(0.0, abs=1e-12)


def test_two_files_and_logits(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([0.0, 1.0, 2.0, 3.0]))
    np.save(tmp_path / "d.npy", np.array([3.0, 2.0, 1.0, 0.0]))
    result = run(
        "bound",
        str(tmp_path / "t.json"),
        str(tmp_path / "d.npy"),
        "--logits",
        "--temperature",
        "0.5",
        "--top-k",
        "3",
        "-n",
        "1",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.output)["bounds"][0]["alpha_star"] <= 1


def test_table_output_and_errors(tmp_path):
    result = run("compare", "--random", "30", "-n", "2", "--verifiers", "rrs,greedy")
    assert result.exit_code == 0 and "alpha*" in result.output
    bad = run("bound", "--random", "30", "--law", "nope")
    assert bad.exit_code != 0 and "unknown law 'nope'" in bad.output
    missing = run("bound", str(tmp_path / "missing.npy"))
    assert missing.exit_code != 0 and "does not exist" in missing.output
    (tmp_path / "bad.json").write_text(json.dumps({"p": [0.5, 0.6], "q": [0.5, 0.5]}))
    off = run("bound", str(tmp_path / "bad.json"))
    assert off.exit_code != 0 and "must sum to 1" in off.output


# ---------------------------------------------------------------- exact command lines (subprocess)


@pytest.fixture
def batch_files(tmp_path):
    rng = np.random.default_rng(5)
    p, q = rng.dirichlet(np.ones(6), size=4), rng.dirichlet(np.ones(6), size=4)  # [4, 6]
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "q.npy", q)
    return tmp_path / "p.npy", tmp_path / "q.npy", p, q


def test_bound_batched_files_per_row(batch_files):
    """[B, V] files: --json lists alpha* per row (equal to the library's per-row values)."""
    p_path, q_path, p, q = batch_files
    result = mdsd("bound", str(p_path), str(q_path), "-n", "2,3", "--law", "greedy", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["batch"] == 4
    for row in data["bounds"]:
        expected = [mdsd_lib.optimal_acceptance(p[b], q[b], row["n"], "greedy") for b in range(4)]
        assert row["alpha_star"] == pytest.approx(expected, abs=1e-12)
    table = run("bound", str(p_path), str(q_path))
    assert table.exit_code == 0 and "4 rows" in table.output


def test_compare_batched_files_json(batch_files):
    p_path, q_path, p, q = batch_files
    result = run("compare", str(p_path), str(q_path), "-n", "2", "--verifiers", "rrs,greedy", "--json")
    assert result.exit_code == 0, result.output
    (res,) = json.loads(result.output)["results"]
    rrs = next(r for r in res["verifiers"] if r["verifier"] == "rrs")
    assert rrs["acceptance"] == pytest.approx(
        mdsd_lib.acceptance_rate(p, q, 2, "rrs").rate.tolist(), abs=1e-12
    )
    assert len(res["bounds"]["iid"]) == 4
    table = run("compare", str(p_path), str(q_path), "-n", "2")
    assert table.exit_code == 0, table.output


def test_missing_model_directory_is_one_line(tmp_path):
    assert_refused(mdsd("generate", "hello", "--target", "./no_such_model"), "--target", "does not exist")
    assert_refused(mdsd("bench", "--draft", str(tmp_path / "none" / "x")), "--draft", "does not exist")
    measured = run("measure", "--target", "./no_such_model", "--out", str(tmp_path / "m"))
    assert measured.exit_code == 2 and "does not exist" in measured.output


def test_uncached_hub_id_offline_is_one_line(tmp_path):
    """A bare hub id with no local directory and an empty hub cache, offline: refused at once
    (exit 2, one line naming the option), by generate and by a measure that needs a capture."""
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    generated = mdsd("generate", "hello", "--target", "some-org/some-model", env=offline)
    assert_refused(generated, "--target 'some-org/some-model' is not a local directory", "local hub cache")
    measured = mdsd(
        "measure",
        "--draft",
        "some-org/some-model",
        "--num-prompts",
        "1",
        "--out",
        str(tmp_path / "m"),
        env=offline,
    )
    assert_refused(measured, "--draft 'some-org/some-model'", "HF_HUB_OFFLINE is set")


def test_sampling_options_need_logits(batch_files, tmp_path):
    p_path, q_path, _, _ = batch_files
    assert_refused(mdsd("bound", str(p_path), str(q_path), "-t", "0.5"), "--temperature", "--logits")
    refused = run("bound", str(p_path), str(q_path), "--top-k", "3", "--top-p", "0.9")
    assert refused.exit_code == 2 and "--top-k, --top-p apply to logits" in refused.output
    np.save(tmp_path / "z.npy", np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]]))
    bad_p = run("bound", str(tmp_path / "z.npy"), "--logits", "--top-p", "1.5")
    assert bad_p.exit_code == 2 and "--top-p must be in (0, 1]" in bad_p.output
    # top-k 0 means no truncation, as in measure and generate
    full = run("bound", str(tmp_path / "z.npy"), "--logits", "--json")
    zero = run("bound", str(tmp_path / "z.npy"), "--logits", "--top-k", "0", "--json")
    assert zero.exit_code == 0 and json.loads(zero.output) == json.loads(full.output)
    negative = run("bound", "--random", "20", "--top-k", "-1")
    assert negative.exit_code == 2 and "--top-k must be >= 0" in negative.output


def test_malformed_lists_refused():
    assert_refused(mdsd("generate", "hello", "--tree", "3,-1"), "tree", "'3,-1'")
    assert_refused(mdsd("bound", "--random", "20", "-n", "2,,3"), "-n", "'2,,3'")
    for bad in ("3,-1", "2,,3", "3,"):
        with pytest.raises(ValueError, match="tree"):
            parse_tree(bad)
    assert parse_tree("3, 2,1").widths == (3, 2, 1)
    bad_t = run("measure", "--temperatures", "0.5,,0.7", "--out", "unused")
    assert bad_t.exit_code == 2 and "--temperatures" in bad_t.output


def test_file_errors_name_the_file_and_the_flag(tmp_path):
    np.save(tmp_path / "twice.npy", np.array([0.5, 1.0, 0.5]))
    assert_refused(mdsd("bound", str(tmp_path / "twice.npy"), str(tmp_path / "twice.npy")), "--normalize")
    (tmp_path / "bad.txt").write_text("0.5 abc 0.5")
    bad = run("bound", str(tmp_path / "bad.txt"), str(tmp_path / "bad.txt"))
    assert bad.exit_code == 2 and "bad.txt" in bad.output and "could not convert" in bad.output
    (tmp_path / "bad.json").write_text("[0.5, ")
    broken = run("bound", str(tmp_path / "bad.json"))
    assert broken.exit_code == 2 and "bad.json" in broken.output
