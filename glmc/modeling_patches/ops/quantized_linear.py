"""glmc::QuantizedLinear: Y = X @ dequant(QWeight, Scales[, ZeroPoints])^T + Bias, weight-only int8/int4.

Layout (kept the same everywhere: torch, checkpoints, every lowering):
- bits=8: QWeight int8 [N, K].
- bits=4: QWeight uint8 [N, ceil(K/2)], two signed (two's complement) 4-bit values per byte along K;
  element 2j sits in the LOW nibble, element 2j+1 in the HIGH nibble (ONNX INT4 order). Odd K pads the
  last high nibble with 0.
- group_size=0: Scales [N] (one per output channel); group_size=G: Scales [N, ceil(K/G)] (per G along K).
- Scales have X's dtype; dequant(q, s)[n, k] = q[n, k] * s[n, k // G].
- ZeroPoints (optional, asymmetric checkpoints such as AutoAWQ's): int8 with the Scales' shape, in the codes'
  signed range ([-8, 7] for bits=4); dequant(q, s, z)[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G], the
  difference exact in float32 before the product. An unsigned code u in [0, 2^bits) with unsigned zero point u_z
  (AutoAWQ: w = (u - u_z) * s) is stored as q = u - 2^(bits-1), z = u_z - 2^(bits-1): the same nibbles with the
  top bit flipped, and q - z = u - u_z. Absent = symmetric (z = 0), what glmc's own quantizers write.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch
from onnx import TensorProto
from onnx.defs import OpSchema

from glmc.modeling_patches.ops.onnx_defs import (
    FLOAT_TYPES,
    MS_DOMAIN,
    Builder,
    infer_linear,
    int4_tensor,
    register,
)


class _DequantizeAttrs(TypedDict, total=False):
    """DequantizeLinear's attributes: per-axis (axis) or blocked (axis and block_size)."""

    axis: int
    block_size: int


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


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, k: int,
                      zero_points: torch.Tensor | None = None) -> torch.Tensor:
    """QWeight + Scales (+ ZeroPoints) -> float weight [N, K] in the scales' dtype."""
    q = unpack_int4(qweight, k) if bits == 4 else qweight
    if zero_points is None:
        s = scales.reshape(-1, 1) if group_size == 0 else scales.repeat_interleave(group_size, dim=1)[:, :k]
        return q.to(scales.dtype) * s
    s, z = ((t.reshape(-1, 1) if group_size == 0 else t.repeat_interleave(group_size, dim=1)[:, :k])
            for t in (scales, zero_points))
    return ((q.float() - z.float()) * s.float()).to(scales.dtype)  # q - z exact; one rounding, as q * s


@torch.library.custom_op("glmc::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     bits: int, group_size: int, in_features: int, zero_points: torch.Tensor | None = None
                     ) -> torch.Tensor:
    w = dequantize_weight(qweight, scales, bits, group_size, in_features, zero_points).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@quantized_linear.register_fake
