"""mdsd.experiments.capture: the prompts file reader and deterministic captures."""

from __future__ import annotations

import json

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


def test_capture_on_processes_writes_the_same_files(tiny, tmp_path):
    """Two capture processes (one prompt each at a time) write byte-identical arrays to one
    process's: each prompt is generated alone from its own seeded generator."""
    config = measure_config(tiny)
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
