"""glmc::QuantizedLinear on CUDA: weight-only int8/int4 (and fp16) GEMV/GEMM writing split-K float32 partials.

Op and reference: `glmc.modeling_patches.ops.quantized_linear.quantized_linear` (Y = X @ dequant(QWeight, Scales)^T +
Bias) and, for fp16 weights, `F.linear`. The weights arrive in the op's layout: int8 [N, K]; int4 uint8 [N,
ceil(K/2)], element 2j in the low nibble, two's complement; Scales [N] (group_size 0) or [N, ceil(K/G)]. Made once
per layer when loaded: int4's interleaved words for the word kernels, or, in place of the rows, the mma kernel's
tiles (`tile_layer`, `settle_layout`; below).

`linear_partials(x, lin)` returns P [SPLIT, M, N] (float32, or the activation dtype when one cuBLAS call made it)
with Y = sum over SPLIT of P, bias NOT added: the consumer kernels (norm, rotary, sampling) sum the partials and add
the bias in their own pass, so a linear's output never makes an extra round trip and split-K costs no extra launch.
`linear(x, lin)` is the plain op (partials summed, bias added, in x's dtype): what the tests compare to the op.

Decode (M <= 16): one kernel reads each weight byte once. `fma` variant (M = 1): per-thread multiply-adds into a
[BLOCK_N, BLOCK_K] float32 accumulator, reduced once at the end. `dot` variant (M up to 16): tensor-core dots of the
[16, BLOCK_K] activations with the dequantized [BLOCK_N, BLOCK_K] tile. int4: the even and odd columns of X meet the
low and high nibbles separately (no interleave). Grouped scales: a tile never straddles a group (BLOCK_K divides the
group), so the scale multiplies the tile's partial sum, not every weight. Per-channel scales multiply at the end.
Prefill (M > 16): the weight is dequantized to the activation dtype by a kernel and multiplied by cuBLAS.

FP8 (`glmc::fp8_linear`, ops/fp8_linear.py): e4m3 weights [N, K] with a per-row scale go through the fma/dot
variants (the e4m3 byte converted to float like an int8 code, the row scale at the end), each X tile quantized to
e4m3 with the layer's static input scale and dequantized as the op does (`_fp8_activations`) as it is loaded.

`wo` variants (weight-only, fp16 activations; the decode path of int8/int4 builds): the weights are read as 32-bit
words and decoded with a few bit operations and packed fp16x2 math in inline PTX instead of an int->float conversion
per weight (FasterTransformer's trick). int8 words are the op's bytes, 4 codes; each byte is permuted into the
mantissa of 2^23 (`prmt`), so a code becomes a float32 with one subtraction, then float32 multiply-adds. int4 words
hold 8 codes in an interleaved order made once when the layer is loaded (`interleave_int4`: nibbles k0 k2 k4 k6 k1
k3 k5 k7, offset by 8), so that `(w & 0x000F000F) | 0x6400_6400` is the fp16 pair (1024 + u0, 1024 + u1) in the
activations' own pair order; 4 pairs per word, fp16x2 multiply-adds over the word's 8 products (at most 4 per lane,
|q| <= 8), then float32. `wo` (fma, any M, one row of X per program) and `wodot` (int4, M up to 16: the 8 decoded
codes of each word meet the matching columns of X in 8 tensor-core dots) are config choices like the others; the
kernels' pure-Triton twin (ASM=False) decodes the same words without PTX (the CPU interpreter runs it). `wo` at split
1 also has a SwiGLU epilogue (`gate_up_swiglu`), as `mma` has.

`mma` variant (int4 / int8 / fp16 weights, fp16 activations and scales, M <= 16; CUDA C++ in quantized_linear_mma.cu,
compiled at run time by NVRTC through torch, no build step): each lane loads 16 weight bytes per step, which are
exactly its B fragments of mma.m16n8k16 once the columns are renumbered inside the span it covers (the activations
renumbered alike), so a code is decoded straight into the tensor cores' operand registers (the int4 words above,
int8 bytes permuted into fp16 1152 + q) and multiplied in float32 by the tensor cores, for M = 1 as for M = 16.
Config: block_n = 8 x the 8-row blocks per warp, num_warps warps per program, num_stages spans per round of loads
(two rounds in flight), prefetch 256-byte L2 lines, split as for the others; block_k is the span (128 int4, 64 int8,
32 fp16). Layout: the op's rows (a warp's span is 8 runs of 64 bytes, one per row) or, for int8/int4 layers,
`tile_layer`'s tiles in their place (a warp's span is one 512-byte block, its rows one run: 0.3-1.1 us faster per
GEMV on the H200); `settle_layout` gives a layer the tiles when every decode batch runs it on the mma kernel and batch
1's config was timed on them (`tiled`), so a layer holds one copy of its weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from glmc.errors import GlmcError
from glmc.kernels._cuda import compile_kernel, launch, pdl_kwargs, pdl_on, pdl_prologue, sm_count
from glmc.kernels._jit import cdiv, jit, tl

DECODE_MAX_M = 16
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter runs no inline PTX


@dataclasses.dataclass
class PackedLinear:
    """One linear layer as the kernels read it: the op's tensors on the device."""

    weight: torch.Tensor  # fp16/bf16 [N, K] (bits 16), int8 [N, K], or uint8 [N, ceil(K/2)]
    scale: torch.Tensor | None  # [N] or [N, groups] in the activation dtype; None for bits 16
    bias: torch.Tensor | None  # [N]
    bits: int  # 16, 8 or 4
    group_size: int  # 0 = per channel
    n: int
    k: int
    words: torch.Tensor | None = None  # int4: int32 [N, K/8] in the interleaved order (interleave_int4)
    input_scale: torch.Tensor | None = None  # fp8 (glmc::fp8_linear): the activations' static scale [1]
    tiled: bool = False  # weight (int4: its interleaved words) and group scales in the mma tiles (tile_layer)

    @property
    def fp8(self) -> bool:
        """FP8 e4m3 weights [N, K] with a per-row scale; the activations are quantized to e4m3 with input_scale."""
        return self.weight.dtype == torch.float8_e4m3fn

    @property
    def nbytes(self) -> int:
        """Bytes one decode step reads (the int4 layer's weight once, in whichever layout its kernel reads)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.bias) if t is not None)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    variant: str  # "fma" (M = 1), "dot", "wo" (int8/int4 words, PTX decode), "wodot" (int4, M <= 16) or "mma"
    # (int4/int8/fp16 on tensor cores, M <= 16, CUDA C++)
    block_n: int
    block_k: int
    split: int
    num_warps: int
    num_stages: int
    magic: bool = False  # int4/int8: dequantize through fp16 bit patterns instead of int->float conversions
    prefetch: bool = False  # wo: load the next tile's words and scales before computing this one's; mma: ask L2
    # for 256-byte lines
    tiled: bool = False  # mma: timed on the tiled layout (tile_layer), the one settle_layout gives the layer when
    # its batch-1 config says so; the kernel reads whichever layout the layer holds


# ---------------------------------------------------------------------------------------------- kernels
# MAGIC dequantization (no int->float conversion instruction): an offset-binary code u in 0..255 OR-ed into the
# mantissa of fp16 1024.0 (0x6400) is the fp16 number 1024 + u. int4: u = nibble ^ 8 = q + 8, so the value is
# 1032 + q; int8: u = byte ^ 0x80 = q + 128, value 1152 + q. The kernels multiply these and subtract the offset
# times the sum of x (per group for grouped scales).


@jit
def _int4_magic(p):
    """Packed int4 bytes (uint8) -> (low, high) nibbles as fp16 1032 + q."""
    v = p.to(tl.int16) ^ 0x88
    lo = ((v & 0xF) | 0x6400).to(tl.float16, bitcast=True)
    hi = (((v >> 4) & 0xF) | 0x6400).to(tl.float16, bitcast=True)
    return lo, hi


@jit
def _int8_magic(w):
    """int8 codes -> fp16 1152 + q."""
    v = (w.to(tl.int16) & 0xFF) ^ 0x80
    return (v | 0x6400).to(tl.float16, bitcast=True)


@jit
def _fp8_activations(x, xs_ptr):
    """glmc::fp8_linear's activations: cast_to_x_dtype(float32(e4m3(x / s)) * float32(s)), the division in x's
    dtype (float32 division correctly rounded, then rounded to x's dtype: the same as the dtype's own division),
    e4m3 saturating to +-448 with round-to-nearest-even."""
    s = tl.load(xs_ptr).to(tl.float32)
    v = tl.div_rn(x.to(tl.float32), s).to(x.dtype).to(tl.float32)
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    # e4m3 rounding in float32 arithmetic (no float8 conversion: Triton's CPU interpreter rounds those wrongly): the
    # quantum is 2^(max(exponent, -6) - 3); v / quantum (exact, a power of two) rounded to an integer, ties to even
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    q = ((v * inv + 12582912.0) - 12582912.0) * ((127 + e) << 23).to(tl.float32, bitcast=True)
    return (q * s).to(x.dtype)


@jit
def _gemv_fma_kernel(x_ptr, w_ptr, s_ptr, out_ptr, xs_ptr, N, K, stride_xm, stride_wn, stride_sn, k_split,
                     BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     MAGIC: tl.constexpr, FP8X: tl.constexpr, PDL: tl.constexpr):
    """One row of X (program axis 2) times BLOCK_N weight rows over this split's K range -> partials[split, m, n]."""
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    k_lo = pid_s * k_split
    HALF: tl.constexpr = BLOCK_K // 2
    acc = tl.zeros((BLOCK_N, HALF if BITS == 4 else BLOCK_K), dtype=tl.float32)
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    xsum = tl.zeros((1,), dtype=tl.float32)  # MAGIC: sum of x, for the offset correction
    x_row = x_ptr + m * stride_xm
    for k0 in range(k_lo, k_lo + k_split, BLOCK_K):  # the last split's tail is masked
        if BITS == 4:
            j = k0 // 2 + tl.arange(0, HALF)
            p = tl.load(w_ptr + rn[:, None] * stride_wn + j[None, :],
                        mask=nmask[:, None] & (2 * j < K)[None, :], other=0x88)
            if MAGIC:
                lo, hi = _int4_magic(p)
                lo = lo.to(tl.float32)
                hi = hi.to(tl.float32)
            else:
                p = p.to(tl.int32)
                lo = ((p << 28) >> 28).to(tl.float32)
                hi = ((p << 24) >> 28).to(tl.float32)
            xe = tl.load(x_row + 2 * j, mask=2 * j < K, other=0.0).to(tl.float32)
            xo = tl.load(x_row + 2 * j + 1, mask=2 * j + 1 < K, other=0.0).to(tl.float32)
            tile = lo * xe[None, :] + hi * xo[None, :]
            if MAGIC:
                xt = tl.sum(xe, axis=0) + tl.sum(xo, axis=0)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=nmask[:, None] & (rk < K)[None, :],
                        other=0)
            if FP8X:  # e4m3 bytes (read as uint8: a masked byte 0 is +0.0)
                w = w.to(tl.float8e4nv, bitcast=True)
            w = _int8_magic(w).to(tl.float32) if MAGIC else w.to(tl.float32)
            xk = tl.load(x_row + rk, mask=rk < K, other=0.0)
            if FP8X:
                xk = _fp8_activations(xk, xs_ptr)
            xk = xk.to(tl.float32)
            tile = w * xk[None, :]
            if MAGIC:
                xt = tl.sum(xk, axis=0)
        if GROUP > 0:
            s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
            if MAGIC:
                out += (tl.sum(tile, axis=1) - (1032.0 if BITS == 4 else 1152.0) * xt) * s
            else:
                out += tl.sum(tile, axis=1) * s
        else:
            acc += tile
            if MAGIC:
                xsum += xt
    if GROUP == 0:
        out = tl.sum(acc, axis=1)
        if MAGIC:
            out = out - (1032.0 if BITS == 4 else 1152.0) * tl.sum(xsum, axis=0)
        if BITS != 16:
            out = out * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    M = tl.num_programs(2)
    tl.store(out_ptr + (pid_s * M + m) * N + rn, out, mask=nmask)


