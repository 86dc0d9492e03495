"""mdsd.engine.runner and static_llama: tree-forward logits and the KV caches after accepted paths
equal plain forwards (Hugging Face and the lean static-cache Llama, every matmul backend); the
compiled forward against the torch one (GQA, q/k/v biases, dynamic RoPE, every row-count path);
model checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdsd.engine import SamplingConfig, TreeConfig, TreeDecoder
from mdsd.engine.decode import Autoregressive
from mdsd.models import ModelPair

from .helpers import (
    LOGIT_TOL,
    PROMPT,
    RUNNER_CASES,
    VOCAB,
    Oracle,
    assert_draft_probs,
    decoded_steps,
    path_tokens,
)


@pytest.mark.parametrize("family,static_cache,matmul", RUNNER_CASES)
@pytest.mark.parametrize("widths", [(3, 2, 1), (2, 1, 1), (1, 1, 1)])
def test_tree_logits_and_caches_match_plain_forward(request, family, static_cache, matmul, widths):
    pair = request.getfixturevalue(family)
    sampling = SamplingConfig(1.0)
    config = TreeConfig.make(widths, "iid", "rrs")
    dec = TreeDecoder(pair, config, sampling, static_cache=static_cache, matmul=matmul)
    expected_runner = "StaticLlamaRunner" if family == "llama" and static_cache else "ModelRunner"
    assert type(dec.target).__name__ == type(dec.draft).__name__ == expected_runner
    if expected_runner == "StaticLlamaRunner":
        assert dec.target.matmul == dec.draft.matmul == matmul
    oracle = Oracle(pair, sampling)
    with torch.inference_mode():
        for seq, drafted, emitted in decoded_steps(dec, 4):
            logits = dec.last_step.logits(dec.target)
            for node in [-1] + list(np.flatnonzero(drafted.valid)):
                want = oracle.logits(pair.target, seq + path_tokens(dec.tree, drafted, node))
                np.testing.assert_allclose(logits[node + 1], want, atol=LOGIT_TOL, rtol=0)
            assert_draft_probs(dec.tree, drafted, seq, oracle.q)  # q the children were drawn from
            committed = seq + emitted
        # the caches now hold exactly the committed prefix: next logits = a full forward
        assert dec.target.cached == len(committed) - 1
        got_t = dec.target.causal(np.asarray(committed[dec.target.cached :]))[0]
        got_d = dec.draft.causal(np.asarray(committed[dec.draft.cached :]))[0]
    np.testing.assert_allclose(got_t, oracle.logits(pair.target, committed), atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(got_d, oracle.logits(pair.draft, committed), atol=LOGIT_TOL, rtol=0)


def test_steady_attention_leaves_out_cudnn_on_cuda_only():
    """Decoding forwards on CUDA run SDPA without cuDNN's backend (it rebuilds its graph at every
    new key length); on the CPU the context changes nothing; both restore the flags on exit."""
    from mdsd.engine.runner import steady_attention

    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    with steady_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before
    with steady_attention(torch.device("cpu")):
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_matmul_backend_choice_and_errors(llama):
    from mdsd.engine.static_llama import choose_matmul

    assert choose_matmul(llama.target) == "numba"  # float32 on the CPU
    assert choose_matmul(llama.target, "torch") == "torch"
    with pytest.raises(ValueError, match="matmul must be one of"):
        choose_matmul(llama.target, "blas")
    half = type(llama.target)(llama.target.config).to(torch.bfloat16)
    assert choose_matmul(half) == "torch"
    for backend in ("numpy", "numba"):
        with pytest.raises(ValueError, match=f"matmul '{backend}' needs a float32 model"):
            choose_matmul(half, backend)
    with pytest.raises(ValueError, match="matmul must be one of"):
        Autoregressive(llama, SamplingConfig(1.0), matmul="fast")


def _kernel_widths() -> list[int]:
    """Vector widths the host runs: 8 floats (AVX2) everywhere, 16 with AVX-512F."""
    from mdsd.engine._panel_gemm import host_width

    return sorted({8, host_width()})


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 20, 25, 40, 70])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fmt", ["f32", "f16"])
def test_panel_products_equal_the_blas(rows, bias, fmt):
    """``project`` (the compiled panel kernel up to ``panel_max_rows`` rows -- 12 / 24 on float32
    panels, 24 / 64 on 16-bit ones with AVX2 / AVX-512 -- np.dot beyond) equals x @ W^T (+ b) in
    float64 to float32 rounding, with an output width that is not a multiple of the panel width
    (the zero-padded last panel), for every vector width the host runs, with and without the
    software prefetch (which reads ahead past the last panel); all agree bit for bit."""
    from mdsd.engine import _llama_numba as kernels
    from mdsd.engine._panel_gemm import PANEL, PREFETCH_BYTES, gemm_kernel, kernel_address, pack_panels

    gen = np.random.default_rng(rows)
    weight_t = gen.normal(size=(37, 3 * PANEL + 5)).astype(np.float32)  # [in, out]
    if fmt == "f16":
        weight_t = weight_t.astype(np.float16).astype(np.float32)
    x = gen.normal(size=(rows, 37)).astype(np.float32)
    b = gen.normal(size=weight_t.shape[1]).astype(np.float32) if bias else np.zeros(0, np.float32)
    want = x.astype(np.float64) @ weight_t + (b if bias else 0.0)
    results = [
        kernels.project(
            x, pack_panels(weight_t, fmt), weight_t, b, kernel_address(gemm_kernel(fmt, width, prefetch))
        )
        for width in _kernel_widths()
        for prefetch in (0, PREFETCH_BYTES, 64)
    ]
    for got in results:
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
        np.testing.assert_array_equal(got, results[0])


@pytest.mark.parametrize("fmt", ["f32", "f16"])
def test_panel_widths_give_the_same_products_bit_for_bit(fmt):
    """Panels of 16 columns (one accumulator per row with AVX-512) and 32 (two, the default
    there) give every output the same in-order chain of fused multiply-adds over k: equal bit
    for bit, for 1 to 2 passes of rows, every vector width the host runs, and output widths that
    are not multiples of either panel width."""
    from mdsd.engine._panel_gemm import gemm_kernel, pack_panels, rows_per_pass

    gen = np.random.default_rng(7)
    weight_t = gen.normal(size=(45, 77)).astype(np.float16).astype(np.float32)  # [in, out]
    for width in _kernel_widths():
        for rows in (1, 2, 3, rows_per_pass(width, 32) + 1):
            x = gen.normal(size=(rows, 45)).astype(np.float32)
            products = []
            for panel in (16, 32):
                panels = pack_panels(weight_t, fmt, panel)
                out = np.full((rows, panels.shape[0] * panel), np.nan, dtype=np.float32)
                kernel = gemm_kernel(fmt, width, panel=panel)
                kernel(
                    x.ctypes.data,
                    panels.ctypes.data,
                    out.ctypes.data,
                    rows,
                    panels.shape[0],
                    45,
                    out.shape[1],
                )
                products.append(out[:, :77])
            np.testing.assert_allclose(products[0], x.astype(np.float64) @ weight_t, atol=1e-4, rtol=1e-5)
            np.testing.assert_array_equal(products[0], products[1])


@pytest.mark.parametrize("fmt", ["f32", "bf16"])
def test_kernel_passes_cover_every_row(fmt):
    """The kernel alone, called with more rows than a pass holds (MAX_ROWS per width): every
    row of the output is the product, in passes, for each vector width."""
    from mdsd.engine._panel_gemm import MAX_ROWS, PANEL, gemm_kernel, pack_panels

    gen = np.random.default_rng(5)
    weight_t = gen.normal(size=(19, 2 * PANEL)).astype(np.float32)
    weight_t = (weight_t.view(np.uint32) & 0xFFFF0000).view(np.float32)  # bfloat16 values
    panels = pack_panels(weight_t, fmt)
    for width in _kernel_widths():
        rows = 2 * MAX_ROWS[width] + 3
        x = gen.normal(size=(rows, 19)).astype(np.float32)
        out = np.full((rows, 2 * PANEL), np.nan, dtype=np.float32)
        gemm_kernel(fmt, width)(x.ctypes.data, panels.ctypes.data, out.ctypes.data, rows, 2, 19, 2 * PANEL)
        np.testing.assert_allclose(out, x.astype(np.float64) @ weight_t, atol=1e-4, rtol=1e-5)


def _root(array: np.ndarray):
    while array.base is not None:
        array = array.base
    return array


def test_pooled_panels_are_aligned_copies_in_one_allocation(llama):
    """``pool_panels``: the same values, each a cache-line aligned view of one buffer, the first
    on a 2 MiB boundary; a compiled runner keeps every projection's panels (the output layer's
    too) in one pool."""
    from mdsd.engine._panel_gemm import HUGE_PAGE, PANEL_ALIGN, pool_panels
    from mdsd.engine.static_llama import StaticLlamaRunner

    gen = np.random.default_rng(0)
    arrays = [gen.normal(size=shape).astype(np.float32) for shape in ((3, 5, 32), (1, 7, 32), (2, 2, 32))]
    arrays.append(np.arange(12, dtype=np.uint16).reshape(1, 3, 4))  # 16-bit panels
    pooled = pool_panels(arrays)
    for original, view in zip(arrays, pooled):
        assert view.dtype == original.dtype and np.array_equal(view, original)
        assert view.ctypes.data % PANEL_ALIGN == 0
    assert pooled[0].ctypes.data % HUGE_PAGE == 0
    assert len({id(_root(v)) for v in pooled}) == 1
    runner = StaticLlamaRunner(llama.target, "numba")
    linears = runner.projections()
    assert len({id(_root(lin.panels)) for lin in linears}) == 1
    layer_panels = [w for weights in runner._compiled_layers for w in weights if w.ndim == 3]
    assert {id(_root(w)) for w in layer_panels} == {id(_root(linears[0].panels))}


@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 6, 7])
def test_16_bit_panels_give_the_float32_products_bit_for_bit(fmt, rows):
    """Weights that a 16-bit format holds exactly (``storage_format``) give the same products
    from 16-bit panels as from float32 panels, bit for bit; ``storage_format`` picks the format
    (float16 first; bfloat16 for values beyond float16's range; float32 otherwise)."""
    from mdsd.engine import _llama_numba as kernels
    from mdsd.engine._panel_gemm import PANEL, gemm_kernel, kernel_address, pack_panels, storage_format

    gen = np.random.default_rng(rows)
    weight_t = gen.normal(size=(40, 2 * PANEL + 3)).astype(np.float32)  # [in, out]
    assert storage_format(weight_t) == "f32"
    if fmt == "f16":
        weight_t = weight_t.astype(np.float16).astype(np.float32)
    else:  # bfloat16: keep the high 16 bits; one value beyond float16's range
        weight_t = (weight_t.view(np.uint32) & 0xFFFF0000).view(np.float32)
        weight_t[0, 0] = 2.0**20
    assert storage_format(weight_t) == fmt
    x = gen.normal(size=(rows, 40)).astype(np.float32)
    none = np.zeros(0, np.float32)
    want = kernels.project(x, pack_panels(weight_t), weight_t, none, kernel_address(gemm_kernel()))
    got = kernels.project(x, pack_panels(weight_t, fmt), weight_t, none, kernel_address(gemm_kernel(fmt)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, x.astype(np.float64) @ weight_t, atol=1e-4, rtol=1e-5)


def test_float32_exp_within_two_ulp():
    """``exp_inplace`` (the compiled forward's softmax and SiLU exponential) against float64 exp
    over the whole float32 range it keeps: relative error <= 2 ulp; exactly 0 below EXP_LOW
    (masked keys, -inf), exp(EXP_HIGH) above it, 1 at 0."""
    from mdsd.engine._llama_numba import EXP_HIGH, EXP_LOW, exp_inplace

    x = np.concatenate(
        [np.linspace(EXP_LOW, EXP_HIGH, 400_001), np.random.default_rng(0).normal(0, 5, 10_000)]
    ).astype(np.float32)
    got = x.copy()
    exp_inplace(got)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) <= 2 * 2.0**-24
    edges = np.array([-np.inf, np.finfo(np.float32).min, -86.5, 0.0, 100.0], dtype=np.float32)
    exp_inplace(edges)
    assert edges.tolist() == [0.0, 0.0, 0.0, 1.0, edges[4]]
    assert edges[4] == pytest.approx(np.exp(float(EXP_HIGH)), rel=1e-6)


def test_float32_exp_within_two_ulp_on_every_softmax_input():
    """``exp_inplace`` on every float32 in [EXP_LOW, 0] (1.1e9 inputs, the exponents of a
    softmax after its maximum is subtracted), in chunks, against float64 exp: relative error
    <= 2 ulp on each (1.41 ulp at most, measured). ``_walk_numba.softmax_lower_bound``'s proof
    takes this as a fact and allows 8 ulp."""
    from mdsd.engine._llama_numba import EXP_LOW, exp_inplace

    first = int(np.float32(-0.0).view(np.uint32))
    last = int(np.float32(EXP_LOW).view(np.uint32))
    worst = 0.0
    for start in range(first, last + 1, 1 << 24):
        x = np.arange(start, min(start + (1 << 24), last + 1), dtype=np.uint32).view(np.float32)
        got = x.copy()
        exp_inplace(got)
        want = np.exp(x.astype(np.float64))
        worst = max(worst, float(np.max(np.abs(got - want) / want)))
    assert worst <= 2 * 2.0**-24


def _variant_model(kind: str):
    """A tiny random model the compiled forward must follow: grouped-query attention, q/k/v
    biases (Qwen2), a RoPE rescaled with the sequence length ("dynamic", no cos / sin table), or
    float16 weights in a float32 model ("f16": 16-bit panels)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    # context long enough for the test's forwards (a prompt past every panel row limit, then ~40
    # tokens): the dynamic RoPE module is shared by both runners and rescales, statefully, only
    # past it
    common |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0} if kind == "dynamic" else None
    config = LlamaConfig(**common, **({"rope_parameters": rope} if rope else {}))
    model = LlamaForCausalLM(config).eval()
    if kind == "f16":  # a float16 checkpoint loaded in float32: 16-bit weight panels
        model = model.half().float()
    return model


@pytest.mark.parametrize("kind", ["gqa", "qwen2", "dynamic", "f16"])
def test_compiled_forward_equals_the_torch_forward(kind):
    """matmul "numba" against the torch forward (itself tested against Hugging Face's above):
    a causal prompt longer than every panel row limit (the many-row BLAS layer), then 1, 3, 9 and
    20 new tokens (attention by loops below ``LOOP_ATTENTION_ROWS`` = 16 queries, by the BLAS
    from there), then a tree forward under a 4-D mask (5 rows: the panel layer, loop attention);
    logits to float32 rounding and equal caches."""
    from mdsd.engine._llama_numba import PANEL_MAX_ROWS_16
    from mdsd.engine.static_llama import StaticLlamaRunner
    from mdsd.engine.tree import build_tree

    model = _variant_model(kind)
    runners = {backend: StaticLlamaRunner(model, backend) for backend in ("torch", "numba")}
    assert runners["numba"]._compiled_layers is not None
    assert runners["numba"].panel_format == ("f16" if kind == "f16" else "f32")
    gen = np.random.default_rng(1)
    tree = build_tree((2, 2))
    mask = runners["torch"].additive(tree.ancestor_mask[1:, 1:])
    got = {}
    with torch.inference_mode():
        for backend, runner in runners.items():
            prompt = PANEL_MAX_ROWS_16 + 6
            runner.reset(prompt + 64)
            gen = np.random.default_rng(1)
            logits = [runner.causal(gen.integers(0, 50, size=prompt), keep=prompt)]
            logits += [runner.causal(gen.integers(0, 50, size=m), keep=m) for m in (1, 3, 9, 20)]
            ids = gen.integers(0, 50, size=tree.num_nodes + 1)
            hidden = runner.tree_hidden(ids, 1, mask, tree.depths, runner.cached, keep=tree.num_nodes)
            logits.append(runner.logits(hidden))
            got[backend] = (logits, runner._keys[:, :, : runner.cached].clone())
            assert (runner._rotary_table is None) == (kind == "dynamic")  # dynamic: per forward
    for want, have in zip(got["torch"][0], got["numba"][0]):
        np.testing.assert_allclose(have, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)
    torch.testing.assert_close(got["numba"][1], got["torch"][1], atol=1e-5, rtol=1e-5)


def test_rotary_table_equals_the_models_rotary_module(llama):
    """The lean forward's cos / sin lookup holds the module's numbers bit for bit."""
    from mdsd.engine.static_llama import StaticLlamaRunner

    runner = StaticLlamaRunner(llama.target)
    runner.reset(40)
    positions = torch.tensor([[0, 5, 17, 39]])
    with torch.inference_mode():
        cos, sin = runner._rotary(torch.zeros(1), positions)  # [1, 4, d]
    table_cos, table_sin = runner._rotary_table
    assert torch.equal(table_cos[positions[0], 0], cos[0])
    assert torch.equal(table_sin[positions[0], 0], sin[0])


def test_unsupported_model_refused(llama):
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    pair = ModelPair(target=opt.eval(), draft=llama.draft, tokenizer=llama.tokenizer, name="x")
    with pytest.raises(ValueError, match="target model type 'opt'"):
        TreeDecoder(pair, TreeConfig.make("2x2", "iid", "rrs"), SamplingConfig(1.0))


def test_bfloat16_pair_decodes_on_the_lean_forward(tiny):
    """A bfloat16 pair runs the lean forward with torch's matmul (the compiled layers are for
    float32): the decoder's own tree-attention check passes and decoding runs, with and without
    a draft vocabulary."""
    from mdsd.models import load_pair

    pair = load_pair(target=tiny["llama"][0], draft=tiny["llama"][1], dtype="bfloat16")
    sampling = SamplingConfig(1.0, max_new_tokens=5, stop_on_eos=False)
    for vocab in (None, 6):
        dec = TreeDecoder(pair, TreeConfig.make("2x2", "iid", "rrs", draft_vocab=vocab), sampling)
        assert type(dec.target).__name__ == "StaticLlamaRunner" and dec.target.matmul == "torch"
        assert dec.target.dtype == torch.bfloat16
        out = dec.generate([PROMPT], seed=0)[0]
        assert len(out.token_ids) == 5
    # matmul "torch" keeps the draft in bfloat16 too
    dec = TreeDecoder(pair, TreeConfig.make("2x2", "iid", "rrs"), sampling, matmul="torch")
    assert dec.draft.dtype == torch.bfloat16 and dec.draft.matmul == "torch"


def test_16_bit_draft_runs_in_float32_on_the_compiled_forward(tiny):
    """A bfloat16 draft on the CPU (matmul "auto") runs a float32 copy of itself on the compiled
    forward, its weights on exact 16-bit panels; the q the walk verifies with is that copy's
    (the float32 model's own forward), so the verifier knows the law the drafts came from."""
    from mdsd.models import load_pair

    pair = load_pair(target=tiny["llama"][0], draft=tiny["llama"][1], dtype="bfloat16")
    sampling = SamplingConfig(1.0)
    dec = TreeDecoder(pair, TreeConfig.make((2, 1), "iid", "rrs"), sampling)
    assert dec.draft.dtype == torch.float32 and dec.draft.matmul == "numba"
    assert dec.draft.panel_format in ("f16", "bf16")
    assert pair.draft.dtype == torch.bfloat16  # the pair's own model is untouched
    copy = Oracle(ModelPair(target=pair.target, draft=dec.draft.model, tokenizer=None, name="x"), sampling)
    with torch.inference_mode():
        for seq, drafted, _ in decoded_steps(dec, 3):
            assert_draft_probs(dec.tree, drafted, seq, copy.q)


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("output_ids", [None, (0, 2, 3, 5, 6, 7, 9, 11)])
def test_sample_chain_equals_the_levels_one_by_one(llama, output_ids, top_k):
    """``StaticLlamaRunner.sample_chain`` (one compiled call per chain) gives the tokens, q and
    cache of the per-level reference: ``causal_hidden``, ``logits``, ``process_logits_row``
    (temperature, with and without top-k, underflow to 0 included; q on its nonzero entries where
    the decoder stores it so) and ``draw`` at successive ``rng.random()``, bit for bit; it draws
    nothing and returns None where it does not apply (more tokens than a panel pass)."""
    from mdsd.engine.static_llama import StaticLlamaRunner
    from mdsd.logits import process_logits_row
    from mdsd.sampling import draw

    runner = StaticLlamaRunner(llama.draft, "numba")
    runner.restrict_output(None if output_ids is None else np.array(output_ids))
    ids = runner.output_ids if output_ids is not None else np.arange(VOCAB)
    stored = top_k is not None or output_ids is not None  # q kept on its nonzero entries
    for temperature, depth, fresh in [(1.0, 4, PROMPT), (0.3, 1, [4]), (2.5, 3, [7, 1]), (0.0005, 2, [3])]:
        runner.reset(64)
        runner.causal_hidden(np.array([1, 2]), 1)
        chain = runner.sample_chain(
            np.array(fresh), depth, np.random.default_rng(3), temperature, top_k=top_k
        )
        tokens, probs, zeros = chain.tokens, chain.probs, chain.zeros
        if top_k is None:
            assert bool(zeros.any()) == (temperature < 0.01) and not chain.kept.size
        got_cache = [c[:, :, : runner.cached].copy() for c in runner._cache_numpy]
        runner.keep_positions(2, [])
        rng, level_ids = np.random.default_rng(3), np.array(fresh)
        for d in range(depth):
            logits = runner.logits(runner.causal_hidden(level_ids, 1))[0]
            q = process_logits_row(logits, temperature, top_k, drop_zeros=output_ids is not None)
            positions = chain.kept[d] if top_k else np.arange(len(ids))  # of probs[d] in ids
            nonzero = probs[d] > 0 if stored else np.ones(probs[d].size, dtype=bool)
            want = np.arange(len(ids)) if q.indices is None else q.indices
            assert np.array_equal(positions[nonzero], want) and np.array_equal(probs[d][nonzero], q.values)
            assert zeros[d] == np.count_nonzero(probs[d] == 0)
            assert tokens[d] == ids[q.token(draw(q.values, rng.random()))]
            level_ids = tokens[d : d + 1]
        assert runner.cached == 2 + len(fresh) + depth - 1  # the chain never forwards its last token
        assert all(
            np.array_equal(a[:, :, : runner.cached], b) for a, b in zip(runner._cache_numpy, got_cache)
        )
    rng = np.random.default_rng(0)
    too_many = np.ones(runner._panel_max_rows + 1, dtype=np.int64)
    assert runner.sample_chain(too_many, 2, rng, 1.0) is None
    assert rng.random() == np.random.default_rng(0).random()  # nothing drawn


@pytest.mark.parametrize("output_ids", [None, (0, 2, 3, 5, 6, 7, 9, 11)])
def test_compiled_causal_equals_hidden_then_logits(llama, output_ids):
    """``StaticLlamaRunner.causal`` (forward, final norm and output layer in one compiled call)
    gives the logits and the cache of ``causal_hidden`` then ``logits``, bit for bit: one token,
    a few, every row kept or the last only, the whole output layer or part of it; past a panel
    pass it takes the general path (the same numbers)."""
    from mdsd.engine.static_llama import StaticLlamaRunner

    runner = StaticLlamaRunner(llama.target, "numba")
    runner.restrict_output(None if output_ids is None else np.array(output_ids))
    long = np.arange(runner._panel_max_rows + 2) % VOCAB
    for fresh, keep in [([4], 1), (PROMPT, 1), (PROMPT, 3), ([7, 1, 9, 2], 2), ([5, 6], 4), (long, 2)]:
        results = []
        for one_call in (True, False):
            runner.reset(64)
            runner.causal_hidden(np.array([1, 2]), 1)
            if one_call:
                logits = runner.causal(np.array(fresh), keep)
            else:
                logits = runner.logits(runner.causal_hidden(np.array(fresh), keep))
            cache = [c[:, :, : runner.cached].copy() for c in runner._cache_numpy]
            results.append((logits, cache, runner.cached))
        (a, cache_a, n_a), (b, cache_b, n_b) = results
        assert a.shape == (min(keep, len(fresh)), VOCAB if output_ids is None else len(output_ids))
        assert np.array_equal(a, b) and n_a == n_b == 2 + len(fresh)
        assert all(np.array_equal(x, y) for x, y in zip(cache_a, cache_b))


@pytest.mark.parametrize("output_ids", [None, (0, 2, 3, 5, 6, 7, 9, 11)])
def test_compiled_tree_logits_equal_tree_hidden_then_logits(llama, output_ids):
    """``StaticLlamaRunner.tree_logits`` (a tree forward, the final norm and the output layer on
    chosen rows in one compiled call) gives the logits and the cache of ``tree_hidden`` then
    ``logits`` on those rows, bit for bit: one committed token or several before the tree, every
    row or some; past a panel pass it takes the general path (the same numbers)."""
    from mdsd.engine.static_llama import StaticLlamaRunner
    from mdsd.engine.tree import build_tree

    runner = StaticLlamaRunner(llama.target, "numba")
    runner.restrict_output(None if output_ids is None else np.array(output_ids))
    tree = build_tree((2, 2))
    mask = runner.additive(tree.ancestor_mask[1:, 1:])
    nodes = np.array([3, 8, 1, 5, 9, 2], dtype=np.int64)
    long = np.arange(runner._panel_max_rows) % VOCAB
    for fresh, rows in [
        ([4], [0, 1, 2, 3, 4, 5, 6]),
        (PROMPT, [0, 2, 5]),
        ([7, 1], [0, 1, 2, 6]),
        (long, [0, 3]),
    ]:
        results = []
        for one_call in (True, False):
            runner.reset(64)
            runner.causal_hidden(np.array([1, 2]), 1)
            args = (np.concatenate([fresh, nodes]), len(fresh), mask, tree.depths, 1 + len(fresh), rows)
            if one_call:
                logits = runner.tree_logits(*args)
            else:
                hidden = runner.tree_hidden(*args[:5], keep=tree.num_nodes + 1)
                logits = runner.logits(hidden[torch.as_tensor(rows)])
            cache = [c[:, :, : runner.cached].copy() for c in runner._cache_numpy]
            results.append((logits, cache, runner.cached))
        (a, cache_a, n_a), (b, cache_b, n_b) = results
        assert a.shape == (len(rows), VOCAB if output_ids is None else len(output_ids))
        assert np.array_equal(a, b) and n_a == n_b == 2 + len(fresh) + tree.num_nodes
        assert all(np.array_equal(x, y) for x, y in zip(cache_a, cache_b))


def test_keep_positions_gathers_the_kept_entries(llama):
    """``StaticLlamaRunner.keep_positions`` (one compiled gather on the compiled forward's cache)
    keeps entries 0 .. base - 1 and then the entries at the given positions, in their order,
    every source read before any entry is written: an accepted path, positions out of order, one
    position, none, paths whose first entries are already in place (left untouched), and the
    compiled gather of a path wholly in place (nothing moves)."""
    from mdsd.engine.static_llama import StaticLlamaRunner

    runner = StaticLlamaRunner(llama.draft, "numba")
    for extra in ([4, 6, 9], [9, 5, 4, 7], [3], [], [3, 7, 5], [3, 4, 9, 6]):
        runner.reset(16)
        runner.causal_hidden(np.arange(10) % VOCAB, 1)
        before = [c[:, :, :10].copy() for c in runner._cache_numpy]
        runner.keep_positions(3, extra)
        assert runner.cached == 3 + len(extra)
        for cache, old in zip(runner._cache_numpy, before):
            want = np.concatenate([old[:, :, :3], old[:, :, extra]], axis=2)
            assert np.array_equal(cache[:, :, : runner.cached], want)
    before = [c.copy() for c in runner._cache_numpy]
    runner._kernels.gather_positions(*runner._cache_numpy, 3, np.arange(3, 6))  # every entry in place
    assert all(np.array_equal(c, old) for c, old in zip(runner._cache_numpy, before))


def test_prefetch_positions_changes_nothing(llama):
    """``_llama_numba.prefetch_positions`` (the tree step's hint before its walk: LLVM's prefetch
    of every cache line of some entries) compiles on this host and leaves both caches as they
    were: the tree's entries, one entry, none, the last entries of the capacity."""
    from mdsd.engine import _llama_numba as kernels
    from mdsd.engine.static_llama import StaticLlamaRunner

    runner = StaticLlamaRunner(llama.draft, "numba")
    runner.reset(16)
    runner.causal_hidden(np.arange(10) % VOCAB, 1)
    before = [c.copy() for c in runner._cache_numpy]
    for first, count in ((3, 7), (0, 1), (5, 0), (runner.capacity - 4, 4)):
        kernels.prefetch_positions(*runner._cache_numpy, first, count)
        assert all(np.array_equal(c, old) for c, old in zip(runner._cache_numpy, before))


def _q8_reference(x, weight_t):
    """The "q8" product from its definition: rows and columns quantized (``quantize_rows``,
    ``int8_columns``), exact integer sums, then float32(sum) * w_scale[c] * x_scale[r]."""
    from mdsd.engine import _llama_numba as kernels
    from mdsd.engine._panel_gemm import int8_columns

    codes, x_scales = kernels.quantize_rows(x, x.shape[1])
    q_w, w_scales = int8_columns(weight_t)
    sums = (codes.astype(np.int64) - 128) @ q_w.astype(np.int64)
    return (sums.astype(np.float32) * w_scales) * x_scales[:, None]


def _q8_kernels():
    """(width, vnni) of every "q8" kernel this host runs: the generic sums at each vector width,
    and vpdpbusd where the CPU has AVX-512 VNNI."""
    from mdsd.engine._panel_gemm import host_vnni

    return [(w, False) for w in _kernel_widths()] + ([(16, True)] if host_vnni() else [])


@pytest.mark.parametrize("rows", [1, 3, 14, 15, 29, 161, 170])
def test_q8_panels_give_the_exact_integer_sums(rows):
    """``project`` on "q8" panels: up to ``panel_max_rows`` rows the kernel's products are the
    definition's bit for bit (exact int32 sums of int8 products), with VNNI and without, at every
    vector width, with and without prefetch, over K not a multiple of 4 and a zero-padded last
    panel; beyond, the BLAS on the quantized rows gives the same to float32 rounding. Every
    output is within the quantization's error bound of the float product:
    sum_k |x_k| s_w / 2 + |W_kc| s_x / 2 + s_x s_w / 4."""
    from mdsd.engine import _llama_numba as kernels
    from mdsd.engine._panel_gemm import (
        PANEL,
        gemm_kernel,
        int8_columns,
        int8_weights,
        kernel_address,
        pack_panels,
    )

    gen = np.random.default_rng(rows)
    k_dim, cols = 38, 2 * PANEL + 7
    weight_t = gen.normal(size=(k_dim, cols)).astype(np.float32)
    weight_t[:, 3] = 0.0  # a zero column
    x = gen.normal(size=(rows, k_dim)).astype(np.float32) * np.float32(3.0)
    x[0, :] = 0.0  # a zero row
    panels, none = pack_panels(weight_t, "q8"), np.zeros(0, np.float32)
    want = _q8_reference(x, weight_t)
    results = [
        kernels.project(
            x,
            panels,
            int8_weights(weight_t),
            none,
            kernel_address(gemm_kernel("q8", width, prefetch, vnni=vnni)),
        )
        for width, vnni in _q8_kernels()
        for prefetch in (0, 8192)
    ]
    for got in results:
        if rows <= kernels.panel_max_rows(1):
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
        np.testing.assert_array_equal(got, results[0])
    _, x_scales = kernels.quantize_rows(x, k_dim)
    _, w_scales = int8_columns(weight_t)
    bound = np.abs(x) @ np.ones((k_dim, cols)) * w_scales / 2 + x_scales[:, None] * (
        np.abs(weight_t).sum(axis=0) / 2 + k_dim * w_scales / 4
    )
    error = np.abs(results[0] - x.astype(np.float64) @ weight_t)
    assert np.all(error <= bound * (1 + 1e-5) + 1e-6)
    assert np.all(results[0][0] == 0) and np.all(results[0][:, 3] == 0)


def test_quantize_rows_scales_by_each_row_s_peak():
    """``quantize_rows``' scale is max |x| / 127 of each row (numpy's maximum) wherever the peak
    lies, in the blocks of eight or past them, for rows of 1-20, 256 and 771 entries."""
    from mdsd.engine import _llama_numba as kernels

    gen = np.random.default_rng(5)
    for k_dim in [*range(1, 21), 256, 771]:
        x = gen.standard_normal((k_dim, k_dim)).astype(np.float32)
        x[np.arange(k_dim), np.arange(k_dim)] = -9.0  # row r peaks at column r
        _, scales = kernels.quantize_rows(x, (k_dim + 3) // 4 * 4)
        np.testing.assert_array_equal(scales, np.abs(x).max(axis=1) / np.float32(127.0))


def test_int8_columns_and_rows():
    """``int8_columns``: per column scale max |w| / 127 (1 for a zero column), q in [-127, 127]
    with the peak at +-127; ``quantize_rows``: per row the same, as unsigned bytes q + 128, the
    padding columns at 128; non-finite weights refused naming the weights."""
    from mdsd.engine import _llama_numba as kernels
    from mdsd.engine._panel_gemm import int8_columns

    weight_t = np.array([[1.0, 0.0, -2.0], [-0.5, 0.0, 0.01]], dtype=np.float32)
    q, scales = int8_columns(weight_t)
    np.testing.assert_array_equal(q, [[127, 0, -127], [-64, 0, 1]])
    np.testing.assert_allclose(scales, [1 / 127, 1.0, 2 / 127], rtol=1e-7)
    codes, row_scales = kernels.quantize_rows(weight_t.T.copy(), 4)
    np.testing.assert_array_equal(codes.astype(int) - 128, [[127, -64, 0, 0], [0, 0, 0, 0], [-127, 1, 0, 0]])
    np.testing.assert_allclose(row_scales, [1 / 127, 1.0, 2 / 127], rtol=1e-7)
    with pytest.raises(ValueError, match="weights"):
        int8_columns(np.array([[np.nan]], dtype=np.float32))


def test_int8_runner_forward(llama):
    """``StaticLlamaRunner(weights="int8")``: "q8" panels everywhere, the one-call forward equal
    to ``causal_hidden`` then ``logits`` bit for bit, logits near the exact runner's but not equal
    to them; bad ``weights`` and int8 off the compiled forward refused naming the argument."""
    from mdsd.engine.static_llama import StaticLlamaRunner

    exact = StaticLlamaRunner(llama.draft, "numba")
    runner = StaticLlamaRunner(llama.draft, "numba", weights="int8")
    assert runner.panel_format == "q8" and all(lin.panels.dtype == np.int8 for lin in runner.projections())
    results = []
    for r, one_call in ((runner, True), (runner, False), (exact, True)):
        r.reset(32)
        ids = np.array(PROMPT)
        results.append(r.causal(ids, 3) if one_call else r.logits(r.causal_hidden(ids, 3)))
    assert np.array_equal(results[0], results[1])
    scale = np.abs(results[2]).max()
    assert 0 < np.abs(results[0] - results[2]).max() < 0.1 * scale
    with pytest.raises(ValueError, match="weights"):
        StaticLlamaRunner(llama.draft, "numba", weights="int4")
    with pytest.raises(ValueError, match="weights 'int8'"):
        StaticLlamaRunner(llama.draft, "torch", weights="int8")


class _Int8DraftOracle(Oracle):
    """``Oracle`` whose q is a fresh int8 runner's full forward of the context."""

    def __init__(self, pair, sampling):
        from mdsd.engine.static_llama import StaticLlamaRunner

        super().__init__(pair, sampling)
        self.runner = StaticLlamaRunner(pair.draft, "numba", weights="int8")

    def q(self, context):
        self.runner.reset(len(context) + 1)
        return self.sampling.probs(self.runner.causal(np.array(context), 1)[0])


@pytest.mark.parametrize("spec", ["iid:rrs:1x3", "without_replacement:rrs_without_replacement:2,1"])
def test_int8_draft_is_verified_with_the_q_it_drew_from(llama, spec):
    """A decoder with ``draft_weights`` "int8" (the lean chain loop and the general tree loop):
    every q the drafts were drawn from is the int8 draft's (a fresh int8 runner's forward of the
    context), not the exact draft's; and the exact law of the first two tokens, enumerated with
    those q, is the target's."""
    from .helpers import LAW_TOL, assert_same_law, autoregressive_law, first_tokens_law

    sampling = SamplingConfig(1.0)
    config = TreeConfig.from_spec(spec + "::int8")
    dec = TreeDecoder(llama, config, sampling)
    assert dec.draft.panel_format == "q8"
    oracle, exact = _Int8DraftOracle(llama, sampling), Oracle(llama, sampling)
    with torch.inference_mode():
        for seq, drafted, _ in decoded_steps(dec, 3):
            assert_draft_probs(dec.tree, drafted, seq, oracle.q)
            assert np.abs(oracle.q(seq) - exact.q(seq)).max() > 1e-4
        want = autoregressive_law(exact, PROMPT, 2)
        got = first_tokens_law(dec.tree, dec.book, oracle, PROMPT, 2)
    assert_same_law(got, want, LAW_TOL)


def test_int8_draft_refused_without_the_compiled_forward(gpt2, llama):
    """``draft_weights`` "int8" where the draft has no compiled forward (GPT-2, the static cache
    off, matmul "torch") is refused with a ValueError naming ``draft_weights``."""
    config = TreeConfig.from_spec("iid:rrs:1x2::int8")
    for pair, kwargs in ((gpt2, {}), (llama, {"static_cache": False}), (llama, {"matmul": "torch"})):
        with pytest.raises(ValueError, match="draft_weights 'int8'"):
            TreeDecoder(pair, config, SamplingConfig(1.0), **kwargs)


def test_compiled_clock_reads_the_monotonic_clock():
    """``_step_numba.monotonic`` (``clock_gettime`` called from compiled code, which times the
    parts of a tree's one-call step) reads the clock of ``time.monotonic``: between two readings
    of it; and 0.0 without a clock."""
    import time

    from mdsd.engine._step_numba import clock_source, monotonic

    clock = clock_source()
    assert clock[0] != 0
    for _ in range(100):
        before = time.monotonic()
        now = monotonic(*clock)
        assert before <= now <= time.monotonic()
    assert monotonic(0, 0) == 0.0
