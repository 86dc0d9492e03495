"""Measure the numbers of MODEL_CARD.md for a target/draft pair (default: the bundled pair;
``--draft mdsd-bundled/draft-distilled`` for the distilled draft).

For each domain, on the held-out corpus of ``scripts/build_corpora.py`` (documents never seen
in training), teacher-forced over non-overlapping 512-token windows:

* held-out loss (mean next-token cross-entropy, nats) and perplexity of target and draft;
* mean single-draft acceptance ``sum_x min(p_x, q_x)`` per position, where
  ``p = softmax(target_logits / T)`` and ``q = softmax(draft_logits / T)`` are computed in
  float64 from float32 logits, at T = 0.3, 0.7, 1.0; and the greedy agreement
  ``argmax p == argmax q`` (the T -> 0 limit of the acceptance).

And the cost of one decoding step: batch 1, one new token, KV cache holding a 200-token held-out
context, ``--threads`` threads (2), median wall and CPU time of TIMING_STEPS calls per model, and
the target/draft ratios.

Usage::

    python scripts/model_card_stats.py [--max-windows 64] [--out data_build/model_card_stats.json]
    python scripts/model_card_stats.py --draft mdsd-bundled/draft-distilled \
        --out data_build/model_card_stats_distilled.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from mdsd.models import bundled_prompts, load_pair

REPO = Path(__file__).resolve().parents[1]
TOKEN_DIR = REPO / "data_build" / "tokens"
CONTEXT = 512
TEMPERATURES = (0.3, 0.7, 1.0)
BATCH_WINDOWS = 4
NUM_THREADS = 2
TIMING_CONTEXT = 200  # tokens in the KV cache before the timed steps
TIMING_WARMUP = 20
TIMING_STEPS = 200


def acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position ``sum_x min(p_x, q_x)``, p/q = softmax(logits / T) in float64.

    Args:
        target_logits, draft_logits: ``[positions, vocab]``.

    Returns:
        ``[positions]`` float64 in [0, 1]; 1 iff the two laws coincide.
    """
    p = torch.softmax(target_logits.double() / temperature, dim=-1)  # [positions, vocab]
    q = torch.softmax(draft_logits.double() / temperature, dim=-1)  # [positions, vocab]
    return torch.minimum(p, q).sum(dim=-1)


