"""What the engine needs from a Hugging Face causal LM: checks, tree forwards, KV-cache surgery.

Tree attention (docs/theory.md §7): the new tokens of a forward are (a) committed tokens not yet in
the cache, attended causally, then (b) tree nodes, each attending to everything committed, its
ancestors and itself. The model gets an additive float 4-D mask ``[1, 1, queries, keys]`` (0 =
visible, dtype minimum = hidden), which both the SDPA and the eager attention paths of
transformers 5.x use as given, and explicit position ids (a node's position is the root's position
plus its depth). After verification only the accepted path is kept: ``keep_positions`` moves the
accepted entries next to the committed prefix in every layer and drops the rest.

Supported: decoder-only models whose cache is a plain ``DynamicCache`` of full-attention layers,
with SDPA or eager attention, from the families in ``SUPPORTED_MODEL_TYPES``; on top of that,
``check_tree_attention`` compares a tree forward with plain forwards once per model, so a model
that ignores custom 4-D masks is refused instead of decoding from a wrong distribution.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

SUPPORTED_MODEL_TYPES = ("llama", "gpt2", "mistral", "qwen2", "qwen3")
SUPPORTED_ATTENTION = ("sdpa", "eager")
MASK_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # else 2e-2 (half precision)
# SDPA on CUDA without cuDNN's backend, which builds a new execution graph for every new key
# length (PyTorch pull request 155958), i.e. at every decoding step
STEADY_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def steady_attention(device: torch.device):
    """The context every decoding forward on ``device`` runs in: on CUDA, SDPA limited to
    ``STEADY_SDPA_BACKENDS``; elsewhere torch's own choice (a null context)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(STEADY_SDPA_BACKENDS)


def check_supported(model, name: str) -> None:
    """Raise ValueError (naming ``name``: target or draft) for a model the engine cannot drive."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name} model type {model_type!r} is not supported by tree decoding; supported: "
            f"{list(SUPPORTED_MODEL_TYPES)}"
        )
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"{name} model uses attention {attn!r}; tree decoding needs one that honours 4-D "
            f"masks: {list(SUPPORTED_ATTENTION)} (load with attn_implementation='sdpa')"
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        if model_type != "llama":
            raise ValueError(f"{name} model uses sliding-window attention, which is not supported")


def cache_keyword(module) -> str:
    """The name of a Hugging Face module's KV-cache argument: ``cache`` in transformers >= 5.x,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def context_length(model) -> int | None:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return None


@dataclass(frozen=True)
class SampledChain:
    """A chain drafted in one call (``StaticLlamaRunner.sample_chain``).

    tokens: [D] int64 token ids, level by level.
    probs:  [D, W] float64 q of each level over the output layer's K tokens (W = K), or over its
            top-k (W = k) where the transform truncates.
    zeros:  [D] int64 entries of each level's q that underflowed to 0.
    kept:   [D, k] int64 positions in the output layer's tokens of a truncated q's entries
            (ascending); empty where each q covers all K.
    """

    tokens: np.ndarray
    probs: np.ndarray
    zeros: np.ndarray
    kept: np.ndarray


@dataclass(frozen=True)
class SampledTree:
    """A draft tree drafted in one call (``StaticLlamaRunner.sample_tree``); R rows of q, one per
    node with children (the root and the valid nodes above the last level, breadth first).

    tokens:  [N] int64 token ids in the tree's node slots (an unused slot: its node's first draft).
    valid:   [N] bool, the slots drafted.
    nodes:   [R] int64 the node of each q row (-1: the root).
    drafted: [R] int64 drafts of each row's node (n_eff).
    probs, zeros, kept: as ``SampledChain``'s, per row.
    """

    tokens: np.ndarray
    valid: np.ndarray
    nodes: np.ndarray
    drafted: np.ndarray
    probs: np.ndarray
    zeros: np.ndarray
    kept: np.ndarray