@jit
def _gemv_dot_kernel(x_ptr, w_ptr, s_ptr, out_ptr, xs_ptr, M, N, K, stride_xm, stride_wn, stride_sn, k_split,
                     BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, MAGIC: tl.constexpr, FP8X: tl.constexpr, PDL: tl.constexpr):
    """BLOCK_M rows of X (tensor-core dots, rows past M masked) times BLOCK_N weight rows -> partials[split]."""
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    k_lo = pid_s * k_split
    HALF: tl.constexpr = BLOCK_K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_split, BLOCK_K):  # the last split's tail is masked
        if BITS == 4:
            j = k0 // 2 + tl.arange(0, HALF)
            p = tl.load(w_ptr + rn[:, None] * stride_wn + j[None, :],
                        mask=nmask[:, None] & (2 * j < K)[None, :], other=0x88)
            xe = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :],
                         mask=mmask[:, None] & (2 * j < K)[None, :], other=0.0)
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :] + 1,
                         mask=mmask[:, None] & (2 * j + 1 < K)[None, :], other=0.0)
            if MAGIC:
                lo, hi = _int4_magic(p)
                xt = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)
            else:
                p = p.to(tl.int32)
                lo = ((p << 28) >> 28).to(xe.dtype)
                hi = ((p << 24) >> 28).to(xe.dtype)
            tile = tl.dot(xe, tl.trans(lo.to(xe.dtype))) + tl.dot(xo, tl.trans(hi.to(xe.dtype)))
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & (rk < K)[None, :],
                         other=0.0)
            if FP8X:
                xk = _fp8_activations(xk, xs_ptr)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=nmask[:, None] & (rk < K)[None, :],
                        other=0)
            if FP8X:
                w = w.to(tl.float8e4nv, bitcast=True)
            if MAGIC:
                w = _int8_magic(w)
                xt = tl.sum(xk.to(tl.float32), axis=1)
            tile = tl.dot(xk, tl.trans(w.to(xk.dtype)))
        if MAGIC:
            if GROUP > 0:
                tile = tile - (1032.0 if BITS == 4 else 1152.0) * xt[:, None]
            else:
                xsum += xt
        if GROUP > 0:
            s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
            acc += tile * s[None, :]
        else:
            acc += tile
    if GROUP == 0 and MAGIC:
        acc = acc - (1032.0 if BITS == 4 else 1152.0) * xsum[:, None]
    if GROUP == 0 and BITS != 16:
        acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])


