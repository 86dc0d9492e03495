"""Fixtures of the engine tests: random tiny Llama and GPT-2 pairs (vocabulary 12) and one torch
thread for every engine test module."""

from __future__ import annotations

import pytest
import torch

from mdsd.models import load_pair

from .helpers import VOCAB
from conftest import save_tiny_model

# every matrix x6: sharper random distributions than the default init
TINY = {"vocab": VOCAB, "max_positions": 48, "weight_scale": 6.0}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is ~10x faster than several on a busy machine."""
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    dirs = {}
    for kind in ("llama", "gpt2"):
        dirs[kind] = (
            save_tiny_model(root / f"{kind}_t", kind=kind, hidden=32, layers=2, seed=0, **TINY),
            save_tiny_model(root / f"{kind}_d", kind=kind, hidden=16, layers=1, seed=1, **TINY),
        )
    dirs["wide"] = save_tiny_model(
        root / "wide", **(TINY | {"vocab": VOCAB + 4}), hidden=16, layers=1, seed=2
    )
    return dirs


@pytest.fixture(scope="module")
def llama(tiny):
    return load_pair(target=tiny["llama"][0], draft=tiny["llama"][1])


@pytest.fixture(scope="module")
def gpt2(tiny):
    return load_pair(target=tiny["gpt2"][0], draft=tiny["gpt2"][1])


@pytest.fixture(scope="module")
def llama_cuda(tiny):
    """The tiny Llama pair in float32 on the CUDA device (skips where there is none)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return load_pair(target=tiny["llama"][0], draft=tiny["llama"][1], device="cuda", dtype="float32")
