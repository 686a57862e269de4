"""glmc::QuantizedLinear: Y = X @ dequant(QWeight, Scales)^T + Bias, symmetric weight-only int8/int4.

Layout (kept the same everywhere: torch, checkpoints, every lowering):
- bits=8: QWeight int8 [N, K].
- bits=4: QWeight uint8 [N, ceil(K/2)], two signed (two's complement) 4-bit values per byte along K;
  element 2j sits in the LOW nibble, element 2j+1 in the HIGH nibble (ONNX INT4 order). Odd K pads the
  last high nibble with 0.
- group_size=0: Scales [N] (one per output channel); group_size=G: Scales [N, ceil(K/G)] (per G along K).
- Scales have X's dtype; dequant(q, s)[n, k] = q[n, k] * s[n, k // G].
"""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], shape [N, K] -> uint8 [N, ceil(K/2)] (low nibble = even k)."""
    n, k = q.shape
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = (q.to(torch.int16) & 0xF).to(torch.uint8).view(n, -1, 2)
    return u[..., 0] | (u[..., 1] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> int8 [N, K] signed values in [-8, 7]."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    q = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :k]
    return torch.where(q >= 8, q - 16, q).to(torch.int8)


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, k: int) -> torch.Tensor:
    """QWeight + Scales -> float weight [N, K] in the scales' dtype."""
    q = unpack_int4(qweight, k) if bits == 4 else qweight
    if group_size == 0:
        s = scales.reshape(-1, 1)
    else:
        s = scales.repeat_interleave(group_size, dim=1)[:, :k]
    return q.to(scales.dtype) * s


@torch.library.custom_op("glmc::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     bits: int, group_size: int, in_features: int) -> torch.Tensor:
    w = dequantize_weight(qweight, scales, bits, group_size, in_features).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@quantized_linear.register_fake
def _(x, qweight, scales, bias, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
