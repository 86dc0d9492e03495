"""Capture cost of ``mdsd measure``: the lean runner against the Hugging Face forward.

Generates the first ``--prompts`` prompts of every bundled domain at the default sweep's six
temperatures with the bundled pair (one torch thread, in this process), once through the models'
Hugging Face forward (the temperatures as one batch) and once through the lean Llama runner (the
temperatures as chains of one tree, ``mdsd.experiments.capture.lean_forwards``), and prints the
process CPU seconds per prompt of each, their ratio measured in this run, whether the tokens are
identical and the largest logit difference between the two.

    python benchmarks/bench_capture.py --prompts 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mdsd._threads import torch_threads
from mdsd.experiments import capture
from mdsd.experiments.config import DEFAULT
from mdsd.models import load_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, help="prompts per domain")
    args = ap.parse_args()
    with torch_threads(1):
        pair = load_pair(None, None, device="cpu")
        forwards = capture.lean_forwards(pair)
        rows = capture.load_prompts(None, args.prompts)
        temperatures = [float(t) for t in DEFAULT.temperatures]
        capture.generate_rows(pair, rows[0], temperatures[:1], DEFAULT.with_(max_new_tokens=2), forwards)
        cpu = {"hf": 0.0, "lean": 0.0}
        same, largest, positions = True, 0.0, 0
        for row in rows:
            results = {}
            for name, runner in (("hf", None), ("lean", forwards)):
                start = time.process_time()
                results[name] = capture.generate_rows(pair, row, temperatures, DEFAULT, runner)
                cpu[name] += time.process_time() - start
            for a, b in zip(results["hf"], results["lean"]):
                same &= np.array_equal(a.tokens, b.tokens)
                if a.tokens.size == b.tokens.size:
                    for x, y in ((a.target_logits, b.target_logits), (a.draft_logits, b.draft_logits)):
                        largest = max(largest, float(np.abs(x - y).max()))
                positions += a.tokens.size
    count = len(rows)
    print(f"{count} prompts x {len(temperatures)} temperatures, {positions} positions, one thread")
    print(f"Hugging Face forward (batched): {cpu['hf'] / count:.2f} CPU s per prompt")
    print(f"lean runner (chains of a tree): {cpu['lean'] / count:.2f} CPU s per prompt")
    print(f"ratio HF / lean: {cpu['hf'] / cpu['lean']:.2f}x")
    print(f"tokens identical: {same}; largest logit difference: {largest:.2e}")


if __name__ == "__main__":
    main()
