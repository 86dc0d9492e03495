"""The CLI runs on random and file inputs and prints valid JSON."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mdsd.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args))
    return result


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
