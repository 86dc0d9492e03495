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

import contextlib
import copy
import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mdsd.engine.runner import ModelRunner, SampledChain, SampledTree, steady_attention
from mdsd.logits import kernel_truncation
from mdsd.sampling import uniform_source

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


MATMULS = ("auto", "torch", "numpy", "numba")
NUMPY_MATMUL_MAX_BYTES = 4 * 2**30  # "auto": the BLAS copies of larger models would cost too much memory


WEIGHTS = ("exact", "int8")


def check_weights(weights: str) -> None:
    """``weights`` of a runner: "exact" (the model's own weights) or "int8" (the projections and
    the output layer quantized per output column, ``_panel_gemm.int8_columns``: for a draft,
    whose q the verifier is given as computed, so the output law stays the target's)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")


def choose_matmul(model, matmul: str = "auto") -> str:
    """The forward's backend: "torch" (``F.linear`` and torch operations), "numpy" (projections
    by OpenBLAS through numpy on transposed weight copies, the rest in torch) or "numba" (the
    decoder layers compiled, ``mdsd.engine._llama_numba``: weight panels for a few rows, the BLAS
    for many); "auto" takes numba for a float32 model on the CPU of at most
    ``NUMPY_MATMUL_MAX_BYTES`` of weights, else torch. Raises ValueError naming ``matmul``."""
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {list(MATMULS)}, got {matmul!r}")
    cpu_float32 = model.device.type == "cpu" and model.dtype == torch.float32
    if matmul in ("numpy", "numba") and not cpu_float32:
        raise ValueError(
            f"matmul {matmul!r} needs a float32 model on the CPU, got {model.dtype} on {model.device}"
        )
    from mdsd.engine._panel_gemm import gemm_kernel

    if matmul == "numba" and gemm_kernel() is None:
        raise ValueError("matmul 'numba': llvmlite cannot compile the panel kernel here; use 'numpy'")
    if matmul != "auto":
        return matmul
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if not cpu_float32 or size > NUMPY_MATMUL_MAX_BYTES:
        return "torch"
    return "numba" if gemm_kernel() is not None else "numpy"


class _BlasThreads:
    """Give numpy's BLAS the thread budget of torch's intra-op setting during a forward.

    With the numpy backend the projections run in numpy's BLAS and the remaining torch operations
    are small; when both libraries run several threads on the same cores, torch's OpenMP workers
    spin while the BLAS works and a forward gets several times slower. Inside ``with
    blas_threads:`` torch runs one thread and the BLAS ``torch.get_num_threads()``; both settings
    are restored on exit.
    """

    def __init__(self):
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS of numba's np.dot, controlled too)
        from threadpoolctl import ThreadpoolController

        self._blas = ThreadpoolController().select(user_api="blas").lib_controllers

    def __enter__(self):
        self._budget = torch.get_num_threads()
        self._before = [c.num_threads for c in self._blas]
        torch.set_num_threads(1)
        for c in self._blas:
            c.set_num_threads(self._budget)

    def __exit__(self, *exc):
        for c, n in zip(self._blas, self._before):
            c.set_num_threads(n)
        torch.set_num_threads(self._budget)


class _Linear:
    """y = x W^T (+ b) for x [m, in] -> [m, out], by ``F.linear``, numpy's BLAS or the compiled
    kernels (``matmul`` "torch", "numpy", "numba").

    The numpy form keeps W^T as a C-contiguous float32 array [in, out] (a copy made once) and
    multiplies the tensor's own memory, so no data moves between torch and numpy. On the AMD
    Zen 3 CPU of BENCHMARKS.md, OpenBLAS on this layout takes about half of torch's MKL time for one
    row and a third for 2-16 rows (``benchmarks/bench_matmul.py``). The numba form adds the
    weight panels of ``mdsd.engine._panel_gemm.pack_panels`` (a few rows read each weight once),
    stored in float16 or bfloat16 when every weight is exactly representable there (a checkpoint
    saved in 16 bits, loaded in float32): half the bytes to read, the same products bit for bit.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, matmul: str, fmt: str = "f32"):
        weight = weight.detach()
        self.matmul = matmul
        self.bias = None if bias is None else bias.detach()
        self.weight = weight if matmul == "torch" else None  # [out, in]
        self.weight_t = None if matmul == "torch" else weight.t().contiguous().numpy()  # [in, out]
        self.panels = None  # [P, in, PANEL]
        self.bias_np = np.zeros(0, np.float32) if bias is None else self.bias.numpy()
        if matmul == "numba":
            from mdsd.engine._panel_gemm import gemm_kernel, int8_weights, kernel_address, pack_panels

            self.format = fmt  # the model's panel format (``_panel_format``), or "q8"
            self.panels = pack_panels(self.weight_t, fmt)
            if fmt == "q8":  # the many-row path multiplies by the weights the panels stand for
                self.weight_t = int8_weights(self.weight_t)
            self.gemm = kernel_address(gemm_kernel(fmt))
            self._project = _compiled().project

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None:
            return F.linear(x, self.weight, self.bias)
        return torch.from_numpy(self.numpy(x))

    def numpy(self, x: torch.Tensor) -> np.ndarray:
        """The product as float32 numpy [m, out] (the output layer's form)."""
        if self.weight_t is None:
            return self(x).float().cpu().numpy()
        if self.panels is not None:
            return self._project(x.contiguous().numpy(), self.panels, self.weight_t, self.bias_np, self.gemm)
        out = x.contiguous().numpy() @ self.weight_t
        return out if self.bias is None else out + self.bias_np

    def compiled(self) -> tuple:
        """(panels, W^T, bias) for the compiled layer (bias empty when there is none)."""
        return self.panels, self.weight_t, self.bias_np


