"""The README's Python examples run as written (offline: the bundled pair ships with the package).

Each fenced ``python`` block of README.md is executed in a fresh namespace; a block that raises
fails the test with the block's first line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_readme_python_block_runs(block):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)


def test_readme_has_the_three_commands():
    text = README.read_text()
    assert 'pip install torch==2.13.0 -e ".[test]"' in text
    assert "python -m pytest -n 2" in text
    assert "\nmdsd measure " in text
