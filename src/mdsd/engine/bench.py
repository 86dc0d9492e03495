"""The benchmark behind ``mdsd bench``: autoregressive sampling, Hugging Face assisted
generation and mdsd tree decoding on the same prompts, seeds and sampling transform, in one
process.

Every method decodes every prompt with a seed derived from (seed, prompt index), methods
interleaved prompt by prompt; one untimed warm-up generation per method runs first. With
``repeats`` R each prompt is decoded R times per method (interleaved) and the fastest run kept.
Reported per method: generated tokens, target forward calls (counted by a forward hook, so the same way for
every method), tokens per target call, block efficiency (tokens per verification step), mean
accepted drafts per step, acceptance by depth, draft / target / verification time, tokens per
second and speedups relative to autoregressive sampling and to HF assisted generation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mdsd.engine.decode import Autoregressive, TreeDecoder, encode_prompt, eos_ids
from mdsd.engine.records import DecodeStats, SamplingConfig, TreeConfig
from mdsd.engine.runner import steady_attention

WARMUP_TOKENS = 8
DEFAULT_CONFIGS = (  # single-draft chains and multi-draft trees at the same depths
    ("iid", "rrs", "1x3"),
    ("without_replacement", "rrs_without_replacement", "3x3"),
    ("greedy", "greedy", "2x3"),
    ("iid", "rrs", "1x4"),
    ("without_replacement", "rrs_without_replacement", "3x4"),
    ("greedy", "greedy", "3x4"),
)
# with the draft's output layer over a quarter of the vocabulary (FR-Spec's ratio, 32k of 128k;
# ``mdsd.engine.vocab``): a short chain and the auto shape
SMALL_VOCAB_CONFIGS = (
    ("iid", "rrs", "1x2"),
    ("without_replacement", "rrs_without_replacement", "auto"),
)


def default_configs(
    vocab: int, draft_vocab: int | None = None, draft_weights: str = "exact"
) -> list[TreeConfig]:
    """``mdsd bench``'s grid for a pair of ``vocab`` tokens: ``DEFAULT_CONFIGS`` and, with the
    draft over vocab // 4 tokens, ``SMALL_VOCAB_CONFIGS``; with ``draft_vocab`` K, the grid alone
    with every draft over K tokens; every draft with ``draft_weights``."""
    grid = [
        TreeConfig.make(tree, law, verifier, draft_vocab, draft_weights)
        for law, verifier, tree in DEFAULT_CONFIGS
    ]
    if draft_vocab is not None or vocab < 8:
        return grid
    small = [
        TreeConfig.make(tree, law, verifier, vocab // 4, draft_weights)
        for law, verifier, tree in SMALL_VOCAB_CONFIGS
    ]
    return grid + small


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
    """Counts forward calls of a module (a forward hook), whoever makes them through it."""

    def __init__(self, module):
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)  # the decoder stack: every forward

    def _hook(self, *args):
        self.count += 1

    def close(self):
        self._handle.remove()


def _seed_of(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, i])


class _DecoderMethod:
    """One mdsd or autoregressive decoder, run prompt by prompt."""

    def __init__(self, name, decoder):
        self.name, self.decoder, self.stats = name, decoder, None

    def warm_up(self, prompt, seed):
        real = self.decoder.sampling
        self.decoder.sampling = dataclasses.replace(real, max_new_tokens=WARMUP_TOKENS)
        try:
            self.decoder.generate_one(prompt, np.random.default_rng(seed))
        finally:
            self.decoder.sampling = real

    def run(self, prompt, seed, i) -> DecodeStats:
        return self.decoder.generate_one(prompt, _seed_of(seed, i)).stats


class _HFAssisted:
    """``target.generate(..., assistant_model=draft)``: HF's single-draft speculative sampling.

    HF samples with torch's global generator; it is seeded per prompt inside
    ``torch.random.fork_rng`` so the caller's global state is left untouched.
    """

    name = "hf_assisted"

    def __init__(self, pair, sampling: SamplingConfig):
        eos = sorted(eos_ids(pair))
        greedy = sampling.temperature == 0
        self.pair, self.sampling = pair, sampling
        self.kwargs = dict(
            assistant_model=pair.draft,
            do_sample=not greedy,
            pad_token_id=eos[0] if eos else 0,
            eos_token_id=(eos if sampling.stop_on_eos and eos else None),
        )
        if not greedy:
            self.kwargs.update(
                temperature=sampling.temperature,
                top_k=sampling.top_k or 0,
                top_p=sampling.top_p if sampling.top_p is not None else 1.0,
            )
        self.stats = None

    def _generate(self, prompt, seed, max_new):
        ids = encode_prompt(self.pair, prompt)
        input_ids = torch.tensor([ids], device=self.pair.target.device)
        min_new = 0 if self.sampling.stop_on_eos else max_new
        with torch.random.fork_rng(devices=[]), torch.inference_mode(), steady_attention(input_ids.device):
            torch.manual_seed(seed)
            out = self.pair.target.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new,
                min_new_tokens=min_new,
                **self.kwargs,
            )
        return out.shape[1] - input_ids.shape[1]

    def warm_up(self, prompt, seed):
        self._generate(prompt, seed, WARMUP_TOKENS)

    def run(self, prompt, seed, i) -> DecodeStats:
        start = time.perf_counter()
        new = self._generate(prompt, seed * 100003 + i, self.sampling.max_new_tokens)
        return DecodeStats(depth=0, sequences=1, new_tokens=new, total_time=time.perf_counter() - start)


def _timed_run(method, pair, prompt, seed: int, i: int) -> tuple[DecodeStats, int]:
    """One decoding of prompt i by ``method``: its statistics and the target forwards the hook saw."""
    counter = _CallCounter(pair.target.base_model)
    try:
        return method.run(prompt, seed, i), counter.count
    finally:
        counter.close()


def _own_calls(method) -> int:
    """Target forwards an mdsd decoder made through a runner that no forward hook sees."""
    from mdsd.engine.static_llama import StaticLlamaRunner

    decoder = getattr(method, "decoder", None)
    runner = getattr(getattr(decoder, "_plain", None) or decoder, "target", None)
    return method.stats.target_calls if isinstance(runner, StaticLlamaRunner) else 0


def _add_profile(rows: list[dict], results: list[MethodResult]) -> None:
    """Per step of each tree method, in autoregressive steps of the same run (AR time / token):
    ``draft_level_ar_steps`` (draft forward + output layer per level; for a chain drafted in one
    compiled call, ``StaticLlamaRunner.sample_chain``, also its q transform and draw, a few
    microseconds), ``target_forward_ar_steps``
    (the tree forward + output layer of the visited rows), ``overhead_ar_steps`` (everything
    outside the two models: sampling transform, drafting, verification, cache bookkeeping)."""
    base = next((r.stats for r in results if r.name == "autoregressive"), None)
    if base is None or not base.new_tokens:
        return
    ar_step = base.total_time / base.new_tokens
    for row, result in zip(rows, results):
        s = result.stats
        if not s.steps or not s.depth:
            continue
        outside = s.total_time - s.draft_model_time - s.target_model_time
        row["draft_level_ar_steps"] = s.draft_model_time / (s.steps * s.depth) / ar_step
        row["target_forward_ar_steps"] = s.target_model_time / s.steps / ar_step
        row["overhead_ar_steps"] = outside / s.steps / ar_step


def run_bench(
    pair,
    prompts: Sequence,
    sampling: SamplingConfig,
    configs: Sequence[TreeConfig],
    *,
    seed: int = 0,
    hf: bool = True,
    autoregressive: bool = True,
    matmul: str = "auto",
    matmul_baseline: str | None = None,
    repeats: int = 1,
    general_loop: bool = False,
    level_by_level: bool = False,
    unfused: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run every method over the prompts; rows of statistics with speedups (see module doc).

    ``repeats`` R: every method decodes every prompt R times (the same tokens each time: a run is
    a function of the seed) and the fastest of the R runs is kept, which filters out the slow
    spells of a shared machine. Raises ValueError naming ``repeats`` unless it is >= 1.

    ``matmul``: the lean forward's projection backend for every mdsd method
    (``mdsd.engine.static_llama.choose_matmul``); ``matmul_baseline`` adds a second
    autoregressive row with that backend ("autoregressive (matmul torch)"), so a run shows
    what the backend alone is worth.

    ``general_loop``: every chain that runs the lean loop (``TreeDecoder.fast_chain``) also runs
    on the general loop, as a row "... (general loop)" (the same tokens, so the rows differ in
    time only).

    ``level_by_level``: every chain that runs the lean loop, and every tree of a law drafted in
    one call, also runs with its draft levels one by one (``TreeDecoder.compiled_draft`` False;
    ``TreeDecoder.one_call_drafting``), as a row "... (drafted level by level)"; the same tokens
    (where the transform is not the tempered softmax after an optional top-k both rows run the
    same code).

    ``unfused``: every tree or chain whose step runs in one compiled call
    (``TreeDecoder.one_call_steps``) also runs with its step in three calls
    (``TreeDecoder.fused_step`` False), as a row "... (step in three calls)"; the same tokens.

    Methods are interleaved prompt by prompt (prompt 1 with every method, then prompt 2, ...), so
    a change in machine load during the run affects all methods alike.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    methods = []
    if autoregressive:
        methods.append(_DecoderMethod("autoregressive", Autoregressive(pair, sampling, matmul=matmul)))
    if matmul_baseline is not None:
        plain = Autoregressive(pair, sampling, matmul=matmul_baseline)
        methods.append(_DecoderMethod(f"autoregressive (matmul {matmul_baseline})", plain))
    if hf:
        methods.append(_HFAssisted(pair, sampling))
    for config in configs:
        decoder = TreeDecoder(pair, config, sampling, matmul=matmul)
        name = f"mdsd {config.describe()}"
        if config.tree is None:  # auto: calibrate on these prompts, name the chosen shape
            choice = decoder.choose_tree(prompts)
            name += f" ({choice.describe()})"
        methods.append(_DecoderMethod(name, decoder))
        if general_loop and decoder.fast_chain:
            general = TreeDecoder(pair, config, sampling, matmul=matmul)
            general.fast_chain = False
            methods.append(_DecoderMethod(f"{name} (general loop)", general))
        if unfused and decoder.one_call_steps:
            three = TreeDecoder(pair, config, sampling, matmul=matmul)
            three.fused_step = False
            methods.append(_DecoderMethod(f"{name} (step in three calls)", three))
        if level_by_level and decoder.one_call_drafting:
            levels = TreeDecoder(pair, config, sampling, matmul=matmul)
            levels.compiled_draft = False
            methods.append(_DecoderMethod(f"{name} (drafted level by level)", levels))
    for method in methods:
        method.warm_up(prompts[0], seed)
    counters = {}
    for i, prompt in enumerate(prompts):
        fastest = {}  # method name -> (stats, forward calls) of its fastest run of this prompt
        for _ in range(repeats):
            for method in methods:
                stats, calls = _timed_run(method, pair, prompt, seed, i)
                if method.name not in fastest or stats.total_time < fastest[method.name][0].total_time:
                    fastest[method.name] = (stats, calls)
                if progress:
                    progress(method.name)
        for method in methods:
            stats, calls = fastest[method.name]
            method.stats = stats if method.stats is None else method.stats.merge(stats)
            counters[method.name] = counters.get(method.name, 0) + calls
    results = []
    for method in methods:
        stats = method.stats
        if isinstance(method, _HFAssisted):
            stats.target_calls = counters[method.name]
            stats.draft_time = stats.target_time = stats.verify_time = float("nan")  # unmeasured
        # mdsd's lean runner bypasses the module the hook watches: its own count is added
        results.append(MethodResult(method.name, stats, counters[method.name] + _own_calls(method)))
    rows = [r.row() for r in results]
    _add_profile(rows, results)
    for row, method in zip(rows, methods):
        choice = getattr(getattr(method, "decoder", None), "auto_choice", None)
        if choice is not None:
            row["chosen_tree"] = choice.describe()
            row["predicted_tokens_per_second"] = choice.tokens_per_s
            row["predicted_speedup_vs_autoregressive"] = choice.predicted_speedup
            ceiling = method.decoder.auto_ceiling
            row["ceiling_tree"] = ceiling.describe()
            row["ceiling_speedup_vs_autoregressive"] = ceiling.predicted_speedup
    base = {r["method"]: r["tokens_per_second"] for r in rows}
    for row in rows:
        tps = row["tokens_per_second"]
        row["speedup_vs_autoregressive"] = tps / base["autoregressive"] if "autoregressive" in base else None
        row["speedup_vs_hf_assisted"] = tps / base["hf_assisted"] if "hf_assisted" in base else None
    _add_decode_speedup(rows)
    return rows


def auto_note(row: dict) -> str:
    """The line that sets an auto row's prediction (the decoding phase's steady state) against
    its measurement in the decoding phase, with the overall speedup and the ceiling."""
    measured = row.get("decode_tokens_per_second")
    there = (
        f"measured {measured:.1f} tokens/s ({row['decode_speedup_vs_autoregressive']:.2f}x) there, "
        if measured is not None
        else ""
    )
    return (
        f"{row['method']}: predicted {row['predicted_tokens_per_second']:.1f} tokens/s "
        f"({row['predicted_speedup_vs_autoregressive']:.2f}x autoregressive) in the decoding phase, "
        f"{there}{row['speedup_vs_autoregressive']:.2f}x overall; ceiling if drafting and "
        f"verification were free: {row['ceiling_speedup_vs_autoregressive']:.2f}x ({row['ceiling_tree']})"
    )


def prefill_note(rows: list[dict]) -> str | None:
    """The line that reports the prompts' share of plain sampling's time (``prefill_share``),
    printed under the table by ``mdsd bench`` and ``benchmarks/bench_decode.py``; None without it."""
    share = next((r["prefill_share"] for r in rows if "prefill_share" in r), None)
    if share is None:
        return None
    return (
        f"The prompts' forwards (prefill, paid by every method) took {100 * share:.1f}% of plain "
        "sampling's time; 'vs AR, decoding only' leaves each method's out."
    )


def _add_decode_speedup(rows: list[dict]) -> None:
    """``prefill_share`` (autoregressive row: the prompts' forwards over its whole time) and, per
    mdsd row, ``decode_tokens_per_second`` (tokens/s with the method's prefill left out: the
    target's first forward of each prompt, which every method pays; what auto's prediction is
    about) and ``decode_speedup_vs_autoregressive``, the speedup of the decoding phase alone.
    None where a method's prefill is not timed (HF assisted)."""
    base = next((r for r in rows if r["method"] == "autoregressive"), None)
    if base is None or not base.get("prefill_time_s"):
        return
    base["prefill_share"] = base["prefill_time_s"] / base["total_time_s"]

    def decode_seconds_per_token(row):
        return (row["total_time_s"] - row["prefill_time_s"]) / row["new_tokens"]

    for row in rows:
        if row.get("prefill_time_s"):
            row["decode_tokens_per_second"] = 1.0 / decode_seconds_per_token(row)
            speedup = decode_seconds_per_token(base) / decode_seconds_per_token(row)
            row["decode_speedup_vs_autoregressive"] = speedup