class ModelRunner:
    """A causal LM with its DynamicCache and the three forwards the engine uses.

    All methods run under the caller's ``torch.inference_mode()``. A forward returns the final
    hidden states of the rows asked for; ``logits`` applies the output layer to the rows the
    engine needs (float32 numpy [rows, V]). The cache is the model's ``DynamicCache``; after a
    tree forward ``keep_positions`` keeps the committed prefix and the accepted path.
    """

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.hidden = float(torch.finfo(self.dtype).min)  # the additive masks' "not visible"
        self._body = model.base_model  # the decoder stack without the output layer
        self._head = model.get_output_embeddings()
        self._full_head = self._head
        self.output_ids = None  # [K] token ids of the logits' columns (None: the whole vocabulary)
        self._body_cache_kw = cache_keyword(self._body)
        self._dynamic_cache = DynamicCache
        self.cache = None
        self.calls = 0
        self.model_time = 0.0  # seconds inside forwards and the output layer (for the profile)
        self._checked_layers = False

    # ------------------------------------------------------------------ cache
    def reset(self, capacity: int | None = None) -> None:
        """Empty the cache (``capacity``: positions the caller will need; a hint only here)."""
        self.cache = self._dynamic_cache(config=self.model.config)
        self._checked_layers = False

    @property
    def cached(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def _check_layers(self) -> None:
        from transformers.cache_utils import DynamicLayer

        for layer in self.cache.layers:
            if type(layer) is not DynamicLayer:
                raise ValueError(
                    f"model {type(self.model).__name__} uses cache layers of type "
                    f"{type(layer).__name__}; tree decoding needs plain full-attention layers"
                )
        self._checked_layers = True

    def keep_positions(self, base: int, extra: np.ndarray) -> None:
        """Keep cache entries 0..base-1 followed by the entries at absolute positions ``extra``."""
        extra = np.asarray(extra, dtype=np.int64)
        k = extra.size
        if k == 0 or bool(np.all(extra == np.arange(base, base + k))):
            self.keep_prefix(base + k)
            return
        idx = torch.as_tensor(extra, device=self.device)
        for layer in self.cache.layers:
            keys, values = layer.keys, layer.values
            keys[:, :, base : base + k] = keys[:, :, idx]  # the gather copies before writing
            values[:, :, base : base + k] = values[:, :, idx]
        self.keep_prefix(base + k)

    def keep_prefix(self, length: int) -> None:
        """Keep cache entries 0..length-1 (``keep_positions`` of a contiguous run)."""
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]

    # ------------------------------------------------------------------ forwards
    def _hidden(self, ids, keep: int, **kwargs) -> torch.Tensor:
        """Final hidden states of the last ``keep`` new tokens, [keep, H] (the cache grows)."""
        with steady_attention(self.device):
            out = self._body(
                input_ids=torch.as_tensor(ids, dtype=torch.long, device=self.device)[None, :],
                use_cache=True,
                **{self._body_cache_kw: self.cache},
                **kwargs,
            )
        self.calls += 1
        if not self._checked_layers:
            self._check_layers()
        return out.last_hidden_state[0, -keep:]

    def logits(self, hidden: torch.Tensor) -> np.ndarray:
        """Logits of hidden-state rows [r, H] -> float32 numpy [r, V] (the output layer alone).

        The engine applies the output layer only to the rows it needs: every valid node of a
        draft level, but only the visited nodes of the target's tree.
        """
        start = time.perf_counter()
        out = self._head(hidden).float().cpu().numpy()
        self.model_time += time.perf_counter() - start
        return out

    def restrict_output(self, token_ids: np.ndarray | None) -> None:
        """Compute the logits of ``token_ids`` [K] (ascending) only: ``logits`` then returns
        [rows, K], column j for token ``token_ids[j]`` (``mdsd.engine.vocab``); None restores
        the whole vocabulary."""
        self.output_ids = None if token_ids is None else np.asarray(token_ids, dtype=np.int64)
        head = self._full_head
        weight, bias = head.weight.detach(), getattr(head, "bias", None)
        if self.output_ids is not None:  # the kept rows of the output layer
            ids = torch.as_tensor(self.output_ids, device=self.device)
            weight, bias = weight[ids], None if bias is None else bias.detach()[ids]
        self._use_output(weight, bias)

    def _use_output(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Adopt the output layer ``weight`` [K or V, H] (+ ``bias``) set by ``restrict_output``."""
        if self.output_ids is None:
            self._head = self._full_head
        else:
            self._head = lambda hidden: torch.nn.functional.linear(hidden, weight, bias)

    def causal_hidden(self, ids: np.ndarray, keep: int = 1) -> torch.Tensor:
        """Plain causal forward of ``ids`` after the cache; hidden states of the last ``keep``."""
        return self._timed(ids, keep)

    def _timed(self, ids, keep: int, **kwargs) -> torch.Tensor:
        start = time.perf_counter()
        out = self._hidden(ids, keep, **kwargs)
        self.model_time += time.perf_counter() - start
        return out

    def sample_chain(
        self,
        ids,
        depth: int,
        rng: np.random.Generator,
        temperature: float,
        source=None,
        top_k=None,
        top_p=None,
    ) -> SampledChain | None:
        """A chain drafted in one compiled call, or None (drawing nothing from ``rng``) where the
        runner has none (this one): see ``StaticLlamaRunner.sample_chain``."""
        return None

    def sample_tree(
        self,
        ids,
        tree,
        distinct: bool,
        rng: np.random.Generator,
        temperature: float,
        source=None,
        top_k=None,
        top_p=None,
    ) -> SampledTree | None:
        """A draft tree drafted in one compiled call, or None (drawing nothing from ``rng``) where
        the runner has none (this one): see ``StaticLlamaRunner.sample_tree``."""
        return None

    @property
    def compiled(self) -> bool:
        """Whether the runner has compiled forwards (``compiled_forward``; this one has none)."""
        return False

    def compiled_forward(self, rows: int, end: int) -> tuple | None:
        """The compiled forwards' arguments for forwards of at most ``rows`` tokens filling the
        cache up to ``end`` entries, or None where the runner has none (this one): see
        ``StaticLlamaRunner.compiled_forward``."""
        return None

    def causal(self, ids: np.ndarray, keep: int = 1) -> np.ndarray:
        """Plain causal forward of ``ids`` after the cache; logits of the last ``keep`` rows."""
        return self.logits(self._timed(ids, keep))

    def tree_hidden(
        self,
        ids: np.ndarray,
        num_causal: int,
        tree_mask: np.ndarray,
        node_depths: np.ndarray,
        root_position: int,
        keep: int,
    ) -> torch.Tensor:
        """Forward ``ids`` = num_causal committed tokens, then T tree nodes; hidden [keep, H].

        tree_mask: [T, C_tree] additive float32 (``additive``) over the keys that belong to the
            tree (the last C_tree keys, ending with these nodes); tree nodes see every earlier key.
        node_depths: [T] depth of each node; its position id is root_position + depth.
        root_position: position of the root (the last committed token).
        """
        cached = self.cached
        total_new = len(ids)
        keys = cached + total_new
        mask = np.zeros((total_new, keys), dtype=np.float32)  # [new, keys] additive
        if num_causal > 1:  # causal block of the committed tokens
            mask[:num_causal, cached : cached + num_causal] = self._causal_block(num_causal)
        if num_causal > 0:  # committed tokens never see the tree
            mask[:num_causal, cached + num_causal :] = self.hidden
        mask[num_causal:, keys - tree_mask.shape[1] :] = tree_mask
        positions = np.concatenate(
            [np.arange(cached, cached + num_causal), root_position + np.asarray(node_depths)]
        )
        assert positions.size == total_new and total_new - num_causal == len(node_depths)
        start = time.perf_counter()
        out = self._masked_hidden(ids, keep, mask, positions)
        self.model_time += time.perf_counter() - start
        return out

    def tree_logits(
        self,
        ids: np.ndarray,
        num_causal: int,
        tree_mask: np.ndarray,
        node_depths: np.ndarray,
        root_position: int,
        rows: Sequence[int],
    ) -> np.ndarray:
        """``tree_hidden`` (``num_causal`` >= 1 committed tokens, the root last) then ``logits``
        of ``rows`` (ascending; 0: the root, i + 1: node i): [len(rows), V]."""
        hidden = self.tree_hidden(
            ids, num_causal, tree_mask, node_depths, root_position, len(node_depths) + 1
        )
        return self.logits(rows_of(hidden, rows))

    def _masked_hidden(self, ids, keep: int, mask: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """The forward of ``tree_hidden`` under an additive float32 mask [new, keys] and explicit
        position ids [new]."""
        return self._hidden(
            ids,
            keep,
            attention_mask=torch.from_numpy(mask).to(device=self.device, dtype=self.dtype)[None, None],
            position_ids=torch.as_tensor(positions, dtype=torch.long, device=self.device)[None],
        )

    def _causal_block(self, size: int) -> np.ndarray:
        """[size, size] additive causal mask (hidden above the diagonal), float32."""
        return np.triu(np.full((size, size), self.hidden, dtype=np.float32), k=1)

    def additive(self, visible: np.ndarray) -> np.ndarray:
        """Bool visibility [..] -> additive float32 mask (0 visible, ``hidden`` not): exact in
        the model's dtype, the dtype's most negative finite number."""
        return np.where(visible, np.float32(0.0), np.float32(self.hidden))


def rows_of(hidden: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """hidden[rows] for distinct ascending row indices (a list); hidden itself when they are all
    of its rows (a chain's levels and small trees: no gather)."""
    if len(rows) == hidden.shape[0]:
        return hidden
    return hidden[torch.as_tensor(rows, device=hidden.device)]


def check_tree_attention(runner: ModelRunner, name: str, vocab: int, seed: int = 0) -> None:
    """Refuse a model whose tree forward differs from plain forwards (4-D mask ignored).

    Context of 3 tokens, tree (2, 1): compares the logits of every tree node with a plain
    forward over context + path. Raises ValueError naming ``name``.
    """
    from mdsd.engine.tree import build_tree

    tree = build_tree((2, 1))
    gen = np.random.default_rng(seed)
    context = gen.integers(0, vocab, size=3)
    nodes = gen.integers(0, vocab, size=tree.num_nodes)
    tol = MASK_CHECK_TOLERANCE.get(runner.dtype, 2e-2)
    mask = runner.additive(tree.ancestor_mask[1:, 1:])  # [N, N] over the tree's keys
    runner.reset()
    runner.causal(context[:-1])
    got = runner.logits(
        runner.tree_hidden(
            np.concatenate([context[-1:], nodes]),
            1,
            mask,
            tree.depths,
            root_position=len(context) - 1,
            keep=tree.num_nodes,
        )
    )
    for i in range(tree.num_nodes):
        path = [i] if tree.parents[i] < 0 else [int(tree.parents[i]), i]
        runner.reset()
        want = runner.causal(np.concatenate([context, nodes[path]]), keep=1)[0]
        scale = max(1.0, float(np.abs(want).max()))
        if not np.allclose(got[i], want, atol=tol * scale, rtol=0):
            raise ValueError(
                f"{name} model {type(runner.model).__name__} does not honour custom 4-D attention "
                f"masks (tree logits differ from a plain forward by "
                f"{float(np.abs(got[i] - want).max()):.3g}); tree decoding is not supported for it"
            )
    runner.reset()
