"""QKV bias + ChatGLM rotary + KV-cache append on CUDA, into a static (preallocated) fp16/bf16 or int8 cache.

Op and reference: the first half of `glmc::group_query_attention` (`ops.attention.gqa_reference`): q, k, v from the
fused QKV linear (rows q then k then v, plus its bias), rotary on dims 0..R-1 of each q/k head as adjacent pairs
(2i, 2i+1) at the token's position (cos/sin tables [max_positions, R/2]), then k and v appended to the cache. Here
the cache is static, [B, Hkv, S_max, D] per layer, and token s of row b goes to slot `past + s` (past is a device
scalar, so one CUDA graph serves every decode step). Inputs are the QKV linear's split-K partials.

int8 cache (`KV8`): the appended k/v are quantized as `glmc::kv_cache_quantize` (ops/kv_cache.py) does:
q = clamp(round_half_even(float32(x) / float32(scale)), -127, 127), with the scale given per KV head and channel as
float32 [Hkv, D] (per-tensor and per-head scales broadcast to it: `KV8.of`). As in the model (SelfAttention: the
past is dequantized, the new tokens join it unquantized, the present is quantized afterwards), the new tokens'
unquantized k/v are also written to `KV8.k_new / v_new` [B, Hkv, S, D] for the attention of this same step.
"""

from __future__ import annotations

import dataclasses

import torch

from glmc.kernels._cuda import pdl_kwargs, pdl_prologue
from glmc.kernels._jit import jit, next_pow2, tl
from glmc.kernels.partials import split_block, sum_partials


