"""mdsd.experiments.capture: the prompts file reader and deterministic captures."""

from __future__ import annotations

import numpy as np
import pytest

from mdsd.experiments import capture
from mdsd.experiments.capture import load_prompts

from .conftest import measure_config


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


def test_capture_is_deterministic(tiny, tmp_path):
    config = measure_config(tiny, temperatures=(1.0,), num_prompts=1)
    a = capture.capture(config, tmp_path / "a")
    b = capture.capture(config, tmp_path / "b")
    for fa, fb in zip(sorted(a.cache_dir.rglob("*.npz")), sorted(b.cache_dir.rglob("*.npz"))):
        with np.load(fa) as x, np.load(fb) as y:
            assert np.array_equal(x["tokens"], y["tokens"])
            assert np.array_equal(x["target_logits"], y["target_logits"])