def _compiled():
    """The compiled decoder kernels (imported on first use: numba's import costs ~0.3 s)."""
    from mdsd._optional import compiled_module

    return compiled_module("mdsd.engine._llama_numba")


class _Norm:
    """The model's RMSNorm; for float32 models the same formula as one fused ``F.rms_norm``."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        self.module = module
        self.fused = dtype == torch.float32 and eps is not None and hasattr(module, "weight")
        self.eps = None if eps is None else float(eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.module(x)
        return F.rms_norm(x, (x.shape[-1],), self.module.weight, self.eps)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer: norms and projections (q/k/v and gate/up fused into one each)."""

    input_norm: _Norm
    qkv: _Linear  # [hidden] -> [(H + 2 H_kv) d]
    out: _Linear  # [H d] -> [hidden]
    post_norm: _Norm
    gate_up: _Linear  # [hidden] -> [2 I]
    down: _Linear  # [I] -> [hidden]


def _panel_format(model) -> str:
    """The narrowest panel format holding every projection weight of ``model`` exactly ("f16",
    "bf16" or "f32"; ``mdsd.engine._panel_gemm.storage_format``): one format for the whole model,
    so that every layer calls one kernel."""
    from mdsd.engine._panel_gemm import storage_format

    matrices = [p for name, p in model.named_parameters() if p.dim() == 2]
    formats = {storage_format(p.detach().cpu().numpy()) for p in matrices}
    for fmt in ("f16", "bf16"):
        if formats == {fmt}:
            return fmt
    return "f32"


def _fuse(layer, dtype: torch.dtype, matmul: str, fmt: str = "f32") -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    bias = None
    if attn.q_proj.bias is not None:
        bias = torch.cat([p.bias for p in projections])
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    return _Layer(
        _Norm(layer.input_layernorm, dtype),
        _Linear(torch.cat([p.weight for p in projections]), bias, matmul, fmt),
        _Linear(attn.o_proj.weight, attn.o_proj.bias, matmul, fmt),
        _Norm(layer.post_attention_layernorm, dtype),
        _Linear(gate_up, None, matmul, fmt),
        _Linear(mlp.down_proj.weight, None, matmul, fmt),
    )


