"""Decode attention on CUDA over the static KV cache (fp16/bf16 or int8): split-K (flash-decoding) with grouped-query
heads; prefill attention over the same cache.

Op and reference: the attention half of `glmc::group_query_attention` (`ops.attention.gqa_reference`) for one new
token per row (S = 1), after `rotary.qkv_rotary_append` wrote its key and value at slot `past`: the query of row b
sees keys j with start[b] <= j <= past (start[b] = the row's left padding: its attention mask is zeros then ones).
Scores scaled, softmax in float32 (here everything is float32 inside; probabilities meet V in the model dtype).

int8 cache (`rotary.KV8`): as the model (SelfAttention) computes it, the cached keys and values j < past are
`glmc::kv_cache_dequantize`d (float32(code) * float32(scale); ops/kv_cache.py) and the new token's own key and value
(slot past) are its unquantized ones (KV8.k_new / v_new), not the codes just written. The scales are applied outside
the products (to q, and to a program's output), so the rounding differs from the model's fp16 dequantized cache by
the model dtype's rounding (within the kv8 verification bound).

Stage 1, program (row b, KV head, c < P): the G = Hq / Hkv query heads of that KV head as one [G, D] tile (padded
to 16 rows for the tensor cores) against the row's key tiles (BLOCK_T slots) number c, c + P, c + 2P, ... counted
from the tile of start[b], online softmax; writes its max, sum and un-normalised output. Every context length splits
over the same P programs a row (the tiles dealt round-robin), so one launch shape (and one CUDA graph) serves every
length up to the cache's, short contexts write and combine few partials (a program without tiles returns at once
and writes nothing) and long ones spread over all P. Stage 2, program (row b, query head): merges the programs that
had tiles.
"""

from __future__ import annotations

import torch

from glmc.kernels._cuda import pdl_kwargs, pdl_prologue, sm_count
from glmc.kernels._jit import cdiv, jit, next_pow2, tl
from glmc.kernels.rotary import KV8


@jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, start_ptr, past_ptr, m_ptr, l_ptr, acc_ptr, scale,
                             ks_ptr, vs_ptr, kn_ptr, vn_ptr,
                             stride_cb, stride_ch, stride_ct, P, HQ: tl.constexpr, HKV: tl.constexpr,
                             G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                             KV8: tl.constexpr, PDL: tl.constexpr):
    """int8 cache: the codes meet the tensor cores as fp16 (exact), the K scale is folded into q (per channel:
    q.(s*k) = (q*s).k) and the V scale applied to the program's output (sum_j p_j (s*v_j) = s * sum_j p_j v_j); the
    new token (slot `past`, unquantized) joins the online softmax once, in the program whose tile holds it."""
    pdl_prologue(PDL)
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    rg = tl.arange(0, BLOCK_G)
    gmask = rg < G
    rd = tl.arange(0, D)
    heads = hk * G + rg  # query heads of this KV head
    q = tl.load(q_ptr + b * HQ * D + heads[:, None] * D + rd[None, :], mask=gmask[:, None], other=0.0)
    dt = q.dtype
    start = tl.load(start_ptr + b)
    last = tl.load(past_ptr)  # the new token's slot: keys start..last
    tile0 = start // BLOCK_T
    if tile0 + c > last // BLOCK_T:  # no tile of this row for this program: the combine does not read it
        return
    if KV8:
        hi = last  # cached keys start..last-1; the new one after the loop
        qk = (q.to(tl.float32) * tl.load(ks_ptr + hk * D + rd)[None, :]).to(dt)
    else:
        hi = last + 1
        qk = q
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
    base = b * stride_cb + hk * stride_ch
    for tile in range(tile0 + c, (hi + BLOCK_T - 1) // BLOCK_T, P):
        rt = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = (rt >= start) & (rt < hi)
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
        if (last // BLOCK_T - tile0) % P == c:  # the new token's unquantized key and value
            kn = tl.load(kn_ptr + bh * D + rd).to(tl.float32)
            vn = tl.load(vn_ptr + bh * D + rd).to(tl.float32)
            s_new = tl.sum(q.to(tl.float32) * kn[None, :], axis=1) * scale  # [BLOCK_G]
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp(m_i - m_new)
            p_new = tl.exp(s_new - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * vn[None, :]
            m_i = m_new
    o = (b * HQ + heads) * P + c
    tl.store(m_ptr + o, m_i, mask=gmask)
    tl.store(l_ptr + o, l_i, mask=gmask)
    tl.store(acc_ptr + o[:, None] * D + rd[None, :], acc, mask=gmask[:, None])


@jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, start_ptr, past_ptr, P, HQ: tl.constexpr, D: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """out[b, h] = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c over the programs c of row b that had tiles."""
    pdl_prologue(PDL)
    bh = tl.program_id(0)
    rc = tl.arange(0, BLOCK_C)
    rd = tl.arange(0, D)
    cmask = (rc <= tl.load(past_ptr) // BLOCK_T - tl.load(start_ptr + bh // HQ) // BLOCK_T) & (rc < P)
    m = tl.load(m_ptr + bh * P + rc, mask=cmask, other=float("-inf"))
    lsum = tl.load(l_ptr + bh * P + rc, mask=cmask, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
    acc = tl.load(acc_ptr + (bh * P + rc)[:, None] * D + rd[None, :], mask=cmask[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
    tl.store(out_ptr + bh * D + rd, o.to(out_ptr.dtype.element_ty))


def programs_per_row(smax: int, pairs: int, block_t: int, sms: int, kv8: bool = False) -> int:
    """P, the stage-1 programs of one (row, KV head): about 2 per SM over the batch for an fp16 cache, 4 for an int8
    one (its tiles cost more than their bytes: more programs hide it), at most 64 (the combine reads P partials a
    query head) and at most the cache's tiles. 132 SMs: 64 at batch 1; at batch 16, 8 (fp16) and 16 (int8): the P
    sweep of docs/gpu/visit-l and the decode rows of visits L and M (int8 cache at batch 16 / 8k: 3513 tok/s with
    P 16, 3377 with 8; fp16 cache 3556 with 8, 3507 with 16)."""
    return max(1, min(64, cdiv(smax, block_t), (4 if kv8 else 2) * sms // pairs))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
                     past: torch.Tensor, num_heads: int, scale: float, programs: int | None = None,
                     block_t: int = 64, out: torch.Tensor | None = None, kv8: KV8 | None = None) -> torch.Tensor:
    """q [B, Hq D] (rotated), caches [B, Hkv, S_max, D] (int8 with `kv8`, whose k_new/v_new [B, Hkv, 1, D] hold the
    new token's unquantized key/value), start int32 [B], past int32 [1] (the new token's slot) -> attention output
    [B, Hq D] in q's dtype. `programs`: P, the programs a (row, KV head) splits its tiles over (programs_per_row)."""
    b = q.shape[0]
    _, hkv, smax, d = k_cache.shape
    if (k_cache.dtype == torch.int8) != (kv8 is not None):
        raise ValueError(f"decode_attention: a {k_cache.dtype} cache {'without' if kv8 is None else 'with'} KV8")
    g = num_heads // hkv
    p = programs or programs_per_row(smax, b * hkv, block_t, sm_count(q.device), kv8 is not None)
    ml = torch.empty((2, b, num_heads, p), dtype=torch.float32, device=q.device)
    acc = torch.empty((b, num_heads, p, d), dtype=torch.float32, device=q.device)
    ks, vs, kn, vn = (kv8.k_scale, kv8.v_scale, kv8.k_new, kv8.v_new) if kv8 is not None else (q,) * 4
    _decode_attention_kernel[(b * hkv, p)](
        q, k_cache, v_cache, start, past, ml[0], ml[1], acc, scale, ks, vs, kn, vn, k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), p, HQ=num_heads, HKV=hkv, G=g, BLOCK_G=max(16, next_pow2(g)), D=d,
        BLOCK_T=block_t, KV8=kv8 is not None, num_warps=4, **pdl_kwargs(q.device))
    out = torch.empty_like(q) if out is None else out
    _combine_kernel[(b * num_heads,)](ml[0], ml[1], acc, out, start, past, p, HQ=num_heads, D=d, BLOCK_T=block_t,
                                      BLOCK_C=max(2, next_pow2(p)), num_warps=2, **pdl_kwargs(q.device))
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
