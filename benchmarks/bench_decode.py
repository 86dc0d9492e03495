"""Tree-decoding benchmark as a Markdown table (for BENCHMARKS.md, section "Tree decoding").

    python benchmarks/bench_decode.py --prompts 8 --max-new-tokens 96 --threads 1 \
        [--temperature T] [--top-k K] [--dtype bfloat16] [--prompts-file FILE] \
        [--target DIR --draft DIR] [--config LAW:VERIFIER:TREE[:DRAFT_VOCAB[:DRAFT_WEIGHTS]] ...]
        [--draft-vocab K] [--draft-weights int8]
        [--repeats R] [--general-loop] [--level-by-level] [--unfused] [--json out.json]

TREE may be ``auto`` (``mdsd.engine.auto``: chosen from a calibration on the same prompts; the
table then names the chosen shape and the predicted tokens/s). The profile columns give, per
verification step and in autoregressive steps of the same run, a draft level (forward + output
layer), the target's tree forward (+ output layer of the visited rows) and everything else.
"vs AR, decoding only" is the speedup with each method's prefill (the target's first forward of
each prompt, which every method pays) left out of its time.

Same runner as ``mdsd bench`` (``mdsd.engine.bench.run_bench``): autoregressive sampling, HF
assisted generation and the mdsd configurations on the same prompts (held-out prompts, the two
domains alternating) and per-prompt seeds, in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mdsd._threads import set_threads
from mdsd.engine import SamplingConfig, TreeConfig
from mdsd.engine.bench import auto_note, prefill_note, run_bench
from mdsd.engine.records import DRAFT_WEIGHTS
from mdsd.models import bundled_prompts, load_pair

CONFIGS = (
    "iid:rrs:1x3",
    "iid:rrs:1x4",
    "without_replacement:rrs_without_replacement:3x3",
    "without_replacement:rrs_without_replacement:3x4",
    "greedy:greedy:3x4",
    "iid:rrs:3x4",
    "without_replacement:rrs_without_replacement:2,2,1,1",
    "without_replacement:rrs_without_replacement:auto",
)


def alternating_prompts(n: int) -> list[str]:
    by_domain: dict[str, list[str]] = {}
    for row in bundled_prompts():
        by_domain.setdefault(row["domain"], []).append(row["prompt"])
    return [p for group in zip(*by_domain.values()) for p in group][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--config", action="append")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompts-file", help="one prompt per line (default: bundled held-out prompts)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--matmul", default="auto", choices=["auto", "numba", "numpy", "torch"])
    ap.add_argument(
        "--matmul-baseline", choices=["numba", "numpy", "torch"], help="add an autoregressive row with it"
    )
    ap.add_argument(
        "--draft-vocab", type=int, help="draft output layer over K tokens (mdsd.engine.vocab) in every config"
    )
    ap.add_argument(
        "--draft-weights",
        default="exact",
        choices=list(DRAFT_WEIGHTS),
        help="the draft's weights in every config (int8: int8 weights and activations)",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="decode each prompt R times per method, keep the fastest"
    )
    ap.add_argument(
        "--general-loop",
        action="store_true",
        help="run every chain on the lean loop also on the general loop (same tokens, a row each)",
    )
    ap.add_argument(
        "--level-by-level",
        action="store_true",
        help="run every chain on the lean loop and every tree drafted in one call also with its draft "
        "levels one by one (a row each)",
    )
    ap.add_argument(
        "--unfused",
        action="store_true",
        help="run every tree or chain whose step is one compiled call also with its step in three calls "
        "(a row each)",
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        set_threads(args.threads)
    pair = load_pair(target=args.target, draft=args.draft, dtype=args.dtype)
    sampling = SamplingConfig(
        args.temperature, args.top_k, args.top_p, args.max_new_tokens, stop_on_eos=False
    )
    configs = [
        TreeConfig.from_spec(spec, args.draft_vocab, args.draft_weights) for spec in args.config or CONFIGS
    ]
    if args.prompts_file:
        with open(args.prompts_file) as fh:
            prompts = [line.rstrip("\n") for line in fh if line.strip()][: args.prompts]
    else:
        prompts = alternating_prompts(args.prompts)
    start = time.time()
    rows = run_bench(
        pair,
        prompts,
        sampling,
        configs,
        seed=args.seed,
        hf=not args.no_hf,
        matmul=args.matmul,
        matmul_baseline=args.matmul_baseline,
        repeats=args.repeats,
        general_loop=args.general_loop,
        level_by_level=args.level_by_level,
        unfused=args.unfused,
    )
    elapsed = time.time() - start

    print(
        f"pair {pair.name}; {len(prompts)} prompts x {args.max_new_tokens} new tokens; "
        f"T = {args.temperature}, top-k {args.top_k}, top-p {args.top_p}; seed {args.seed}; "
        f"torch threads {torch.get_num_threads()}; fastest of {args.repeats} run(s) per prompt; "
        f"{platform.processor() or platform.machine()}; "
        f"{elapsed:.0f} s\n"
    )
    print(
        "| method | tokens/call | tokens/step | accept by depth | draft / target / verify s "
        "| AR steps per step: draft level / target / other | tokens/s | vs AR | vs AR, decoding only "
        "| vs HF |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in rows:
        depth = ", ".join(f"{a:.2f}" for a in r["acceptance_by_depth"]) or "-"
        times = " / ".join(f(r[k], ".1f") for k in ("draft_time_s", "target_time_s", "verify_time_s"))
        profile = " / ".join(
            f(r.get(k), ".2f")
            for k in ("draft_level_ar_steps", "target_forward_ar_steps", "overhead_ar_steps")
        )
        print(
            f"| {r['method']} | {f(r['tokens_per_call'], '.2f')} | "
            f"{f(r['block_efficiency'], '.2f')} | {depth} | {times} | {profile} | "
            f"{f(r['tokens_per_second'], '.1f')} | {f(r['speedup_vs_autoregressive'], '.2f')} | "
            f"{f(r.get('decode_speedup_vs_autoregressive'), '.2f')} | "
            f"{f(r['speedup_vs_hf_assisted'], '.2f')} |"
        )
    note = prefill_note(rows)
    if note:
        print(f"\n{note}")
    for r in rows:
        if "chosen_tree" in r:
            print(f"\n{auto_note(r)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"pair": pair.name, "prompts": len(prompts), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
