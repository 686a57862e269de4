"""glmc::GroupQueryAttention: ChatGLM rotary + KV-cache concat + causal grouped-query attention.

Inputs (S new tokens, P cached, T = P + S; Hq query heads, Hkv KV heads, D head dim, R = rotary dims):
  query [B, S, Hq*D], key [B, S, Hkv*D], value [B, S, Hkv*D]  (before rotary)
  past_key, past_value [B, Hkv, P, D]  (after rotary; P may be 0)
  position_ids [B, S] int64; attention_mask [B, T] int64 (1 = real token, 0 = left padding)
  cos_cache, sin_cache [M, R/2] (row p holds cos/sin of p * theta_i, any position scaling already applied)
Attributes: num_heads, kv_num_heads, scale (softmax scale, usually 1/sqrt(D)).
Outputs: output [B, S, Hq*D], present_key, present_value [B, Hkv, T, D] = concat(past, rotated new).

Rotary (ChatGLM style): on dims 0..R-1 of each q/k head, adjacent pairs (2i, 2i+1) rotate by angle
theta_i * pos: (a, b) -> (a cos - b sin, b cos + a sin); dims R..D-1 pass through.
Attention: query i (absolute index P + i) sees key j iff j <= P + i and attention_mask[b, j] == 1.
Scores are computed in the input dtype, softmax in float32; masked scores are the dtype's lowest value
(a fully masked row, i.e. a padding query, averages the values instead of producing NaN).
"""

from __future__ import annotations

import torch


def rotary_tables(rotary_dim: int, max_positions: int, base: float, position_divisor: float = 1.0):
    """cos/sin tables [max_positions, rotary_dim/2]: angle = (p / divisor) * base^(-2i/R), in float32 as the original."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim))
    pos = torch.arange(max_positions, dtype=torch.float32, device="cpu")
    if position_divisor != 1.0:
        pos = pos / position_divisor
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos/sin [B, S, R/2] -> x with dims 0..R-1 rotated as adjacent pairs."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    rot = rot.unflatten(-1, (half, 2))
    a, b = rot[..., 0], rot[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


def gqa_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                  past_value: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                  cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int, kv_num_heads: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's semantics in plain (differentiable) torch; the custom op below runs exactly this."""
    b, s, _ = query.shape
    d = past_key.shape[-1]
    p = past_key.shape[2]
    group = num_heads // kv_num_heads
    cos = cos_cache[position_ids].to(query.dtype)  # [B, S, R/2]
    sin = sin_cache[position_ids].to(query.dtype)
    q = apply_rotary(query.view(b, s, num_heads, d), cos, sin)
    k = apply_rotary(key.view(b, s, kv_num_heads, d), cos, sin)
    v = value.view(b, s, kv_num_heads, d)
    present_key = torch.cat([past_key, k.transpose(1, 2).to(past_key.dtype)], dim=2)  # [B, Hkv, T, D]
    present_value = torch.cat([past_value, v.transpose(1, 2).to(past_value.dtype)], dim=2)
    t = p + s
    # [B, Hkv, G*S, D] so that each KV head serves its G query heads without copying K/V.
    qg = q.transpose(1, 2).reshape(b, kv_num_heads, group * s, d)
    scores = torch.matmul(qg, present_key.transpose(2, 3).to(q.dtype)).float() * scale  # [B, Hkv, G*S, T]
    causal = torch.arange(t, device=query.device)[None, :] <= (p + torch.arange(s, device=query.device))[:, None]
    allowed = causal[None] & (attention_mask[:, None, :] != 0)  # [B, S, T]
    allowed = allowed[:, None, None].expand(b, 1, group, s, t).reshape(b, 1, group * s, t)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, present_value.to(q.dtype))  # [B, Hkv, G*S, D]
    out = out.view(b, kv_num_heads, group, s, d).reshape(b, num_heads, s, d).transpose(1, 2).reshape(b, s, num_heads * d)
    return out, present_key, present_value


@torch.library.custom_op("glmc::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                          cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gqa_reference(query, key, value, past_key, past_value, position_ids, attention_mask, cos_cache, sin_cache,
                         num_heads, kv_num_heads, scale)


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, position_ids, attention_mask, cos_cache, sin_cache, num_heads,
      kv_num_heads, scale):
    b, s, _ = query.shape
    hkv, p, d = past_key.shape[1:]
    present = past_key.new_empty(b, hkv, p + s, d)
    return query.new_empty(b, s, num_heads * d), present, past_value.new_empty(b, hkv, p + s, d)
