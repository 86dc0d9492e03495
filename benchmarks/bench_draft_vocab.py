"""What a draft vocabulary of K tokens costs in acceptance (``mdsd.engine.vocab``).

    python benchmarks/bench_draft_vocab.py [--sizes 1024,2048,4096,8192] [--temperature 0.7]

The ranking is ``draft_vocabulary`` (the draft's own samples, no data). The measure: at every
position of the bundled held-out prompts of the odd rows (both domains; teacher-forced: the
prompt text itself), p and q from full forwards of the pair with the sampling transform at
``--temperature``, and the single-draft acceptance sum_x min(p, q_S) with q_S the draft's law over
the kept tokens (``SamplingConfig.row_probs`` on the kept logits), averaged over positions,
against sum_x min(p, q) with the whole vocabulary. ``coverage`` is the draft's own mean mass of
the kept tokens over its samples (``DraftVocabulary.coverage``, temperature 1); ``ranking s``
the wall time of ``draft_vocabulary`` (one thread).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mdsd._threads import set_threads
from mdsd.engine import SamplingConfig
from mdsd.engine.vocab import draft_vocabulary
from mdsd.models import bundled_prompts, load_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048,4096,8192")
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()
    set_threads(1)
    pair = load_pair()
    vocab = int(pair.draft.config.vocab_size)
    sampling = SamplingConfig(args.temperature)
    target_logits, draft_logits = [], []
    with torch.inference_mode():
        for row in bundled_prompts()[1::2]:
            ids = torch.tensor([pair.tokenizer.encode(row["prompt"])])
            target_logits.append(pair.target(input_ids=ids).logits[0].float().numpy())
            draft_logits.append(pair.draft(input_ids=ids).logits[0].float().numpy())
    target_logits, draft_logits = np.concatenate(target_logits), np.concatenate(draft_logits)
    p = sampling.probs(target_logits)  # [positions, V]
    print(f"{p.shape[0]} positions; T = {args.temperature}\n")
    print("| K | ranking s | coverage | acceptance | vs whole vocabulary |")
    print("|---|---|---|---|---|")
    whole = None
    for size in sorted((int(k) for k in args.sizes.split(",")), reverse=True):
        if size == vocab:
            kept, coverage, seconds = np.arange(vocab), 1.0, 0.0
        else:
            start = time.perf_counter()
            ranked = draft_vocabulary(pair.draft, size)
            seconds = time.perf_counter() - start
            kept, coverage = ranked.token_ids, ranked.coverage
        q = np.stack([sampling.row_probs(row[kept], kept, vocab).dense() for row in draft_logits])
        acceptance = float(np.minimum(p, q).sum(axis=1).mean())
        whole = whole or acceptance
        print(f"| {size} | {seconds:.2f} | {coverage:.3f} | {acceptance:.4f} | {acceptance - whole:+.4f} |")


if __name__ == "__main__":
    main()
