"""Token-by-token against block verification on the same drafted chains, as a Markdown table.

    python benchmarks/bench_chain_verifiers.py --draft mdsd-bundled/draft-distilled \
        [--temperature T ...] [--depths 2,3,4,5] [--draft-vocab K ...] [--prompts 8] \
        [--max-new-tokens 96] [--seed 0]

Decodes the prompts with ``rrs`` chains of each depth (the draft over its K likeliest tokens,
or the whole vocabulary for K = 0) and, after every step, computes from that step's drafts and
its rows p (target) and q (draft) the *exact* expected tokens per step of both rules given those
drafts (``mdsd.sequence.chain_emission_law``, "token" and "block"; Rao-Blackwellised: no
sampling noise from the verification itself). Both rules see the same chains, so their ratio is
the gain in tokens per step of verifying the chain as a block (Sun et al., arXiv 2403.10444);
wall-clock speed is ``bench_decode.py``'s (``-c iid:block:1xD``). Deterministic for its seed.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bench_decode import alternating_prompts

from mdsd._threads import set_threads
from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder
from mdsd.engine.vocab import draft_vocabulary
from mdsd.engine.walk import as_support
from mdsd.models import load_pair
from mdsd.sequence import chain_emission_law, chain_expected_length


def expected_lengths(decoder: TreeDecoder, prompts: list[str], seed: int) -> np.ndarray:
    """[steps, 2]: per decoding step, the expected tokens per step of token and block
    verification given that step's drafted chain."""
    depth, rows = decoder.tree.depth, []

    def after_step(_prompt: int, _tokens: list[int]) -> None:
        step = decoder.last_step
        logits = decoder.target.logits(step.target_hidden)  # [depth + 1, V]
        target = np.stack([as_support(decoder.sampling.row_probs(row)).dense() for row in logits])
        draft = np.stack([as_support(step.drafted.draft_probs[n]).dense() for n in range(-1, depth - 1)])
        laws = (chain_emission_law(target, draft, step.drafted.tokens, v) for v in ("token", "block"))
        rows.append([chain_expected_length(law) for law in laws])

    decoder.generate(prompts, seed=seed, on_tokens=after_step)
    return np.array(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--temperature", type=float, action="append")
    ap.add_argument("--depths", default="2,3,4,5")
    ap.add_argument("--draft-vocab", type=int, action="append", help="K (0: the whole vocabulary)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    set_threads(1)
    pair = load_pair(target=args.target, draft=args.draft)
    prompts = alternating_prompts(args.prompts)
    depths = [int(d) for d in args.depths.split(",")]
    print(f"pair {pair.name}; {len(prompts)} prompts x {args.max_new_tokens} new tokens; seed {args.seed}\n")
    print(
        "| T | draft vocabulary | depth | steps | token: tokens/step | block: tokens/step | block / token |"
    )
    print("|---|---|---|---|---|---|---|")
    for temperature in args.temperature or [0.7, 1.0]:
        sampling = SamplingConfig(temperature, max_new_tokens=args.max_new_tokens, stop_on_eos=False)
        for size in args.draft_vocab or [2048, 0]:
            vocabulary = draft_vocabulary(pair.draft, size) if size else None
            for depth in depths:
                decoder = TreeDecoder(pair, TreeConfig.make((1,) * depth, "iid", "rrs"), sampling)
                decoder.use_draft_vocabulary(vocabulary)
                with torch.inference_mode():
                    lengths = expected_lengths(decoder, prompts, args.seed)
                token, block = lengths.mean(axis=0)
                print(
                    f"| {temperature} | {size or 'all'} | {depth} | {len(lengths)} | {token:.3f} | "
                    f"{block:.3f} | {block / token:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
