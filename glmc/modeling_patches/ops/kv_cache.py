"""glmc::KVCacheQuantize / glmc::KVCacheDequantize: symmetric int8 KV cache.

x: [B, H, T, D]. Scale (float, the model dtype): [1] per tensor, [H] per KV head, or [H, D] per KV head and
channel. Quantize: q = clamp(round_half_even(float32(x) / float32(scale)), -127, 127) as int8.
Dequantize: x = float32(q) * float32(scale), cast to the scale's dtype.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch
from onnx import TensorProto, helper

from glmc.modeling_patches.ops.onnx_defs import (
    FLOAT_TYPES,
    Builder,
    input_dims,
    input_elem_type,
    onnxscript_opset,
    register,
    set_output,
)


class _QdqAttrs(TypedDict, total=False):
    """QuantizeLinear/DequantizeLinear's attributes: none per tensor, the axis per KV head."""

    axis: int


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


# ---------------------------------------------------------------------------------------------- ONNX schema

def _infer_quantize(ctx) -> None:
    set_output(ctx, 0, TensorProto.INT8, input_dims(ctx, 0))


def _infer_dequantize(ctx) -> None:
    set_output(ctx, 0, input_elem_type(ctx, 1), input_dims(ctx, 0))


_SCALE_DOC = " Scale: [1] per tensor, [H] per KV head, [H, D] per KV head and channel (x is [B, H, T, D])."
QUANTIZE_SCHEMA = register(
    "KVCacheQuantize", "q = int8(clamp(round_half_even(float32(x) / float32(scale)), -127, 127))." + _SCALE_DOC,
    inputs=[("X", "T", False), ("Scale", "T", False)], outputs=[("Q", "TQ")],
    types=[("T", FLOAT_TYPES), ("TQ", ["tensor(int8)"])], attributes=[], infer=_infer_quantize)
DEQUANTIZE_SCHEMA = register(
    "KVCacheDequantize", "x = cast_to_scale_dtype(float32(q) * float32(scale))." + _SCALE_DOC,
    inputs=[("Q", "TQ", False), ("Scale", "T", False)], outputs=[("X", "T")],
    types=[("T", FLOAT_TYPES), ("TQ", ["tensor(int8)"])], attributes=[], infer=_infer_dequantize)


def quantize_translation(x, scale):
    """torch.ops.glmc.kv_cache_quantize -> glmc::KVCacheQuantize."""
    return onnxscript_opset().KVCacheQuantize(x, scale)


def dequantize_translation(q, scale):
    """torch.ops.glmc.kv_cache_dequantize -> glmc::KVCacheDequantize."""
    return onnxscript_opset().KVCacheDequantize(q, scale)


# ---------------------------------------------------------------------------------------------- lowerings

def _scale(b: Builder) -> tuple[np.ndarray, int]:
    """The scale as float32 shaped to broadcast against [B, H, T, D], and its dtype as an ONNX type."""
    s = b.array(b.input(1))
    shape = (1, 1, 1, 1) if s.size == 1 else ((1, s.size, 1, 1) if s.ndim == 1 else (1, s.shape[0], 1, s.shape[1]))
    return s.astype(np.float32).reshape(shape), helper.np_dtype_to_tensor_dtype(s.dtype)


def lower_quantize_plain(node, b: Builder) -> None:
    """reference: Cast -> Div -> Round (half to even) -> Clip(-127, 127) -> Cast(int8): exactly the op."""
    s, _ = _scale(b)
    x = b.op("Cast", b.input(0), to=TensorProto.FLOAT)
    r = b.op("Round", b.op("Div", x, b.const(s, "scale")))
    c = b.op("Clip", r, b.const(np.array(-127, np.float32), "lo"), b.const(np.array(127, np.float32), "hi"))
    b.op("Cast", c, to=TensorProto.INT8, outputs=[node.output[0]])


def lower_dequantize_plain(node, b: Builder) -> None:
    """reference: Cast(float32) -> Mul(scale) -> Cast(scale dtype): exactly the op."""
    s, dtype = _scale(b)
    y = b.op("Mul", b.op("Cast", b.input(0), to=TensorProto.FLOAT), b.const(s, "scale"))
    b.op("Cast", y, to=dtype, outputs=[node.output[0]])


def _qdq_axis(b: Builder) -> int | None:
    """QuantizeLinear/DequantizeLinear axis for the scale's granularity: None = per tensor, 1 = per KV head,
    -1 = per head and channel (not expressible as one Q/DQ)."""
    s = b.array(b.input(1))
    return None if s.size == 1 else (1 if s.ndim == 1 else -1)


def lower_quantize_qdq(node, b: Builder) -> None:
    """tensorrt: native QuantizeLinear (per tensor or per KV head). Q/DQ saturates to -128 where the op clamps to
    -127: they differ only for x / scale < -127.5, which calibrated scales rule out."""
    axis = _qdq_axis(b)
    if axis == -1:
        return lower_quantize_plain(node, b)
    s = b.array(b.input(1)).reshape(-1)
    zero = b.const(np.zeros(s.shape, np.int8), "zero")
    kw: _QdqAttrs = {} if axis is None else {"axis": axis}
    b.op("QuantizeLinear", b.input(0), b.const(s.reshape(()) if axis is None else s, "scale"), zero,
         outputs=[node.output[0]], **kw)


def lower_dequantize_qdq(node, b: Builder) -> None:
    """tensorrt: native DequantizeLinear (per tensor or per KV head; output in the scale's dtype)."""
    axis = _qdq_axis(b)
    if axis == -1:
        return lower_dequantize_plain(node, b)
    s = b.array(b.input(1)).reshape(-1)
    zero = b.const(np.zeros(s.shape, np.int8), "zero")
    kw: _QdqAttrs = {} if axis is None else {"axis": axis}
    b.op("DequantizeLinear", b.input(0), b.const(s.reshape(()) if axis is None else s, "scale"), zero,
         outputs=[node.output[0]], **kw)
