"""``mdsd audit``: exit code 0 when the audit passes, 1 on a loss or a broken verifier, 2 on bad
arguments (one line, no traceback). The audits are seeded; each has a family-wise false-positive
rate <= 1e-4 (see tests/testing/test_audit.py)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mdsd.cli import app
from mdsd.testing import WorstCase


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
