"""Train the bundled tokenizer and target/draft model pair on this CPU, deterministically.

Stages (``--stage all`` runs them in order, each skipped with ``--stage`` to rerun one):

1. ``tokenizer``: byte-level BPE, vocabulary 8,192, trained with HF ``tokenizers`` on the train
   split of both corpora; saved as ``tokenizer.json`` + ``tokenizer_config.json``.
2. ``target``: LlamaForCausalLM, 6 layers, hidden 384 (about 13.8 M parameters, tied embeddings).
3. ``draft``: LlamaForCausalLM, 1 layer, hidden 256 (about 2.9 M parameters, tied embeddings).
4. ``distill``: ``draft-distilled``, the trained draft fine-tuned to the target's next-token
   distributions (forward KL, Hinton et al. 2015; for drafts, DistillSpec, Zhou et al. 2024):
   same architecture, higher acceptance. Run after ``target`` and ``draft``. Two runs, each
   saved to ``draft-distilled``: ``DISTILLED`` from the draft, then ``DISTILLED_MORE`` from
   its weights; ``--stage distill-more`` runs the second alone (it continues whatever
   ``draft-distilled`` holds).

Both models are trained as plain language models on 512-token windows drawn 5:3 from the two
domains (``code``, ``prose``), with AdamW, linear warm-up and cosine decay, bf16 autocast with
float32 master weights, and stored as float16 safetensors under ``src/mdsd/data/models/``.
The corpora come from ``scripts/build_corpora.py`` (``data_build/corpora``).

Usage (planned 45-60 minutes on 2 idle CPU cores; the run that produced the bundled weights
took 78 minutes on cores shared with other jobs, see MODEL_CARD.md)::

    nohup python scripts/train_pair.py > data_build/train_pair.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO / "data_build" / "corpora"
TOKEN_DIR = REPO / "data_build" / "tokens"
MODEL_DIR = REPO / "src" / "mdsd" / "data" / "models"
DOMAINS = ("code", "prose")
# share of each training batch per domain (the prose corpus is ~2.4x smaller than the code one)
DOMAIN_MIX = {"code": 5, "prose": 3}

VOCAB_SIZE = 8192
CONTEXT = 512
EOS = "<|endoftext|>"
PAD = "<|pad|>"
NUM_THREADS = 2


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and optimisation of one model of the pair."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    steps: int  # horizon of the cosine schedule
    decay_start: int  # from here the learning rate falls linearly ...
    stop: int  # ... to MIN_LR_RATIO x lr at this step, where training stops
    batch_size: int  # windows per step, split between domains by DOMAIN_MIX
    lr: float
    warmup_steps: int
    seed: int


# The runs were planned as full cosine schedules (1300 / 2000 steps) and, because other jobs
# slowed this shared 2-core machine about threefold, cut short during the target run: a linear
# decay to the final learning rate over the last 100 steps.  These specs replay that run.
TARGET = ModelSpec(
    "target",
    384,
    6,
    1024,
    6,
    steps=1300,
    decay_start=700,
    stop=800,
    batch_size=8,
    lr=1e-3,
    warmup_steps=100,
    seed=1,
)
DRAFT = ModelSpec(
    "draft",
    256,
    1,
    768,
    4,
    steps=2000,
    decay_start=500,
    stop=600,
    batch_size=8,
    lr=2e-3,
    warmup_steps=100,
    seed=2,
)

WEIGHT_DECAY = 0.1
ADAM_BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
MIN_LR_RATIO = 0.1  # cosine decays to this fraction of the peak learning rate
LOG_EVERY = 25
EVAL_EVERY = 250
EVAL_WINDOWS_DURING = 16  # per domain, during training; the final evaluation uses all


@dataclass(frozen=True)
class DistillSpec:
    """Fine-tuning of a trained student to a trained teacher's next-token distributions."""

    name: str  # directory written under MODEL_DIR
    student: str  # directory under MODEL_DIR it starts from
    teacher: str  # directory under MODEL_DIR whose distributions it learns
    steps: int  # cosine schedule from lr to MIN_LR_RATIO x lr over these steps
    warmup_steps: int
    batch_size: int  # windows per step, split between domains by DOMAIN_MIX
    lr: float
    seed: int


DISTILLED = DistillSpec(
    "draft-distilled",
    student="draft",
    teacher="target",
    steps=1800,
    warmup_steps=20,
    batch_size=8,
    lr=1e-3,
    seed=3,
)
# A second run on top of the first (its KL was still falling at the end): the same loss, from
# the saved 1,800-step weights, with fresh AdamW moments, other data windows and a lower peak.
DISTILLED_MORE = replace(DISTILLED, student=DISTILLED.name, steps=1500, lr=5e-4, seed=4)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_documents(domain: str, split: str) -> list[str]:
    path = CORPUS_DIR / f"{domain}.{split}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ---------------------------------------------------------------- 1. tokenizer
