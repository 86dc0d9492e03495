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
panels bit for bit, from half the bytes), or "q8": int8 weights and activations, a faster
approximation for draft models (``FORMATS``), whose sums are exact integers. With the float
formats each output is the in-order sum over k of float32 fused multiply-adds: deterministic,
equal to a float64 product to float32 rounding (tests/engine/test_runner.py).
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


@functools.cache
def host_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (``vpdpbusd``), which the "q8" kernel uses when present."""
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("avx512vnni", False))
    except Exception:  # pragma: no cover - llvmlite ships with numba for every supported CPU
        return False


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
FORMATS = {
    "f32": ("float", np.float32),
    "f16": ("half", np.uint16),
    "bf16": ("bfloat", np.uint16),
    "q8": ("i8", np.int8),
}
# "q8": int8 weights *and* activations, an approximation a caller chooses (a draft model's
# forward, ``StaticLlamaRunner(weights="int8")``), never ``storage_format``. W^T ~ q_w[k, c] *
# w_scale[c] per output column (``int8_columns``) and each row x ~ q_x[k] * x_scale per row
# (``quantize_rows``); the kernel sums q_x q_w over k in int32, exactly, by AVX-512 VNNI's
# ``vpdpbusd`` (64 byte products per instruction, where the float kernels do 16 multiply-adds)
# or, on other CPUs, by plain integer vector arithmetic, the same sums. Layout and steps:
# ``pack_panels`` and ``_q8_kernel_ir``.
Q8_GROUP = 4  # k values per 32-bit lane of vpdpbusd
Q8_TRAILER = 2  # rows after a panel's k groups: its int32 corrections, its float32 scales
Q8_OFFSET = 128  # x is read as unsigned bytes q_x + 128; the corrections take 128 sum_k q_w back


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


def int8_columns(weight_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of W^T [in, out] per output column: (q [in, out] int8,
    scales [out] float32), scale[c] = max_k |W^T[k, c]| / 127 (1 for a zero column) and q the
    nearest integer to W^T / scale, in [-127, 127]."""
    weight_t = np.asarray(weight_t, dtype=np.float32)
    if not np.all(np.isfinite(weight_t)):
        raise ValueError("weights 'int8': every weight must be finite")
    peak = np.abs(weight_t).max(axis=0)
    scales = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    return np.clip(np.rint(weight_t / scales), -127, 127).astype(np.int8), scales


def int8_weights(weight_t: np.ndarray) -> np.ndarray:
    """The float32 W^T [in, out] that "q8" panels of ``weight_t`` stand for: q * scale per column
    (``int8_columns``)."""
    q, scales = int8_columns(weight_t)
    return q.astype(np.float32) * scales


