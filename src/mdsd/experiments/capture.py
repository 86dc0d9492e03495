"""Run the target and the draft on prompts and cache their logits at every generated position.

Protocol (Hu et al., ICLR 2025, Section 6): for each dataset, prompt and temperature T, the target
generates up to ``max_new_tokens`` tokens, sampling from p = process_logits(target logits, T,
top_k) with a seeded generator. At each generated position the target's logits (the ones sampled
from) are recorded; one forward of the draft over the finished sequence gives the draft's logits
at the same positions. The analysis later applies the same ``process_logits(T, top_k)`` to both.

Cache layout (one file per (dataset, T, prompt), written atomically, so an interrupted run
resumes where it stopped)::

    <cache_root>/<capture_key>-<weights>/meta.json
    <cache_root>/<capture_key>-<weights>/<dataset>/T0.70/0003-<sha8 of prompt>.npz

Each file holds ``tokens`` [G] (generated ids) and the logits of both models in one of two forms:

* ``top_k`` set: ``target_index``/``draft_index`` int32 [G, k] and ``target_logits``/
  ``draft_logits`` float32 [G, k]: each model's own top-k set (ties: lower token id), i.e.
  exactly the tokens with positive probability after the transform; nothing else is needed.
* full vocabulary: ``target_logits``/``draft_logits`` float16 [G, V] of (logits - row max). The
  analysis is exact for these stored (quantised) logits; near the top of a row the float16 step
  is <= 2^-11 nats.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdsd.experiments.config import MeasureConfig
from mdsd.logits import process_logits
from mdsd.sampling import categorical

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PromptRow:
    """One prompt of one dataset; ``index`` is its position within the dataset."""

    dataset: str
    index: int
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:8]


@dataclass(frozen=True)
class CaptureSummary:
    """What a capture run did: files generated now vs found in the cache."""

    cache_dir: Path
    generated: int
    cached: int
    positions: int


# ---------------------------------------------------------------- prompts
def load_prompts(prompts: str | Path | None, num_prompts: int | None) -> list[PromptRow]:
    """The first ``num_prompts`` prompts of every dataset.

    prompts: a JSONL file of objects with a ``prompt`` (or ``text``) field and an optional
        ``domain`` (or ``dataset``) field (default: the file's stem); None: the bundled held-out
        prompts of every domain (:func:`mdsd.models.bundled_prompts`).
    """
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if prompts is None:
        from mdsd.models import bundled_prompts

        records = bundled_prompts()
        default_dataset = "bundled"
    else:
        path = Path(prompts)
        if not path.is_file():
            raise ValueError(f"prompts file {str(path)!r} does not exist")
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
        default_dataset = path.stem
    rows: list[PromptRow] = []
    counts: dict[str, int] = {}
    for record in records:
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            raise ValueError(f"every prompt record needs a non-empty 'prompt' field, got {record!r}")
        dataset = str(record.get("domain", record.get("dataset", default_dataset)))
        index = counts.get(dataset, 0)
        if num_prompts is not None and index >= num_prompts:
            continue
        counts[dataset] = index + 1
        rows.append(PromptRow(dataset, index, text))
    if not rows:
        raise ValueError("no prompts to measure")
    return rows


# ---------------------------------------------------------------- cache paths
def temperature_dir(temperature: float) -> str:
    return f"T{temperature:.2f}"


def cache_file(cache_dir: Path, row: PromptRow, temperature: float) -> Path:
    return cache_dir / row.dataset / temperature_dir(temperature) / f"{row.index:04d}-{row.digest}.npz"


def weights_fingerprint(config: MeasureConfig) -> str:
    """Short hash of the weight files' sizes and mtimes (local or bundled models), so that
    retrained weights never reuse an old cache; a hub id is fingerprinted by its name only."""
    from importlib import resources

    parts = []
    for role, source in (("target", config.target), ("draft", config.draft)):
        path = (
            Path(str(resources.files("mdsd").joinpath("data", "models", role)))
            if source is None
            else Path(source)
        )
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else []
        parts.append([role, str(source)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8]


def cache_dir_for(cache_root: Path, config: MeasureConfig) -> Path:
    """``<cache_root>/<capture settings hash>-<weights fingerprint>``."""
    return Path(cache_root) / f"{config.capture_key()}-{weights_fingerprint(config)}"


def _write_meta(cache_dir: Path, config: MeasureConfig, pair_name: str, vocab: int) -> None:
    meta = {
        "format": FORMAT_VERSION,
        "pair": pair_name,
        "target": config.target,
        "draft": config.draft,
        "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        "vocab_size": vocab,
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"meta.json.tmp{os.getpid()}"  # atomic: capture processes may race here
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, cache_dir / "meta.json")


def _save_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


# ---------------------------------------------------------------- generation
def _row_rng(seed: int, row: PromptRow, temperature: float) -> np.random.Generator:
    """A generator per (seed, dataset, prompt, T): results do not depend on batching or order."""
    return np.random.default_rng(
        [seed, zlib.crc32(row.dataset.encode()), row.index, int(round(temperature * 1000))]
    )


def _cache_kwarg(model) -> str:
    """transformers 5.x names the KV cache ``cache``; 4.x named it ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _encode(tokenizer, text: str, room: int) -> list[int]:
    """Prompt ids, after the BOS token when the tokenizer has one, keeping the last ``room``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids[-room:]


@dataclass(frozen=True)
class Generated:
    """One generated sequence at one temperature and both models' logits at its positions."""

    tokens: np.ndarray  # [G] int64
    target_logits: np.ndarray  # [G, V] float32: the logits the token at each position was sampled from
    draft_logits: np.ndarray  # [G, V] float32: the draft's logits at the same positions


@dataclass(frozen=True)
class LeanForwards:
    """Both models behind the engine's lean Llama-family forward
    (:class:`mdsd.engine.static_llama.StaticLlamaRunner`: preallocated KV cache, no Hugging Face
    wrappers), built once per loaded pair and reused for every prompt."""

    target: object  # StaticLlamaRunner
    draft: object  # StaticLlamaRunner


def lean_forwards(pair) -> LeanForwards | None:
    """The lean runners of ``pair`` when both models support them
    (:func:`mdsd.engine.static_llama.supports_static`), else None: :func:`generate_rows` then
    uses the models' own Hugging Face forward."""
    from mdsd.engine.static_llama import StaticLlamaRunner, supports_static

    if not (supports_static(pair.target) and supports_static(pair.draft)):
        return None
    return LeanForwards(StaticLlamaRunner(pair.target), StaticLlamaRunner(pair.draft))


def _prompt_ids(pair, row: PromptRow, config: MeasureConfig) -> list[int]:
    max_positions = getattr(pair.target.config, "max_position_embeddings", None) or 1 << 30
    return _encode(pair.tokenizer, row.text, max(1, max_positions - config.max_new_tokens))


def _sample(logits: np.ndarray, temperature: float, config: MeasureConfig, rng: np.random.Generator) -> int:
    """One token from p = process_logits(logits [V], T, top_k)."""
    return int(categorical(process_logits(logits, temperature, config.top_k), rng))


def generate_rows(
    pair,
    row: PromptRow,
    temperatures: list[float],
    config: MeasureConfig,
    forwards: LeanForwards | None = None,
) -> list[Generated]:
    """Generate from one prompt at each temperature, recording both models' logits.

    Each temperature's sequence is sampled with its own seeded generator (:func:`_row_rng`)
    until EOS or ``config.max_new_tokens`` tokens. ``forwards`` (:func:`lean_forwards`): the
    lean runners, the temperatures as chains of one tree over the prompt; None: the Hugging
    Face forward, the temperatures as one batch. Both compute the same logits to
    float32 rounding (tested), hence the same tokens but for a draw that falls within that
    rounding of a boundary.
    """
    import torch

    prompt = _prompt_ids(pair, row, config)
    rngs = [_row_rng(config.seed, row, t) for t in temperatures]
    with torch.inference_mode():
        if forwards is None:
            return _generate_hf(pair, prompt, temperatures, rngs, config)
        return _generate_lean(forwards, prompt, temperatures, rngs, config, pair.tokenizer.eos_token_id)


def _generate_lean(
    forwards: LeanForwards,
    prompt: list[int],
    temperatures: list[float],
    rngs: list[np.random.Generator],
    config: MeasureConfig,
    eos: int | None,
) -> list[Generated]:
    """The temperatures' sequences as chains of one tree over the prompt (docs/theory.md §7):
    each target forward takes the newest token of every unfinished chain, each attending to
    the prompt and its own chain only (a 4-D mask, ``tree_hidden``), so the temperatures share
    the weight reads of one forward as a batch would, in one KV cache. Then one draft forward
    over every chain but its last token gives q at every generated position."""
    base = len(prompt)
    capacity = base + len(temperatures) * config.max_new_tokens
    target = forwards.target
    target.reset(capacity)
    first = target.logits(target.causal_hidden(np.asarray(prompt), keep=1))[0]  # [V]
    tokens: list[list[int]] = [[] for _ in temperatures]
    target_rows: list[list[np.ndarray]] = [[] for _ in temperatures]
    latest = [first] * len(temperatures)  # the logits each chain samples its next token from
    node_chain: list[int] = []  # the chain of every generated token in the target's cache
    active = list(range(len(temperatures)))
    while active:
        fed = []  # chains whose new token needs a forward
        for r in active:
            token = _sample(latest[r], temperatures[r], config, rngs[r])
            tokens[r].append(token)
            target_rows[r].append(latest[r])
            if token != eos and len(tokens[r]) < config.max_new_tokens:
                fed.append(r)
        if fed:
            node_chain += fed
            out = target.logits(_chain_forward(target, tokens, fed, node_chain, base))  # [F, V]
            for i, r in enumerate(fed):
                latest[r] = out[i]
        active = fed
    draft_rows = _draft_rows(forwards.draft, prompt, tokens, capacity)
    return [
        Generated(
            np.asarray(seq, dtype=np.int64),
            np.stack(rows).astype(np.float32),  # [G, V]
            draft.astype(np.float32),  # [G, V]
        )
        for seq, rows, draft in zip(tokens, target_rows, draft_rows)
    ]


def _chain_forward(runner, tokens: list[list[int]], fed: list[int], node_chain: list[int], base: int):
    """Hidden states [F, H] of the newest token of each chain in ``fed``; ``node_chain`` [C]
    names the chain of every generated token in the cache, these F last. A chain's token k sits
    at position base + k and sees the prompt and its own chain's tokens 0..k."""
    visible = np.asarray(node_chain)[None, :] == np.asarray(fed)[:, None]  # [F, C]
    return runner.tree_hidden(
        np.asarray([tokens[r][-1] for r in fed]),
        0,
        runner.additive(visible),
        np.asarray([len(tokens[r]) for r in fed]),  # depth below the prompt's last token
        root_position=base - 1,
        keep=len(fed),
    )


def _draft_rows(runner, prompt: list[int], tokens: list[list[int]], capacity: int) -> list[np.ndarray]:
    """The draft's logits [G, V] at every generated position of each chain: after the prompt,
    then after each chain token but the last (one forward of every chain at once)."""
    runner.reset(capacity)
    first = runner.logits(runner.causal_hidden(np.asarray(prompt), keep=1))  # [1, V]
    chain = np.concatenate([np.full(len(seq) - 1, r) for r, seq in enumerate(tokens)]).astype(np.int64)
    if chain.size == 0:
        return [first for _ in tokens]
    depth = np.concatenate([np.arange(1, len(seq)) for seq in tokens])  # [N]
    visible = (chain[None, :] == chain[:, None]) & (depth[None, :] <= depth[:, None])  # [N, N]
    hidden = runner.tree_hidden(
        np.concatenate([seq[:-1] for seq in tokens]),
        0,
        runner.additive(visible),
        depth,
        root_position=len(prompt) - 1,
        keep=chain.size,
    )
    later = runner.logits(hidden)  # [N, V]
    return [np.concatenate([first, later[chain == r]]) for r in range(len(tokens))]


def _generate_hf(pair, prompt: list[int], temperatures: list[float], rngs, config: MeasureConfig):
    """The temperatures as one batch through the models' Hugging Face forward (KV cache of the
    model); then one draft forward over the finished, end-padded sequences. On CUDA the forwards
    run SDPA without cuDNN's backend (``mdsd.engine.runner.steady_attention``)."""
    from mdsd.engine.runner import steady_attention

    with steady_attention(pair.device):
        return _generate_hf_rows(pair, prompt, temperatures, rngs, config)


def _generate_hf_rows(pair, prompt: list[int], temperatures: list[float], rngs, config: MeasureConfig):
    import torch

    tokenizer, target, draft = pair.tokenizer, pair.target, pair.draft
    eos = tokenizer.eos_token_id
    batch = len(temperatures)
    key = _cache_kwarg(target)
    device = pair.device
    tokens: list[list[int]] = [[] for _ in range(batch)]
    target_logits: list[list[np.ndarray]] = [[] for _ in range(batch)]
    done = [False] * batch
    ids = torch.tensor([prompt] * batch, device=device)  # [R, L]
    out = target(input_ids=ids, use_cache=True)
    for _ in range(config.max_new_tokens):
        logits = out.logits[:, -1].float().cpu().numpy()  # [R, V]
        step = []
        for r, temperature in enumerate(temperatures):
            if done[r]:
                step.append(eos if eos is not None else 0)
                continue
            token = _sample(logits[r], temperature, config, rngs[r])
            tokens[r].append(token)
            target_logits[r].append(logits[r].copy())
            done[r] = eos is not None and token == eos
            step.append(token)
        if all(d or len(t) >= config.max_new_tokens for t, d in zip(tokens, done)):
            break
        nxt = torch.tensor(step, device=device)[:, None]  # [R, 1]
        out = target(input_ids=nxt, use_cache=True, **{key: getattr(out, key)})

    # one draft forward over each finished sequence gives q at every generated position
    longest = max(len(t) for t in tokens)
    pad = eos if eos is not None else 0
    seqs = [prompt + t[:-1] + [pad] * (longest - len(t)) for t in tokens]  # drop last token
    draft_all = draft(input_ids=torch.tensor(seqs, device=device)).logits  # [R, L+G-1, V]
    draft_all = draft_all[:, len(prompt) - 1 :].float().cpu().numpy()  # [R, G, V]
    return [
        Generated(
            np.asarray(tokens[r], dtype=np.int64),
            np.stack(target_logits[r]).astype(np.float32),  # [G, V]
            draft_all[r, : len(tokens[r])].astype(np.float32),  # [G, V]
        )
        for r in range(batch)
    ]


def compress_logits(logits: np.ndarray, top_k: int | None) -> dict[str, np.ndarray]:
    """The cache form of [G, V] logits: top-k (index, value) pairs, or float16 (logits - max)."""
    if top_k is None or top_k >= logits.shape[-1]:
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return {"logits": shifted.astype(np.float16)}
    order = np.argsort(-logits.astype(np.float64), axis=-1, kind="stable")[:, :top_k]  # ties: lower id
    return {"index": order.astype(np.int32), "logits": np.take_along_axis(logits, order, axis=-1)}


# ---------------------------------------------------------------- front door
def missing_files(config: MeasureConfig, cache_root: str | Path) -> int:
    """How many (dataset, T, prompt) files of ``config`` the cache under ``cache_root`` lacks."""
    cache_dir = cache_dir_for(Path(cache_root), config)
    rows = load_prompts(config.prompts, config.num_prompts)
    return sum(not cache_file(cache_dir, row, float(t)).exists() for row in rows for t in config.temperatures)


def capture(
    config: MeasureConfig,
    cache_root: str | Path,
    *,
    pair=None,
    progress: Callable | None = None,
    workers: int = 1,
    lean: bool = True,
) -> CaptureSummary:
    """Make sure every (dataset, T, prompt) of ``config`` is cached; generate what is missing.

    The models are loaded (``mdsd.models.load_pair``) only when something is missing, unless a
    loaded ``pair`` is passed. ``progress(advance_positions, description)`` is called after each
    prompt if given. ``workers`` > 1 (and no ``pair``): the missing prompts are generated on that
    many local processes, each with its own copy of the pair and ``config.threads`` torch threads
    (one by default); every file is the same as from one process, since each prompt is generated
    alone from its own seeded generator. ``lean``: generate through the engine's lean forward
    where both models support it (:func:`lean_forwards`; 1.7x less CPU time for the bundled
    pair, ``benchmarks/bench_capture.py``), else through the Hugging Face forward; the two agree
    to float32 rounding.
    """
    rows = load_prompts(config.prompts, config.num_prompts)
    cache_dir = cache_dir_for(Path(cache_root), config)
    temperatures = [float(t) for t in config.temperatures]
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0 (T = 0 is greedy: alpha is trivial), got {temperatures}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    todo = []  # (row, missing temperatures)
    for row in rows:
        missing = [t for t in temperatures if not cache_file(cache_dir, row, t).exists()]
        if missing:
            todo.append((row, missing))
        elif progress is not None:
            progress(len(temperatures), f"{row.dataset} prompt {row.index} (cached)")
    generated = sum(len(missing) for _, missing in todo)
    cached = len(rows) * len(temperatures) - generated
    if workers > 1 and pair is None and len(todo) > 1:
        positions = _capture_on_processes(config, cache_dir, todo, workers, progress, lean)
    else:
        positions = 0
        forwards = None
        for row, missing in todo:
            if pair is None:
                from mdsd.models import load_pair

                pair = load_pair(config.target, config.draft, device=config.device)
            if forwards is None and lean:
                forwards = lean_forwards(pair)
            positions += _capture_row(pair, config, cache_dir, row, missing, forwards)
            if progress is not None:
                progress(len(temperatures), f"{row.dataset} prompt {row.index}")
    return CaptureSummary(cache_dir, generated, cached, positions)


def _capture_row(
    pair,
    config: MeasureConfig,
    cache_dir: Path,
    row: PromptRow,
    missing: list[float],
    forwards: LeanForwards | None = None,
) -> int:
    """Generate one prompt at the ``missing`` temperatures and cache each; returns the positions."""
    if not (cache_dir / "meta.json").exists():
        _write_meta(cache_dir, config, pair.name, pair.vocab_size)
    positions = 0
    for temperature, generated in zip(missing, generate_rows(pair, row, missing, config, forwards)):
        arrays = {
            "tokens": generated.tokens,
            "meta": np.array(
                json.dumps(
                    {
                        "dataset": row.dataset,
                        "index": row.index,
                        "digest": row.digest,
                        "temperature": temperature,
                        "top_k": config.top_k,
                    }
                )
            ),
        }
        for name, logits in (("target", generated.target_logits), ("draft", generated.draft_logits)):
            for part, value in compress_logits(logits, config.top_k).items():
                arrays[f"{name}_{part}"] = value
        _save_atomic(cache_file(cache_dir, row, temperature), **arrays)
        positions += generated.tokens.size
    return positions


def _capture_on_processes(config, cache_dir, todo, workers, progress, lean: bool) -> int:
    """The prompts of ``todo`` on ``workers`` spawned processes (one task per prompt)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from mdsd.models import resolve_source

    for argument, source in (("target", config.target), ("draft", config.draft)):
        if source is not None:  # refuse an unloadable model here, before any process starts
            resolve_source(source, argument)
    context = multiprocessing.get_context("spawn")
    positions = 0
    with ProcessPoolExecutor(
        max_workers=min(workers, len(todo)),
        mp_context=context,
        initializer=_init_capture_process,
        initargs=(config.threads or 1,),
    ) as pool:
        futures = {
            pool.submit(_capture_row_in_process, config, cache_dir, row, missing, lean): row
            for row, missing in todo
        }
        for future in as_completed(futures):
            positions += future.result()
            row = futures[future]
            if progress is not None:
                progress(len(config.temperatures), f"{row.dataset} prompt {row.index}")
    return positions


def _init_capture_process(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _process_models(target: str | None, draft: str | None, device: str, lean: bool):
    """The pair (and its lean runners) of a capture process, loaded by its first task and kept
    for the next ones."""
    from mdsd.models import load_pair

    pair = load_pair(target, draft, device=device)
    return pair, lean_forwards(pair) if lean else None


def _capture_row_in_process(
    config: MeasureConfig, cache_dir: Path, row: PromptRow, missing: list[float], lean: bool
) -> int:
    pair, forwards = _process_models(config.target, config.draft, config.device, lean)
    return _capture_row(pair, config, cache_dir, row, missing, forwards)


# ---------------------------------------------------------------- reading back
@dataclass(frozen=True)
class Positions:
    """The cached positions of one (dataset, T): logits of both models and the prompt of each.

    Sparse (top-k) form: ``target_index``/``draft_index`` [B, k] and logits [B, k]; dense form:
    index None and logits [B, V]. ``prompt`` [B] identifies the sequence (for clustered CIs).
    """

    dataset: str
    temperature: float
    target_logits: np.ndarray
    draft_logits: np.ndarray
    target_index: np.ndarray | None
    draft_index: np.ndarray | None
    prompt: np.ndarray

    @property
    def count(self) -> int:
        return int(self.prompt.size)


def datasets_in(cache_dir: Path, config: MeasureConfig) -> list[str]:
    rows = load_prompts(config.prompts, config.num_prompts)
    return list(dict.fromkeys(row.dataset for row in rows))


def load_positions(cache_dir: Path, config: MeasureConfig, dataset: str, temperature: float) -> Positions:
    """All cached positions of the configured prompts of ``dataset`` at ``temperature``."""
    rows = [r for r in load_prompts(config.prompts, config.num_prompts) if r.dataset == dataset]
    parts: dict[str, list[np.ndarray]] = {}
    prompt_ids = []
    for row in rows:
        path = cache_file(cache_dir, row, temperature)
        if not path.exists():
            raise FileNotFoundError(f"{path} is not cached; run the capture first")
        with np.load(path, allow_pickle=False) as f:
            for name in f.files:
                if name.startswith(("target_", "draft_")):
                    parts.setdefault(name, []).append(f[name])
            prompt_ids.append(np.full(f["tokens"].size, row.index, dtype=np.int64))
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return Positions(
        dataset=dataset,
        temperature=temperature,
        target_logits=joined["target_logits"],
        draft_logits=joined["draft_logits"],
        target_index=joined.get("target_index"),
        draft_index=joined.get("draft_index"),
        prompt=np.concatenate(prompt_ids),
    )
