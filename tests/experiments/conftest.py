"""Fixtures of the experiments tests: a tiny random Llama pair (vocabulary 32) with a prompts
file, the measurement configuration on it, and one measured sweep shared by the module."""

from __future__ import annotations

import json

import pytest

from mdsd.experiments.config import MeasureConfig
from mdsd.experiments.sweep import run_sweep

from conftest import save_tiny_model

TINY_VOCAB = 32
# tied embeddings, output head x20: p and q differ visibly
TINY = {"vocab": TINY_VOCAB, "tie_embeddings": True, "head_scale": 20.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pair")
    prompts = root / "prompts.jsonl"
    with prompts.open("w") as f:
        for dataset in ("alpha", "beta"):
            for i in range(2):
                words = " ".join(f"w{(5 * i + 3 * j + len(dataset)) % 30 + 2}" for j in range(6))
                f.write(json.dumps({"domain": dataset, "prompt": words}) + "\n")
    return {
        "target": str(save_tiny_model(root / "target", hidden=32, layers=2, seed=0, **TINY)),
        "draft": str(save_tiny_model(root / "draft", hidden=16, layers=1, seed=1, **TINY)),
        "prompts": str(prompts),
    }


def measure_config(tiny, **changes):
    base = MeasureConfig(
        target=tiny["target"],
        draft=tiny["draft"],
        prompts=tiny["prompts"],
        num_prompts=2,
        max_new_tokens=6,
        temperatures=(0.5, 1.0),
        ns=(1, 2, 3),
        top_k=None,
        mc_samples=4,
        subsample=("optimal:without_replacement", "kseq", "rrs:iid:3"),
        subsample_positions=5,
    )
    return base.with_(**changes)


@pytest.fixture(scope="module")
def measured(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("measure")
    run = run_sweep(measure_config(tiny), out)
    return out, run