def train_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [t for d in DOMAINS for t in read_documents(d, "train")]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=CONTEXT,
    )
    fast.save_pretrained(out_dir)
    # transformers 5 writes its own class name; the 4.x name loads in both major versions
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    log(f"tokenizer: vocabulary {tok.get_vocab_size()} saved to {out_dir}")


def load_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(MODEL_DIR / "tokenizer")


def token_stream(domain: str, split: str) -> np.ndarray:
    """All documents of a split, tokenized, each followed by EOS; cached in data_build/tokens."""
    path = TOKEN_DIR / f"{domain}.{split}.npy"
    if path.exists():
        return np.load(path)
    tok = load_tokenizer()
    ids: list[int] = []
    for text in read_documents(domain, split):
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id)
    arr = np.asarray(ids, dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    log(f"tokens {domain}.{split}: {arr.size:,}")
    return arr


# ---------------------------------------------------------------- 2./3. models
def build_model(spec: ModelSpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)  # HF initialises from the global generator
    return LlamaForCausalLM(config)


def sample_batch(streams: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator) -> torch.Tensor:
    """``batch_size`` random CONTEXT-token windows, shared between domains by DOMAIN_MIX."""
    assert batch_size % sum(DOMAIN_MIX.values()) == 0, batch_size
    rows = []
    for domain, stream in streams.items():
        per_domain = batch_size // sum(DOMAIN_MIX.values()) * DOMAIN_MIX[domain]
        starts = rng.integers(0, stream.size - CONTEXT, size=per_domain)
        rows.extend(stream[s : s + CONTEXT] for s in starts)
    return torch.from_numpy(np.stack(rows).astype(np.int64))  # [batch, CONTEXT]


@torch.inference_mode()
def heldout_loss(model, stream: np.ndarray, max_windows: int | None = None) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over non-overlapping CONTEXT windows, float32."""
    n = (stream.size - 1) // CONTEXT
    if max_windows is not None:
        n = min(n, max_windows)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, 8):
        windows = [stream[j * CONTEXT : (j + 1) * CONTEXT] for j in range(i, min(n, i + 8))]
        ids = torch.from_numpy(np.stack(windows).astype(np.int64))  # [b, CONTEXT]
        logits = model(input_ids=ids).logits[:, :-1].float()  # [b, CONTEXT-1, vocab]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += ids[:, 1:].numel()
    model.train()
    return total / count, count


def lr_at(step: int, spec: ModelSpec) -> float:
    """Linear warm-up, cosine over ``spec.steps``, then from ``decay_start`` (after the warm-up)
    a linear fall to ``MIN_LR_RATIO * lr`` at ``stop``."""
    if step >= spec.decay_start:
        base = _cosine_lr(spec.decay_start, spec)
        frac = min(1.0, (step - spec.decay_start) / (spec.stop - spec.decay_start))
        return base + (spec.lr * MIN_LR_RATIO - base) * frac
    return warmup_cosine_lr(step, spec)


def warmup_cosine_lr(step: int, spec: ModelSpec | DistillSpec) -> float:
    """Linear warm-up over ``spec.warmup_steps``, then cosine from ``lr`` to
    ``MIN_LR_RATIO * lr`` at ``spec.steps``."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    return _cosine_lr(step, spec)


def _cosine_lr(step: int, spec: ModelSpec | DistillSpec) -> float:
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.lr * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * cosine)


def make_optimizer(model, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (dim >= 2) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=ADAM_BETAS,
    )


