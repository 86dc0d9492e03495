"""``mdsd trees`` (mdsd.experiments.trees) on a tiny random pair: rows, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from mdsd.experiments import trees


@pytest.fixture(scope="module")
def pair(one_thread):
    from mdsd.models import ModelPair
    from mdsd.testing.decoder import _IdTokenizer, tiny_llama_pair

    target, draft = tiny_llama_pair(vocab=8)
    return ModelPair(target, draft, _IdTokenizer(), "tiny")


def test_rows_and_determinism(pair):
    kwargs = dict(temperatures=(1.0,), shapes=("1x2", "2,1"), top_k=None, positions_per_prompt=3, seed=4)
    rows = trees.measure_trees(pair, [[3, 5, 2], [1, 4]], **kwargs)
    again = trees.measure_trees(pair, [[3, 5, 2], [1, 4]], **kwargs)
    assert rows == again  # a function of the arguments and the seed
    by_shape = {}
    for r in rows:
        by_shape.setdefault(r.shape, []).append(r)
        assert 1.0 <= r.tokens_per_step <= 3.0 and r.positions == 6
    # chains draw i.i.d.: no without-replacement verifier there; trees: no i.i.d.-only one
    assert [r.rule for r in by_shape["1x2"]] == ["node:rrs", "node:optimal", "traversal", "hybrid"]
    assert [r.rule for r in by_shape["2,1"]] == [
        "node:rrs_without_replacement",
        "node:optimal",
        "traversal",
        "hybrid",
    ]
    for rows_of_shape in by_shape.values():
        assert rows_of_shape[0].gain == 0.0
        for r in rows_of_shape:
            assert np.isfinite(r.gain_stderr)
    # on a chain with one draft per node, the optimal node verifier is token verification
    chain = {r.rule: r for r in by_shape["1x2"]}
    assert chain["node:optimal"].tokens_per_step == pytest.approx(
        chain["node:rrs"].tokens_per_step, abs=1e-12
    )
    table = trees.markdown_table(rows)
    assert table.count("\n") == 1 + len(rows)


def test_cli_errors():
    from typer.testing import CliRunner

    from mdsd.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["trees", "--temperatures", "0,0.7"])
    assert res.exit_code == 2 and "--temperatures" in res.output
    res = runner.invoke(app, ["trees", "--positions", "0"])
    assert res.exit_code == 2 and "--positions" in res.output
    res = runner.invoke(app, ["trees", "--target", "./no/such/dir"])
    assert res.exit_code == 2 and "--target" in res.output
