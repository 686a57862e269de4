"""glmc::KVCacheQuantize / glmc::KVCacheDequantize: symmetric int8 KV cache.

x: [B, H, T, D]. Scale (float, the model dtype): [1] per tensor, [H] per KV head, or [H, D] per KV head and
channel. Quantize: q = clamp(round_half_even(float32(x) / float32(scale)), -127, 127) as int8.
Dequantize: x = float32(q) * float32(scale), cast to the scale's dtype.
"""

from __future__ import annotations

import torch


def _broadcast(scale: torch.Tensor) -> torch.Tensor:
    s = scale.float()
    if s.dim() == 2:  # [H, D]
        return s[None, :, None, :]
    if s.numel() == 1:
        return s.reshape(1, 1, 1, 1)
    return s.reshape(1, -1, 1, 1)  # [H]


@torch.library.custom_op("glmc::kv_cache_quantize", mutates_args=())
def kv_cache_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x.float() / _broadcast(scale)), -127, 127).to(torch.int8)


@kv_cache_quantize.register_fake
def _(x, scale):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("glmc::kv_cache_dequantize", mutates_args=())
def kv_cache_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float() * _broadcast(scale)).to(scale.dtype)


@kv_cache_dequantize.register_fake
def _(q, scale):
    return torch.empty_like(q, dtype=scale.dtype)
