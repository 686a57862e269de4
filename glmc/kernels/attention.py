"""Attention on CUDA over the static KV cache (fp16/bf16 or int8): one fused kernel per decode step (QKV bias +
rotary + append + split-K flash-decoding + the merge of the splits) with grouped-query heads; prefill over the same
cache with torch's SDPA.

Op and reference: `glmc::group_query_attention` (`ops.attention.gqa_reference`) for one new token per row (S = 1):
q, k, v from the fused QKV linear's split-K partials plus its bias (`rotary.qkv_sum`), q and k rotated at the
token's position (`rotary.rotate`), k and v appended to the cache at slot `past`, and the query of row b sees keys j
with start[b] <= j <= past (start[b] = the row's left padding: its attention mask is zeros then ones). Scores scaled,
softmax in float32 (here everything is float32 inside; probabilities meet the cached V in the model dtype).

As in the model (SelfAttention: the past is read from the cache, the new token joins it as computed), the new
token's own key and value enter the softmax as computed (rounded to the model dtype), not re-read from the cache; with
an int8 cache (`rotary.KV8`, the scales float32 [Hkv, D]) the cached keys and values j < past are
`glmc::kv_cache_dequantize`d (float32(code) * float32(scale); ops/kv_cache.py) and the new ones are quantized into
the cache as `glmc::kv_cache_quantize` (`rotary.quantize`) for the steps after. The scales are applied outside the
products (to q, and to the chunk's output), so the rounding differs from the model's fp16 dequantized cache by the
model dtype's rounding (within the kv8 verification bound).

Program (row b, KV head, chunk c of CHUNK cache slots): the G = Hq / Hkv query heads of that KV head as one [G, D]
tile (padded to 16 rows for the tensor cores), made from the partials, against the chunk's cached keys, online
softmax; the chunk holding slot `past` also writes the new key/value there and joins them; each program writes its
chunk's max, sum and un-normalised output. Chunks past `past` (and before the row's padding) read nothing, so one
launch shape (and one CUDA graph) serves every length up to the cache's. Then the merge, program (row b, query
head): the chunks' outputs weighted by their softmax sums. (One kernel with the merge done by the last chunk to
finish, counted by an atomic, was slower: 24.6 vs 7.5 us at batch 1 and 8k tokens, one program reading every
chunk; and the whole step slower under programmatic dependent launch, docs/gpu.md.)
"""

from __future__ import annotations

import torch

from glmc.kernels._cuda import pdl_kwargs, pdl_prologue
from glmc.kernels._jit import cdiv, jit, next_pow2, tl
from glmc.kernels.quantized_linear import split_block
from glmc.kernels.rotary import KV8, qkv_sum, quantize, rotate