class StaticLlamaRunner(ModelRunner):
    """``ModelRunner`` with the lean forward and a preallocated cache (see the module docstring).

    ``reset(capacity)`` sizes the cache for ``capacity`` positions (it grows when asked for
    more); a forward past the capacity raises ValueError. ``matmul`` picks the projections'
    backend (``choose_matmul``); both give the model's logits to float32 rounding (tested).
    """

    def __init__(self, model, matmul: str = "auto", weights: str = "exact"):
        super().__init__(model)
        config = model.config
        body = model.base_model
        self.matmul = choose_matmul(model, matmul)
        check_weights(weights)
        if weights == "int8" and self.matmul != "numba":
            raise ValueError(
                f"weights 'int8' needs the compiled forward (matmul 'numba'), got matmul {self.matmul!r}"
            )
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self._embed = body.embed_tokens
        self._rotary = body.rotary_emb
        self._final_norm = _Norm(body.norm, self.dtype)
        self.panel_format = None
        if self.matmul == "numba":
            self.panel_format = "q8" if weights == "int8" else _panel_format(model)
        fmt = self.panel_format or "f32"
        self._layers = [_fuse(layer, self.dtype, self.matmul, fmt) for layer in body.layers]
        self._output = _Linear(self._head.weight, getattr(self._head, "bias", None), self.matmul, fmt)
        if self.matmul == "numba":
            self._pool_panels()
        self._compiled_layers = self._compiled_weights() if self.matmul == "numba" else None
        self._model_arrays = None  # ``_compiled_model``'s list, built on first use
        self._tree_cache = None  # (tree, ``tree_arrays``) of the last tree drafted in one call
        self._threads = _BlasThreads() if self.matmul == "numpy" else contextlib.nullcontext()
        self._keys = self._values = None  # [layers, kv_heads, capacity, head_dim]
        self._rotary_table = None  # (cos, sin) [capacity, 1, head_dim] when the RoPE is static
        self._rotary_numpy = None  # the same as numpy [capacity, head_dim]
        self._cache_numpy = None  # (keys, values) as numpy views, for the compiled forward
        self._length = 0

    def projections(self) -> list[_Linear]:
        """Every projection in model order (per layer q/k/v, output, gate/up, down), then the
        output layer."""
        per_layer = [
            lin for layer in self._layers for lin in (layer.qkv, layer.out, layer.gate_up, layer.down)
        ]
        return per_layer + [self._output]

    def _pool_panels(self) -> None:
        """Every projection's panels (the output layer's too) in one allocation backed by huge
        pages where the system allows (``_panel_gemm.pool_panels``)."""
        from mdsd.engine._panel_gemm import pool_panels

        linears = self.projections()
        for lin, pooled in zip(linears, pool_panels([lin.panels for lin in linears])):
            lin.panels = pooled

    def _compiled_weights(self) -> tuple[tuple, ...]:
        """Per layer, the arrays of ``_llama_numba.decoder_layer`` (numpy views, no copies but
        the panels); sets the embedding table and final norm the compiled forward reads."""
        norms = [self._final_norm] + [
            n for layer in self._layers for n in (layer.input_norm, layer.post_norm)
        ]
        eps = {n.eps for n in norms}
        if not all(n.fused for n in norms) or len(eps) != 1:
            raise ValueError("matmul 'numba' needs RMSNorm layers with a weight and one epsilon")
        self._eps = eps.pop()
        self._kernels = _compiled()
        self._gemm = self._output.gemm
        self._panel_max_rows = self._kernels.panel_max_rows(self._output.panels.itemsize)
        self._embed_table = self._embed.weight.detach().numpy()  # [V, hidden]
        self._final_norm_weight = self._final_norm.module.weight.detach().numpy()
        return tuple(
            (
                layer.input_norm.module.weight.detach().numpy(),
                *layer.qkv.compiled(),
                *layer.out.compiled(),
                layer.post_norm.module.weight.detach().numpy(),
                *layer.gate_up.compiled()[:2],
                *layer.down.compiled()[:2],
            )
            for layer in self._layers
        )

    def _use_output(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._output = _Linear(weight, bias, self.matmul, self.panel_format or "f32")
        self._model_arrays = None  # rebuilt with the new output layer (``_compiled_model``)

    def _compiled_model(self):
        """A ``numba.typed.List`` holding (embed, layers, final_norm, out_panels, out_t,
        out_bias): the ``models`` argument of ``_llama_numba.causal_logits``, ``tree_logits``,
        ``sample_chain`` and ``sample_tree`` (one object to unbox per call), built once per output
        layer."""
        if self._model_arrays is None:
            from numba.typed import List

            model = (
                self._embed_table,
                self._compiled_layers,
                self._final_norm_weight,
                *self._output.compiled(),
            )
            self._model_arrays = List([model])
        return self._model_arrays

    @property
    def _stack_args(self) -> tuple:
        """(cos table, sin table, heads, kv_heads, eps, gemm): the trailing arguments of every
        compiled forward from token ids (``_llama_numba.causal_logits``, ``tree_logits``,
        ``sample_chain``, ``sample_tree``)."""
        return (*self._rotary_numpy, self.heads, self.kv_heads, self._eps, self._gemm)

    def _compiled_applies(self, tokens: int) -> bool:
        """Whether a forward of ``tokens`` tokens runs as one compiled call from token ids
        (``causal``, ``sample_chain``): matmul "numba", a static RoPE table, one panel pass."""
        return (
            self._compiled_layers is not None
            and self._rotary_numpy is not None
            and tokens <= self._panel_max_rows
        )

    # ------------------------------------------------------------------ cache
    def reset(self, capacity: int | None = None) -> None:
        capacity = int(capacity or 256)
        if self._keys is None or self._keys.shape[2] < capacity:
            shape = (len(self._layers), self.kv_heads, capacity, self.head_dim)
            self._keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self._values = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self._rotary_table = self._static_rotary(capacity)
            if self._compiled_layers is not None:  # the compiled forward's numpy views of the cache
                self._cache_numpy = (self._keys.numpy(), self._values.numpy())
            if self._rotary_table is not None and self._compiled_layers is not None:
                # the compiled forward's [capacity, d] copies (float32 models only)
                self._rotary_numpy = tuple(t[:, 0].contiguous().numpy() for t in self._rotary_table)
        self._length = 0

    def _static_rotary(self, capacity: int):
        """cos / sin of positions 0..capacity-1 from the model's rotary module, looked up per
        forward instead of recomputed. Each entry depends on its own position only (an outer
        product of positions and frequencies, then cos / sin), so the table holds the module's
        numbers bit for bit. RoPE variants that rescale with the sequence length ("dynamic",
        "longrope") are recomputed per forward: None."""
        rope_type = str(getattr(self._rotary, "rope_type", "default"))
        if "dynamic" in rope_type or "longrope" in rope_type:
            return None
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        positions = torch.arange(capacity, device=self.device)[None]
        cos, sin = self._rotary(probe, positions)  # [1, capacity, d]
        return cos[0, :, None], sin[0, :, None]  # [capacity, 1, d]

    @property
    def cached(self) -> int:
        return self._length

    def keep_positions(self, base: int, extra: np.ndarray) -> None:
        """Keep cache entries 0..base-1 followed by the entries at absolute positions ``extra``."""
        extra = np.asarray(extra, dtype=np.int64)
        k = extra.size
        if k and extra.tolist() != list(range(base, base + k)):  # a few positions: plain Python
            if self._cache_numpy is not None:  # the compiled forward's views: one compiled call
                self._kernels.gather_positions(*self._cache_numpy, base, extra)
            else:
                idx = torch.as_tensor(extra, device=self.device)
                self._keys[:, :, base : base + k] = self._keys[:, :, idx]
                self._values[:, :, base : base + k] = self._values[:, :, idx]
        self.keep_prefix(base + k)

    def keep_prefix(self, length: int) -> None:
        """Keep cache entries 0..length-1: later entries are overwritten by the next forward."""
        self._length = length

    # ------------------------------------------------------------------ forward
    def logits(self, hidden: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        with self._threads:
            out = self._output.numpy(hidden)  # [rows, V]
        self.model_time += time.perf_counter() - start
        return out

    def _hidden(self, ids, keep: int, attention_mask=None, position_ids=None) -> torch.Tensor:
        with self._threads:
            if self._compiled_layers is not None:  # a causal forward (tree forwards: _masked_hidden)
                return self._forward_compiled(ids, keep)
            return self._forward(ids, keep, attention_mask, position_ids)

    def _check_capacity(self, end: int) -> None:
        if self._keys is None or end > self._keys.shape[2]:
            capacity = 0 if self._keys is None else self._keys.shape[2]
            raise ValueError(f"the static cache holds {capacity} positions; this forward needs {end}")

    def _masked_hidden(self, ids, keep: int, mask: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        if self._compiled_layers is None:
            return super()._masked_hidden(ids, keep, mask, positions)
        with self._threads:
            return self._forward_compiled(ids, keep, mask, positions)

    def _forward_compiled(self, ids, keep: int, mask=None, positions=None) -> torch.Tensor:
        """``_forward``'s steps with the decoder layers compiled (matmul "numba"): one call for
        the whole stack on the panels, one per layer on the BLAS;
        ``mask`` additive float32 [m, end] (None: causal), ``positions`` [m] (None: next)."""
        kernels = self._kernels
        start, m = self._length, len(ids)
        end = start + m
        self._check_capacity(end)
        x = self._embed_table[np.asarray(ids, dtype=np.int64)]  # [m, hidden]
        positions = np.arange(start, end) if positions is None else positions
        if self._rotary_numpy is not None:
            cos, sin = (table[positions] for table in self._rotary_numpy)  # [m, d]
        else:
            cos, sin = self._rotary(torch.from_numpy(x), torch.as_tensor(positions)[None])
            cos, sin = cos[0].numpy(), sin[0].numpy()  # [m, d]
        causal = mask is None and m > 1
        mask = np.zeros((0, 0), dtype=np.float32) if mask is None else mask
        keys, values = self._cache_numpy  # [layers, H_kv, capacity, d], views of the cache
        args = (start, mask, causal, cos, sin, self.heads, self.kv_heads, self._eps, self._gemm)
        if m <= self._panel_max_rows:  # every layer in one compiled call
            x = kernels.decoder_stack(x, self._compiled_layers, keys, values, *args)
        else:
            for i, weights in enumerate(self._compiled_layers):
                x = kernels.decoder_layer_blas(x, weights, keys[i], values[i], *args)
        self._length = end
        self.calls += 1
        last = np.ascontiguousarray(x[-keep:])
        return torch.from_numpy(kernels.rms_norm(last, self._final_norm_weight, self._eps))

    def causal(self, ids: np.ndarray, keep: int = 1) -> np.ndarray:
        """Logits [keep, V] of the last ``keep`` rows of a causal forward of ``ids``: the forward,
        the final norm and the output layer in one compiled call (``_llama_numba.causal_logits``)
        where it applies (``_compiled_applies``), the same arrays and kernels as ``causal_hidden``
        then ``logits`` (the same logits bit for bit, tested), without their Python between the
        calls (~60 microseconds a token in the decoding loop, where the weights' stream has
        flushed the interpreter's caches; BENCHMARKS.md); else ``ModelRunner.causal``."""
        if not self._compiled_applies(len(ids)):
            return super().causal(ids, keep)
        start = self._length
        began = time.perf_counter()
        end = start + len(ids)
        self._check_capacity(end)
        logits = self._kernels.causal_logits(
            np.asarray(ids, dtype=np.int64),
            min(keep, len(ids)),  # as causal_hidden's x[-keep:]
            self._compiled_model(),
            *self._cache_numpy,
            start,
            *self._stack_args,
        )
        self._length = end
        self.calls += 1
        self.model_time += time.perf_counter() - began
        return logits

    def tree_logits(self, ids, num_causal, tree_mask, node_depths, root_position, rows) -> np.ndarray:
        """``ModelRunner.tree_logits`` in one compiled call (``_llama_numba.tree_logits``) where
        it applies (``_compiled_applies``): the forward, the final norm and the output layer on
        ``rows``, the same arrays and kernels as ``tree_hidden`` then ``logits`` (the same
        logits bit for bit, tested), without their Python between the calls."""
        if not self._compiled_applies(len(ids)):
            return super().tree_logits(ids, num_causal, tree_mask, node_depths, root_position, rows)
        start = self._length
        began = time.perf_counter()
        self._check_capacity(start + len(ids))
        logits = self._kernels.tree_logits(
            np.asarray(ids, dtype=np.int64),
            int(num_causal),
            tree_mask,
            np.asarray(node_depths, dtype=np.int64),
            int(root_position),
            np.asarray(rows, dtype=np.int64),
            np.float32(self.hidden),
            self._compiled_model(),
            *self._cache_numpy,
            start,
            *self._stack_args,
        )
        self._length = start + len(ids)
        self.calls += 1
        self.model_time += time.perf_counter() - began
        return logits

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
        """Draft a chain of ``depth`` tokens in one compiled call (``_llama_numba.sample_chain``):
        level 0 forwards ``ids`` (the tokens the cache lacks), each further level the token drawn
        before it; level d's q = softmax(logits / ``temperature``) over the output layer's tokens
        and its token drawn at the d-th of ``rng.random(depth)``. The same forwards, q and draws
        as ``causal_hidden``, ``logits``, ``mdsd.logits.process_logits_row`` (temperature alone)
        and ``mdsd.sampling.draw`` per level (tested); with ``top_k`` and / or ``top_p``, q over the
        output layer's logits truncated by them, as ``process_logits_row`` truncates. ``source``:
        ``uniform_source(rng)`` where the caller keeps it (the compiled call draws from ``rng``
        through it).

        Returns a ``SampledChain`` (q over the output layer's K tokens: ``output_ids``, or the
        vocabulary); or None, drawing nothing from ``rng``, where the compiled forward does not
        apply (matmul other than "numba", a RoPE recomputed per forward, more tokens than one
        panel pass).
        """
        if not self._compiled_applies(len(ids)):
            return None
        start = self._length
        self._check_capacity(start + len(ids) + depth - 1)
        source = uniform_source(rng) if source is None else source
        began = time.perf_counter()
        chain = SampledChain(
            *self._kernels.sample_chain(
                np.asarray(ids, dtype=np.int64),
                int(depth),
                *source,
                *self._drafting_args(temperature, top_k, top_p, start),
            )
        )
        self._length = start + len(ids) + depth - 1
        self.calls += depth
        self.model_time += time.perf_counter() - began
        return chain

    def sample_tree(
        self,
        ids,
        tree,
        law: int,
        rng: np.random.Generator,
        temperature: float,
        source=None,
        top_k=None,
        top_p=None,
    ) -> SampledTree | None:
        """Draft the whole ``tree`` (a ``DraftTree``) in one compiled call
        (``_llama_numba.sample_tree``): the forwards of ``tree_hidden`` per level and of
        ``causal_hidden`` for ``ids`` (the tokens the cache lacks), ``logits`` on the valid rows,
        ``process_logits_row`` (temperature, optional top-k and top-p) and the drafts of every node by the
        law of code ``law`` (``mdsd.engine.tree.TREE_LAWS``: i.i.d., without replacement by
        ``mdsd.laws``' sequential draws, greedy, SpecHub), from ``rng``
        through ``source`` (``uniform_source(rng)``): the same numbers as ``TreeDecoder``'s level
        by level drafting (tested). Returns a ``SampledTree``, or None, drawing nothing, where the
        compiled forward does not apply (``sample_chain``'s conditions, or a level wider than a
        panel pass)."""
        forwarded = tree.level_sizes[:-1]  # the levels forwarded after the root's (not the last)
        if not self._compiled_applies(max((len(ids), *forwarded))):
            return None
        start = self._length
        end = start + len(ids) + sum(forwarded)
        self._check_capacity(end)
        source = uniform_source(rng) if source is None else source
        began = time.perf_counter()
        sampled = SampledTree(
            *self._kernels.sample_tree(
                np.asarray(ids, dtype=np.int64),
                *self.tree_arrays(tree),
                int(law),
                *source,
                *self._drafting_args(temperature, top_k, top_p, start),
            )
        )
        self._length = end
        self.calls += tree.depth
        self.model_time += time.perf_counter() - began
        return sampled

    def _drafting_args(self, temperature: float, top_k, top_p, start: int) -> tuple:
        """The arguments ``_llama_numba.sample_chain`` and ``sample_tree`` share after their own:
        temperature, top-k (0: none), top-p (1: none), whether q is stored on its nonzero entries
        (a draft over part of the vocabulary, as ``SamplingConfig.row_probs`` stores it), the output
        layer's token ids, the model, the cache, its length and ``_stack_args``."""
        truncation = kernel_truncation(top_k, top_p)
        sampling = (float(temperature), *truncation, self.output_ids is not None, self.output_token_ids)
        return (*sampling, self._compiled_model(), *self._cache_numpy, start, *self._stack_args)

    @property
    def output_token_ids(self) -> np.ndarray:
        """[K] the output layer's tokens, ascending: ``output_ids``, or 0 .. V - 1."""
        return self.output_ids if self.output_ids is not None else self._vocabulary_ids

    @property
    def capacity(self) -> int:
        """Entries the static cache holds (0 before ``reset``)."""
        return 0 if self._keys is None else int(self._keys.shape[2])

    @property
    def compiled(self) -> bool:
        """Whether the forwards run compiled (matmul "numba"; ``compiled_forward`` still returns
        None for a forward wider than one panel pass or a RoPE recomputed per forward)."""
        return self._compiled_layers is not None

    def compiled_forward(self, rows: int, end: int) -> tuple | None:
        """(models, (keys, values, cache length, cos table, sin table, heads, kv_heads, eps, gemm)):
        the model, cache and stack arguments of the compiled forwards (``_llama_numba``'s
        ``tree_logits``, ``sample_tree``; ``_step_numba.tree_step`` takes them so: numba's
        dispatcher types a tuple holding the ``numba.typed.List`` in Python, ~60 microseconds a
        call, the list alone and a tuple of arrays and numbers in C, ~1) for forwards of at most
        ``rows`` tokens each that fill the cache up to ``end`` entries (checked against its
        capacity: the compiled code does not); None where the compiled
        forward does not apply (``_compiled_applies``). The caller reports the forwards with
        ``advance``."""
        if not self._compiled_applies(rows):
            return None
        self._check_capacity(end)
        return self._compiled_model(), (*self._cache_numpy, self._length, *self._stack_args)

    def advance(self, length: int, calls: int, seconds: float) -> None:
        """Account for forwards run by a compiled call on ``compiled_forward``'s arguments: the
        cache now holds ``length`` entries, ``calls`` forwards, ``seconds`` in the model."""
        self._length = length
        self.calls += calls
        self.model_time += seconds

    def tree_arrays(self, tree) -> tuple:
        """(widths, level_starts, child_starts, depths, masks) of ``sample_tree`` for ``tree``,
        made once per shape: masks [max(D - 1, 1), m, C] float32 holds ``additive(level_mask(d))``
        of depth d at index d - 1 (zero-padded to the widest level and the largest tree part)."""
        if self._tree_cache is None or self._tree_cache[0] != tree:
            depth, starts = tree.depth, tree.level_starts
            masks = np.zeros((max(depth - 1, 1), int(np.diff(starts).max()), int(starts[-1])), np.float32)
            for d in range(1, depth):
                level = self.additive(tree.level_mask(d))
                masks[d - 1, : level.shape[0], : level.shape[1]] = level
            arrays = (tree.widths_array, starts, tree.child_starts, tree.depths, masks)
            self._tree_cache = (tree, arrays)
        return self._tree_cache[1]

    @functools.cached_property
    def _vocabulary_ids(self) -> np.ndarray:
        """0 .. V - 1: the tokens of the full output layer."""
        return np.arange(self._full_head.weight.shape[0], dtype=np.int64)

    def _forward(self, ids, keep: int, attention_mask, position_ids) -> torch.Tensor:
        start = self._length
        m = len(ids)
        end = start + m
        self._check_capacity(end)
        tokens = torch.as_tensor(ids, dtype=torch.long, device=self.device)  # [m]
        if position_ids is None:
            position_ids = torch.arange(start, end, device=self.device)[None]
        if attention_mask is not None:
            mask = attention_mask  # [1, 1, m, end] additive
        elif m > 1:  # causal block over the new tokens
            mask = torch.zeros((m, end), dtype=self.dtype, device=self.device)
            mask[:, start:] = torch.from_numpy(self._causal_block(m)).to(self.device, self.dtype)
            mask = mask[None, None]
        else:
            mask = None
        x = self._embed(tokens)  # [m, hidden]
        if self._rotary_table is not None:
            cos, sin = (table[position_ids[0]] for table in self._rotary_table)  # [m, 1, d]
        else:
            cos, sin = self._rotary(x, position_ids)  # [1, m, d]
            cos, sin = cos[0, :, None], sin[0, :, None]  # [m, 1, d]
        with steady_attention(self.device):
            for i, layer in enumerate(self._layers):
                x = x + self._attention(i, layer, layer.input_norm(x), cos, sin, mask, start, end)
                gate, up = layer.gate_up(layer.post_norm(x)).chunk(2, dim=-1)  # [m, I] each
                x = x + layer.down(F.silu(gate) * up)
        self._length = end
        self.calls += 1
        return self._final_norm(x[-keep:])

    def _attention(self, i, layer: _Layer, h, cos, sin, mask, start: int, end: int):
        m, d, heads, kv_heads = h.shape[0], self.head_dim, self.heads, self.kv_heads
        qkv = layer.qkv(h).view(m, heads + 2 * kv_heads, d)
        qk = _rotate(qkv[:, : heads + kv_heads], cos, sin)  # [m, H + H_kv, d]
        self._keys[i, :, start:end] = qk[:, heads:].transpose(0, 1)  # [H_kv, m, d]
        self._values[i, :, start:end] = qkv[:, heads + kv_heads :].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            qk[:, :heads].transpose(0, 1)[None],  # [1, H, m, d]
            self._keys[i, :, :end][None],
            self._values[i, :, :end][None],
            attn_mask=mask,
            enable_gqa=kv_heads != heads,
        )  # [1, H, m, d]
        return layer.out(out[0].transpose(0, 1).reshape(m, heads * d))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [m, heads, d] with cos / sin [m, 1, d] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def draft_runner(model, fast: bool = True, matmul: str = "auto", weights: str = "exact") -> ModelRunner:
    """The draft's runner: ``make_runner``, except that with ``matmul`` "auto" a float16 or
    bfloat16 Llama-family draft on the CPU runs a float32 copy on the compiled forward. Its
    weights stay exact (16-bit panels hold them, ``_panel_format``); its activations are float32
    instead of 16-bit. Speculative decoding is exact for any draft distribution the verifier is
    given, and the engine verifies with the q this runner computes, so the output law is the
    target's as before; only the speed and, by rounding, the acceptance change. torch's 16-bit
    forward pays its per-operation dispatch on every draft level; the compiled one does not.

    ``weights`` "int8": the same, with int8 weights and activations ("q8" panels of
    ``_panel_gemm``; a draft level reads a quarter of float32's bytes and its products run 64
    byte pairs per instruction with AVX-512 VNNI). Needs the compiled forward: a Llama-family
    draft on the CPU, ``fast`` and ``matmul`` "auto" or "numba"."""
    check_weights(weights)
    if weights == "int8":
        if not (fast and supports_static(model) and model.device.type == "cpu"):
            raise ValueError(
                "draft_weights 'int8' needs the compiled draft forward: a Llama-family draft "
                "(llama, mistral, qwen2) on the CPU with the static cache"
            )
        if matmul not in ("auto", "numba"):
            raise ValueError(f"draft_weights 'int8' needs matmul 'auto' or 'numba', got {matmul!r}")
        if model.dtype != torch.float32:
            model = copy.deepcopy(model).float().eval()
        return StaticLlamaRunner(model, "numba", weights="int8")
    if fast and matmul == "auto" and _compiled_float32_pays(model):
        model = copy.deepcopy(model).float().eval()
    return make_runner(model, fast, matmul)


def _compiled_float32_pays(model) -> bool:
    from mdsd.engine._panel_gemm import gemm_kernel

    float32_bytes = 4 * sum(p.numel() for p in model.parameters())
    return (
        model.dtype in (torch.float16, torch.bfloat16)
        and model.device.type == "cpu"
        and supports_static(model)
        and float32_bytes <= NUMPY_MATMUL_MAX_BYTES
        and gemm_kernel() is not None
    )


def make_runner(model, fast: bool = True, matmul: str = "auto") -> ModelRunner:
    """The engine's runner for ``model``: ``StaticLlamaRunner`` (with ``matmul``) where it
    applies, else the Hugging Face forward (``ModelRunner``)."""
    if fast and supports_static(model):
        return StaticLlamaRunner(model, matmul)
    choose_matmul(model, matmul)  # validates the argument
    return ModelRunner(model)