def _pack_q8(weight_t: np.ndarray, panel: int) -> np.ndarray:
    """Panels of format "q8", [P, G + Q8_TRAILER, panel, Q8_GROUP] int8, of W^T [K, out], G = ceil(K / 4):
    panels[p, g, c, t] = q[4 g + t, p panel + c] (zero past K and past the last column), then in
    the bytes of row G the int32 corrections Q8_OFFSET * sum_k q[k, c] and in those of row G + 1
    the float32 scales (``int8_columns``)."""
    q, scales = int8_columns(weight_t)
    k_dim, cols = q.shape
    groups, blocks = -(-k_dim // Q8_GROUP), -(-cols // panel)
    padded = np.zeros((groups * Q8_GROUP, blocks * panel), dtype=np.int8)
    padded[:k_dim, :cols] = q
    body = padded.reshape(groups, Q8_GROUP, blocks, panel).transpose(2, 0, 3, 1)  # [P, G, panel, 4]
    corrections = np.zeros(blocks * panel, dtype=np.int32)
    corrections[:cols] = Q8_OFFSET * q.astype(np.int32).sum(axis=0)
    padded_scales = np.ones(blocks * panel, dtype=np.float32)
    padded_scales[:cols] = scales
    panels = np.empty((blocks, groups + Q8_TRAILER, panel, Q8_GROUP), dtype=np.int8)
    panels[:, :groups] = body
    panels[:, groups] = corrections.view(np.int8).reshape(blocks, panel, Q8_GROUP)
    panels[:, groups + 1] = padded_scales.view(np.int8).reshape(blocks, panel, Q8_GROUP)
    return panels


def pack_panels(weight_t: np.ndarray, fmt: str = "f32", panel: int = PANEL) -> np.ndarray:
    """W^T [in, out] -> panels [ceil(out / panel), in, panel], the last zero-padded, in ``fmt``
    (float32; float16 or bfloat16 bit patterns as uint16 -- exact only for weights
    ``storage_format`` accepts, which the caller checks; "q8": ``_pack_q8``'s int8 layout)."""
    if fmt == "q8":
        return _pack_q8(weight_t, panel)
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


def _broadcast_ir(row: int, step: str, scalar: str, width: int, align: int) -> list[str]:
    """IR of ``%xb{row}``: element ``%xrow{row} + step`` of x, a ``scalar`` ("float" or "i32"),
    in every one of ``width`` lanes."""
    vec = f"<{width} x {scalar}>"
    return [
        f"  %x.at{row} = add i64 %xrow{row}, {step}",
        f"  %x.ptr{row} = getelementptr {scalar}, ptr %x, i64 %x.at{row}",
        f"  %x{row} = load {scalar}, ptr %x.ptr{row}, align {align}",
        f"  %x.ins{row} = insertelement {vec} poison, {scalar} %x{row}, i64 0",
        f"  %xb{row} = shufflevector {vec} %x.ins{row}, {vec} poison, <{width} x i32> zeroinitializer",
    ]


def _rows_kernel_ir(rows: int, fmt: str, width: int, prefetch: int, panel: int) -> list[str]:
    """LLVM IR of ``gemm_{fmt}_r{rows}``: for each panel p, for k in 0..K-1,
    acc[r] += broadcast(x[r, k]) * panels[p, k, :] (panel / width vectors of ``width`` floats per
    row; 16-bit weights widened to float32 exactly), then store. With ``prefetch`` > 0 each k step
    first requests the weights ``prefetch`` bytes ahead in the stream."""
    elem = FORMATS[fmt][0]
    vec, parts = f"<{width} x float>", panel // width
    acc = [(r, c) for r in range(rows) for c in range(parts)]
    ir = _kernel_entry_ir(f"gemm_{fmt}_r{rows}", rows, "%K", [])
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
        ir += _broadcast_ir(r, "%k", "float", width, 4)
        ir += [
            f"  %n{r}.{c} = call {vec} @llvm.fma.v{width}f32({vec} %xb{r}, {vec} %w{c}, {vec} %a{r}.{c})"
            for c in range(parts)
        ]
    ir += ["  %k.next = add i64 %k, 1", "  %k.done = icmp eq i64 %k.next, %K"]
    ir += ["  br i1 %k.done, label %store, label %inner", "store:", f"  %col = mul i64 %p, {panel}"]
    for r, c in acc:
        ir += _store_ir(r, c, f"%n{r}.{c}", width)
    return ir + _next_panel_ir()


def _kernel_entry_ir(name: str, rows: int, x_stride: str, setup: list[str]) -> list[str]:
    """IR opening a row kernel ``name`` of ``GEMM_SIGNATURE``: ``setup``, the offsets
    ``%xrow{r}`` (r * ``x_stride`` elements of x) and ``%orow{r}`` of each row, and the panel
    loop's head (``%p``)."""
    ir = [
        f"define internal void @{name}(ptr noalias nocapture readonly %x, "
        "ptr noalias nocapture readonly %w, ptr noalias nocapture %out, i64 %P, i64 %K, i64 %ldo) #0 {",
        "entry:",
        *setup,
    ]
    ir += [f"  %xrow{r} = mul i64 {x_stride}, {r}\n  %orow{r} = mul i64 %ldo, {r}" for r in range(rows)]
    return ir + ["  br label %panel", "panel:", "  %p = phi i64 [0, %entry], [%p.next, %store]"]


def _store_ir(row: int, part: int, value: str, width: int) -> list[str]:
    """IR storing ``value`` (``width`` floats) at out[row, %col + width * part]."""
    r, c, vec = row, part, f"<{width} x float>"
    return [
        f"  %o.base{r}.{c} = add i64 %orow{r}, %col",
        f"  %o.at{r}.{c} = add i64 %o.base{r}.{c}, {width * c}",
        f"  %o.ptr{r}.{c} = getelementptr float, ptr %out, i64 %o.at{r}.{c}",
        f"  store {vec} {value}, ptr %o.ptr{r}.{c}, align 4",
    ]


def _next_panel_ir() -> list[str]:
    """IR ending a panel: the next one, or the kernel's return after the last."""
    return [
        "  %p.next = add i64 %p, 1",
        "  %p.done = icmp eq i64 %p.next, %P",
        "  br i1 %p.done, label %exit, label %panel",
        "exit:",
        "  ret void",
        "}",
    ]


def _q8_dot_ir(out: str, acc: str, x: str, w: str, width: int, vnni: bool) -> list[str]:
    """IR setting ``out`` = acc[j] + sum_t x_byte[4 j + t] * w_byte[4 j + t] over the four bytes
    of each 32-bit lane (x unsigned, w signed; ``vpdpbusd``), exact in int32; written inline,
    as the module is compiled without an inlining pass."""
    lanes, i32v, n = width, f"<{width} x i32>", Q8_GROUP * width
    if vnni:
        return [f"  {out} = call {i32v} @llvm.x86.avx512.vpdpbusd.512({i32v} {acc}, {i32v} {x}, {i32v} {w})"]
    tag = out[1:]
    ir = [
        f"  %{tag}.xb = bitcast {i32v} {x} to <{n} x i8>",
        f"  %{tag}.wb = bitcast {i32v} {w} to <{n} x i8>",
        f"  %{tag}.xe = zext <{n} x i8> %{tag}.xb to <{n} x i32>",
        f"  %{tag}.we = sext <{n} x i8> %{tag}.wb to <{n} x i32>",
        f"  %{tag}.pr = mul <{n} x i32> %{tag}.xe, %{tag}.we",
    ]
    total = acc
    for t in range(Q8_GROUP):
        picks = ", ".join(f"i32 {Q8_GROUP * j + t}" for j in range(lanes))
        part = f"<{n} x i32> %{tag}.pr, <{n} x i32> poison, <{lanes} x i32> <{picks}>"
        ir += [f"  %{tag}.p{t} = shufflevector {part}"]
        step = out if t == Q8_GROUP - 1 else f"%{tag}.s{t}"
        ir += [f"  {step} = add {i32v} {total}, %{tag}.p{t}"]
        total = step
    return ir


def _q8_kernel_ir(rows: int, width: int, prefetch: int, panel: int, vnni: bool) -> list[str]:
    """LLVM IR of ``gemm_q8_r{rows}``: x is [rows, K] unsigned bytes (q_x + Q8_OFFSET, K a
    multiple of 4), panels ``_pack_q8``'s; for each panel p and group g < G = K / 4,
    acc[r] = q8_dot(acc[r], x[r, 4g:4g+4] in every lane, panels[p, g]); then out[r, c] =
    float32(acc[r, c] - correction[c]) * scale[c] (the caller multiplies row r by its x scale)."""
    i32v, vec, parts = f"<{width} x i32>", f"<{width} x float>", panel // width
    group_bytes = panel * Q8_GROUP
    acc = [(r, c) for r in range(rows) for c in range(parts)]
    groups = [f"  %G = udiv i64 %K, {Q8_GROUP}", f"  %G.rows = add i64 %G, {Q8_TRAILER}"]
    ir = _kernel_entry_ir(f"gemm_q8_r{rows}", rows, "%G", groups)
    ir += ["  %pbase = mul i64 %p, %G.rows", "  br label %inner", "inner:"]
    ir += ["  %g = phi i64 [0, %panel], [%g.next, %inner]"]
    ir += [f"  %a{r}.{c} = phi {i32v} [zeroinitializer, %panel], [%n{r}.{c}, %inner]" for r, c in acc]
    ir += ["  %wrow = add i64 %pbase, %g", f"  %w.base = mul i64 %wrow, {group_bytes}"]
    ir += ["  %w.here = getelementptr i8, ptr %w, i64 %w.base"]
    if prefetch:
        for line in range(0, group_bytes, 64):
            ir += [
                f"  %w.ahead{line} = getelementptr i8, ptr %w.here, i64 {prefetch + line}",
                f"  call void @llvm.prefetch.p0(ptr %w.ahead{line}, i32 0, i32 3, i32 1)",
            ]
    for c in range(parts):
        ir += [f"  %w.ptr{c} = getelementptr i8, ptr %w.here, i64 {width * Q8_GROUP * c}"]
        ir += [f"  %w{c} = load {i32v}, ptr %w.ptr{c}, align 4"]
    for r in range(rows):
        ir += _broadcast_ir(r, "%g", "i32", width, 1)  # four bytes of row r: one lane's worth
        for c in range(parts):
            ir += _q8_dot_ir(f"%n{r}.{c}", f"%a{r}.{c}", f"%xb{r}", f"%w{c}", width, vnni)
    ir += ["  %g.next = add i64 %g, 1", "  %g.done = icmp eq i64 %g.next, %G"]
    ir += ["  br i1 %g.done, label %store, label %inner", "store:", f"  %col = mul i64 %p, {panel}"]
    ir += ["  %t.row = add i64 %pbase, %G", f"  %t.base = mul i64 %t.row, {group_bytes}"]
    ir += ["  %corr.ptr = getelementptr i8, ptr %w, i64 %t.base"]
    ir += [f"  %scale.ptr = getelementptr i8, ptr %corr.ptr, i64 {group_bytes}"]
    for c in range(parts):
        ir += [
            f"  %corr.ptr{c} = getelementptr i32, ptr %corr.ptr, i64 {width * c}",
            f"  %corr{c} = load {i32v}, ptr %corr.ptr{c}, align 4",
            f"  %scale.ptr{c} = getelementptr float, ptr %scale.ptr, i64 {width * c}",
            f"  %scale{c} = load {vec}, ptr %scale.ptr{c}, align 4",
        ]
    for r, c in acc:
        ir += [
            f"  %d{r}.{c} = sub {i32v} %n{r}.{c}, %corr{c}",
            f"  %f{r}.{c} = sitofp {i32v} %d{r}.{c} to {vec}",
            f"  %y{r}.{c} = fmul {vec} %f{r}.{c}, %scale{c}",
        ]
        ir += _store_ir(r, c, f"%y{r}.{c}", width)
    return ir + _next_panel_ir()


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
        f"  %xp = getelementptr {'i8' if fmt == 'q8' else 'float'}, ptr %x, i64 %x.off",
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


def module_ir(
    width: int = 8, prefetch: int = PREFETCH_BYTES, panel: int = PANEL, vnni: bool | None = None
) -> str:
    """The LLVM IR module for vectors of ``width`` floats and panels of ``panel`` columns: per
    format, ``gemm_{fmt}_r1`` .. ``gemm_{fmt}_r{rows_per_pass(width, panel)}`` and the exported
    dispatcher ``mdsd_panel_gemm_{fmt}``; ``prefetch``: the software prefetch distance in bytes
    (0: none); ``vnni``: "q8" sums by ``vpdpbusd`` (None: where the host has it and ``width`` is
    16), else by plain integer vector arithmetic (the same sums)."""
    vec = f"<{width} x float>"
    most = rows_per_pass(width, panel)
    vnni = (width == 16 and host_vnni()) if vnni is None else bool(vnni)
    if vnni and width != 16:
        raise ValueError(f"vnni: vpdpbusd needs 16-lane vectors, got width {width}")
    ir = [f"declare {vec} @llvm.fma.v{width}f32({vec}, {vec}, {vec})"]
    ir += ["declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"]
    if vnni:
        ir += ["declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)"]
    ir += [""]
    for fmt in FORMATS:
        for rows in range(1, most + 1):
            if fmt == "q8":
                ir += _q8_kernel_ir(rows, width, prefetch, panel, vnni) + [""]
            else:
                ir += _rows_kernel_ir(rows, fmt, width, prefetch, panel) + [""]
        ir += _dispatcher_ir(fmt, width, most) + [""]
    # explicit 512-bit vectors stay whole where the CPU prefers 256-bit ones for autovectorising
    bits = 32 * width
    ir += [f'attributes #0 = {{ "min-legal-vector-width"="{bits}" "prefer-vector-width"="{bits}" }}']
    return "\n".join(ir)


@functools.cache
def _compiled(width: int, prefetch: int, panel: int, vnni: bool | None = None) -> tuple:
    """(execution engine, {format: ctypes function}) for vectors of ``width`` floats, a prefetch
    distance and a panel width: compiled once per process for the host CPU (~0.1-0.3 s). The
    engine owns the machine code, so it is kept alive with the functions."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3
    )
    module = llvm.parse_assembly(module_ir(width, prefetch, panel, vnni))
    module.verify()
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    kernels = {fmt: GEMM_SIGNATURE(engine.get_function_address(f"mdsd_panel_gemm_{fmt}")) for fmt in FORMATS}
    return engine, kernels


def gemm_kernel(
    fmt: str = "f32",
    width: int | None = None,
    prefetch: int = PREFETCH_BYTES,
    panel: int = PANEL,
    vnni: bool | None = None,
):
    """The compiled kernel for panels in ``fmt`` of ``panel`` columns (``pack_panels``) with
    vectors of ``width`` floats (None: the host's, ``host_width``) and software prefetch
    ``prefetch`` bytes ahead (0: none), a ctypes function of ``GEMM_SIGNATURE``; None where
    llvmlite cannot compile for this machine (the forward then uses numpy's BLAS). Every width,
    panel width and prefetch distance gives the same products bit for bit (each output is the
    same in-order chain of fused multiply-adds over k; for "q8" the same exact integer sums,
    with or without ``vnni``, which must be left None or False on a CPU without AVX-512 VNNI)."""
    try:
        return _compiled(width or host_width(), prefetch, panel, vnni)[1][fmt]
    except Exception:  # pragma: no cover - llvmlite ships with numba for every supported CPU
        return None


def kernel_address(kernel) -> int:
    """The machine address of a kernel from ``gemm_kernel``, the form compiled code takes."""
    return ctypes.cast(kernel, ctypes.c_void_p).value
