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


def _tiny_pair(tiny):
    from mdsd.models import load_pair

    return load_pair(tiny["target"], tiny["draft"], device="cpu")


def test_lean_capture_matches_the_hugging_face_forward(tiny, one_thread):
    """The lean capture (the temperatures as chains of one tree through ``StaticLlamaRunner``)
    gives the Hugging Face batched capture's tokens and, position by position, both models'
    logits to float32 rounding. A second pass makes the most frequent generated token the EOS,
    so chains stop at different lengths: the masks of unequal chains and the draft's single
    forward over them are covered too."""
    pair = _tiny_pair(tiny)
    forwards = capture.lean_forwards(pair)
    assert forwards is not None
    config = measure_config(tiny, max_new_tokens=24, temperatures=(0.3, 0.7, 1.0, 1.5, 2.0))
    temperatures = [float(t) for t in config.temperatures]
    rows = load_prompts(config.prompts, config.num_prompts)

    def compare() -> tuple[list[int], list[int]]:
        lengths, generated = [], []
        for row in rows:
            hf = capture.generate_rows(pair, row, temperatures, config)
            lean = capture.generate_rows(pair, row, temperatures, config, forwards)
            for a, b in zip(hf, lean):
                assert np.array_equal(a.tokens, b.tokens), row
                for x, y in ((a.target_logits, b.target_logits), (a.draft_logits, b.draft_logits)):
                    assert x.shape == y.shape == (a.tokens.size, 32) and x.dtype == y.dtype == np.float32
                    scale = max(1.0, float(np.abs(x).max()))
                    np.testing.assert_allclose(y, x, rtol=0, atol=2e-6 * scale)
                lengths.append(a.tokens.size)
                generated += a.tokens.tolist()
        return lengths, generated

    lengths, generated = compare()
    assert set(lengths) == {24}  # the tiny models' own EOS is never drawn here
    pair.tokenizer.eos_token = f"w{np.bincount(generated).argmax()}"
    lengths, _ = compare()
    assert len(set(lengths)) > 2 and min(lengths) < 24


def test_capture_lean_switch_and_non_llama_models(tiny, tmp_path):
    """``capture(lean=False)`` (the Hugging Face forward) writes the same tokens and logits to
    float32 rounding as the default lean capture; a GPT-2 pair has no lean runner and is
    captured through the Hugging Face forward."""
    from mdsd.models import load_pair

    from conftest import save_tiny_model

    config = measure_config(tiny, top_k=8)
    lean = capture.capture(config, tmp_path / "lean")
    hf = capture.capture(config, tmp_path / "hf", lean=False)
    files = sorted(lean.cache_dir.rglob("*.npz"))
    assert len(files) == 8 and lean.positions == hf.positions
    for fa in files:
        with np.load(fa) as x, np.load(hf.cache_dir / fa.relative_to(lean.cache_dir)) as y:
            assert np.array_equal(x["tokens"], y["tokens"])
            for name in ("target", "draft"):
                assert np.array_equal(x[f"{name}_index"], y[f"{name}_index"])
                np.testing.assert_allclose(x[f"{name}_logits"], y[f"{name}_logits"], rtol=1e-5, atol=1e-5)

    root = tmp_path / "gpt2"
    gpt2 = {
        "target": str(save_tiny_model(root / "target", vocab=32, hidden=16, layers=1, seed=2, kind="gpt2")),
        "draft": str(save_tiny_model(root / "draft", vocab=32, hidden=16, layers=1, seed=3, kind="gpt2")),
        "prompts": tiny["prompts"],
    }
    assert capture.lean_forwards(load_pair(gpt2["target"], gpt2["draft"], device="cpu")) is None
    summary = capture.capture(measure_config(gpt2, num_prompts=1), tmp_path / "gpt2-cache")
    assert summary.generated == 4 and summary.positions > 0
