"""Tokens per step of several drafts on the same trees, over seeds (no timing).

    python benchmarks/bench_drafts.py --draft mdsd-bundled/draft-distilled --draft OTHER_DIR \
        [--config LAW:VERIFIER:TREE[:DRAFT_VOCAB] ...] [--seeds 6] [--prompts 8] \
        [--max-new-tokens 96] [--temperature T] [--top-k K] [--threads 1]

A draft's worth in decoding is its tokens per verification step, which the speed grid
(``bench_decode.py``) measures for one seed only: at 8 prompts x 96 tokens one seed's draws move
a chain's tokens per step by ~5%, more than a better draft adds. Here every draft decodes the
same prompts (held-out prompts, the two domains alternating, as in ``bench_decode.py``) with
every configuration at seeds 0..S-1; the table gives the mean tokens per step over the seeds
(steps pooled per seed), its standard error over the seeds, and the ratio to the first draft.
The numbers are functions of the arguments only (no clock is read).
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_decode import alternating_prompts

from mdsd._threads import set_threads
from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder
from mdsd.models import load_pair


def tokens_per_step(decoder: TreeDecoder, prompts: list[str], seeds: int) -> np.ndarray:
    """[seeds] tokens per step of ``decoder`` over ``prompts``, one entry per seed."""
    out = np.empty(seeds)
    for seed in range(seeds):
        stats = [g.stats for g in decoder.generate(prompts, seed=seed)]
        out[seed] = sum(s.step_tokens for s in stats) / sum(s.steps for s in stats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target")
    ap.add_argument(
        "--draft", action="append", required=True, help="a draft (repeatable; the first is the baseline)"
    )
    ap.add_argument("--config", action="append", help="LAW:VERIFIER:TREE[:DRAFT_VOCAB] (repeatable)")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.seeds < 2:
        ap.error(f"--seeds must be at least 2 (a standard error needs two), got {args.seeds}")
    set_threads(args.threads)
    sampling = SamplingConfig(
        args.temperature, args.top_k, args.top_p, args.max_new_tokens, stop_on_eos=False
    )
    prompts = alternating_prompts(args.prompts)
    specs = args.config or ["iid:rrs:1x3:2048", "iid:rrs:1x3"]
    pairs = [load_pair(target=args.target, draft=draft) for draft in args.draft]

    print(
        f"{len(prompts)} prompts x {args.max_new_tokens} new tokens; T = {args.temperature}, "
        f"top-k {args.top_k}, top-p {args.top_p}; seeds 0-{args.seeds - 1}\n"
    )
    print("| config | draft | tokens/step | standard error | vs first draft |")
    print("|---|---|---|---|---|")
    for spec in specs:
        config = TreeConfig.from_spec(spec)
        base = None
        for draft, pair in zip(args.draft, pairs):
            values = tokens_per_step(TreeDecoder(pair, config, sampling), prompts, args.seeds)
            mean, sem = values.mean(), values.std(ddof=1) / np.sqrt(values.size)
            base = mean if base is None else base
            print(f"| {spec} | {draft} | {mean:.3f} | {sem:.3f} | {mean / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
