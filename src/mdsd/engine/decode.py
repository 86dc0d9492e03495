"""Multi-draft tree speculative decoding on a Hugging Face target/draft pair, and the
autoregressive baseline.

One decoding step (docs/theory.md §7), for a committed sequence s of length L whose last token (the
root) is not yet in the target's cache:

1. Draft: the draft model expands the tree level by level, one forward per level with its KV
   cache and a 4-D mask (level 0 = the committed tokens it has not seen, causally); each node's
   children are drawn from q(. | path) by the draft law (``walk.draft_children``), with q from
   ``mdsd.logits.process_logits`` -- the same transform as the target's p (with ``draft_vocab``,
   over the draft's kept tokens only: ``mdsd.engine.vocab``).
2. Target: one forward over (root, all nodes) with the tree mask and position ids
   L - 1 + depth (for a chain, the causal mask).
3. Verify node by node from the root (``walk.walk``); emitted = accepted path + one recovered or
   bonus token.
4. Both caches keep only the committed prefix and the accepted path.

Chains verified by single-draft rejection sampling or by block verification run the same steps
leaner (``fast_chain``: ``TreeDecoder.draft_chain``, ``walk.walk_chain`` / ``walk_chain_block``;
with the tempered softmax alone, the whole draft chain in one compiled call and the whole walk in
another, ``walk.walk_chain_softmax``), with the same tokens from the same seed.

The emitted sequence has exactly the target's law (temperature / top-k / top-p applied); the
tests compute the exact law through the same ``walk`` functions. Batches of prompts are decoded
one sequence after another (each with its own caches), so results are correct for any batch size
but there is no batching speed-up.

The module holds the two decoders (~700 lines); their records (configs, statistics, generations)
are in ``mdsd.engine.records``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mdsd.engine._panel_gemm import host_width
from mdsd.engine.records import (
    SEQUENCE_VERIFIERS,
    DecodeStats,
    Generation,
    SamplingConfig,
    TreeConfig,
)
from mdsd.engine.runner import (
    SampledChain,
    SampledTree,
    check_supported,
    check_tree_attention,
    context_length,
    rows_of,
)
from mdsd.engine.static_llama import draft_runner, make_runner
from mdsd.engine.tree import TREE_LAWS, DraftTree, build_tree
from mdsd.engine.vocab import DraftVocabulary, as_draft_vocabulary
from mdsd.engine.walk import (
    DENSE_IDS,
    DraftedSlots,
    RuleBook,
    WalkResult,
    as_support,
    chain_walk_result,
    chain_walks_fast,
    draft_children,
    softmax_token,
    tree_walk_result,
    tree_walk_verifier,
    walk,
    walk_chain,
    walk_chain_block,
    walk_chain_softmax,
    walk_rule,
    walk_tree_softmax,
)
from mdsd.laws import SEQUENTIAL_DRAWS_MAX
from mdsd.logits import SupportProbs, kernel_truncation
from mdsd.sampling import categorical, draw, uniform_source
from mdsd.sequence import chain_verify
from mdsd.verifiers import natural_verifier
from mdsd.verifiers.optimal.verifier import OptimalVerifier

LOW_ACCEPTANCE_WARNING = 0.1  # warn when the mean acceptance at depth 1 is below this
# Trees of at most this many rows (root + nodes) get the output layer on every row at once, and
# their steps run in one compiled call (``_one_call_plan``): with AVX-512 (passes of 14 rows) the
# target's projections from memory on 13 / 17 / 24 rows cost 1.58x / 2.14x / 2.54x one row
# (benchmarks/bench_matmul.py, 2026-12-05), less than the ~3 visited rows one call each, and 24
# rows are a one-token step's forward of 23 nodes on the panels (``PANEL_MAX_ROWS_F32``); with
# AVX2 (passes of 2 rows, 12 rows on the panels) 13 rows cost ~2.5x one row (3x4 has 13).
HEAD_BATCH_ROWS = 24 if host_width() == 16 else 13


# ---------------------------------------------------------------------- shared helpers
@functools.cache
def _step_kernels():
    """``mdsd.engine._step_numba``, imported once (numba's import costs ~0.3 s)."""
    from mdsd.engine import _step_numba

    return _step_numba


def eos_ids(pair) -> set[int]:
    ids = set()
    for source in (getattr(pair.target, "generation_config", None), pair.target.config, pair.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return ids


def encode_prompt(pair, prompt) -> list[int]:
    """Token ids of a prompt (a string, or already ids). Raises ValueError naming ``prompt``."""
    if isinstance(prompt, str):
        ids = pair.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt is empty (no tokens)")
    vocab = int(pair.target.config.vocab_size)
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab})")
    return ids


def check_context(pair, prompt_ids: list[int], lookahead: int) -> int | None:
    """The usable context length; raises ValueError naming ``prompt`` when it does not fit."""
    limits = [c for c in (context_length(pair.target), context_length(pair.draft)) if c]
    ctx = min(limits) if limits else None
    if ctx is not None and len(prompt_ids) + lookahead > ctx:
        raise ValueError(
            f"prompt has {len(prompt_ids)} tokens; with {lookahead} more it exceeds the models' "
            f"context length of {ctx} tokens"
        )
    return ctx


def _capacity(prompt_ids: list[int], sampling: SamplingConfig, lookahead: int, ctx: int | None) -> int:
    """Cache entries a run can need: the committed tokens (at most the prompt + new tokens, and
    the context) plus one step's uncommitted entries (``lookahead``: the tree's nodes)."""
    committed = len(prompt_ids) + sampling.max_new_tokens
    return (committed if ctx is None else min(committed, ctx)) + lookahead + 1


def _finish(emitted: list[int], budget: int, eos: set[int], stop_on_eos: bool):
    """Truncate a step's tokens at the budget / first EOS; returns (tokens, stop reason or None)."""
    if stop_on_eos and eos:
        for i, tok in enumerate(emitted):
            if tok in eos and i < budget:
                return emitted[: i + 1], "eos"
    if len(emitted) >= budget:
        return emitted[:budget], "length"
    return emitted, None


def _check_pair(pair) -> None:
    t_vocab, d_vocab = int(pair.target.config.vocab_size), int(pair.draft.config.vocab_size)
    if t_vocab != d_vocab:
        raise ValueError(
            f"draft vocabulary ({d_vocab}) differs from the target's ({t_vocab}); the pair must "
            "share one tokenizer"
        )