# ---- weight-only words (the `wo` variants)
# int4 word: nibble i holds k = 8j + ORDER[i], ORDER = (0, 2, 4, 6, 1, 3, 5, 7), each code offset by 8 (u = q + 8).
# (w & 0x000F000F) | 0x64006400 = fp16 pair (1024 + u[k0], 1024 + u[k1]): minus 1032 = (q0, q1).
# (w & 0x00F000F0) | 0x64006400 = (1024 + 16 u[k2], 1024 + 16 u[k3]): times 1/16 minus 72 = (q2, q3).
# The same on w >> 8 gives (q4, q5) and (q6, q7). X is read as int32 words of fp16 pairs (x0 x1) (x2 x3) ...
INT4_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

_I4_DECODE = """
        .reg .b32 w8, t0, t1, t2, t3, c1032, c16, cm72;
        mov.b32 c1032, 0x64086408;
        mov.b32 c16, 0x2C002C00;
        mov.b32 cm72, 0xD480D480;
        shr.u32 w8, $W, 8;
        lop3.b32 t0, $W, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 t1, $W, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 t3, w8, 0x00F000F0, 0x64006400, 0xEA;
        sub.f16x2 t0, t0, c1032;
        fma.rn.f16x2 t1, t1, c16, cm72;
        sub.f16x2 t2, t2, c1032;
        fma.rn.f16x2 t3, t3, c16, cm72;
"""
_I4_DOT_ASM = tl.constexpr("{" + _I4_DECODE.replace("$W", "$1") + """
        .reg .b32 acc;
        .reg .b16 lo, hi;
        .reg .f32 flo, fhi;
        mul.rn.f16x2 acc, t0, $2;
        fma.rn.f16x2 acc, t1, $3, acc;
        fma.rn.f16x2 acc, t2, $4, acc;
        fma.rn.f16x2 acc, t3, $5, acc;
        mov.b32 {lo, hi}, acc;
        cvt.f32.f16 flo, lo;
        cvt.f32.f16 fhi, hi;
        add.f32 $0, flo, fhi;
        }""")
_I4_DECODE_ASM = tl.constexpr("{" + _I4_DECODE.replace("$W", "$8") + """
        mov.b32 {$0, $1}, t0;
        mov.b32 {$2, $3}, t1;
        mov.b32 {$4, $5}, t2;
        mov.b32 {$6, $7}, t3;
        }""")


@jit
def _i4_word_dot(w, xa, xb, xc, xd):
    """sum over the word's 8 codes of q * x (fp16x2 products, float32 result); xa..xd: int32 fp16 pairs."""
    return tl.inline_asm_elementwise(
        asm=_I4_DOT_ASM, constraints="=r,r,r,r,r,r", args=[w, xa, xb, xc, xd], dtype=tl.float32, is_pure=True, pack=1)


@jit
def _i4_word_decode(w):
    """The word's 8 codes as fp16 q values, in k order (k0 .. k7)."""
    return tl.inline_asm_elementwise(
        asm=_I4_DECODE_ASM, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[w],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True, pack=1)


@jit
def _i8_word_dot(w, x0, x1, x2, x3):
    """sum over the int8 word's 4 codes (two's complement bytes, k order) of q * x, in float32 (x0..x3 float32)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 u, m, b0, b1, b2, b3;
        .reg .f32 acc;
        xor.b32 u, $1, 0x80808080;
        mov.b32 m, 0x4B000000;
        prmt.b32 b0, u, m, 0x7440;
        prmt.b32 b1, u, m, 0x7441;
        prmt.b32 b2, u, m, 0x7442;
        prmt.b32 b3, u, m, 0x7443;
        sub.f32 b0, b0, 0f4B000080;
        sub.f32 b1, b1, 0f4B000080;
        sub.f32 b2, b2, 0f4B000080;
        sub.f32 b3, b3, 0f4B000080;
        mul.f32 acc, b0, $2;
        fma.rn.f32 acc, b1, $3, acc;
        fma.rn.f32 acc, b2, $4, acc;
        fma.rn.f32 $0, b3, $5, acc;
        }""",
        constraints="=r,r,r,r,r,r", args=[w, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1)


@jit
def _word_codes(w, BITS: tl.constexpr, T: tl.constexpr):
    """Pure Triton: code number T (k = KPW * j + T) of each word, as float32 (the interpreter's twin of the PTX)."""
    if BITS == 4:
        POS: tl.constexpr = T // 2 + 4 * (T % 2)  # INT4_ORDER's inverse
        return (((w >> (4 * POS)) & 0xF) - 8).to(tl.float32)
    return ((w << (24 - 8 * T)) >> 24).to(tl.float32)