@dataclasses.dataclass
class KV8:
    """What the kernels need for an int8 KV cache: float32 scales [Hkv, D] (the op's scale broadcast; exact) and the
    unquantized k/v of the tokens being appended, [B, Hkv, S, D] in the model dtype (written by the append)."""

    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor

    @staticmethod
    def scale(scale: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """The op's scale ([1], [Hkv] or [Hkv, D], model dtype) as the kernels read it: float32 [Hkv, D]."""
        s = scale.float()
        s = s.reshape(1, 1) if s.numel() == 1 else (s.reshape(-1, 1) if s.dim() == 1 else s)
        return s.expand(num_kv_heads, head_dim).contiguous()


@jit
def _quantize(x, s):
    """kv_cache_quantize of float32 values (already rounded to the model dtype) by float32 scales -> int8."""
    y = tl.div_rn(x, s)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    # + then - 1.5 * 2^23 rounds a float32 |y| < 2^22 to an integer, ties to even (float32 adds round so)
    return ((y + 12582912.0) - 12582912.0).to(tl.int8)


@jit
def _qkv_rotary_append_kernel(part_ptr, bias_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, past_ptr,
                              ks_ptr, vs_ptr, kn_ptr, vn_ptr, M, S, NQKV, stride_cb, stride_ch, stride_ct,
                              SPLIT: tl.constexpr, SB: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr,
                              D: tl.constexpr, HALF_R: tl.constexpr, HAS_BIAS: tl.constexpr, KV8: tl.constexpr,
                              PDL: tl.constexpr):
    """Program (token m, head h): h < HQ query heads -> q[m]; then HKV key heads, HKV value heads -> the cache (int8
    with KV8: quantized into the cache, unquantized into kn/vn [B, HKV, S, D])."""
    pdl_prologue(PDL)
    m = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, D // 2)
    col = h * D + 2 * i  # even element of each pair within the fused QKV row
    every = i < D // 2
    a = sum_partials(part_ptr + m * NQKV, M * NQKV, col, every, SPLIT, SB)
    b = sum_partials(part_ptr + m * NQKV, M * NQKV, col + 1, every, SPLIT, SB)
    dt = q_ptr.dtype.element_ty
    if HAS_BIAS:  # the linear's output is rounded, then the bias added (rounded): as F.linear in fp16 closely
        a = a.to(dt).to(tl.float32) + tl.load(bias_ptr + col).to(tl.float32)
        b = b.to(dt).to(tl.float32) + tl.load(bias_ptr + col + 1).to(tl.float32)
    a = a.to(dt).to(tl.float32)
    b = b.to(dt).to(tl.float32)
    if h < HQ + HKV:  # q and k heads rotate
        pos = tl.load(pos_ptr + m)
        rmask = i < HALF_R
        c = tl.load(cos_ptr + pos * HALF_R + i, mask=rmask, other=1.0).to(dt).to(tl.float32)
        sn = tl.load(sin_ptr + pos * HALF_R + i, mask=rmask, other=0.0).to(dt).to(tl.float32)
        a, b = a * c - b * sn, b * c + a * sn
    if h < HQ:
        tl.store(q_ptr + m * HQ * D + col, a.to(dt))
        tl.store(q_ptr + m * HQ * D + col + 1, b.to(dt))
    else:
        row_b = m // S
        slot = tl.load(past_ptr) + m % S
        is_k = h < HQ + HKV
        hk = tl.where(is_k, h - HQ, h - HQ - HKV)
        off = row_b * stride_cb + hk * stride_ch + slot * stride_ct
        if KV8:
            a = a.to(dt).to(tl.float32)
            b = b.to(dt).to(tl.float32)
            new = (row_b * HKV + hk) * S + m % S  # row of kn/vn
            if is_k:
                tl.store(kn_ptr + new * D + 2 * i, a.to(dt))
                tl.store(kn_ptr + new * D + 2 * i + 1, b.to(dt))
                sa = tl.load(ks_ptr + hk * D + 2 * i)
                sb = tl.load(ks_ptr + hk * D + 2 * i + 1)
                tl.store(k_ptr + off + 2 * i, _quantize(a, sa))
                tl.store(k_ptr + off + 2 * i + 1, _quantize(b, sb))
            else:
                tl.store(vn_ptr + new * D + 2 * i, a.to(dt))
                tl.store(vn_ptr + new * D + 2 * i + 1, b.to(dt))
                sa = tl.load(vs_ptr + hk * D + 2 * i)
                sb = tl.load(vs_ptr + hk * D + 2 * i + 1)
                tl.store(v_ptr + off + 2 * i, _quantize(a, sa))
                tl.store(v_ptr + off + 2 * i + 1, _quantize(b, sb))
        else:
            if is_k:
                tl.store(k_ptr + off + 2 * i, a.to(dt))
                tl.store(k_ptr + off + 2 * i + 1, b.to(dt))
            else:
                tl.store(v_ptr + off + 2 * i, a.to(dt))
                tl.store(v_ptr + off + 2 * i + 1, b.to(dt))


def qkv_rotary_append(part: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, past: torch.Tensor, seq: int,
                      num_heads: int, num_kv_heads: int, q_out: torch.Tensor | None = None,
                      kv8: KV8 | None = None) -> torch.Tensor:
    """part [SPLIT, M, (Hq + 2 Hkv) D] (M = B * seq tokens, row-major), positions [M] int64, caches
    [B, Hkv, S_max, D] (written at slots past..past+seq-1; int8 with `kv8`, whose k_new/v_new [B, Hkv, seq, D] get
    the unquantized values), past int32 [1] on the device -> rotated q [M, Hq D] (in cos's dtype, the model's)."""
    split, m, nqkv = part.shape
    d = k_cache.shape[-1]
    if nqkv != (num_heads + 2 * num_kv_heads) * d or d != next_pow2(d):
        raise ValueError(f"qkv_rotary_append: {nqkv} QKV features for {num_heads}+2x{num_kv_heads} heads of {d}")
    if (k_cache.dtype == torch.int8) != (kv8 is not None):
        raise ValueError(f"qkv_rotary_append: a {k_cache.dtype} cache {'without' if kv8 is None else 'with'} KV8")
    dtype = kv8.k_new.dtype if kv8 is not None else k_cache.dtype
    q_out = torch.empty((m, num_heads * d), dtype=dtype, device=part.device) if q_out is None else q_out
    ks, vs, kn, vn = (kv8.k_scale, kv8.v_scale, kv8.k_new, kv8.v_new) if kv8 is not None else (part,) * 4
    _qkv_rotary_append_kernel[(m, num_heads + 2 * num_kv_heads)](
        part, bias if bias is not None else part, positions, cos, sin, q_out, k_cache, v_cache, past,
        ks, vs, kn, vn, m, seq, nqkv, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), SPLIT=split,
        SB=split_block(split, max(1, d // 64)), HQ=num_heads,
        HKV=num_kv_heads, D=d, HALF_R=cos.shape[-1], HAS_BIAS=bias is not None, KV8=kv8 is not None, num_warps=1,
        **pdl_kwargs(part.device))
    return q_out
