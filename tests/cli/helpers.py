"""Helpers of the CLI tests: the app in process (typer's runner) and as a separate process."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from mdsd.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args))
    return result


def mdsd(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run ``mdsd ARGS`` as a separate process (this checkout's package, stdout/stderr piped;
    ``env`` adds environment variables)."""
    return subprocess.run(
        [sys.executable, "-c", "from mdsd.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=os.environ | {"COLUMNS": "120"} | (env or {}),
        timeout=600,
    )


def assert_refused(result, *fragments: str) -> None:
    """Exit code 2, no traceback, one 'Error: ...' line on stderr holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