@torch.inference_mode()
def domain_stats(pair, stream: np.ndarray, max_windows: int) -> dict:
    n = min((stream.size - 1) // CONTEXT, max_windows)
    sums = {"target_nll": 0.0, "draft_nll": 0.0, "greedy": 0.0}
    sums |= {f"accept_T{t}": 0.0 for t in TEMPERATURES}
    count = 0
    for i in range(0, n, BATCH_WINDOWS):
        windows = [stream[j * CONTEXT : (j + 1) * CONTEXT] for j in range(i, min(n, i + BATCH_WINDOWS))]
        ids = torch.from_numpy(np.stack(windows).astype(np.int64))  # [b, CONTEXT]
        labels = ids[:, 1:].reshape(-1)  # [positions]
        vocab = pair.vocab_size
        t_logits = pair.target(input_ids=ids).logits[:, :-1].float().reshape(-1, vocab)
        d_logits = pair.draft(input_ids=ids).logits[:, :-1].float().reshape(-1, vocab)
        ce = torch.nn.functional.cross_entropy
        sums["target_nll"] += ce(t_logits.double(), labels, reduction="sum").item()
        sums["draft_nll"] += ce(d_logits.double(), labels, reduction="sum").item()
        sums["greedy"] += (t_logits.argmax(-1) == d_logits.argmax(-1)).double().sum().item()
        for t in TEMPERATURES:
            sums[f"accept_T{t}"] += acceptance(t_logits, d_logits, t).sum().item()
        count += labels.numel()
    out = {k: v / count for k, v in sums.items()}
    out["target_ppl"] = math.exp(out["target_nll"])
    out["draft_ppl"] = math.exp(out["draft_nll"])
    out["positions"] = count
    return out


@torch.inference_mode()
def decode_step_seconds(models: dict, context: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Median wall and CPU seconds of one cached single-token forward after ``context``.

    The models' steps are interleaved (target, draft, target, ...) so that both see the same
    load from other jobs on the machine, which keeps their ratio meaningful on a shared CPU.

    Args:
        models: ``{role: model}``.
        context: ``[1, seq]`` token ids put in each KV cache first.

    Returns:
        ``{role: (wall, cpu)}``: medians of ``time.perf_counter`` / ``time.process_time`` deltas.
    """
    state = {}
    for role, model in models.items():
        params = inspect.signature(model.forward).parameters
        key = "cache" if "cache" in params else "past_key_values"
        state[role] = {
            "key": key,
            "cache": model(input_ids=context, use_cache=True)[key],
            "token": context[:, -1:],
            "wall": [],
            "cpu": [],
        }  # token: [1, 1]
    for step in range(TIMING_WARMUP + TIMING_STEPS):
        for role, model in models.items():
            st = state[role]
            start, start_cpu = time.perf_counter(), time.process_time()
            out = model(input_ids=st["token"], use_cache=True, **{st["key"]: st["cache"]})
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            st["cache"], st["token"] = out[st["key"]], out.logits[:, -1:].argmax(-1)
            if step >= TIMING_WARMUP:
                st["wall"].append(elapsed)
                st["cpu"].append(elapsed_cpu)
    return {role: (float(np.median(st["wall"])), float(np.median(st["cpu"]))) for role, st in state.items()}


def timing_context(pair) -> torch.Tensor:
    text = "\n".join(row["prompt"] for row in bundled_prompts("code")[:6])
    ids = pair.tokenizer(text, return_tensors="pt")["input_ids"][:, :TIMING_CONTEXT]
    assert ids.shape[1] == TIMING_CONTEXT, ids.shape
    return ids  # [1, TIMING_CONTEXT]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-windows", type=int, default=64, help="per domain")
    parser.add_argument("--out", type=Path, default=REPO / "data_build" / "model_card_stats.json")
    parser.add_argument("--timing-only", action="store_true", help="measure the decode step only, print it")
    parser.add_argument("--threads", type=int, default=NUM_THREADS)
    parser.add_argument(
        "--draft", help="draft model (default: the bundled draft), e.g. mdsd-bundled/draft-distilled"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pair = load_pair(draft=args.draft)
    result: dict = {
        "pair": pair.name,
        "temperatures": list(TEMPERATURES),
        "threads": args.threads,
        "domains": {},
    }
    for role, model in (("target", pair.target), ("draft", pair.draft)):
        result[role] = {"parameters": sum(p.numel() for p in model.parameters())}

    context = timing_context(pair)
    models = {"target": pair.target, "draft": pair.draft}
    timings = {
        # each model's steps back to back, as while the draft proposes k tokens
        "standalone": {role: decode_step_seconds({role: m}, context)[role] for role, m in models.items()},
        # alternating single steps: the target's weights evict the draft's from the CPU caches
        "interleaved": decode_step_seconds(models, context),
    }
    for mode, steps in timings.items():
        for role, (wall, cpu) in steps.items():
            result[role][f"decode_step_{mode}_ms"] = 1e3 * wall
            result[role][f"decode_step_{mode}_cpu_ms"] = 1e3 * cpu
        for kind in (f"decode_step_{mode}_ms", f"decode_step_{mode}_cpu_ms"):
            result[f"{kind}_ratio"] = result["target"][kind] / result["draft"][kind]
            print(
                f"{kind}: target {result['target'][kind]:.3f}, draft {result['draft'][kind]:.3f}, "
                f"ratio {result[f'{kind}_ratio']:.2f}",
                flush=True,
            )

    if args.timing_only:
        return
    for domain in ("code", "prose"):
        stream = np.load(TOKEN_DIR / f"{domain}.heldout.npy")
        stats = domain_stats(pair, stream, args.max_windows)
        result["domains"][domain] = stats
        print(
            f"{domain}: {stats['positions']} positions, target ppl {stats['target_ppl']:.3f}, "
            f"draft ppl {stats['draft_ppl']:.3f}, greedy agreement {stats['greedy']:.4f}, "
            + ", ".join(f"accept T={t}: {stats[f'accept_T{t}']:.4f}" for t in TEMPERATURES),
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