@jit
def _decode_attention_kernel(part_ptr, bias_ptr, pos_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, start_ptr, past_ptr,
                             m_ptr, l_ptr, acc_ptr, like_ptr, scale, ks_ptr, vs_ptr, M, NQKV, stride_cb,
                             stride_ch, stride_ct, NCHUNK, SPLIT: tl.constexpr, SB: tl.constexpr, HQ: tl.constexpr,
                             HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                             HALF_R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
                             HAS_BIAS: tl.constexpr, KV8: tl.constexpr, PDL: tl.constexpr):
    """int8 cache: the codes meet the tensor cores as fp16 (exact), the K scale is folded into q (per channel:
    q.(s*k) = (q*s).k) and the V scale applied to the chunk's output (sum_j p_j (s*v_j) = s * sum_j p_j v_j)."""
    pdl_prologue(PDL)
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    dt = like_ptr.dtype.element_ty
    rg = tl.arange(0, BLOCK_G)
    gmask = rg < G
    rd = tl.arange(0, D)
    i = tl.arange(0, D // 2)
    heads = hk * G + rg  # query heads of this KV head
    row = part_ptr + b * NQKV
    pos = tl.load(pos_ptr + b)
    # q [BLOCK_G, D] from the partials: even and odd elements of each pair as flat [BLOCK_G * D/2] columns
    colq = tl.reshape(heads[:, None] * D + 2 * i[None, :], (BLOCK_G * (D // 2),))
    qmask = tl.reshape(gmask[:, None] & (i[None, :] < D // 2), (BLOCK_G * (D // 2),))
    qa = tl.reshape(qkv_sum(row, M * NQKV, bias_ptr, colq, qmask, like_ptr, SPLIT, SB, HAS_BIAS), (BLOCK_G, D // 2))
    qb = tl.reshape(qkv_sum(row, M * NQKV, bias_ptr, colq + 1, qmask, like_ptr, SPLIT, SB, HAS_BIAS),
                    (BLOCK_G, D // 2))
    qa, qb = rotate(qa, qb, cos_ptr, sin_ptr, pos, i[None, :], HALF_R, like_ptr)
    q = tl.interleave(qa, qb).to(dt)
    # the new token's key (rotated) and value, pairs (a, b), rounded to the model dtype
    every = i < D // 2
    colk = (HQ + hk) * D + 2 * i
    colv = (HQ + HKV + hk) * D + 2 * i
    ka, kb = rotate(qkv_sum(row, M * NQKV, bias_ptr, colk, every, like_ptr, SPLIT, SB, HAS_BIAS),
                    qkv_sum(row, M * NQKV, bias_ptr, colk + 1, every, like_ptr, SPLIT, SB, HAS_BIAS),
                    cos_ptr, sin_ptr, pos, i, HALF_R, like_ptr)
    ka = ka.to(dt).to(tl.float32)
    kb = kb.to(dt).to(tl.float32)
    va = qkv_sum(row, M * NQKV, bias_ptr, colv, every, like_ptr, SPLIT, SB, HAS_BIAS)
    vb = qkv_sum(row, M * NQKV, bias_ptr, colv + 1, every, like_ptr, SPLIT, SB, HAS_BIAS)

    start = tl.load(start_ptr + b)
    last = tl.load(past_ptr)  # the new token's slot: cached keys start..last-1, then the new one
    t0 = c * CHUNK
    holds_new = (last >= t0) & (last < t0 + CHUNK)
    base = b * stride_cb + hk * stride_ch
    if holds_new:  # append: the one program of (b, KV head) whose chunk holds slot `last`
        if KV8:
            tl.store(k_ptr + base + last * stride_ct + 2 * i, quantize(ka, tl.load(ks_ptr + hk * D + 2 * i)))
            tl.store(k_ptr + base + last * stride_ct + 2 * i + 1, quantize(kb, tl.load(ks_ptr + hk * D + 2 * i + 1)))
            tl.store(v_ptr + base + last * stride_ct + 2 * i, quantize(va, tl.load(vs_ptr + hk * D + 2 * i)))
            tl.store(v_ptr + base + last * stride_ct + 2 * i + 1, quantize(vb, tl.load(vs_ptr + hk * D + 2 * i + 1)))
        else:
            tl.store(k_ptr + base + last * stride_ct + 2 * i, ka.to(dt))
            tl.store(k_ptr + base + last * stride_ct + 2 * i + 1, kb.to(dt))
            tl.store(v_ptr + base + last * stride_ct + 2 * i, va.to(dt))
            tl.store(v_ptr + base + last * stride_ct + 2 * i + 1, vb.to(dt))
    lo = tl.maximum(t0, start)
    hi = tl.minimum(t0 + CHUNK, last)
    qk = (q.to(tl.float32) * tl.load(ks_ptr + hk * D + rd)[None, :]).to(dt) if KV8 else q
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
    # only the tiles that hold cached keys of this row: other chunks loop 0 times
    for tt in range((lo - t0) // BLOCK_T * BLOCK_T, hi - t0, BLOCK_T):
        rt = t0 + tt + tl.arange(0, BLOCK_T)
        tmask = (rt >= lo) & (rt < hi)
        k = tl.load(k_ptr + base + rt[:, None] * stride_ct + rd[None, :], mask=tmask[:, None], other=0).to(dt)
        s = tl.dot(qk, tl.trans(k)) * scale  # [BLOCK_G, BLOCK_T]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base + rt[:, None] * stride_ct + rd[None, :], mask=tmask[:, None], other=0).to(dt)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
        m_i = m_new
    if KV8:
        acc = acc * tl.load(vs_ptr + hk * D + rd)[None, :]
    if holds_new:  # the new token joins the softmax once
        kn = tl.interleave(ka, kb)
        vn = tl.interleave(va, vb)
        s_new = tl.sum(q.to(tl.float32) * kn[None, :], axis=1) * scale  # [BLOCK_G]
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp(m_i - m_new)
        p_new = tl.exp(s_new - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * vn[None, :]
        m_i = m_new
    o = (bh * NCHUNK + c) * BLOCK_G + rg  # partials [B * HKV, NCHUNK, BLOCK_G] (and x D)
    tl.store(m_ptr + o, m_i)
    tl.store(l_ptr + o, l_i)
    tl.store(acc_ptr + o[:, None] * D + rd[None, :], acc)


@jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, NCHUNK, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                    BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """Program (row b, query head h): out[b, h] = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c over the chunks
    of h's KV head (a chunk without keys of the row has m = -inf and weighs 0)."""
    pdl_prologue(PDL)
    bq = tl.program_id(0)
    b = bq // HQ
    h = bq % HQ
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, D)
    cmask = rc < NCHUNK
    o = ((b * HKV + h // G) * NCHUNK + rc) * BLOCK_G + h % G
    m = tl.load(m_ptr + o, mask=cmask, other=float("-inf"))
    lsum = tl.load(l_ptr + o, mask=cmask, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
    acc = tl.load(acc_ptr + o[:, None] * D + rd[None, :], mask=cmask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
    tl.store(out_ptr + bq * D + rd, out.to(out_ptr.dtype.element_ty))


def decode_attention(part: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                     past: torch.Tensor, num_heads: int, scale: float, out: torch.Tensor | None = None,
                     kv8: KV8 | None = None, chunk: int | None = None, block_t: int = 64) -> torch.Tensor:
    """One decode step's attention from the QKV linear: part [SPLIT, B, (Hq + 2 Hkv) D] (its split-K partials),
    bias, positions [B] int64, cos/sin [max_positions, R/2]; caches [B, Hkv, S_max, D] (int8 with `kv8`, of which
    only the scales are read), the new token written at slot `past` (int32 [1] on the device), start int32 [B]
    -> attention output [B, Hq D] in cos's dtype (the model's). `chunk` (cache slots per program) defaults to
    S_max / 64 within 64..256: short caches get more programs in flight at batch 1, long ones fewer partials to
    merge."""
    split, b, nqkv = part.shape
    _, hkv, smax, d = k_cache.shape
    if nqkv != (num_heads + 2 * hkv) * d or d != next_pow2(d):
        raise ValueError(f"decode_attention: {nqkv} QKV features for {num_heads}+2x{hkv} heads of {d}")
    if (k_cache.dtype == torch.int8) != (kv8 is not None):
        raise ValueError(f"decode_attention: a {k_cache.dtype} cache {'without' if kv8 is None else 'with'} KV8")
    g = num_heads // hkv
    block_g = max(16, next_pow2(g))
    chunk = chunk or min(256, max(block_t, next_pow2(cdiv(smax, 64))))
    nchunk = cdiv(smax, chunk)
    ml = torch.empty((2, b * hkv, nchunk, block_g), dtype=torch.float32, device=part.device)
    acc = torch.empty((b * hkv, nchunk, block_g, d), dtype=torch.float32, device=part.device)
    out = torch.empty((b, num_heads * d), dtype=cos.dtype, device=part.device) if out is None else out
    ks, vs = (kv8.k_scale, kv8.v_scale) if kv8 is not None else (part, part)
    _decode_attention_kernel[(b * hkv, nchunk)](
        part, bias if bias is not None else part, positions, cos, sin, k_cache, v_cache, start, past, ml[0], ml[1],
        acc, out, scale, ks, vs, b, nqkv, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), nchunk,
        SPLIT=split, SB=split_block(split, max(1, block_g * d // 2 // 128)), HQ=num_heads, HKV=hkv, G=g,
        BLOCK_G=block_g, D=d, HALF_R=cos.shape[-1], CHUNK=chunk, BLOCK_T=block_t, HAS_BIAS=bias is not None,
        KV8=kv8 is not None, num_warps=4, **pdl_kwargs(part.device))
    _combine_kernel[(b * num_heads,)](ml[0], ml[1], acc, out, nchunk, HQ=num_heads, HKV=hkv, G=g, BLOCK_G=block_g,
                                      D=d, BLOCK_C=max(2, next_pow2(nchunk)), num_warps=2, **pdl_kwargs(part.device))
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor, b: int,
                      s: int, p: int, num_heads: int, scale: float, kv8: KV8 | None = None) -> torch.Tensor:
    """Prompt tokens (torch SDPA over the cache) after `qkv_rotary_append` wrote them at slots p..p+s-1: q [B S, Hq D]
    -> [B S, Hq D]. Query i of row b sees keys start[b] <= j <= p + i; a padding query (no such key) sees its own
    slot instead, so no row is fully masked (its output is never read). With `kv8` the cached keys j < p are
    dequantized and the new ones are k_new/v_new [B, Hkv, s, D] (unquantized), as the model computes them."""
    hkv, d = k_cache.shape[1], k_cache.shape[-1]
    t = p + s
    g = num_heads // hkv
    qh = q.view(b, s, num_heads, d).transpose(1, 2)
    if kv8 is None:
        k, v = k_cache[:, :, :t], v_cache[:, :, :t]
    else:
        def past(cache: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
            return (cache[:, :, :p].float() * sc[None, :, None, :]).to(q.dtype)
        k = torch.cat([past(k_cache, kv8.k_scale), kv8.k_new], dim=2)
        v = torch.cat([past(v_cache, kv8.v_scale), kv8.v_new], dim=2)
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    j = torch.arange(t, device=q.device)
    i = p + torch.arange(s, device=q.device)
    allowed = (j[None, None, :] <= i[None, :, None]) & (j[None, None, :] >= start[:b, None, None])
    allowed |= j[None, None, :] == i[None, :, None]
    out = torch.nn.functional.scaled_dot_product_attention(qh, k, v, attn_mask=allowed[:, None], scale=scale)
    return out.transpose(1, 2).reshape(b * s, num_heads * d)
