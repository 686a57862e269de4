"""QKV bias + ChatGLM rotary + KV-cache append on CUDA, into a static (preallocated) cache.

Op and reference: the first half of `glmc::group_query_attention` (`ops.attention.gqa_reference`): q, k, v from the
fused QKV linear (rows q then k then v, plus its bias), rotary on dims 0..R-1 of each q/k head as adjacent pairs
(2i, 2i+1) at the token's position (cos/sin tables [max_positions, R/2]), then k and v appended to the cache. Here
the cache is static, [B, Hkv, S_max, D] per layer, and token s of row b goes to slot `past + s` (past is a device
scalar, so one CUDA graph serves every decode step). Inputs are the QKV linear's split-K partials.
"""

from __future__ import annotations

import torch

from glmc.kernels._jit import jit, next_pow2, tl


@jit
def _qkv_rotary_append_kernel(part_ptr, nsplit, bias_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, past_ptr,
                              M, S, NQKV, stride_cb, stride_ch, stride_ct, HQ: tl.constexpr, HKV: tl.constexpr,
                              D: tl.constexpr, HALF_R: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (token m, head h): h < HQ query heads -> q[m]; then HKV key heads, HKV value heads -> the cache."""
    m = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, D // 2)
    col = h * D + 2 * i  # even element of each pair within the fused QKV row
    a = tl.zeros((D // 2,), dtype=tl.float32)
    b = tl.zeros((D // 2,), dtype=tl.float32)
    for s in range(0, nsplit):
        row = part_ptr + (s * M + m) * NQKV
        a += tl.load(row + col).to(tl.float32)
        b += tl.load(row + col + 1).to(tl.float32)
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
        if h < HQ + HKV:
            dst = k_ptr + row_b * stride_cb + (h - HQ) * stride_ch + slot * stride_ct
        else:
            dst = v_ptr + row_b * stride_cb + (h - HQ - HKV) * stride_ch + slot * stride_ct
        tl.store(dst + 2 * i, a.to(dt))
        tl.store(dst + 2 * i + 1, b.to(dt))


def qkv_rotary_append(part: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, past: torch.Tensor, seq: int,
                      num_heads: int, num_kv_heads: int, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """part [SPLIT, M, (Hq + 2 Hkv) D] (M = B * seq tokens, row-major), positions [M] int64, caches
    [B, Hkv, S_max, D] (written at slots past..past+seq-1), past int32 [1] on the device -> rotated q [M, Hq D]."""
    nsplit, m, nqkv = part.shape
    d = k_cache.shape[-1]
    if nqkv != (num_heads + 2 * num_kv_heads) * d or d != next_pow2(d):
        raise ValueError(f"qkv_rotary_append: {nqkv} QKV features for {num_heads}+2x{num_kv_heads} heads of {d}")
    q_out = torch.empty((m, num_heads * d), dtype=k_cache.dtype, device=part.device) if q_out is None else q_out
    _qkv_rotary_append_kernel[(m, num_heads + 2 * num_kv_heads)](
        part, nsplit, bias if bias is not None else part, positions, cos, sin, q_out, k_cache, v_cache, past, m, seq,
        nqkv, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HQ=num_heads, HKV=num_kv_heads, D=d,
        HALF_R=cos.shape[-1], HAS_BIAS=bias is not None, num_warps=1)
    return q_out
