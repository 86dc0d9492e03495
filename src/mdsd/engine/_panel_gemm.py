"""Small-M matrix products x [m, in] @ W^T [in, out] at the memory bound of one row.

A decoder forward over the few tokens of a draft tree multiplies 2-16 rows by every weight
matrix. General BLAS kernels pack the weights on every call and, on the CPUs of BENCHMARKS.md,
take 1.9-2.2x the time of one row for 2-8 rows (``benchmarks/bench_matmul.py``), although the
arithmetic is a small fraction of the time it takes to read the weights once. This kernel reads
them once for all rows of a pass:

- W^T is stored once, at load, as *panels* [P, in, PANEL]: column block c of W^T is the
  contiguous array ``panels[c]`` (the last block zero-padded), so one product streams every
  weight exactly once, in memory order;
- per panel, the ``rows x PANEL`` outputs stay in vector registers while k runs over the input
  dimension: for each k, two vector loads of ``panels[c, k]`` (PANEL is two vectors of the
  host's width: 32 floats with AVX-512, 16 with AVX2), one broadcast of ``x[r, k]`` per row and
  two fused multiply-adds per row. Two accumulators per row keep two independent chains in
  flight: with one (16-float panels on AVX-512) a pass is bound by the 4-cycle latency of its
  chain rather than by the weights' stream: a one-row product took 1.4-2x as long hot, and in
  some runs 3 rows from memory 1.4-1.6x one row (AMD Zen 4, ``benchmarks/bench_matmul.py``). A pass
  takes up to 6 rows with AVX2 (16 registers) and 14 with AVX-512 (32 registers), two
  accumulators per row plus the weights and a broadcast (``MAX_ROWS``; the dispatcher runs
  passes until every row is done);
- each k step also prefetches the weights ``PREFETCH_BYTES`` ahead in the stream: in a decode
  step the weights come from memory, and the hardware prefetcher alone does not keep enough
  lines in flight.

numba cannot hold such a tile in registers (its arrays live in memory; its superword vectoriser
is off by default), so the kernel is written as LLVM IR (one function per row count and a
dispatcher of passes) and compiled for the host CPU by llvmlite, numba's own LLVM binding.
``gemm_kernel(fmt)`` returns it as a ctypes function; compiled code takes its address
(``kernel_address``) and calls it through an intrinsic (``mdsd.engine._llama_numba.project``).
Panels are float32, or float16 / bfloat16 for weights those formats hold exactly
(``storage_format``; widened to float32 in registers, so the products are those of float32
panels bit for bit, from half the bytes). Each output is the
in-order sum over k of float32 fused multiply-adds: deterministic, equal to a float64 product to
float32 rounding (tests/engine/test_runner.py).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np


@functools.cache
def host_width() -> int:
    """Floats per vector register of this CPU for the kernel: 16 with AVX-512F, else 8."""
    try:
        import llvmlite.binding as llvm

        return 16 if llvm.get_host_cpu_features().get("avx512f", False) else 8
    except Exception:  # pragma: no cover - llvmlite ships with numba for every supported CPU
        return 8


PANEL = 2 * host_width()  # output columns per panel: two vectors (see the module docstring)
_REGISTERS = {8: 16, 16: 32}  # vector registers by width (AVX2, AVX-512)


def rows_per_pass(width: int, panel: int = PANEL) -> int:
    """Rows one pass holds in registers: panel / width accumulators per row, plus as many weight
    vectors and one broadcast (AVX2 with 16-float panels: 6 rows; AVX-512 with 32: 14), at most
    24."""
    parts = panel // width
    return min(24, (_REGISTERS[width] - parts - 1) // parts)


MAX_ROWS = {width: rows_per_pass(width) for width in _REGISTERS}  # for PANEL
# Software prefetch distance along the panel stream, in bytes (0: none). With the hardware
# prefetcher alone a 3-4 row product took 1.14-1.35x a one-row product when the weights come from
# memory (every decode step: the target's ~27 MB do not stay in cache); requesting the line 8 KiB
# ahead on every k step (a few hundred cycles of memory latency ahead) makes the one-row product
# 0.73-0.83x its time and 1-4 rows cost about what one row cost without it
# (``benchmarks/bench_matmul.py``, table 4).
# A prefetch never faults, so reading past the last panel is harmless.
PREFETCH_BYTES = 8192

GEMM_SIGNATURE = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,  # x [rows, k_dim] float32, C order
    ctypes.c_void_p,  # panels [n_panels, k_dim, PANEL] in the kernel's format
    ctypes.c_void_p,  # out [rows, out_stride] float32 (columns 0 .. n_panels * PANEL - 1 written)
    ctypes.c_int64,  # rows >= 0 (passes of rows_per_pass(width, panel) rows)
    ctypes.c_int64,  # n_panels >= 1
    ctypes.c_int64,  # k_dim >= 1
    ctypes.c_int64,  # out_stride: floats between output rows
)


# Storage formats of the panels: the IR element type and the numpy dtype holding it. 16-bit
# formats are used only for weights they hold exactly (``storage_format``): a checkpoint saved in
# float16 or bfloat16 and loaded in float32 has such weights, and reading half the bytes then gives
# the same products bit for bit.
FORMATS = {"f32": ("float", np.float32), "f16": ("half", np.uint16), "bf16": ("bfloat", np.uint16)}


HUGE_PAGE = 2 << 20  # bytes: an x86-64 transparent huge page
PANEL_ALIGN = 64  # bytes: one cache line


def pool_panels(panels) -> list[np.ndarray]:
    """Copies of the arrays ``panels`` in one allocation, each aligned to a cache line, the first
    to a 2 MiB boundary (the same values: the products do not change).

    A decode step streams every panel of a model. Held one array per matrix, the bundled target's
    ~27 MB of panels lie on ~6,700 pages of 4 KiB, more than the CPU's TLB covers, and every step
    pays those misses again. numpy asks Linux to back allocations of several megabytes with 2 MiB
    transparent huge pages (``madvise``; where the system does not, nothing changes): one pool
    spans ~14 such pages (``benchmarks/bench_matmul.py``, table 5).
    """
    sizes = [-(-p.nbytes // PANEL_ALIGN) * PANEL_ALIGN for p in panels]
    pool = np.empty(sum(sizes) + HUGE_PAGE, dtype=np.uint8)
    start = (-pool.ctypes.data) % HUGE_PAGE
    pooled = []
    for array, size in zip(panels, sizes):
        view = pool[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
        view[...] = array
        pooled.append(view)
        start += size
    return pooled


def storage_format(weight_t: np.ndarray) -> str:
    """The narrowest format holding every float32 weight exactly: "f16", "bf16" or "f32"."""
    weight_t = np.asarray(weight_t, dtype=np.float32)
    with np.errstate(over="ignore"):
        if np.array_equal(weight_t.astype(np.float16).astype(np.float32), weight_t):
            return "f16"
    if not np.any(weight_t.view(np.uint32) & 0xFFFF):  # the low 16 bits of every float are zero
        return "bf16"
    return "f32"


def pack_panels(weight_t: np.ndarray, fmt: str = "f32", panel: int = PANEL) -> np.ndarray:
    """W^T [in, out] -> panels [ceil(out / panel), in, panel], the last zero-padded, in ``fmt``
    (float32; float16 or bfloat16 bit patterns as uint16 -- exact only for weights
    ``storage_format`` accepts, which the caller checks)."""
    k_dim, cols = weight_t.shape
    blocks = -(-cols // panel)
    padded = np.zeros((k_dim, blocks * panel), dtype=np.float32)
    padded[:, :cols] = weight_t
    if fmt == "f16":
        padded = padded.astype(np.float16).view(np.uint16)
    elif fmt == "bf16":
        padded = (padded.view(np.uint32) >> 16).astype(np.uint16)
    elif fmt != "f32":
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    return np.ascontiguousarray(padded.reshape(k_dim, blocks, panel).transpose(1, 0, 2))


def _rows_kernel_ir(rows: int, fmt: str, width: int, prefetch: int, panel: int) -> list[str]:
    """LLVM IR of ``gemm_{fmt}_r{rows}``: for each panel p, for k in 0..K-1,
    acc[r] += broadcast(x[r, k]) * panels[p, k, :] (panel / width vectors of ``width`` floats per
    row; 16-bit weights widened to float32 exactly), then store. With ``prefetch`` > 0 each k step
    first requests the weights ``prefetch`` bytes ahead in the stream."""
    elem = FORMATS[fmt][0]
    vec, parts = f"<{width} x float>", panel // width
    acc = [(r, c) for r in range(rows) for c in range(parts)]
    ir = [
        f"define internal void @gemm_{fmt}_r{rows}(ptr noalias nocapture readonly %x, "
        "ptr noalias nocapture readonly %w, ptr noalias nocapture %out, i64 %P, i64 %K, i64 %ldo) #0 {",
        "entry:",
    ]
    ir += [f"  %xrow{r} = mul i64 %K, {r}\n  %orow{r} = mul i64 %ldo, {r}" for r in range(rows)]
    ir += ["  br label %panel", "panel:", "  %p = phi i64 [0, %entry], [%p.next, %store]"]
    ir += ["  %pbase = mul i64 %p, %K", "  br label %inner", "inner:"]
    ir += ["  %k = phi i64 [0, %panel], [%k.next, %inner]"]
    ir += [f"  %a{r}.{c} = phi {vec} [zeroinitializer, %panel], [%n{r}.{c}, %inner]" for r, c in acc]
    ir += ["  %wrow = add i64 %pbase, %k", f"  %w.base = mul i64 %wrow, {panel}"]
    if prefetch:
        ir += [
            f"  %w.here = getelementptr {elem}, ptr %w, i64 %w.base",
            f"  %w.ahead = getelementptr i8, ptr %w.here, i64 {prefetch}",
            "  call void @llvm.prefetch.p0(ptr %w.ahead, i32 0, i32 3, i32 1)",
        ]
    for c in range(parts):
        ir += [f"  %w.at{c} = add i64 %w.base, {width * c}"]
        ir += [f"  %w.ptr{c} = getelementptr {elem}, ptr %w, i64 %w.at{c}"]
        if elem == "float":
            ir += [f"  %w{c} = load {vec}, ptr %w.ptr{c}, align 4"]
        else:
            ir += [f"  %w.raw{c} = load <{width} x {elem}>, ptr %w.ptr{c}, align 2"]
            ir += [f"  %w{c} = fpext <{width} x {elem}> %w.raw{c} to {vec}"]
    for r in range(rows):
        ir += [
            f"  %x.at{r} = add i64 %xrow{r}, %k",
            f"  %x.ptr{r} = getelementptr float, ptr %x, i64 %x.at{r}",
            f"  %x{r} = load float, ptr %x.ptr{r}, align 4",
            f"  %x.ins{r} = insertelement {vec} poison, float %x{r}, i64 0",
            f"  %xb{r} = shufflevector {vec} %x.ins{r}, {vec} poison, <{width} x i32> zeroinitializer",
        ]
        ir += [
            f"  %n{r}.{c} = call {vec} @llvm.fma.v{width}f32({vec} %xb{r}, {vec} %w{c}, {vec} %a{r}.{c})"
            for c in range(parts)
        ]
    ir += ["  %k.next = add i64 %k, 1", "  %k.done = icmp eq i64 %k.next, %K"]
    ir += ["  br i1 %k.done, label %store, label %inner", "store:", f"  %col = mul i64 %p, {panel}"]
    for r, c in acc:
        ir += [
            f"  %o.base{r}.{c} = add i64 %orow{r}, %col",
            f"  %o.at{r}.{c} = add i64 %o.base{r}.{c}, {width * c}",
            f"  %o.ptr{r}.{c} = getelementptr float, ptr %out, i64 %o.at{r}.{c}",
            f"  store {vec} %n{r}.{c}, ptr %o.ptr{r}.{c}, align 4",
        ]
    ir += ["  %p.next = add i64 %p, 1", "  %p.done = icmp eq i64 %p.next, %P"]
    ir += ["  br i1 %p.done, label %exit, label %panel", "exit:", "  ret void", "}"]
    return ir


def _dispatcher_ir(fmt: str, width: int, most: int) -> list[str]:
    """``mdsd_panel_gemm_{fmt}(x, panels, out, rows, n_panels, k_dim, out_stride)``: passes of
    up to ``most`` rows, each by the kernel of its row count."""
    cases = " ".join(f"i64 {r}, label %rows{r}" for r in range(1, most + 1))
    ir = [
        f"define void @mdsd_panel_gemm_{fmt}(ptr %x, ptr %w, ptr %out, i64 %rows, i64 %P, i64 %K, "
        "i64 %ldo) {",
        "entry:",
        "  br label %loop",
        "loop:",
        "  %done = phi i64 [0, %entry], [%done.next, %next]",
        "  %left = sub i64 %rows, %done",
        "  %more = icmp sgt i64 %left, 0",
        "  br i1 %more, label %pass, label %exit",
        "pass:",
        f"  %big = icmp sgt i64 %left, {most}",
        f"  %r = select i1 %big, i64 {most}, i64 %left",
        "  %x.off = mul i64 %done, %K",
        "  %xp = getelementptr float, ptr %x, i64 %x.off",
        "  %o.off = mul i64 %done, %ldo",
        "  %op = getelementptr float, ptr %out, i64 %o.off",
        f"  switch i64 %r, label %next [{cases}]",
    ]
    for r in range(1, most + 1):
        ir += [
            f"rows{r}:",
            f"  call void @gemm_{fmt}_r{r}(ptr %xp, ptr %w, ptr %op, i64 %P, i64 %K, i64 %ldo)",
            "  br label %next",
        ]
    ir += ["next:", "  %done.next = add i64 %done, %r", "  br label %loop", "exit:", "  ret void", "}"]
    return ir


def module_ir(width: int = 8, prefetch: int = PREFETCH_BYTES, panel: int = PANEL) -> str:
    """The LLVM IR module for vectors of ``width`` floats and panels of ``panel`` columns: per
    format, ``gemm_{fmt}_r1`` .. ``gemm_{fmt}_r{rows_per_pass(width, panel)}`` and the exported
    dispatcher ``mdsd_panel_gemm_{fmt}``; ``prefetch``: the software prefetch distance in bytes
    (0: none)."""
    vec = f"<{width} x float>"
    most = rows_per_pass(width, panel)
    ir = [f"declare {vec} @llvm.fma.v{width}f32({vec}, {vec}, {vec})"]
    ir += ["declare void @llvm.prefetch.p0(ptr, i32, i32, i32)", ""]
    for fmt in FORMATS:
        for rows in range(1, most + 1):
            ir += _rows_kernel_ir(rows, fmt, width, prefetch, panel) + [""]
        ir += _dispatcher_ir(fmt, width, most) + [""]
    # explicit 512-bit vectors stay whole where the CPU prefers 256-bit ones for autovectorising
    bits = 32 * width
    ir += [f'attributes #0 = {{ "min-legal-vector-width"="{bits}" "prefer-vector-width"="{bits}" }}']
    return "\n".join(ir)


@functools.cache
def _compiled(width: int, prefetch: int, panel: int) -> tuple:
    """(execution engine, {format: ctypes function}) for vectors of ``width`` floats, a prefetch
    distance and a panel width: compiled once per process for the host CPU (~0.1-0.3 s). The
    engine owns the machine code, so it is kept alive with the functions."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3
    )
    module = llvm.parse_assembly(module_ir(width, prefetch, panel))
    module.verify()
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    kernels = {fmt: GEMM_SIGNATURE(engine.get_function_address(f"mdsd_panel_gemm_{fmt}")) for fmt in FORMATS}
    return engine, kernels


def gemm_kernel(
    fmt: str = "f32", width: int | None = None, prefetch: int = PREFETCH_BYTES, panel: int = PANEL
):
    """The compiled kernel for panels in ``fmt`` of ``panel`` columns (``pack_panels``) with
    vectors of ``width`` floats (None: the host's, ``host_width``) and software prefetch
    ``prefetch`` bytes ahead (0: none), a ctypes function of ``GEMM_SIGNATURE``; None where
    llvmlite cannot compile for this machine (the forward then uses numpy's BLAS). Every width,
    panel width and prefetch distance gives the same products bit for bit (each output is the
    same in-order chain of fused multiply-adds over k)."""
    try:
        return _compiled(width or host_width(), prefetch, panel)[1][fmt]
    except Exception:  # pragma: no cover - llvmlite ships with numba for every supported CPU
        return None


def kernel_address(kernel) -> int:
    """The machine address of a kernel from ``gemm_kernel``, the form compiled code takes."""
    return ctypes.cast(kernel, ctypes.c_void_p).value