def optimizer_step(model, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Backward, gradient clipping to GRAD_CLIP, one update."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)


def final_heldout(model, heldout: dict[str, np.ndarray], name: str) -> dict:
    """Loss, perplexity and token count per domain over all held-out windows (logged)."""
    final = {}
    for d, s in heldout.items():
        loss, count = heldout_loss(model, s)
        final[d] = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
    log(
        f"{name} final held-out: "
        + ", ".join(f"{d} loss {v['loss']:.4f} ppl {v['perplexity']:.2f}" for d, v in final.items())
    )
    return final


def save_float16(model, name: str) -> None:
    """The weights as float16 safetensors (with the config) under MODEL_DIR / name."""
    out = MODEL_DIR / name
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    log(f"{name} saved to {out} (float16)")


def train_model(spec: ModelSpec, data_seed: int) -> dict:
    tokenizer = load_tokenizer()
    train = {d: token_stream(d, "train") for d in DOMAINS}
    heldout = {d: token_stream(d, "heldout") for d in DOMAINS}
    model = build_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{spec.name}: {n_params:,} parameters, {asdict(spec)}")

    opt = make_optimizer(model, spec.lr)
    rng = np.random.default_rng([data_seed, spec.seed])
    model.train()
    t0 = time.perf_counter()
    running = 0.0
    for step in range(spec.stop):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)
        ids = sample_batch(train, spec.batch_size, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        optimizer_step(model, opt, loss)
        running += loss.item()
        if (step + 1) % LOG_EVERY == 0:
            elapsed = time.perf_counter() - t0
            tok_s = (step + 1) * spec.batch_size * CONTEXT / elapsed
            log(
                f"{spec.name} step {step + 1}/{spec.stop} loss {running / LOG_EVERY:.4f} "
                f"lr {lr_at(step, spec):.2e} {tok_s:.0f} tok/s elapsed {elapsed / 60:.1f} min"
            )
            running = 0.0
        if (step + 1) % EVAL_EVERY == 0:
            losses = {d: heldout_loss(model, s, EVAL_WINDOWS_DURING)[0] for d, s in heldout.items()}
            log(
                f"{spec.name} step {step + 1} held-out loss (subset) "
                + ", ".join(f"{d} {v:.4f}" for d, v in losses.items())
            )
    train_seconds = time.perf_counter() - t0

    final = final_heldout(model, heldout, spec.name)
    save_float16(model, spec.name)
    return {
        "spec": asdict(spec),
        "parameters": n_params,
        "train_tokens": spec.stop * spec.batch_size * CONTEXT,
        "train_seconds": train_seconds,
        "heldout": final,
    }


# ---------------------------------------------------------------- 4. distillation
def load_trained(name: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(MODEL_DIR / name, dtype=torch.float32)


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q), p = softmax(teacher), q = softmax(student), temperature 1.

    Args:
        teacher_logits, student_logits: ``[batch, positions, vocab]``.
    """
    teacher_logp = torch.log_softmax(teacher_logits.float(), dim=-1)  # [b, t, vocab]
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)  # [b, t, vocab]
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1).mean()


def distill_model(spec: DistillSpec, data_seed: int) -> dict:
    train = {d: token_stream(d, "train") for d in DOMAINS}
    heldout = {d: token_stream(d, "heldout") for d in DOMAINS}
    teacher = load_trained(spec.teacher).eval()
    student = load_trained(spec.student).train()
    log(f"{spec.name}: {spec.student} distilled from {spec.teacher}, {asdict(spec)}")

    opt = make_optimizer(student, spec.lr)
    rng = np.random.default_rng([data_seed, spec.seed])
    t0 = time.perf_counter()
    running = 0.0
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, spec)
        ids = sample_batch(train, spec.batch_size, rng)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            teacher_logits = teacher(input_ids=ids).logits.float()  # [b, CONTEXT, vocab]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            student_logits = student(input_ids=ids).logits
        loss = distillation_loss(teacher_logits.clone(), student_logits)
        optimizer_step(student, opt, loss)
        running += loss.item()
        if (step + 1) % LOG_EVERY == 0:
            elapsed = time.perf_counter() - t0
            log(
                f"{spec.name} step {step + 1}/{spec.steps} KL {running / LOG_EVERY:.4f} "
                f"lr {warmup_cosine_lr(step, spec):.2e} elapsed {elapsed / 60:.1f} min"
            )
            running = 0.0
    train_seconds = time.perf_counter() - t0

    final = final_heldout(student, heldout, spec.name)
    save_float16(student, spec.name)
    return {
        "spec": asdict(spec),
        "train_tokens": spec.steps * spec.batch_size * CONTEXT,
        "train_seconds": train_seconds,
        "heldout": final,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--stage", choices=["all", "tokenizer", "target", "draft", "distill", "distill-more"], default="all"
    )
    parser.add_argument("--seed", type=int, default=0, help="data-order seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(NUM_THREADS)

    summary_path = MODEL_DIR / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}

    def write_summary() -> None:  # after every stage, so a later stage's failure keeps it
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    if args.stage in ("all", "tokenizer"):
        t = time.perf_counter()
        train_tokenizer(MODEL_DIR / "tokenizer")
        for d in DOMAINS:
            for split in ("train", "heldout"):
                (TOKEN_DIR / f"{d}.{split}.npy").unlink(missing_ok=True)
                token_stream(d, split)
        summary["tokenizer"] = {"vocab_size": VOCAB_SIZE, "seconds": time.perf_counter() - t}
    for spec in (TARGET, DRAFT):
        if args.stage in ("all", spec.name):
            summary[spec.name] = train_model(spec, args.seed)
            summary["seed"] = args.seed
            write_summary()
    if args.stage in ("all", "distill"):
        summary[DISTILLED.name] = distill_model(DISTILLED, args.seed)
        write_summary()
    if args.stage in ("all", "distill", "distill-more"):
        previous = summary.get(DISTILLED.name)  # the run whose weights this one continues
        summary[DISTILLED.name] = distill_model(DISTILLED_MORE, args.seed)
        if previous is not None:
            summary[DISTILLED.name]["continues"] = previous
    write_summary()
    log("done")


if __name__ == "__main__":
    main()