class _Decoder:
    """What both decoders share: a loop over the prompts of a batch (one after another)."""

    def generate(
        self,
        prompts: Sequence,
        *,
        seed: int | None = None,
        rng: np.random.Generator | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> list[Generation]:
        """Decode each prompt (string or token ids); ``on_tokens(index, new_ids)`` streams."""
        rng = np.random.default_rng(seed) if rng is None else rng
        results = []
        for i, prompt in enumerate(prompts):
            callback = (lambda toks, i=i: on_tokens(i, toks)) if on_tokens else None
            results.append(self.generate_one(prompt, rng, callback))
        return results

    def generate_one(self, prompt, rng, on_tokens=None) -> Generation:
        raise NotImplementedError


class _DraftedProbs(Mapping):
    """node -> the ``SupportProbs`` of q drawn in one call: row r of ``probs`` [R, W] over the
    output layer's ``ids`` (or the vocabulary where ``ids`` is None; over their positions
    ``kept`` [R, W] where a top-k or a top-p truncates q) is the q of node ``nodes[r]`` (-1: the root; None:
    a chain's, row d the q of node d - 1), stored as ``SamplingConfig.row_probs`` stores it: on
    its nonzero entries when q is truncated or the output layer covers part of the vocabulary
    and some underflowed (``zeros`` [R] counts them). Each is made when first read: the lean walk
    reads the array itself, and three wrappers per step cost ~15 microseconds in the decoding
    loop."""

    def __init__(self, ids, probs: np.ndarray, zeros: np.ndarray, kept: np.ndarray, vocab: int, nodes=None):
        self._ids, self._probs, self._zeros, self._kept, self._vocab = ids, probs, zeros, kept, vocab
        self._node_array = nodes
        self._made: dict[int, SupportProbs] = {}

    @functools.cached_property
    def _nodes(self) -> Sequence[int]:
        """The node of each row, made when first needed (the one-call walk never asks)."""
        return range(-1, len(self._probs) - 1) if self._node_array is None else self._node_array.tolist()

    def row_of(self, node: int) -> int:
        """The row of ``node``'s q; KeyError for a node without one."""
        if node not in self._nodes:
            raise KeyError(node)
        return self._nodes.index(node)

    def support(self, node: int) -> int:
        """The number of nonzero entries of ``node``'s q."""
        return self._probs.shape[1] - int(self._zeros[self.row_of(node)])

    def __getitem__(self, node: int) -> SupportProbs:
        if node not in self._made:
            self._made[node] = self._row(self.row_of(node))
        return self._made[node]

    def _row(self, r: int) -> SupportProbs:
        q, ids = self._probs[r], self._ids
        if self._kept.size:  # top-k: the kept positions, then their token ids
            ids = self._kept[r] if ids is None else ids[self._kept[r]]
        if ids is None:
            return SupportProbs(None, q, self._vocab)
        if self._zeros[r]:
            nonzero = np.flatnonzero(q)
            return SupportProbs(ids[nonzero], q[nonzero], self._vocab)
        return SupportProbs(ids, q, self._vocab)

    def __iter__(self):
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._probs)


class _NodeRules(Mapping):
    """node -> its ``NodeRule`` (``RuleBook.rule`` of its width and its q's support, read from
    the tree's ``_DraftedProbs``), made when read (the walk reads the visited nodes' only)."""

    def __init__(self, book: RuleBook, tree: DraftTree, qs: _DraftedProbs):
        self._book, self._tree, self._qs = book, tree, qs

    def __getitem__(self, node: int):
        support = self._qs.support(node)  # KeyError for a node without children
        depth = 0 if node < 0 else int(self._tree.depths[node])
        return self._book.rule(self._tree.widths[depth], support)

    def __iter__(self):
        return iter(self._qs)

    def __len__(self) -> int:
        return len(self._qs)


# ---------------------------------------------------------------------- autoregressive
@dataclass(frozen=True)
class PlainTokens:
    """Tokens of plain sampling drawn in one compiled call (``plain_tokens``).

    tokens:  the new token ids, cut at the budget or after an EOS.
    stop:    "length", "eos", "context", or None (more may follow).
    seconds: [len(tokens), 2] per token, the target's forward and the draw, timed inside the call.
    """

    tokens: list[int]
    stop: str | None
    seconds: np.ndarray


def plain_tokens(target, sampling: SamplingConfig, seq: list[int], budget: int, ctx, eos, rng):
    """Up to ``budget`` tokens of plain sampling after ``seq`` in one compiled call
    (``_step_numba.plain_steps``): per token the target's causal forward of the tokens its cache
    lacks and a draw of ``sampling``'s transform at ``rng.random()``, as ``Autoregressive``'s
    Python loop draws them, stopping at the budget, after a token of ``eos`` (where
    ``sampling.stop_on_eos``) or past the context ``ctx`` (None: none), the target's cache then
    holding every token but the last. Returns ``PlainTokens``, or None, drawing nothing, where
    it does not apply: the target's forward not compiled, greedy decoding (temperature 0), the
    tokens the cache lacks wider than one panel pass."""
    length = len(seq)
    if budget < 1 or not sampling.compiled_transform:
        return None
    forward = target.compiled_forward(max(length - target.cached, 1), length + 1)
    if forward is None:
        return None
    kernels = _step_kernels()
    buffer = np.zeros(length + budget + 1, dtype=np.int64)
    buffer[:length] = seq
    records = np.zeros((budget, kernels.RECORD_FIELDS))
    context_end = ctx - 1 if ctx is not None else np.iinfo(np.int64).max
    common = (
        buffer, length, length + budget, context_end, target.capacity, np.fromiter(sorted(eos), np.int64),
        sampling.stop_on_eos, records, target.cached,
    )  # fmt: skip
    source = uniform_source(rng)
    end, steps, status, cached = kernels.plain_steps(
        *common,
        float(sampling.temperature),
        *kernel_truncation(sampling.top_k, sampling.top_p),
        *forward,
        *source,
        kernels.clock_source(),
    )
    seconds = records[:steps, 3:5]
    target.advance(cached, steps, seconds[:, 0].sum())
    return PlainTokens(buffer[length:end].tolist(), kernels.stop_reason(status), seconds)


