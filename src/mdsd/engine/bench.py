"""The benchmark behind ``mdsd bench``: autoregressive sampling, Hugging Face assisted
generation and mdsd tree decoding on the same prompts, seeds and sampling transform, in one
process.

Every method decodes every prompt with a seed derived from (seed, prompt index); one untimed
warm-up generation per method runs first. Reported per method: generated tokens, target forward
calls (counted by a forward hook, so the same way for every method), tokens per target call, block
efficiency (tokens per verification step), mean accepted drafts per step, acceptance by depth,
draft / target / verification time, tokens per second and speedups relative to autoregressive
sampling and to HF assisted generation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mdsd.engine.decode import (
    Autoregressive,
    DecodeStats,
    SamplingConfig,
    TreeConfig,
    TreeDecoder,
    encode_prompt,
    eos_ids,
)

WARMUP_TOKENS = 8
DEFAULT_CONFIGS = (
    ("iid", "rrs", "1x4"),
    ("without_replacement", "rrs_without_replacement", "3x4"),
    ("greedy", "greedy", "3x4"),
    ("without_replacement", "rrs_without_replacement", "2,2,1,1"),
)


@dataclass
class MethodResult:
    name: str
    stats: DecodeStats
    target_calls: int

    def row(self) -> dict:
        s = self.stats
        out = {"method": self.name} | s.as_dict()
        out["target_calls"] = self.target_calls
        out["tokens_per_call"] = s.new_tokens / self.target_calls if self.target_calls else None
        out["acceptance_by_depth"] = [float(a) for a in out["acceptance_by_depth"]]
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}


class _CallCounter:
    """Counts forward calls of a module (a forward hook), whoever makes them."""

    def __init__(self, module):
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1

    def close(self):
        self._handle.remove()


def _seeds(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, i]) for i in range(n)]


def run_decoder(name, decoder, prompts, seed, progress=None) -> MethodResult:
    """Decode the prompts one by one (prompt i with seed (seed, i)), after an untimed warm-up."""
    real = decoder.sampling
    decoder.sampling = dataclasses.replace(real, max_new_tokens=WARMUP_TOKENS)
    decoder.generate_one(prompts[0], np.random.default_rng(seed))
    decoder.sampling = real
    counter = _CallCounter(decoder.pair.target)
    total = None
    try:
        for prompt, rng in zip(prompts, _seeds(seed, len(prompts))):
            stats = decoder.generate_one(prompt, rng).stats
            total = stats if total is None else total.merge(stats)
            if progress:
                progress()
    finally:
        counter.close()
    return MethodResult(name, total, counter.count)


def run_hf_assisted(pair, prompts, sampling: SamplingConfig, seed, progress=None) -> MethodResult:
    """``target.generate(..., assistant_model=draft)``: HF's single-draft speculative sampling.

    HF samples with torch's global generator; it is seeded per prompt inside
    ``torch.random.fork_rng`` so the caller's global state is left untouched.
    """
    eos = sorted(eos_ids(pair))
    greedy = sampling.temperature == 0
    kwargs = dict(
        assistant_model=pair.draft,
        do_sample=not greedy,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=eos[0] if eos else 0,
        eos_token_id=(eos if sampling.stop_on_eos and eos else None),
    )
    if not greedy:
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or 0,
                      top_p=sampling.top_p if sampling.top_p is not None else 1.0)
    if not sampling.stop_on_eos:
        kwargs["min_new_tokens"] = sampling.max_new_tokens

    def one(ids, s, max_new):
        input_ids = torch.tensor([ids], device=pair.target.device)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(s)
            out = pair.target.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                       **{**kwargs, "max_new_tokens": max_new,
                                          "min_new_tokens": min(kwargs.get("min_new_tokens", 0),
                                                                max_new)})
        return out.shape[1] - input_ids.shape[1]

    encoded = [encode_prompt(pair, p) for p in prompts]
    one(encoded[0], seed, WARMUP_TOKENS)
    counter = _CallCounter(pair.target)
    stats = DecodeStats(depth=0)
    try:
        for i, ids in enumerate(encoded):
            start = time.perf_counter()
            new = one(ids, seed * 100003 + i, sampling.max_new_tokens)
            stats.total_time += time.perf_counter() - start
            stats.new_tokens += new
            stats.sequences += 1
            if progress:
                progress()
    finally:
        counter.close()
    stats.target_calls = counter.count
    stats.draft_time = stats.target_time = stats.verify_time = float("nan")  # not measured
    return MethodResult("hf_assisted", stats, counter.count)


def run_bench(pair, prompts: Sequence, sampling: SamplingConfig,
              configs: Sequence[TreeConfig], *, seed: int = 0, hf: bool = True,
              autoregressive: bool = True,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Run every method over the prompts; rows of statistics with speedups (see module doc)."""
    results: list[MethodResult] = []
    tick = (lambda name: (lambda: progress(name))) if progress else (lambda name: None)
    if autoregressive:
        results.append(run_decoder("autoregressive", Autoregressive(pair, sampling), prompts,
                                   seed, tick("autoregressive")))
    if hf:
        results.append(run_hf_assisted(pair, prompts, sampling, seed, tick("hf_assisted")))
    for config in configs:
        name = f"mdsd {config.describe()}"
        results.append(run_decoder(name, TreeDecoder(pair, config, sampling), prompts, seed,
                                   tick(name)))
    rows = [r.row() for r in results]
    base = {r["method"]: r["tokens_per_second"] for r in rows}
    for row in rows:
        tps = row["tokens_per_second"]
        row["speedup_vs_autoregressive"] = (tps / base["autoregressive"]
                                            if "autoregressive" in base else None)
        row["speedup_vs_hf_assisted"] = tps / base["hf_assisted"] if "hf_assisted" in base else None
    return rows