@jit
def _gemv_wo_kernel(x_ptr, xw_ptr, w_ptr, s_ptr, out_ptr, N, kw, stride_xm, stride_wn, stride_sn, w_split,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
                    SWIGLU: tl.constexpr = False):
    """One row of X (program axis 2) times BLOCK_N rows of weight words over this split's words -> partials.
    x_ptr: fp16 X (stride_xm in elements), xw_ptr: the same memory as int32 fp16 pairs; w_ptr: int32 words
    [N, kw] (kw = K / KPW words per row, stride_wn in words); w_split: words per split. EVEN_K: the words per row
    are a whole number of tiles (no mask along K, so each thread's words load as one 16-byte access). PREFETCH (with
    EVEN_K): the next tile's words (and group scales) are loaded before this tile is computed, so each warp keeps
    two tiles of loads in flight (the last tile is loaded twice rather than masked). SWIGLU (split 1, the rows
    dense_h_to_4h's interleaved (gate j, up j) pairs): out is silu(gate) * up [M, N / 2] in out_ptr's dtype, rounded
    as norm.swiglu rounds, instead of partials."""
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = tl.program_id(2)
    KPW: tl.constexpr = 8 if BITS == 4 else 4
    WPB: tl.constexpr = BLOCK_K // KPW
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    j_lo = pid_s * w_split
    j_hi = tl.minimum(j_lo + w_split, kw)
    acc = tl.zeros((BLOCK_N, WPB), dtype=tl.float32)
    x_row = x_ptr + m * stride_xm
    xw_row = xw_ptr + m * (stride_xm // 2)
    w_rows = w_ptr + rn[:, None] * stride_wn
    OTHER: tl.constexpr = -2004318072 if BITS == 4 else 0  # int4: 0x88888888, every code 0
    if PREFETCH and EVEN_K:
        w_next = tl.load(w_rows + j_lo + tl.arange(0, WPB)[None, :], mask=nmask[:, None], other=OTHER)
        if GROUP > 0:
            s_next = tl.load(s_ptr + rn * stride_sn + (j_lo * KPW) // GROUP, mask=nmask, other=0.0)
    for j0 in range(j_lo, j_hi, WPB):
        j = j0 + tl.arange(0, WPB)
        if PREFETCH and EVEN_K:
            jmask = tl.full((WPB,), 1, tl.int1)
            w = w_next
            jn = tl.minimum(j0 + WPB, j_hi - WPB)  # the last tile's "next" is itself (in range, never used)
            w_next = tl.load(w_rows + jn + tl.arange(0, WPB)[None, :], mask=nmask[:, None], other=OTHER)
            if GROUP > 0:
                s_cur = s_next
                s_next = tl.load(s_ptr + rn * stride_sn + (jn * KPW) // GROUP, mask=nmask, other=0.0)
        elif EVEN_K:
            jmask = tl.full((WPB,), 1, tl.int1)
            w = tl.load(w_rows + j[None, :], mask=nmask[:, None], other=OTHER)
        else:
            jmask = j < kw
            w = tl.load(w_rows + j[None, :], mask=nmask[:, None] & jmask[None, :], other=OTHER)
        if ASM:
            if BITS == 4:
                xw = xw_row + 4 * j
                xa = tl.load(xw, mask=jmask, other=0)
                xb = tl.load(xw + 1, mask=jmask, other=0)
                xc = tl.load(xw + 2, mask=jmask, other=0)
                xd = tl.load(xw + 3, mask=jmask, other=0)
                part = _i4_word_dot(w, xa[None, :], xb[None, :], xc[None, :], xd[None, :])
            else:
                xk = x_row + 4 * j
                x0 = tl.load(xk, mask=jmask, other=0.0).to(tl.float32)
                x1 = tl.load(xk + 1, mask=jmask, other=0.0).to(tl.float32)
                x2 = tl.load(xk + 2, mask=jmask, other=0.0).to(tl.float32)
                x3 = tl.load(xk + 3, mask=jmask, other=0.0).to(tl.float32)
                part = _i8_word_dot(w, x0[None, :], x1[None, :], x2[None, :], x3[None, :])
        else:
            part = tl.zeros((BLOCK_N, WPB), dtype=tl.float32)
            for t in tl.static_range(KPW):
                xt = tl.load(x_row + KPW * j + t, mask=jmask, other=0.0).to(tl.float32)
                part += _word_codes(w, BITS, t) * xt[None, :]
        if GROUP > 0:
            if PREFETCH and EVEN_K:
                s = s_cur.to(tl.float32)
            else:
                s = tl.load(s_ptr + rn * stride_sn + (j0 * KPW) // GROUP, mask=nmask, other=0.0).to(tl.float32)
            acc += part * s[:, None]
        else:
            acc += part
    out = tl.sum(acc, axis=1)
    if GROUP == 0:
        out = out * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    if SWIGLU:
        dt = out_ptr.dtype.element_ty
        gate, up = tl.split(tl.reshape(out, (BLOCK_N // 2, 2)))
        gate = gate.to(dt).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        rf = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + m * (N // 2) + rf, (act * up.to(dt).to(tl.float32)).to(dt), mask=rf < N // 2)
    else:
        M = tl.num_programs(2)
        tl.store(out_ptr + (pid_s * M + m) * N + rn, out, mask=nmask)


@jit
def _gemv_wodot_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_sn, k_split,
                       GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       ASM: tl.constexpr, PDL: tl.constexpr):
    """int4 words, BLOCK_M rows of X: each word's 8 decoded codes (fp16) meet X's columns 8j + t in 8 tensor-core
    dots of depth BLOCK_K / 8 -> partials[split]."""
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    WPB: tl.constexpr = BLOCK_K // 8
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    k_lo = pid_s * k_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_split, BLOCK_K):
        j = k0 // 8 + tl.arange(0, WPB)
        jmask = j * 8 < K
        w = tl.load(w_ptr + rn[:, None] * stride_wn + j[None, :], mask=nmask[:, None] & jmask[None, :],
                    other=-2004318072)
        xp = x_ptr + rm[:, None] * stride_xm + 8 * j[None, :]
        xm = mmask[:, None] & jmask[None, :]
        if ASM:
            q0, q1, q2, q3, q4, q5, q6, q7 = _i4_word_decode(w)
        else:
            q0 = _word_codes(w, 4, 0).to(tl.float16)
            q1 = _word_codes(w, 4, 1).to(tl.float16)
            q2 = _word_codes(w, 4, 2).to(tl.float16)
            q3 = _word_codes(w, 4, 3).to(tl.float16)
            q4 = _word_codes(w, 4, 4).to(tl.float16)
            q5 = _word_codes(w, 4, 5).to(tl.float16)
            q6 = _word_codes(w, 4, 6).to(tl.float16)
            q7 = _word_codes(w, 4, 7).to(tl.float16)
        tile = tl.dot(tl.load(xp, mask=xm, other=0.0), tl.trans(q0))
        tile = tl.dot(tl.load(xp + 1, mask=xm, other=0.0), tl.trans(q1), tile)
        tile = tl.dot(tl.load(xp + 2, mask=xm, other=0.0), tl.trans(q2), tile)
        tile = tl.dot(tl.load(xp + 3, mask=xm, other=0.0), tl.trans(q3), tile)
        tile = tl.dot(tl.load(xp + 4, mask=xm, other=0.0), tl.trans(q4), tile)
        tile = tl.dot(tl.load(xp + 5, mask=xm, other=0.0), tl.trans(q5), tile)
        tile = tl.dot(tl.load(xp + 6, mask=xm, other=0.0), tl.trans(q6), tile)
        tile = tl.dot(tl.load(xp + 7, mask=xm, other=0.0), tl.trans(q7), tile)
        if GROUP > 0:
            s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=nmask, other=0.0).to(tl.float32)
            acc += tile * s[None, :]
        else:
            acc += tile
    if GROUP == 0:
        acc = acc * tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])


# ---- the `mma` variant (CUDA C++, quantized_linear_mma.cu)
MMA_SPAN = {4: 128, 8: 64, 16: 32}  # columns of one lane-quad's 16-byte loads per weight row


def mma_layer_refusal(lin: PackedLinear, dtype: torch.dtype, device: torch.device) -> str | None:
    """None when the `mma` variant can read this layer with activations of `dtype` on `device`, else why not."""
    span = MMA_SPAN.get(lin.bits)
    if device.type != "cuda" or not hasattr(torch.cuda, "_compile_kernel"):
        return "needs a CUDA device and torch.cuda._compile_kernel (NVRTC; torch >= 2.8)"
    if lin.fp8 or span is None:
        return f"reads int4, int8 or fp16 weights, not {'fp8' if lin.fp8 else f'{lin.bits}-bit'} ones"
    if dtype != torch.float16 or (lin.scale is not None and lin.scale.dtype != torch.float16) \
            or (lin.bits == 16 and lin.weight.dtype != torch.float16):
        return "computes in fp16 (activations, scales and 16-bit weights)"
    return _mma_shape_refusal(lin)


def _mma_shape_refusal(lin: PackedLinear) -> str | None:
    """None when the mma kernel's 8-row blocks and spans tile the layer (and, grouped, its groups), else why not."""
    span = MMA_SPAN[lin.bits]
    if lin.n % 8 or lin.k % span or lin.group_size % span:
        return (f"needs N a multiple of 8, K and the group size multiples of {span} (this layer: N {lin.n}, K "
                f"{lin.k}, group {lin.group_size})")
    return None


def mma_refusal(x: torch.Tensor, lin: PackedLinear) -> str | None:
    """None when the `mma` variant can run this product, else why not."""
    why = mma_layer_refusal(lin, x.dtype, x.device)
    if why is None and (x.stride(-1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16):
        return "needs 16-byte aligned activation rows"
    return why


def _gemv_mma(x: torch.Tensor, lin: PackedLinear, cfg: GemvConfig, out: torch.Tensor | None,
              swiglu: bool = False) -> torch.Tensor:
    why = mma_refusal(x, lin)
    if why:
        raise GlmcError(f"gemv config {cfg}: the mma variant {why}")
    m = x.shape[0]
    spans = lin.k // MMA_SPAN[lin.bits]
    per_split = spans if swiglu else cdiv(spans, cfg.split)
    split = cdiv(spans, per_split)
    if out is None:
        out = torch.empty((m, lin.n // 2), dtype=x.dtype, device=x.device) if swiglu else \
            torch.empty((split, m, lin.n), dtype=torch.float32, device=x.device)
    rows = cfg.block_n // 8
    weight = int4_words(lin) if lin.bits == 4 and not lin.tiled else lin.weight
    scale = lin.scale if lin.scale is not None else x
    stride_sn = scale.stride(0) if lin.group_size else 0
    dev = x.device.index or 0
    args = [lin.bits, lin.group_size, int(lin.tiled), rows, cfg.num_stages, 8 if m <= 8 else 16, int(cfg.prefetch),
            int(pdl_on(dev)), int(swiglu)]
    kernel = compile_kernel("quantized_linear_mma.cu", f"gemv_mma<{', '.join(map(str, args))}>", dev)
    launch(kernel, (cdiv(lin.n // 8, rows * cfg.num_warps), split, 1), (32 * cfg.num_warps, 1, 1),
           [weight, x, scale, out, m, lin.n, lin.k, x.stride(0), stride_sn, per_split])
    return out


def tile_layer(lin: PackedLinear) -> PackedLinear:
    """The layer in the mma kernel's tiled layout (in place of the op's rows, not beside them): weight bytes [N / 8,
    spans, 8, 64] (int8, or uint8 for int4), each 8-row block's span one 512-byte tile (row g's 64 bytes at lane quad
    g; int4: the interleaved words' bytes), so a warp reads its span as one contiguous block and its rows as one run;
    grouped scales [N / 8, groups, 8]. Only the mma kernel and `dequantize` read it. int8/int4 layers the mma kernel
    can read."""
    if lin.tiled:
        return lin
    why = f"not {lin.bits}-bit{' fp8' if lin.fp8 else ''} weights" if lin.bits not in (4, 8) or lin.fp8 \
        else _mma_shape_refusal(lin)
    if why:
        raise GlmcError(f"tile_layer: the tiles hold int8/int4 layers the mma kernel reads ({why})")
    src = int4_words(lin) if lin.bits == 4 else lin.weight
    spans = lin.k // MMA_SPAN[lin.bits]
    w = src.contiguous().view(torch.uint8).reshape(lin.n // 8, 8, spans, 64).transpose(1, 2).contiguous()
    w = w.view(torch.int8) if lin.bits == 8 else w  # int8: the codes' own dtype
    s = lin.scale
    if lin.group_size and s is not None:
        s = s.reshape(lin.n // 8, 8, -1).transpose(1, 2).contiguous()
    return dataclasses.replace(lin, weight=w, scale=s, words=None, tiled=True)


def settle_layout(lin: PackedLinear, dtype: torch.dtype, device: torch.device, swiglu: bool = False,
                  sms: int = 132) -> PackedLinear:
    """The layout a layer keeps for decode: the tiles (`tile_layer`) where the mma kernel can read it and
    `wants_tiles` says so; else the op's rows, which every variant reads. One layout a layer: no second copy of its
    weights."""
    if lin.tiled or lin.bits not in (4, 8) or mma_layer_refusal(lin, dtype, device):
        return lin
    return tile_layer(lin) if wants_tiles(lin, swiglu, sms) else lin


def wants_tiles(lin: PackedLinear, swiglu: bool = False, sms: int = 132) -> bool:
    """settle_layout's rule from the config table alone: batch 1's config was timed on tiles and every M up to
    DECODE_MAX_M runs the mma kernel (always so with the SwiGLU epilogue: gate_up_swiglu; its `_swiglu` config, or
    the default, tiled, decides)."""
    if swiglu:
        one = _tuned().get(config_key(1, lin.n, lin.k, lin.bits, lin.group_size) + "_swiglu")
        return GemvConfig(*one).tiled if one else True
    cfgs = [pick_config(m, lin, sms) for m in range(1, DECODE_MAX_M + 1)]
    return cfgs[0].tiled and all(c.variant == "mma" for c in cfgs)


@jit
def _dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, BITS: tl.constexpr, GROUP: tl.constexpr,
                       TILED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dequant(QWeight, Scales) -> [N, K] in the scales' dtype: `ops.quantized_linear.dequantize_weight`. TILED: the
    weight and group scales in tile_layer's layout (int4: its interleaved words, nibble (k % 8) // 2 + 4 (k % 2) of
    word k // 8 holding q + 8)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    if TILED:
        nib = (rk % 8) // 2 + 4 * (rk % 2)
        b = 4 * (rk // 8) + nib // 2 if BITS == 4 else rk  # byte of the row
        row = ((rn // 8) * (K * BITS // 512))[:, None] + (b // 64)[None, :]  # (block, span): one 512-byte tile
        v = tl.load(w_ptr + (row * 8 + (rn % 8)[:, None]) * 64 + (b % 64)[None, :], mask=mask, other=0)
        if BITS == 4:
            q = (((v.to(tl.int32) & 0xFF) >> (4 * (nib % 2))[None, :]) & 0xF).to(tl.float32) - 8.0
        else:
            q = v.to(tl.float32)
    elif BITS == 4:
        p = tl.load(w_ptr + rn[:, None] * stride_wn + (rk // 2)[None, :], mask=mask, other=0).to(tl.int32)
        shift = 28 - 4 * (rk % 2)  # even k: low nibble
        q = ((p << shift[None, :]) >> 28).to(tl.float32)
    else:
        q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=mask, other=0).to(tl.float32)
    if GROUP > 0 and TILED:
        s = tl.load(s_ptr + ((rn // 8)[:, None] * tl.cdiv(K, GROUP) + (rk // GROUP)[None, :]) * 8 + (rn % 8)[:, None],
                    mask=mask, other=0.0)
    elif GROUP > 0:
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (rk // GROUP)[None, :], mask=mask, other=0.0)
    else:
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)[:, None]
    # as the reference: the product rounded in the scales' dtype
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], (q.to(s.dtype) * s), mask=mask)


# ---------------------------------------------------------------------------------------------- configs

_TUNED: dict[str, list] | None = None
TUNED_FILE = Path(__file__).with_name("tuned_h200.json")


def _tuned() -> dict[str, list]:
    """The GEMV config table: GLMC_GEMV_TUNED's file (bench_kernels.py's output) or the shipped tuned_h200.json."""
    global _TUNED
    if _TUNED is None:
        path = Path(os.environ.get("GLMC_GEMV_TUNED", TUNED_FILE))
        if not path.is_file():
            raise GlmcError(f"GLMC_GEMV_TUNED={path}: no such file (a table bench_kernels.py wrote, or unset for the "
                            "shipped one)")
        try:
            _TUNED = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GlmcError(f"{path}:{e.lineno}: not a GEMV config table ({e.msg})") from e
    return _TUNED


def config_key(m: int, n: int, k: int, bits: int, group: int) -> str:
    return f"m{m}_n{n}_k{k}_b{bits}_g{group}"


def words_ok(bits: int, k: int) -> bool:
    """Whether the `wo` variants can read this layer (int8/int4, K a whole number of 32-bit words)."""
    return bits in (4, 8) and k % (8 if bits == 4 else 4) == 0


def default_config(m: int, n: int, k: int, bits: int, group: int, sms: int = 132, fp8: bool = False,
                   mma: bool = True) -> GemvConfig:
    """A config from the shape alone (the device sweep's table, tuned_h200.json, overrides it): the `mma` variant for
    int8/int4 layers it can read (with mma), sized for ~32 warps per SM; else the Triton ones (fp8 weights take the
    fma/dot variants, which convert e4m3 to float, never the int8 words)."""
    span = MMA_SPAN.get(bits, 0)
    if mma and not fp8 and bits in (4, 8) and n % 8 == 0 and k % span == 0 and group % span == 0:
        split = max(1, min(k // span // 2, round(32 * sms / max(1, n // 16))))
        return GemvConfig("mma", 16, span, split, 4, 2, False, True, True)
    if not fp8 and words_ok(bits, k) and (m == 1 or (bits == 4 and (group == 0 or group >= 128))):
        variant = "wo" if m == 1 else "wodot"
        block_n = 64
        block_k = min(group or 256, 256 if bits == 8 else 128)
        split = 1
        tiles = cdiv(n, block_n)
        while tiles * split < 2 * sms and split < 8 and k // (block_k * split * 2) >= 2:
            split *= 2
        return GemvConfig(variant, block_n, block_k, split, 4, 3)
    variant = "fma" if m == 1 else "dot"
    block_n = 32 if variant == "fma" else 64
    block_k = {16: 128, 8: 256, 4: 256}[bits] if variant == "fma" else {16: 64, 8: 128, 4: 128}[bits]
    if group:
        block_k = min(block_k, group)
    split = 1
    tiles = cdiv(n, block_n)
    while tiles * split < 2 * sms and split < 8 and k // (block_k * split * 2) >= 4:
        split *= 2
    return GemvConfig(variant, block_n, block_k, split, 4, 3 if variant == "dot" else 2)


def pick_config(m: int, lin: PackedLinear, sms: int = 132) -> GemvConfig:
    if lin.fp8:  # the tuned table's keys are int8's
        return default_config(m, lin.n, lin.k, lin.bits, lin.group_size, sms, fp8=True)
    hit = _tuned().get(config_key(m, lin.n, lin.k, lin.bits, lin.group_size))
    if hit:
        return GemvConfig(*hit)
    return default_config(m, lin.n, lin.k, lin.bits, lin.group_size, sms)


def check_config(cfg: GemvConfig, lin: PackedLinear) -> None:
    if lin.tiled and cfg.variant != "mma":
        raise GlmcError(f"gemv config {cfg}: this layer holds the mma tiles (tile_layer), which only the mma variant "
                        "reads")
    if lin.fp8 and (cfg.variant not in ("fma", "dot") or cfg.magic):
        raise GlmcError(f"gemv config {cfg}: fp8 weights take the fma or dot variant without magic")
    if lin.group_size and (cfg.block_k > lin.group_size or lin.group_size % cfg.block_k):
        raise GlmcError(f"gemv config {cfg}: block_k must divide the group size {lin.group_size}")
    if cfg.variant in ("wo", "wodot") and not words_ok(lin.bits, lin.k):
        raise GlmcError(f"gemv config {cfg}: the word variants read int8/int4 weights with K a multiple of "
                        f"{8 if lin.bits == 4 else 4} (this layer: {lin.bits} bits, K {lin.k})")
    if cfg.variant == "wodot" and (lin.bits != 4 or cfg.block_k < 128):
        raise GlmcError(f"gemv config {cfg}: wodot reads int4 words with block_k >= 128 (dots of depth 16)")
    if cfg.variant == "mma" and (cfg.block_n % 8 or lin.bits not in MMA_SPAN):
        raise GlmcError(f"gemv config {cfg}: mma takes block_n a multiple of 8 and int4, int8 or fp16 weights")
    if cfg.variant == "dot" and cfg.block_k < (32 if lin.bits == 4 else 16):
        raise GlmcError(f"gemv config {cfg}: block_k too small for tensor-core dots")


# ---------------------------------------------------------------------------------------------- launchers

def gemv_partials(x: torch.Tensor, lin: PackedLinear, cfg: GemvConfig | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16, contiguous rows) -> float32 partials [split, M, N] (bias not added)."""
    m = x.shape[0]
    if cfg is None:
        cfg = pick_config(m, lin, sm_count(x.device))
        if cfg.variant == "mma" and mma_refusal(x, lin):  # where it cannot run (CPU, bf16): the Triton variants
            cfg = default_config(m, lin.n, lin.k, lin.bits, lin.group_size, sm_count(x.device), lin.fp8, mma=False)
    check_config(cfg, lin)
    if cfg.variant == "mma":
        return _gemv_mma(x, lin, cfg, out)
    if cfg.variant == "wo":
        return _gemv_wo(x, lin, cfg, out)
    k_split = cdiv(cdiv(lin.k, cfg.split), cfg.block_k) * cfg.block_k
    split = cdiv(lin.k, k_split)
    if out is None:
        out = torch.empty((split, m, lin.n), dtype=torch.float32, device=x.device)
    scale = lin.scale if lin.scale is not None else lin.weight
    stride_sn = scale.stride(0) if scale.dim() == 2 and lin.group_size else 0
    magic = cfg.magic and lin.bits != 16 and x.dtype == torch.float16  # 1152 + q is exact in fp16 only
    xs = lin.input_scale if lin.input_scale is not None else scale
    weight = lin.weight.view(torch.uint8) if lin.fp8 else lin.weight
    pdl = pdl_kwargs(x.device)
    if cfg.variant == "wodot":
        words = int4_words(lin)
        grid = (cdiv(lin.n, cfg.block_n), split, cdiv(m, 16))
        _gemv_wodot_kernel[grid](x, words, scale, out, m, lin.n, lin.k, x.stride(0), words.stride(0), stride_sn,
                                 k_split, GROUP=lin.group_size, BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                 ASM=_word_asm(x, lin), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
        return out
    if cfg.variant == "fma":
        grid = (cdiv(lin.n, cfg.block_n), split, m)
        _gemv_fma_kernel[grid](x, weight, scale, out, xs, lin.n, lin.k, x.stride(0), lin.weight.stride(0),
                               stride_sn, k_split, BITS=lin.bits, GROUP=lin.group_size, BLOCK_N=cfg.block_n,
                               BLOCK_K=cfg.block_k, MAGIC=magic, FP8X=lin.fp8, num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages, **pdl)
    else:
        block_m = 16
        grid = (cdiv(lin.n, cfg.block_n), split, cdiv(m, block_m))
        _gemv_dot_kernel[grid](x, weight, scale, out, xs, m, lin.n, lin.k, x.stride(0), lin.weight.stride(0),
                               stride_sn, k_split, BITS=lin.bits, GROUP=lin.group_size, BLOCK_M=block_m,
                               BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, MAGIC=magic, FP8X=lin.fp8,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
    return out


def _word_asm(x: torch.Tensor, lin: PackedLinear) -> bool:
    """Whether the word kernels decode with PTX: compiled for a GPU, and for int4 fp16 activations (its fp16x2
    math); else their pure-Triton twin."""
    return not INTERPRET and (lin.bits == 8 or x.dtype == torch.float16)


def _gemv_wo(x: torch.Tensor, lin: PackedLinear, cfg: GemvConfig, out: torch.Tensor | None,
             swiglu: bool = False) -> torch.Tensor:
    """The `wo` variant: partials [split, M, N], or with swiglu (split 1, dense_h_to_4h's interleaved rows) the
    SwiGLU of its output [M, N / 2] in x's dtype."""
    m = x.shape[0]
    kpw = 8 if lin.bits == 4 else 4
    k_split = cdiv(cdiv(lin.k, cfg.split), cfg.block_k) * cfg.block_k
    split = cdiv(lin.k, k_split)
    if swiglu and (split != 1 or cfg.block_n % 2):
        raise GlmcError(f"gemv config {cfg}: the SwiGLU epilogue needs split 1 and an even block_n")
    if out is None:
        out = torch.empty((m, lin.n // 2), dtype=x.dtype, device=x.device) if swiglu else \
            torch.empty((split, m, lin.n), dtype=torch.float32, device=x.device)
    assert lin.scale is not None
    words = int4_words(lin) if lin.bits == 4 else lin.weight.view(torch.int32)
    _gemv_wo_kernel[(cdiv(lin.n, cfg.block_n), split, m)](
        x, x.view(torch.int32) if x.dtype != torch.float32 else x, words, lin.scale, out, lin.n, lin.k // kpw,
        x.stride(0), words.stride(0), lin.scale.stride(0) if lin.group_size else 0, k_split // kpw, BITS=lin.bits,
        GROUP=lin.group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=lin.k % cfg.block_k == 0,
        ASM=_word_asm(x, lin), PREFETCH=cfg.prefetch, SWIGLU=swiglu, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_kwargs(x.device))
    return out


def interleave_gate_up(lin: PackedLinear) -> PackedLinear:
    """dense_h_to_4h ([gate | up] rows) -> the same layer with its rows interleaved (gate 0, up 0, gate 1, ...), the
    order `gate_up_swiglu` reads (weights, scales, int4 words and bias alike)."""
    f = lin.n // 2
    order = torch.stack([torch.arange(f), torch.arange(f) + f], 1).reshape(-1).to(lin.weight.device)

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, order).contiguous()
    if lin.tiled:
        raise GlmcError("interleave_gate_up: interleave the rows before tiling the layer")
    return dataclasses.replace(lin, weight=lin.weight.index_select(0, order).contiguous(), scale=rows(lin.scale),
                               bias=rows(lin.bias), words=rows(lin.words))


def swiglu_fused(lin: PackedLinear, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether dense_h_to_4h runs with the SwiGLU epilogue (gate_up_swiglu's kernel path): weights the mma kernel
    reads, no bias, and the tuned table says the fused kernel wins at this shape (a `_swiglu` entry) or, for
    int8/int4, does not know the shape (fp16's Triton GEMVs are the default where the table is silent)."""
    if lin.bias is not None or lin.n % 2 or mma_layer_refusal(lin, dtype, device):
        return False
    key = config_key(1, lin.n, lin.k, lin.bits, lin.group_size)
    return key + "_swiglu" in _tuned() or (lin.bits != 16 and key not in _tuned())


def gate_up_swiglu(x: torch.Tensor, lin: PackedLinear, cfg: GemvConfig | None = None) -> torch.Tensor:
    """MLP's silu(gate) * up [M, N/2] in x's dtype from x [M, K] and the interleaved dense_h_to_4h
    (`interleave_gate_up`; no bias), for M <= 16 in a GEMV's epilogue (split 1): the config's variant, `wo` (a
    program's adjacent rows are a column's gate and up) or `mma` (a lane's C pair is) where the mma kernel can run;
    the config is the table's `_swiglu` entry, else mma's default. Otherwise the partials and `norm.swiglu` over the
    interleaved columns."""
    from glmc.kernels.norm import swiglu
    x = x.contiguous()
    if lin.bias is None and x.shape[0] <= DECODE_MAX_M:
        mma_ok = not mma_refusal(x, lin)
        if cfg is None and mma_ok:
            hit = _tuned().get(config_key(x.shape[0], lin.n, lin.k, lin.bits, lin.group_size) + "_swiglu")
            cfg = GemvConfig(*hit) if hit else GemvConfig("mma", 8, MMA_SPAN[lin.bits], 1, 4, 2, False, True, True)
        if cfg is not None and cfg.variant == "wo":
            check_config(cfg, lin)
            return _gemv_wo(x, lin, cfg, None, swiglu=True)
        if cfg is not None and mma_ok:
            return _gemv_mma(x, lin, cfg, None, swiglu=True)
    return swiglu(linear_partials(x, lin), x.dtype, interleaved=True)


def interleave_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The op's int4 layout (uint8 [N, K/2], low nibble = even k, two's complement) -> int32 words [N, K/8] for the
    `wo` kernels: nibble i of word j holds k = 8j + INT4_ORDER[i] as q + 8 (made once per layer, on its device)."""
    from glmc.modeling_patches.ops.quantized_linear import unpack_int4
    if k % 8:
        raise GlmcError(f"interleave_int4: K = {k} is not a multiple of 8")
    u = (unpack_int4(packed, k).to(torch.int64) + 8).view(packed.shape[0], k // 8, 8)
    word = torch.zeros(u.shape[:2], dtype=torch.int64, device=packed.device)
    for i, t in enumerate(INT4_ORDER):
        word |= u[..., t] << (4 * i)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32).contiguous()


def int4_words(lin: PackedLinear) -> torch.Tensor:
    """The layer's interleaved int4 words (made on first use when pack_linear did not make them)."""
    if lin.tiled:
        raise GlmcError("int4_words: this layer holds the mma tiles, not the op's rows")
    if lin.words is None:
        lin.words = interleave_int4(lin.weight, lin.k)
    return lin.words


def dequantize(lin: PackedLinear) -> torch.Tensor:
    """The weight as [N, K] in the scales' dtype (`ops.quantized_linear.dequantize_weight` on the device)."""
    if lin.bits == 16:
        return lin.weight
    assert lin.scale is not None
    if lin.fp8:  # the op's own dequantization (torch ops on the device; prefill only)
        from glmc.modeling_patches.ops.fp8_linear import dequantize_weight
        return dequantize_weight(lin.weight, lin.scale, lin.scale.dtype)
    out = torch.empty((lin.n, lin.k), dtype=lin.scale.dtype, device=lin.weight.device)
    bn, bk = 32, 128
    stride_sn = lin.scale.stride(0) if lin.group_size else 0
    _dequantize_kernel[(cdiv(lin.n, bn), cdiv(lin.k, bk))](
        lin.weight, lin.scale, out, lin.n, lin.k, lin.weight.stride(0), stride_sn, BITS=lin.bits,
        GROUP=lin.group_size, TILED=lin.tiled, BLOCK_N=bn, BLOCK_K=bk)
    return out


def linear_partials(x: torch.Tensor, lin: PackedLinear, cfg: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] -> partials [split, M, N], bias not added: the GEMV kernel for M <= 16, else dequantize + cuBLAS
    (then [1, M, N] in x's dtype)."""
    if x.shape[-1] != lin.k:
        raise GlmcError(f"quantized linear: input has {x.shape[-1]} features, the weight {lin.k}")
    x = x.contiguous()
    if x.shape[0] <= DECODE_MAX_M:
        return gemv_partials(x, lin, cfg)
    if lin.fp8:  # the op's own activation quantization (ops/fp8_linear.py), then the dequantized weight
        from glmc.modeling_patches.ops.fp8_linear import dequantize_e4m3, to_e4m3
        assert lin.input_scale is not None
        x = dequantize_e4m3(to_e4m3(x / lin.input_scale.to(x.dtype)), lin.input_scale, x.dtype)
    return torch.nn.functional.linear(x, dequantize(lin).to(x.dtype))[None]


def linear(x: torch.Tensor, lin: PackedLinear, cfg: GemvConfig | None = None) -> torch.Tensor:
    """The op itself: x [M, K] -> x @ dequant(W)^T + bias, in x's dtype (partials summed in float32)."""
    y = linear_partials(x, lin, cfg).float().sum(0)
    if lin.bias is not None:
        y = y.to(x.dtype).float() + lin.bias.float()
    return y.to(x.dtype)


def pack_linear(module: torch.nn.Module, device: torch.device | str | None = None) -> PackedLinear:
    """An nn.Linear, a glmc QuantLinear or Fp8Linear -> PackedLinear (the same tensors; moved to `device` if given;
    an fp8 per-tensor weight scale expanded to one per row)."""
    from glmc.modeling_patches.modeling_chatglm import Fp8Linear, QuantLinear

    def mv(t: object) -> torch.Tensor | None:
        return t.detach().to(device or t.device).contiguous() if isinstance(t, torch.Tensor) else None

    if isinstance(module, QuantLinear):
        w, s, b = mv(module.weight), mv(module.weight_scale), mv(module.bias)
        assert w is not None
        lin = PackedLinear(w, s, b, module.bits, module.group_size, module.out_features, module.in_features)
        if lin.bits == 4 and words_ok(4, lin.k):
            int4_words(lin)  # made now, outside any CUDA-graph capture
        return lin
    if isinstance(module, Fp8Linear):
        w, s, b, xs = mv(module.weight), mv(module.weight_scale), mv(module.bias), mv(module.input_scale)
        assert w is not None and s is not None
        return PackedLinear(w, s.expand(module.out_features).contiguous(), b, 8, 0, module.out_features,
                            module.in_features, input_scale=xs)
    if isinstance(module, torch.nn.Linear):
        w, b = mv(module.weight), mv(module.bias)
        assert w is not None
        return PackedLinear(w, None, b, 16, 0, module.out_features, module.in_features)
    raise GlmcError(f"pack_linear: {type(module).__name__} is not an nn.Linear, a QuantLinear or an Fp8Linear")