def _(x, qweight, scales, bias, bits, group_size, in_features, zero_points=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


# ---------------------------------------------------------------------------------------------- ONNX schema

SCHEMA = register(
    "QuantizedLinear", "Y = X @ dequant(QWeight, Scales[, ZeroPoints])^T + Bias (weight-only int8/int4, symmetric "
                       "unless ZeroPoints is given; see docs/ops.md).",
    inputs=[("X", "T", False), ("QWeight", "TQ", False), ("Scales", "T", False), ("Bias", "T", True),
            ("ZeroPoints", "TZ", True)],
    outputs=[("Y", "T")],
    types=[("T", FLOAT_TYPES), ("TQ", ["tensor(int8)", "tensor(uint8)"]), ("TZ", ["tensor(int8)"])],
    attributes=[("bits", OpSchema.AttrType.INT, None), ("group_size", OpSchema.AttrType.INT, 0),
                ("in_features", OpSchema.AttrType.INT, None)],
    infer=infer_linear)


def onnx_translation(x, qweight, scales, bias=None, bits: int = 8, group_size: int = 0, in_features: int = 0,
                     zero_points=None):
    """torch.ops.glmc.quantized_linear -> glmc::QuantizedLinear (for torch.onnx.export's custom_translation_table)."""
    from glmc.modeling_patches.ops.onnx_defs import onnxscript_opset
    op = onnxscript_opset()
    inputs = (x, qweight, scales) if bias is None and zero_points is None else (x, qweight, scales, bias)
    if zero_points is not None:
        inputs = (*inputs, zero_points)
    return op.QuantizedLinear(*inputs, bits=bits, group_size=group_size, in_features=in_features)


# ---------------------------------------------------------------------------------------------- lowerings

def _weight(b: Builder) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """(stored weight as uint8 bytes: int8 codes [N, K] or packed int4 [N, ceil(K/2)], scales, bits, group, K).
    The lowerings move these bytes and nibbles as bits (no unpacking to int8: 6B-model weights stay fast)."""
    bits, group, k = b.attr("bits"), b.attr("group_size", 0), b.attr("in_features")
    return b.array(b.input(1)).view(np.uint8), b.array(b.input(2)), bits, group, k


def _zero_points(b: Builder) -> np.ndarray | None:
    """The int8 zero points ([N] or [N, groups], signed like the codes), or None for a symmetric layer."""
    return b.array(b.input(4)).astype(np.int8) if b.input(4) else None


def int4_transposed(packed: np.ndarray, k: int) -> TensorProto:
    """glmc int4 [N, ceil(K/2)] (pairs along K) -> ONNX INT4 tensor [K, N] (pairs along N, low nibble first)."""
    n = packed.shape[0]
    if n % 2:  # pairs of an odd N straddle rows in the flattened order: take the plain path
        q = unpack_int4(torch.from_numpy(packed.copy()), k).numpy()
        return int4_tensor(np.ascontiguousarray(q.T))
    p0, p1 = packed[0::2], packed[1::2]  # rows 2j and 2j+1 share the bytes of the [K, N] tensor
    even, odd = (p0 & 0x0F) | (p1 << 4), (p0 >> 4) | (p1 & 0xF0)  # the bytes of k = 2c and of k = 2c + 1
    out = np.empty((2 * packed.shape[1], n // 2), np.uint8)
    for r in range(0, n // 2, 512):  # transpose in column tiles: far faster than one strided copy
        out[0::2, r:r + 512], out[1::2, r:r + 512] = even[r:r + 512].T, odd[r:r + 512].T
    t = TensorProto(data_type=TensorProto.INT4, dims=[k, n])
    t.raw_data = out[:k].tobytes()
    return t


def _add_bias(b: Builder, y: str, out: str) -> None:
    if b.input(3):
        b.op("Add", y, b.input(3), outputs=[out])
    else:
        b.op("Identity", y, outputs=[out])


def lower_dequantize_matmul(node, b: Builder, zero_point_input: bool = True) -> None:
    """reference: DequantizeLinear of a [K, N] weight (int8 per-axis or blocked; INT4 likewise; the zero points,
    when the layer has them, as its x_zero_point of the same type and shape as the scale) + MatMul.
    (ONNX Runtime 1.31's QDQ fusion of this pattern into MatMulNBits computes wrong results for signed weights:
    run the reference with disabled_optimizers=["QDQSelectorActionTransformer"]; see docs/onnx.md.)"""
    w, scales, bits, group, k = _weight(b)
    z = _zero_points(b)
    # [K, N]: MatMul(X, W) needs no Transpose node
    wq = b.const(int4_transposed(w, k) if bits == 4 else np.ascontiguousarray(w.view(np.int8).T), "qweight")
    s = scales.reshape(-1) if group == 0 else np.ascontiguousarray(scales.T)  # [N] or [groups, N]
    kw: _DequantizeAttrs = {"axis": 1} if group == 0 else {"axis": 0, "block_size": group}
    zero: list[str] = []
    if z is not None and zero_point_input:
        zt = z.reshape(-1) if group == 0 else np.ascontiguousarray(z.T)
        zero = [b.const(int4_tensor(zt) if bits == 4 else zt, "zero_point")]
    w = b.op("DequantizeLinear", wq, b.const(s, "scale"), *zero, **kw)
    y = b.op("MatMul", b.input(0), w)
    if z is not None and not zero_point_input:
        y = b.op("Sub", y, _zero_point_term(b, scales, z, group, k))
    _add_bias(b, y, node.output[0])


def _zero_point_term(b: Builder, scales: np.ndarray, z: np.ndarray, group: int, k: int) -> str:
    """X @ (z * s expanded over each group)^T, computed small: (X @ G) @ (z * s)^T, G [K, groups] the 0/1 matrix
    that sums X over each group (one group for per-channel scales). Subtracted from X @ (q * s)^T it gives
    X @ ((q - z) * s)^T, the same product up to float rounding."""
    n = z.shape[0]
    groups = z.shape[1] if group else 1
    ind = (np.arange(k)[:, None] // (group or k) == np.arange(groups)[None, :]).astype(scales.dtype)
    zs = z.reshape(n, groups).astype(np.float32) * scales.reshape(n, groups).astype(np.float32)
    xg = b.op("MatMul", b.input(0), b.const(ind, "group_sum"))
    return b.op("MatMul", xg, b.const(np.ascontiguousarray(zs.T).astype(scales.dtype), "zero_times_scale"))


def lower_dequantize_matmul_symmetric(node, b: Builder) -> None:
    """tensorrt: lower_dequantize_matmul with a zero-point-free DequantizeLinear (TensorRT's IDequantizeLayer takes
    only all-zero zero points): a layer with zero points subtracts X @ (z * s)^T as two small MatMuls instead
    (_zero_point_term)."""
    lower_dequantize_matmul(node, b, zero_point_input=False)


def matmul_nbits_block(k: int, group: int) -> int:
    """MatMulNBits block size: the group, or for per-channel scales a power of two (all blocks share the row scale)."""
    if group:
        return group
    return 32 if k <= 32 else (64 if k <= 64 else 128)


def matmul_nbits_supported(node, b: Builder) -> bool:
    group = b.attr("group_size", 0)
    return group == 0 or (group >= 16 and group & (group - 1) == 0)


def lower_matmul_nbits(node, b: Builder) -> None:
    """onnxruntime: com.microsoft.MatMulNBits (8 or 4 bit). Its codes are unsigned with the default zero point
    2^(bits-1): u = q + 2^(bits-1), which for two's complement is q with its top bit flipped (XOR 0x80 per int8,
    0x88 per byte of two nibbles); same low-nibble-first order; K padded to whole blocks with u = zero point (an odd
    K's padding nibble, 0, flips to 8 as well). Zero points, when the layer has them, flip the same way (u_z = z +
    2^(bits-1)) and go in as MatMulNBits' uint8 zero_points (input 3), one per block, [N, ceil(blocks * bits / 8)]
    packed low nibble first for 4 bits (per-channel ones repeated over the blocks). Option `accuracy_level`
    (default 0: float compute, exact): 4 lets the CPU kernels quantize activations to int8 per block (fast;
    docs/onnx.md has what it costs in accuracy)."""
    if not matmul_nbits_supported(node, b):
        return lower_dequantize_matmul(node, b)
    w, scales, bits, group, k = _weight(b)
    n = w.shape[0]
    block = matmul_nbits_block(k, group)
    blocks = -(-k // block)
    flip = 0x80 if bits == 8 else 0x88
    packed = np.full((n, blocks * block * bits // 8), flip, np.uint8)
    packed[:, :w.shape[1]] = w ^ flip
    s = np.repeat(scales.reshape(n, 1), blocks, axis=1) if group == 0 else scales.reshape(n, blocks)
    zero: list[str] = []
    z = _zero_points(b)
    if z is not None:
        zu = (np.repeat(z.reshape(n, 1), blocks, axis=1) if group == 0 else z.reshape(n, blocks)).view(np.uint8)
        zu = zu ^ np.uint8(0x80 if bits == 8 else 0x88)  # (z + 2^(bits-1)); for 4 bits the high nibble is dropped
        if bits == 4:
            zu = np.pad(zu & 0x0F, ((0, 0), (0, blocks % 2)))
            zu = (zu[:, 0::2] | (zu[:, 1::2] << 4)).astype(np.uint8)
        zero = [b.const(np.ascontiguousarray(zu).reshape(-1), "zero_points")]
    y = b.op("MatMulNBits", b.input(0), b.const(packed.reshape(n, blocks, -1), "qweight"),
             b.const(s.reshape(-1), "scales"), *zero,
             domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block,
             accuracy_level=int(b.view.options.get("accuracy_level", 0)))
    _add_bias(b, y, node.output[0])
