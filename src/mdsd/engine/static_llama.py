"""A lean forward for Llama-family decoders over a preallocated KV cache (the engine's fast path).

Hugging Face's forward rebuilds its masks, concatenates every layer's cache on every call and
pays several layers of Python wrappers per module; for the small models of a draft tree (a
forward every tree level) that overhead is a large share of a step. ``StaticLlamaRunner`` runs the
same arithmetic directly on the model's own weights, in the style of gpt-fast:

1. token embeddings; rotary cos / sin from the model's own rotary module (every RoPE variant it
   supports) at the given position ids;
2. per layer: RMSNorm (the model's module), one fused q/k/v projection, rotary embedding, the new
   keys / values written into a preallocated cache ``[layers, kv_heads, capacity, head_dim]``,
   scaled-dot-product attention over the cache prefix with the engine's additive mask, output
   projection, RMSNorm, one fused gate/up projection, SiLU-gated MLP;
3. the final norm; the output layer is applied by the caller to the rows it needs.

Keeping the accepted path after verification is an index copy inside the cache and a new length
(no reallocation). ``ModelRunner`` (Hugging Face's forward) is the reference: tests compare the
logits of causal and tree forwards and the caches after accepted paths, and the engine's
exact-law tests run on both runners. Used for ``llama``, ``mistral`` and ``qwen2`` models with
SiLU MLPs; other models use ``ModelRunner``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mdsd.engine.runner import ModelRunner

STATIC_MODEL_TYPES = ("llama", "mistral", "qwen2")


def supports_static(model) -> bool:
    """True when ``StaticLlamaRunner`` computes exactly what the model's own forward does."""
    config = model.config
    return (
        getattr(config, "model_type", None) in STATIC_MODEL_TYPES
        and getattr(config, "hidden_act", None) == "silu"
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "pretraining_tp", 1) == 1
        and hasattr(model.base_model, "rotary_emb")
    )


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights: q/k/v and gate/up fused into new tensors, the rest the model's own."""

    input_norm: torch.nn.Module
    qkv: torch.Tensor  # [(H + 2 H_kv) d, hidden]
    qkv_bias: torch.Tensor | None  # [(H + 2 H_kv) d]
    out: torch.Tensor  # [hidden, H d]
    post_norm: torch.nn.Module
    gate_up: torch.Tensor  # [2 I, hidden]
    down: torch.Tensor  # [hidden, I]


def _fuse(layer) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    bias = None
    if attn.q_proj.bias is not None:
        bias = torch.cat([p.bias for p in projections]).detach()
    return _Layer(
        layer.input_layernorm,
        torch.cat([p.weight for p in projections]).detach(),
        bias,
        attn.o_proj.weight.detach(),
        layer.post_attention_layernorm,
        torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
        mlp.down_proj.weight.detach(),
    )


class StaticLlamaRunner(ModelRunner):
    """``ModelRunner`` with the lean forward and a preallocated cache (see the module docstring).

    ``reset(capacity)`` sizes the cache for ``capacity`` positions (it grows when asked for
    more); a forward past the capacity raises ValueError.
    """

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        body = model.base_model
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self._embed = body.embed_tokens
        self._rotary = body.rotary_emb
        self._final_norm = body.norm
        self._layers = [_fuse(layer) for layer in body.layers]
        self._keys = self._values = None  # [layers, kv_heads, capacity, head_dim]
        self._length = 0

    # ------------------------------------------------------------------ cache
    def reset(self, capacity: int | None = None) -> None:
        capacity = int(capacity or 256)
        if self._keys is None or self._keys.shape[2] < capacity:
            shape = (len(self._layers), self.kv_heads, capacity, self.head_dim)
            self._keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self._values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._length = 0

    @property
    def cached(self) -> int:
        return self._length

    def keep_positions(self, base: int, extra: np.ndarray) -> None:
        """Keep cache entries 0..base-1 followed by the entries at absolute positions ``extra``."""
        extra = np.asarray(extra, dtype=np.int64)
        k = extra.size
        if k and not np.array_equal(extra, np.arange(base, base + k)):
            idx = torch.as_tensor(extra, device=self.device)
            self._keys[:, :, base : base + k] = self._keys[:, :, idx]  # the gather copies first
            self._values[:, :, base : base + k] = self._values[:, :, idx]
        self._length = base + k

    # ------------------------------------------------------------------ forward
    def _hidden(self, ids, keep: int, attention_mask=None, position_ids=None) -> torch.Tensor:
        start = self._length
        m = len(ids)
        end = start + m
        if self._keys is None or end > self._keys.shape[2]:
            capacity = 0 if self._keys is None else self._keys.shape[2]
            raise ValueError(f"the static cache holds {capacity} positions; this forward needs {end}")
        tokens = torch.as_tensor(ids, dtype=torch.long, device=self.device)[None]  # [1, m]
        if position_ids is None:
            position_ids = torch.arange(start, end, device=self.device)[None]
        if attention_mask is not None:
            mask = attention_mask  # [1, 1, m, end] additive
        elif m > 1:  # causal block over the new tokens
            mask = torch.zeros((m, end), dtype=self.dtype, device=self.device)
            mask[:, start:] = self._causal_block(m)
            mask = mask[None, None]
        else:
            mask = None
        x = self._embed(tokens)  # [1, m, hidden]
        cos, sin = self._rotary(x, position_ids)  # [1, m, d]
        for i, layer in enumerate(self._layers):
            x = x + self._attention(i, layer, layer.input_norm(x), cos, sin, mask, start, end)
            h = layer.post_norm(x)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        self._length = end
        self.calls += 1
        return self._final_norm(x)[0, -keep:]

    def _attention(self, i, layer: _Layer, h, cos, sin, mask, start: int, end: int):
        m, d = h.shape[1], self.head_dim
        qkv = F.linear(h, layer.qkv, layer.qkv_bias)[0]  # [m, (H + 2 H_kv) d]
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(m, self.heads, d).transpose(0, 1)  # [H, m, d]
        k = k.view(m, self.kv_heads, d).transpose(0, 1)  # [H_kv, m, d]
        v = v.view(m, self.kv_heads, d).transpose(0, 1)
        q, k = _rotate(q, cos[0], sin[0]), _rotate(k, cos[0], sin[0])
        self._keys[i, :, start:end] = k
        self._values[i, :, start:end] = v
        out = F.scaled_dot_product_attention(
            q[None],
            self._keys[i, :, :end][None],
            self._values[i, :, :end][None],
            attn_mask=mask,
            enable_gqa=self.kv_heads != self.heads,
        )  # [1, H, m, d]
        return F.linear(out.transpose(1, 2).reshape(1, m, self.heads * d), layer.out)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [heads, m, d] with cos / sin [m, d] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def make_runner(model, fast: bool = True) -> ModelRunner:
    """The engine's runner for ``model``: ``StaticLlamaRunner`` where it applies, else the
    Hugging Face forward (``ModelRunner``)."""
    return StaticLlamaRunner(model) if fast and supports_static(model) else ModelRunner(model)