class Autoregressive(_Decoder):
    """Plain sampling from the target with its KV cache (the baseline), same transform."""

    def __init__(self, pair, sampling: SamplingConfig, *, static_cache: bool = True, matmul: str = "auto"):
        _check_pair(pair)
        self.pair = pair
        self.sampling = sampling
        self.target = make_runner(pair.target, static_cache, matmul)
        self.eos = eos_ids(pair)

    @torch.inference_mode()
    def generate_one(
        self, prompt, rng: np.random.Generator, on_tokens: Callable[[list[int]], None] | None = None
    ) -> Generation:
        ids = encode_prompt(self.pair, prompt)
        ctx = check_context(self.pair, ids, 1)
        stats = DecodeStats(depth=0, sequences=1)
        start = time.perf_counter()
        self.target.reset(_capacity(ids, self.sampling, 1, ctx))
        self.target.calls = 0
        self.target.model_time = 0.0
        pending, out, reason = ids, [], "length"
        while True:
            if on_tokens is None:  # many tokens in one compiled call where it applies
                ran, stop = self._compiled_steps(ids, out, rng, stats, ctx)
                if stop:
                    reason = stop
                    break
                if ran:
                    pending = (ids + out)[self.target.cached :]
                    continue
            t0 = time.perf_counter()
            logits = self.target.causal(np.asarray(pending), keep=1)[0]
            t1 = time.perf_counter()
            token = self._sample(logits, rng)
            stats.target_time += t1 - t0
            stats.verify_time += time.perf_counter() - t1
            if not stats.target_calls:  # the prompt's forward
                stats.prefill_time += t1 - t0
            stats.target_calls += 1
            new, stop = _finish(
                [token], self.sampling.max_new_tokens - len(out), self.eos, self.sampling.stop_on_eos
            )
            out += new
            if on_tokens:
                on_tokens(new)
            if stop:
                reason = stop
                break
            if ctx is not None and len(ids) + len(out) + 1 > ctx:
                reason = "context"
                break
            pending = [token]
        stats.new_tokens = len(out)
        stats.target_model_time = self.target.model_time
        stats.total_time = time.perf_counter() - start
        return Generation(ids, out, self.pair.tokenizer.decode(out), reason, stats)

    def _compiled_steps(
        self, ids: list[int], out: list[int], rng: np.random.Generator, stats: DecodeStats, ctx: int | None
    ) -> tuple[bool, str | None]:
        """``generate_one``'s loop in one compiled call (``plain_tokens``) after the prompt
        ``ids`` and the tokens ``out`` so far, extending ``out``: the same tokens, cache,
        statistics and generator state (tested). Returns (whether it ran, the stop reason or
        None)."""
        began = time.perf_counter()
        budget = self.sampling.max_new_tokens - len(out)
        run = plain_tokens(self.target, self.sampling, ids + out, budget, ctx, self.eos, rng)
        if run is None:
            return False, None
        forward_seconds = run.seconds[:, 0].sum()
        if not stats.target_calls:  # the prompt's forward
            stats.prefill_time += run.seconds[0, 0]
        stats.target_calls += len(run.tokens)
        stats.target_time += forward_seconds
        out += run.tokens
        stats.verify_time += time.perf_counter() - began - forward_seconds
        return True, run.stop

    def _sample(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        """The next token from the target's logits [V]: the transform's law at ``rng.random()``
        (``categorical``); for the tempered softmax alone by ``walk.softmax_token``, the same token
        in one compiled call that seldom needs the float64 softmax (tested)."""
        if self.sampling.softmax_only:
            return softmax_token(logits, self.sampling.temperature, rng.random())
        probs = self.sampling.row_probs(logits)
        return probs.token(int(categorical(probs.values, rng)))


# ---------------------------------------------------------------------- tree decoding
@dataclass(frozen=True)
class StepRecord:
    """The last step of a ``TreeDecoder``, kept for inspection and tests.

    drafted: the drafted tree; target_hidden: the target's final hidden states [N + 1, H] of the
    root and every node (``decoder.target.logits(target_hidden)`` gives their logits), or None
    where the loop computed the logits themselves in the forward's call (``target_logits``
    [R, V] of the rows ``logit_rows``: 0 the root, i + 1 node i; every row where None);
    result: the verification walk.
    """

    drafted: DraftedSlots
    target_hidden: torch.Tensor | None
    result: object
    target_logits: np.ndarray | None = None
    logit_rows: list[int] | None = None

    def logits(self, target) -> np.ndarray:
        """The target's logits [N + 1, V] of the root and every node (``target``: the runner);
        NaN in the rows of invalid slots where the forward computed the valid rows only."""
        if self.target_logits is None:
            return target.logits(self.target_hidden)
        if self.logit_rows is None:
            return self.target_logits
        out = np.full((self.drafted.tokens.size + 1, self.target_logits.shape[1]), np.nan, np.float32)
        out[self.logit_rows] = self.target_logits
        return out


class TreeDecoder(_Decoder):
    """Multi-draft tree speculative decoding (see the module docstring).

    >>> dec = TreeDecoder(load_pair(), TreeConfig.make("3x4"), SamplingConfig(0.7))  # doctest: +SKIP
    >>> dec.generate(["def f(x):"], seed=0)[0].text                                   # doctest: +SKIP

    ``static_cache=True`` runs Llama-family models (llama, mistral, qwen2) through the lean
    forward over a preallocated cache (``mdsd.engine.static_llama``); False, or other models,
    use Hugging Face's forward with its ``DynamicCache``. Both give the same logits (tested).
    ``matmul`` ("auto", "numba", "numpy", "torch") picks the lean forward's backend
    (``mdsd.engine.static_llama.choose_matmul``: the compiled layers for float32 models on the
    CPU); with "auto" a 16-bit draft on the CPU runs a float32 copy of itself there
    (``static_llama.draft_runner``). ``config.draft_vocab`` K restricts the draft's output layer
    to its K likeliest tokens (``mdsd.engine.vocab``; ``use_draft_vocabulary`` takes any ids);
    ``config.draft_weights`` "int8" runs the draft with int8 weights and activations
    (``static_llama.draft_runner``), a faster draft whose q the verifier is given as computed.
    ``exact_acceptance=True`` makes ``stats.acceptance_by_depth`` Rao-Blackwellised (the exact
    acceptance given the drafts at every visited node, one output law per node); by default it
    averages the 0/1 outcomes, which costs nothing.
    A chain (widths 1, ..., 1) verified by single-draft rejection sampling (``rrs``,
    ``rrs_without_replacement``; ``spechub`` and ``optimal`` under laws drafting one draw), or by
    ``block`` under such laws, runs the lean loop (``fast_chain`` True: ``draft_chain`` and
    ``walk.walk_chain`` / ``walk.walk_chain_block``), which draws the
    same tokens from the same generator as the general loop (tested); set ``fast_chain = False``
    to run the general one (``exact_acceptance=True`` runs it too: the walk then computes each
    visited node's output law). With the tempered softmax alone the lean loop drafts the chain
    in one compiled call (the same tokens and q; ``compiled_draft = False``: level by level) and
    verifies it in one more, from the target's logits (``walk.walk_chain_softmax``). Trees of
    ``iid`` / ``without_replacement`` drafts under such a transform are drafted in one compiled
    call too (``StaticLlamaRunner.sample_tree``), the target's forward returns the valid rows'
    logits (``runner.tree_logits``) and, for ``rrs``, ``rrs_without_replacement`` and
    ``optimal``, the walk is one more call (``walk.walk_tree_softmax``); the same tokens
    (tested).

    Raises ValueError for an unknown ``law`` / ``verifier``, a verifier not exact for the law, a
    tree width larger than the vocabulary for laws drawing distinct tokens, unsupported models
    (naming ``target`` / ``draft``) and mismatched vocabularies.
    """

    def __init__(
        self,
        pair,
        config: TreeConfig,
        sampling: SamplingConfig,
        *,
        check_attention: bool = True,
        exact_acceptance: bool = False,
        static_cache: bool = True,
        matmul: str = "auto",
    ):
        _check_pair(pair)
        check_supported(pair.target, "target")
        check_supported(pair.draft, "draft")
        self.pair = pair
        self.config = config
        self.sampling = sampling
        self.exact_acceptance = exact_acceptance
        self.static_cache = static_cache
        self.matmul = matmul
        self.vocab = int(pair.target.config.vocab_size)
        widths = (2,) if config.tree is None else config.tree.widths  # auto: checked when chosen
        self.sequence_method = SEQUENCE_VERIFIERS.get(config.verifier)
        self.book = RuleBook(config.law, self._node_verifier(), widths)
        self.target = make_runner(pair.target, static_cache, matmul)
        self.draft = draft_runner(pair.draft, static_cache, matmul, config.draft_weights)  # 16-bit: float32
        if check_attention:
            with torch.inference_mode():
                check_tree_attention(self.target, "target", self.vocab)
                check_tree_attention(self.draft, "draft", self.vocab)
        self.draft_vocab = None
        self.use_draft_vocabulary(as_draft_vocabulary(config.draft_vocab, pair.draft))
        self.eos = eos_ids(pair)
        self.tree: DraftTree | None = None
        self.fast_chain = False  # set by _use_tree
        self.compiled_draft = True  # draft_chain / draft_tree: one compiled call where it applies
        self.fused_step = True  # a tree's whole step in one compiled call where it applies
        self.auto_choice = None  # mdsd.engine.auto.TreeChoice once an auto tree is chosen
        self.auto_ceiling = None  # ... and auto.ceiling's: the best with free drafting
        self._plain: Autoregressive | None = None  # auto chose plain sampling
        self._source_of, self._uniform_source = None, (0, 0)  # ``_source``'s generator and its source
        self._fused_plan = None  # ``_one_call_plan``'s (key, plan)
        if config.tree is not None:
            self._use_tree(config.tree)

    def _use_tree(self, tree: DraftTree) -> None:
        """Adopt a tree shape: check it against the law, build its frozen masks."""
        if self.book.law.distinct and tree.max_width > self.vocab:
            raise ValueError(
                f"tree width {tree.max_width} exceeds the vocabulary ({self.vocab} tokens); "
                f"law {self.book.law.name!r} draws distinct tokens"
            )
        if self.config.verifier == "block" and any(w != 1 for w in tree.widths):
            raise ValueError(
                f"verifier 'block' verifies one draft chain (widths 1,...,1), got tree "
                f"{tree.describe()}; use 'traversal' or 'hybrid' for trees"
            )
        self.book = RuleBook(self.config.law, self._node_verifier(), tree.widths)
        self.book.warm_up(tree.widths)
        if self.config.verifier == "block":  # load the block walk's compiled steps (a stop test
            chain_verify([[0.5, 0.5]] * 3, [[0.9, 0.1]] * 2, [0, 0], "block", 0)  # and a draw)
        self.tree = tree
        # chains of single-draft rejection sampling take the lean loop (draft_chain, walk_chain)
        self.fast_chain = tree.max_width == 1 and self.lean_chains()
        self._chain_valid = np.ones(tree.num_nodes, dtype=bool)  # draft_chain's: every node
        self._chain_valid.flags.writeable = False
        # frozen masks: target over all nodes; draft per level d = 1..D-1
        self._target_mask = self.target.additive(tree.ancestor_mask[1:, 1:])
        self._level_masks = {d: self.draft.additive(tree.level_mask(d)) for d in range(1, tree.depth)}

    def lean_chains(self) -> bool:
        """Whether chains of this decoder's rule run the lean loop (``fast_chain``): nodes of one
        draft that is one draw from q (``walk.chain_walks_fast``), verified node by node by
        rejection sampling or, for ``block``, as a block (``walk.walk_chain_block``)."""
        block = self.config.verifier == "block"
        return (self.sequence_method is None or block) and chain_walks_fast(self.book.rule(1, 2))

    @property
    def one_call_drafting(self) -> bool:
        """Whether ``compiled_draft`` can apply: a chain on the lean loop (``sample_chain``), or a
        tree whose law ``sample_tree`` draws (``TREE_LAWS``); it then does where the
        transform is the tempered softmax after an optional top-k and the runner is compiled."""
        return self.fast_chain or (self.tree is not None and self.book.law.name in TREE_LAWS)

    def use_draft_vocabulary(self, vocabulary: DraftVocabulary | None) -> None:
        """Draft over ``vocabulary`` only (``mdsd.engine.vocab``; None: the whole vocabulary).
        The decoder stays exact: the verifier is given the draft law it samples from."""
        if vocabulary is not None and vocabulary.vocab != self.vocab:
            raise ValueError(
                f"draft_vocab: a vocabulary of {vocabulary.vocab} tokens for a pair of {self.vocab}"
            )
        self.draft_vocab = vocabulary
        self.draft.restrict_output(None if vocabulary is None else vocabulary.token_ids)

    def _node_verifier(self) -> str:
        """The token-level verifier of the per-node rules; for a sequence-level rule, the law's
        natural verifier (it only fixes how nodes draft; verification is the sequence rule's)."""
        if self.sequence_method is None:
            return self.config.verifier
        from mdsd.sequence.tree import TRAVERSAL_LAWS

        law = self.config.law
        if self.sequence_method == "traversal" and law not in TRAVERSAL_LAWS:
            raise ValueError(
                f"law {law!r} has no traversal rule; verifier {self.config.verifier!r} needs one of "
                f"{list(TRAVERSAL_LAWS)}"
            )
        return natural_verifier(law)

    @torch.inference_mode()
    def choose_tree(self, prompts, rng: np.random.Generator | None = None, *, cache_dir="default"):
        """For ``TreeConfig.make("auto")``: calibrate on ``prompts`` (or load the cached
        calibration) and adopt the shape of highest predicted tokens/s, or plain sampling where
        no tree is predicted to pay over a generation of ``sampling.max_new_tokens`` tokens after
        prompts of these prompts' mean length; returns the ``mdsd.engine.auto.TreeChoice``.
        ``cache_dir=None`` disables the on-disk cache."""
        from mdsd.engine import auto

        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: --tree auto needs at least one prompt to calibrate on")
        rng = np.random.default_rng(0) if rng is None else rng
        cache = auto.default_cache_dir() if cache_dir == "default" else cache_dir
        calibration = auto.load_or_calibrate(self, prompts, rng, cache)
        max_width = 2 if self.book.law.name == "spechub" else auto.MAX_WIDTH
        if self.config.verifier == "block":  # block verification checks one chain
            max_width = 1
        prompt_tokens = float(np.mean([len(encode_prompt(self.pair, p)) for p in prompts]))
        choice = auto.choose_tree(
            calibration,
            max_width=max_width,
            prompt_tokens=prompt_tokens,
            new_tokens=self.sampling.max_new_tokens,
        )
        self.auto_choice = choice
        self.auto_ceiling = auto.ceiling(calibration, max_width=max_width)
        if choice.widths:
            self._use_tree(build_tree(choice.widths))
        else:
            self._plain = Autoregressive(
                self.pair, self.sampling, static_cache=self.static_cache, matmul=self.matmul
            )
        return choice

    def generate(self, prompts: Sequence, *, seed=None, rng=None, on_tokens=None) -> list[Generation]:
        """Decode each prompt; an auto tree is chosen first, calibrated on these prompts."""
        if self.tree is None and self._plain is None:
            self.choose_tree(prompts)
        return super().generate(prompts, seed=seed, rng=rng, on_tokens=on_tokens)

    # -------------------------------------------------------------- public
    @torch.inference_mode()
    def generate_one(
        self, prompt, rng: np.random.Generator, on_tokens: Callable[[list[int]], None] | None = None
    ) -> Generation:
        if self.tree is None and self._plain is None:
            self.choose_tree([prompt])
        if self._plain is not None:  # auto chose plain sampling
            self._plain.sampling = self.sampling
            return self._plain.generate_one(prompt, rng, on_tokens)
        ids = encode_prompt(self.pair, prompt)
        ctx = check_context(self.pair, ids, self.tree.depth)
        stats = DecodeStats(depth=self.tree.depth, sequences=1)
        start = time.perf_counter()
        capacity = _capacity(ids, self.sampling, self.tree.num_nodes + 1, ctx)
        self.target.reset(capacity)
        self.draft.reset(capacity)
        self.target.calls = self.draft.calls = 0
        self.target.model_time = self.draft.model_time = 0.0
        seq = list(ids)
        out: list[int] = []
        reason = "length"
        while True:
            if on_tokens is None:  # many steps in one compiled call where they apply
                ran, stop = self._compiled_steps(seq, out, rng, stats, ctx)
                if stop:
                    reason = stop
                    break
                if ran:
                    continue
            emitted = self.step(seq, rng, stats)
            new, stop = _finish(
                emitted, self.sampling.max_new_tokens - len(out), self.eos, self.sampling.stop_on_eos
            )
            out += new
            seq += new
            if on_tokens:
                on_tokens(new)
            if stop:
                reason = stop
                break
            if ctx is not None and len(seq) + self.tree.depth > ctx:
                reason = "context"
                break
        stats.new_tokens = len(out)
        stats.target_calls = self.target.calls
        stats.draft_calls = self.draft.calls
        stats.target_model_time = self.target.model_time
        stats.draft_model_time = self.draft.model_time
        self.target.calls = self.draft.calls = 0
        stats.total_time = time.perf_counter() - start
        if (
            stats.steps >= 8
            and stats.depth_tries[0]
            and (stats.depth_expected[0] / stats.depth_tries[0] < LOW_ACCEPTANCE_WARNING)
        ):
            import warnings

            warnings.warn(
                f"acceptance at depth 1 is {stats.depth_expected[0] / stats.depth_tries[0]:.3f}: "
                "the draft model rarely agrees with the target; use a shallower tree",
                stacklevel=2,
            )
        return Generation(ids, out, self.pair.tokenizer.decode(out), reason, stats)

    # -------------------------------------------------------------- one step
    def _source(self, rng: np.random.Generator) -> tuple[int, int]:
        """``mdsd.sampling.uniform_source(rng)``, kept for the generator last seen: the compiled
        calls of a step draw from ``rng`` through it, and making it costs ~10 microseconds in the
        decoding loop, where the caches are cold."""
        if self._source_of is not rng:
            self._source_of, self._uniform_source = rng, uniform_source(rng)
        return self._uniform_source

    def draft_probs(self, logits: np.ndarray) -> SupportProbs:
        """q from one row of the draft's output layer (over ``draft_vocab`` when it is set)."""
        return self.sampling.row_probs(logits, self.draft.output_ids, self.vocab)

    def draft_tree(self, seq: list[int], rng: np.random.Generator) -> DraftedSlots:
        """Expand the tree with the draft model (its cache then holds seq + depths 1..D-1).

        Per level: one draft forward over the level's nodes, the output layer on the valid rows
        only, the sampling transform per row on its support, children drawn per node. Where the
        transform is the tempered softmax after an optional top-k and top-p, the law is one of
        ``TREE_LAWS`` (i.i.d., without replacement, greedy, SpecHub) and the runner drafts trees
        in one compiled call
        (``sample_tree``), every level runs in that call: the same tokens and q (tested).
        """
        if self.compiled_draft and self.sampling.compiled_transform and self.book.law.name in TREE_LAWS:
            drafted = self._drafted_tree(seq, rng)
            if drafted is not None:
                return drafted
        tree, row_probs = self.tree, self.draft_probs
        n = tree.num_nodes
        tokens = np.zeros(n, dtype=np.int64)
        valid = np.zeros(n, dtype=bool)
        rules, qs = {}, {}
        # level 0: the committed tokens the draft has not seen; q of the root
        hidden = self.draft.causal_hidden(np.asarray(seq[self.draft.cached :]), keep=1)
        frontier = {-1: row_probs(self.draft.logits(hidden)[0])}  # node -> q(. | path to node)
        for d in range(1, tree.depth + 1):
            for node, q in frontier.items():
                kids = tree.children(node)
                drafts, rule = draft_children(q, len(kids), self.book, rng)
                k = drafts.size
                tokens[kids.start : kids.start + k] = drafts
                tokens[kids.start + k : kids.stop] = drafts[0]  # unused slots: never verified
                valid[kids.start : kids.start + k] = True
                rules[node], qs[node] = rule, q
            if d == tree.depth:
                break
            level = tree.level(d)
            hidden = self.draft.tree_hidden(
                tokens[level.start : level.stop],
                0,
                self._level_masks[d],
                tree.depths[level.start : level.stop],
                len(seq) - 1,
                keep=len(level),
            )  # [m_d, H]
            rows = [r for r, ok in enumerate(valid[level.start : level.stop].tolist()) if ok]
            logits = self.draft.logits(rows_of(hidden, rows))  # [valid rows, V]
            frontier = {level.start + r: row_probs(logits[j]) for j, r in enumerate(rows)}
        return DraftedSlots(tokens, valid, rules, qs)

    def _drafted_tree(self, seq: list[int], rng: np.random.Generator) -> DraftedSlots | None:
        """``draft_tree`` in one call of the runner (``sample_tree``), or None where the runner
        has none or it does not apply (nothing drawn): ``_sequential_draws_exceeded``."""
        if self._sequential_draws_exceeded():
            return None
        fresh = np.asarray(seq[self.draft.cached :])
        sampling, law = self.sampling, TREE_LAWS[self.book.law.name]
        sampled = self.draft.sample_tree(
            fresh,
            self.tree,
            law,
            rng,
            sampling.temperature,
            self._source(rng),
            sampling.top_k,
            sampling.top_p,
        )
        if sampled is None:
            return None
        return self._drafted_slots(sampled)

    def _sequential_draws_exceeded(self) -> bool:
        """Whether the tree is wider than the compiled drafting's sequential draws without
        replacement (``mdsd.laws.SEQUENTIAL_DRAWS_MAX``; ``WithoutReplacement`` takes Gumbel
        top-n beyond)."""
        return self.book.law.name == "without_replacement" and self.tree.max_width > SEQUENTIAL_DRAWS_MAX

    def _drafted_slots(self, sampled: SampledTree) -> DraftedSlots:
        """``draft_tree``'s result from the runner's ``SampledTree``: q per node as
        ``SamplingConfig.row_probs`` stores it (``_DraftedProbs``) and as arrays (``tree_q``)."""
        ids = self.draft.output_ids
        qs = _DraftedProbs(ids, sampled.probs, sampled.zeros, sampled.kept, self.vocab, sampled.nodes)
        rules = _NodeRules(self.book, self.tree, qs)
        tree_q = (
            DENSE_IDS if ids is None else ids,
            sampled.probs,
            sampled.zeros,
            sampled.kept,
            sampled.drafted,
        )
        return DraftedSlots(sampled.tokens, sampled.valid, rules, qs, tree_q=tree_q)

    def draft_chain(self, seq: list[int], rng: np.random.Generator) -> DraftedSlots:
        """``draft_tree`` for a chain (widths all 1), the decoding loop's fast path: one causal
        draft forward per level and one draw from q per level, no masks and no per-node rule
        lookups. The same forwards, draws and result as ``draft_tree`` (tested). Where the
        transform is the tempered softmax after an optional top-k and top-p
        (``SamplingConfig.compiled_transform``) and the runner has a compiled chain
        (``sample_chain``), every level runs in one call: the draft's time per level then drops
        by 20-30 microseconds of Python and dispatch (BENCHMARKS.md)."""
        depth, rule = self.tree.depth, self.book.rule(1, 2)  # width 1: one rule for every q
        fresh = np.asarray(seq[self.draft.cached :])
        sampling = self.sampling
        if self.compiled_draft and sampling.compiled_transform:  # one compiled call where it applies
            source, (top_k, top_p) = self._source(rng), (sampling.top_k, sampling.top_p)
            chain = self.draft.sample_chain(fresh, depth, rng, sampling.temperature, source, top_k, top_p)
            if chain is not None:
                return self._drafted_chain(chain, rule)
        tokens = np.empty(depth, dtype=np.int64)
        qs = {}
        hidden = self.draft.causal_hidden(fresh, keep=1)
        for node in range(-1, depth - 1):  # node's q drafts its child node + 1
            q = qs[node] = self.draft_probs(self.draft.logits(hidden)[0])
            tokens[node + 1] = q.token(draw(q.values, rng.random()))
            if node + 2 < depth:  # the draft never forwards the last level
                hidden = self.draft.causal_hidden(tokens[node + 1 : node + 2], keep=1)
        return DraftedSlots(tokens, self._chain_valid, dict.fromkeys(qs, rule), qs)

    def _drafted_chain(self, chain, rule) -> DraftedSlots:
        """``draft_chain``'s result from the runner's ``SampledChain``: q of level d over the
        output layer's tokens as one array (``chain_q``, which the lean walk reads) and per node
        as ``SamplingConfig.row_probs`` stores it (``_DraftedProbs``, made where something reads
        it: the general walks, tests)."""
        ids = self.draft.output_ids
        qs = _DraftedProbs(ids, chain.probs, chain.zeros, chain.kept, self.vocab)
        chain_q = (DENSE_IDS if ids is None else ids, chain.probs)
        kept = chain.kept if chain.kept.size else None  # q truncated by a top-k or a top-p
        rules = dict.fromkeys(range(-1, len(chain.tokens) - 1), rule)
        return DraftedSlots(chain.tokens, self._chain_valid, rules, qs, chain_q, kept)

    def target_hidden(self, seq: list[int], drafted: DraftedSlots) -> torch.Tensor:
        """One target forward over (fresh committed tokens, every node): final hidden states of
        the root (row 0) and of every node (row i + 1), [N + 1, H]."""
        n = self.tree.num_nodes
        if self.tree.max_width == 1:  # a chain: the tree mask is the causal one
            return self.target.causal_hidden(
                np.asarray(seq[self.target.cached :] + drafted.tokens.tolist()), n + 1
            )
        fresh = np.asarray(seq[self.target.cached :])
        return self.target.tree_hidden(
            np.concatenate([fresh, drafted.tokens]),
            len(fresh),
            self._target_mask,
            self.tree.depths,
            len(seq) - 1,
            keep=n + 1,
        )

    def target_logits(self, seq: list[int], drafted: DraftedSlots, rows: list[int]) -> np.ndarray:
        """``target_hidden``'s forward of a tree, returning the logits of ``rows`` (0: the root,
        i + 1: node i) [len(rows), V] (``runner.tree_logits``: one compiled call on the lean
        forward)."""
        fresh = np.asarray(seq[self.target.cached :])
        ids = np.concatenate([fresh, drafted.tokens])
        return self.target.tree_logits(
            ids, len(fresh), self._target_mask, self.tree.depths, len(seq) - 1, rows
        )

    def sequence_tree(self, drafted: DraftedSlots, target_probs: Callable[[int], object]):
        """The drafted tree as an ``mdsd.sequence.DraftedSlots`` over its valid nodes (dense p at
        the root and every node, q and draft law at every node with children); returns it with
        the engine ids of its nodes [N_valid]."""
        from mdsd.sequence import drafted_tree

        nodes = np.flatnonzero(drafted.valid)  # breadth first: parents precede children
        compact = {-1: -1} | {int(node): i for i, node in enumerate(nodes)}
        parents = [compact[int(self.tree.parents[node])] for node in nodes]
        rows = [-1] + [int(node) for node in nodes]
        p = np.stack([as_support(target_probs(row)).dense() for row in rows])  # [N_valid + 1, V]
        q = np.zeros_like(p)
        laws = []
        for i, row in enumerate(rows):
            if row in drafted.draft_probs:
                q[i] = as_support(drafted.draft_probs[row]).dense()
                laws.append(drafted.rules[row].law.name)
            else:
                laws.append(self.book.law.name)
        return drafted_tree(parents, drafted.tokens[nodes], p, q, laws), nodes

    def verify_sequence(self, drafted: DraftedSlots, target_probs, rng) -> WalkResult:
        """Verify the drafted tree with the configured sequence-level rule (``mdsd.sequence``);
        ``block`` on chains of the lean loop by its walk (``walk.walk_chain_block``), so that both
        loops draw the same."""
        from mdsd.sequence import tree_verify

        if self.config.verifier == "block" and self.lean_chains():
            return walk_chain_block(drafted, target_probs, rng)

        tree, nodes = self.sequence_tree(drafted, target_probs)
        result = tree_verify(tree, self.sequence_method, None, rng)
        path = [int(nodes[i]) for i in result.path]
        reached = [1.0] * len(path) + ([] if result.bonus else [0.0])
        return WalkResult(path, list(result.tokens), result.bonus, reached)

    def _head_batch(self, node: int, drafted: DraftedSlots) -> list[int]:
        """The nodes (-1: root) whose target logits are computed with ``node``'s, ascending.

        The output layer reads its whole weight matrix per call, and a call on a few rows costs
        little more than on one (``mdsd.engine._panel_gemm``): for a tree of at most
        ``HEAD_BATCH_ROWS`` rows, every valid node is computed when the root is visited; in
        larger trees, one visited node per call.
        """
        if node == -1:
            valid = [i for i, ok in enumerate(drafted.valid.tolist()) if ok]
            if len(valid) + 1 <= HEAD_BATCH_ROWS:
                return [-1] + valid
        return [node]

    def _walks_from_logits(self, drafted: DraftedSlots) -> bool:
        """Whether the lean loop verifies this chain by ``walk.walk_chain_softmax`` (node by
        node, or with ``block`` as a block): drafted in one call (``chain_q``), p the tempered
        softmax alone, or after a top-k and / or top-p that truncated the draft's q too
        (``chain_kept``), and
        every row's logits one output-layer call (``HEAD_BATCH_ROWS``), as the
        general walk computes them for such a chain. The target's forward then returns the
        logits of every row itself (``target.causal``: one compiled call on the lean forward)."""
        return (
            drafted.chain_q is not None
            and (self.sampling.softmax_only or drafted.chain_kept is not None)
            and self.tree.num_nodes + 1 <= HEAD_BATCH_ROWS
        )

    def _walks_tree_from_logits(self, drafted: DraftedSlots) -> bool:
        """Whether the general loop verifies this tree by ``walk.walk_tree_softmax``: drafted in
        one call (``tree_q``), every node verified by a verifier of ``walk.walk_rule``
        (recursive rejection sampling, greedy, SpecHub, K-SEQ, importance, sample_check) or the optimal
        verifier, p the tempered softmax after an optional top-k and top-p, every row's
        logits one output-layer call (``HEAD_BATCH_ROWS``) and the walk's own draws (no
        ``exact_acceptance``)."""
        return (
            drafted.tree_q is not None
            and self.sequence_method is None
            and not self.exact_acceptance
            and (walk_rule(self.book.verifier) is not None or isinstance(self.book.verifier, OptimalVerifier))
            and self.sampling.compiled_transform
            and self.tree.num_nodes + 1 <= HEAD_BATCH_ROWS
        )

    def _walk(self, drafted: DraftedSlots, hidden, rng: np.random.Generator, fast: bool):
        """Verify the drafted tree from the target's hidden states [N + 1, H]: (``WalkResult``,
        seconds in the output layer). The output layer runs on the rows the walk visits, batched
        by ``_head_batch``; a sequence-level rule reads every row."""
        head_time = 0.0
        head_rows: dict[int, np.ndarray] = {}  # node -> target logits [V], computed ahead

        def target_probs(node: int) -> SupportProbs:  # p(. | path to node), for visited nodes
            nonlocal head_time
            if node not in head_rows:
                start = time.perf_counter()
                batch = self._head_batch(node, drafted)
                logits = self.target.logits(rows_of(hidden, [b + 1 for b in batch]))  # [rows, V]
                head_rows.update(zip(batch, logits))
                head_time += time.perf_counter() - start
            return self.sampling.row_probs(head_rows.pop(node))

        if fast:
            chain_walk = walk_chain_block if self.config.verifier == "block" else walk_chain
            return chain_walk(drafted, target_probs, rng), head_time
        if self.sequence_method is None:
            result = walk(self.tree, drafted, target_probs, rng, exact_acceptance=self.exact_acceptance)
            return result, head_time
        start = time.perf_counter()  # a sequence-level rule reads p at every node
        logits = self.target.logits(hidden)  # [N + 1, V]
        head_time += time.perf_counter() - start
        result = self.verify_sequence(drafted, lambda node: self.sampling.row_probs(logits[node + 1]), rng)
        return result, head_time

    @property
    def one_call_steps(self) -> bool:
        """Whether a step of this decoder's tree or chain runs in one compiled call
        (``_one_call_step``) where both runners' compiled forwards apply (every step after a
        prompt of at most one panel pass, ``StaticLlamaRunner.compiled_forward``)."""
        compiled = self.draft.compiled and self.target.compiled
        return compiled and self.tree is not None and self._one_call_plan() is not None

    def _one_call_plan(self) -> tuple | None:
        """Where a step runs in one compiled call (``_one_call_step``): ("tree", the arguments of
        ``walk.tree_walk_verifier``) for a tree drafted in one call (``_drafted_tree``) and walked
        from the logits (``_walks_tree_from_logits``) and, for ``optimal``, whose first node of
        several slots on q's widest support (the top-k or the draft's whole output layer) the
        plan table serves (``RuleBook.plan_table``: its other nodes are checked per step, and a
        step with a node it does not serve is walked in Python); ("chain", top_k or 0, block)
        for a chain of the lean loop drafted in one call (``draft_chain``) and walked from the
        logits (``_walks_from_logits``); else None. Kept per (tree, sampling, draft vocabulary, flags)."""
        tree, sampling = self.tree, self.sampling
        width = self.vocab if self.draft.output_ids is None else self.draft.output_ids.size
        key = (tree, sampling, width, self.fused_step, self.compiled_draft, self.exact_acceptance)
        if self._fused_plan is None or self._fused_plan[0] != key:
            self._fused_plan = (key, self._make_one_call_plan(width))
        return self._fused_plan[1]

    def _make_one_call_plan(self, width: int) -> tuple | None:
        """``_one_call_plan``'s value, made (``width``: the draft's output tokens)."""
        tree, sampling, book = self.tree, self.sampling, self.book
        top_k = sampling.top_k if 0 < (sampling.top_k or 0) < width else 0  # a top-k truncating q
        rows_fit = tree.num_nodes + 1 <= HEAD_BATCH_ROWS  # every row's logits in the forward's call
        compiled = self.fused_step and self.compiled_draft and sampling.compiled_transform
        if not compiled or self.exact_acceptance or not rows_fit:
            return None
        if self.fast_chain:  # a truncation of p truncates q too (a top-k below the draft's width)
            walks = sampling.softmax_only or top_k > 0 or (sampling.top_p or 1.0) < 1.0
            walks = walks and not (width <= (sampling.top_k or 0) < self.vocab)
            return ("chain", top_k, self.config.verifier == "block") if walks else None
        if (
            self.sequence_method is not None
            or book.law.name not in TREE_LAWS
            or self._sequential_draws_exceeded()
        ):
            return None
        support = top_k or width  # q's largest support
        n = next((w for w in tree.widths if w > 1), 0)
        verifier = tree_walk_verifier(book, min(n, support) if book.law.distinct else n, support, support)
        return None if verifier is None else ("tree", verifier)

    def _one_call_step(
        self, seq: list[int], rng: np.random.Generator, stats: DecodeStats
    ) -> list[int] | None:
        """``step`` in one compiled call where it applies (``_one_call_plan``, both runners'
        compiled forwards); None, with nothing drawn, where it does not. A tree's step is
        ``_step_numba.tree_step`` (the draft's tree, the target's forward, the walk, both caches'
        moves), a chain's ``chain_step``: the same forwards, draws and result as ``step``'s three
        calls (tested); a tree with a node the plan table does not serve is walked by
        ``walk.walk_tree_softmax`` on the call's logits."""
        plan = self._one_call_plan()
        if plan is None:
            return None
        began = time.perf_counter()
        draft, target, chain, length = self.draft, self.target, plan[0] == "chain", len(seq)
        forwards = self._compiled_forwards(plan, length, fresh=1)
        if forwards is None:
            return None
        (draft_model, draft_end), (target_model, target_end) = forwards
        draft_ids = np.asarray(seq[draft.cached :], dtype=np.int64)
        target_ids = np.asarray(seq[target.cached :], dtype=np.int64)
        kernel = _step_kernels().chain_step if chain else _step_kernels().tree_step
        arguments = self._kernel_arguments(plan, draft_model, target_model, rng)
        step = kernel(draft_ids, target_ids, length, *arguments)
        lengths, seconds = step[-2:]
        draft.advance(draft_end, self.tree.depth, seconds[0])
        target.advance(target_end, 1, seconds[1])
        if not chain and step[4] < 0:  # a node the plan table does not serve: walked here
            self.last_step = self._walk_unplanned(step, length, rng)
        else:
            self.last_step = self._compiled_record(step, chain)
            target.keep_prefix(lengths[0])  # the call kept the accepted path
            draft.keep_prefix(lengths[1])
        result = self.last_step.result
        stats.add_walk(result)
        stats.draft_time += seconds[0]
        stats.target_time += seconds[1]
        if stats.steps == 1:  # the first tree forward also runs the prompt
            stats.prefill_time += seconds[1]
        stats.verify_time += time.perf_counter() - began - seconds[0] - seconds[1]
        return result.emitted

    def _compiled_forwards(self, plan: tuple, length: int, fresh: int) -> tuple | None:
        """((draft's ``compiled_forward``, its cache length after a step), (the target's, its))
        for steps of ``plan`` (``_one_call_plan``) after ``length`` committed tokens, each
        forward of at least ``fresh`` tokens the caches lack (a loop's later steps: up to 2 for
        the draft), or None where either forward is not compiled or not one panel pass."""
        tree, draft, target = self.tree, self.draft, self.target
        levels = [1] * (tree.depth - 1) if plan[0] == "chain" else tree.level_sizes[:-1]  # the draft's
        draft_end, target_end = length + sum(levels), length + tree.num_nodes
        draft_model = draft.compiled_forward(max((length - draft.cached, fresh, *levels)), draft_end)
        target_model = target.compiled_forward(length - target.cached + tree.num_nodes, target_end)
        if draft_model is None or target_model is None:
            return None
        return (draft_model, draft_end), (target_model, target_end)

    def _kernel_arguments(self, plan: tuple, draft_model: tuple, target_model: tuple, rng) -> tuple:
        """The arguments ``_step_numba``'s ``tree_step`` and ``tree_steps`` (``chain_step`` and
        ``chain_steps`` for a chain) share after their own: the tree, law, transform, the draft's
        output tokens, both runners' ``compiled_forward``, the verifier of ``plan``
        (``_one_call_plan``), the generator's source and the clock."""
        tree, draft, sampling = self.tree, self.draft, self.sampling
        output_ids = DENSE_IDS if draft.output_ids is None else draft.output_ids
        temperature, source = float(sampling.temperature), self._source(rng)
        clock = _step_kernels().clock_source()
        if plan[0] == "chain":
            _, top_k, block = plan
            top_p = kernel_truncation(sampling.top_k, sampling.top_p)[1]
            head = (tree.depth, temperature, top_k, top_p, output_ids, draft.output_token_ids, block)
            return (*head, *draft_model, *target_model, *source, clock)
        head = (
            *draft.tree_arrays(tree), self._target_mask, TREE_LAWS[self.book.law.name], temperature,
            *kernel_truncation(sampling.top_k, sampling.top_p), output_ids, draft.output_token_ids,
        )  # fmt: skip
        hidden = np.float32(self.target.hidden)
        return (*head, *draft_model, *target_model, hidden, *plan[1], *source, clock)

    def _compiled_steps(
        self, seq: list[int], out: list[int], rng: np.random.Generator, stats: DecodeStats, ctx: int | None
    ) -> tuple[bool, str | None]:
        """``generate_one``'s loop of steps in one compiled call (``_step_numba.tree_steps`` or
        ``chain_steps``: ``_one_call_step``'s kernel step after step, each step's tokens cut at
        the budget or an EOS as ``_finish`` cuts them, no Python between steps), extending
        ``seq`` and ``out`` and counting every step in ``stats``. Returns (whether it ran, the
        stop reason or None); it does not run where ``_one_call_step`` would not, or where the
        first step's fresh tokens exceed one panel pass (the prompt's). A tree's node the plan
        was not made for ends the call after its forwards, and is walked here
        (``walk.walk_tree_softmax``). The same tokens, caches, statistics and generator state as
        the steps one call each (tested)."""
        plan, tree, draft, target = self._one_call_plan(), self.tree, self.draft, self.target
        budget, length = self.sampling.max_new_tokens - len(out), len(seq)
        if plan is None or budget < 1:
            return False, None
        forwards = self._compiled_forwards(plan, length, fresh=2)  # later steps: 2 fresh tokens at most
        if forwards is None:
            return False, None
        (draft_model, _), (target_model, _) = forwards
        began, chain = time.perf_counter(), plan[0] == "chain"
        sampling, kernels = self.sampling, _step_kernels()
        buffer = np.zeros(length + budget + tree.num_nodes + 2, dtype=np.int64)
        buffer[:length] = seq
        records = np.zeros((budget, kernels.RECORD_FIELDS))  # a step emits a token at least
        context_end = ctx - tree.depth if ctx is not None else np.iinfo(np.int64).max
        common = (
            buffer, length, length + budget, context_end, min(draft.capacity, target.capacity),
            np.fromiter(sorted(self.eos), np.int64), sampling.stop_on_eos, records, draft.cached,
            target.cached,
        )  # fmt: skip
        loop = kernels.chain_steps if chain else kernels.tree_steps
        last, end, steps, status, draft_cached, target_cached = loop(
            *common, *self._kernel_arguments(plan, draft_model, target_model, rng)
        )
        seconds = records[:steps, 2:].sum(axis=0)  # draft, target, walk
        draft.advance(draft_cached, steps * tree.depth, seconds[0])
        target.advance(target_cached, steps, seconds[1])
        unplanned = status == kernels.UNPLANNED
        if stats.steps == 0:  # the first tree forward also runs the prompt
            stats.prefill_time += records[0, 3]
        for kept, bonus in records[: steps - unplanned, :2].tolist():
            stats.add_step(int(kept), bool(bonus))
        new = buffer[length:end].tolist()
        seq += new
        out += new
        stop = kernels.stop_reason(status)
        if unplanned:  # the last step's walk, node by node on the call's logits; its tokens
            self.last_step = self._walk_unplanned(last, len(seq), rng)
            stats.add_walk(self.last_step.result)
            budget = sampling.max_new_tokens - len(out)
            new, stop = _finish(self.last_step.result.emitted, budget, self.eos, sampling.stop_on_eos)
            seq += new
            out += new
            if not stop and ctx is not None and len(seq) + tree.depth > ctx:
                stop = "context"
        else:
            self.last_step = self._compiled_record(last, chain)
        stats.draft_time += seconds[0]
        stats.target_time += seconds[1]
        stats.verify_time += time.perf_counter() - began - seconds[0] - seconds[1]
        return True, stop

    def _walk_unplanned(self, step: tuple, base: int, rng: np.random.Generator) -> StepRecord:
        """The ``StepRecord`` of a tree step (``step``: ``_step_numba.tree_step``'s result) whose
        tree has a node the plan table does not serve, after ``base`` committed tokens: its walk
        (``walk.walk_tree_softmax`` on the step's logits, nothing drawn before it), both caches
        then kept."""
        drafts, logits, rows = step[:3]
        drafted, sampling = self._drafted_slots(SampledTree(*drafts)), self.sampling
        args = (logits, sampling.temperature, sampling.top_k, self.book, rng, self._source(rng))
        result = walk_tree_softmax(self.tree, drafted, *args, top_p=sampling.top_p)
        self._keep_path(base, result.path)
        return StepRecord(drafted, None, result, logits, rows.tolist())

    def _compiled_record(self, step: tuple, chain: bool) -> StepRecord:
        """The ``StepRecord`` of a step in compiled code (``step``: ``_step_numba.tree_step``'s
        result, or ``chain_step``'s for a chain)."""
        if chain:
            sampled, logits, kept, token = step[:4]
            drafted = self._drafted_chain(SampledChain(*sampled), self.book.rule(1, 2))
            result = chain_walk_result(drafted.tokens.tolist(), kept, token)
            return StepRecord(drafted, None, result, logits, None)
        drafts, logits, rows, path, token, bonus = step[:6]
        drafted = self._drafted_slots(SampledTree(*drafts))
        return StepRecord(drafted, None, tree_walk_result(drafted, path, token, bonus), logits, rows.tolist())

    def _keep_path(self, base: int, path: list[int]) -> None:
        """Keep the committed prefix of ``base`` tokens and the accepted ``path`` of tree nodes in
        both caches (the draft never caches the last level)."""
        depths, depth = self.tree.depths, self.tree.depth
        self.target.keep_positions(base, [base + node for node in path])
        self.draft.keep_positions(base, [base + node for node in path if depths[node] < depth])

    def step(self, seq: list[int], rng: np.random.Generator, stats: DecodeStats) -> list[int]:
        """One draft / verify step after ``seq``; returns the emitted tokens."""
        if (emitted := self._one_call_step(seq, rng, stats)) is not None:
            return emitted
        t0 = time.perf_counter()
        fast = self.fast_chain and not self.exact_acceptance  # the lean loop of a chain
        drafted = self.draft_chain(seq, rng) if fast else self.draft_tree(seq, rng)
        t1 = time.perf_counter()
        from_logits = fast and self._walks_from_logits(drafted)
        tree_from_logits = not fast and self._walks_tree_from_logits(drafted)
        rows = None
        if from_logits:  # a chain: the causal forward and every row's logits in one call
            ids = np.asarray(seq[self.target.cached :] + drafted.tokens.tolist())
            hidden, logits = None, self.target.causal(ids, self.tree.num_nodes + 1)  # [N + 1, V]
        elif tree_from_logits:  # a tree: the forward and the valid rows' logits in one call
            rows = [node + 1 for node in self._head_batch(-1, drafted)]
            hidden, logits = None, self.target_logits(seq, drafted, rows)  # [1 + valid nodes, V]
        else:
            hidden, logits = self.target_hidden(seq, drafted), None  # [N + 1, H]
        t2 = time.perf_counter()
        head_time = 0.0
        sampling, source = self.sampling, self._source(rng)
        if from_logits:  # the whole walk in one compiled call
            block = self.config.verifier == "block"
            top_k, top_p = (None, None) if drafted.chain_kept is None else (sampling.top_k, sampling.top_p)
            result = walk_chain_softmax(
                drafted, logits, sampling.temperature, rng, block, source, top_k, top_p
            )
        elif tree_from_logits:
            args = (logits, sampling.temperature, sampling.top_k, self.book, rng, source)
            result = walk_tree_softmax(self.tree, drafted, *args, top_p=sampling.top_p)
        else:
            result, head_time = self._walk(drafted, hidden, rng, fast)
        t3 = time.perf_counter()
        # keep the committed prefix + the accepted path in both caches
        base, depth = len(seq), self.tree.depth  # the draft never caches the last level
        if fast:  # a chain: the accepted path is its first nodes
            self.target.keep_prefix(base + len(result.path))
            self.draft.keep_prefix(base + min(len(result.path), depth - 1))
        else:
            self._keep_path(base, result.path)
        t4 = time.perf_counter()
        self.last_step = StepRecord(drafted, hidden, result, logits, rows)  # for inspection and tests
        stats.add_walk(result)
        stats.draft_time += t1 - t0
        stats.target_time += (t2 - t1) + head_time
        if stats.steps == 1:  # the first tree forward also runs the prompt
            stats.prefill_time += t2 - t1
        stats.verify_time += (t3 - t2 - head_time) + (t4 - t3)
        return result.emitted
