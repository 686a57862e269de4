"""glmc::KVCacheQuantize / glmc::KVCacheDequantize: symmetric int8 or fp8 (e4m3) KV cache.

x: [B, H, T, D]. Scale (float, the model dtype): [1] per tensor, [H] per KV head, or [H, D] per KV head and
channel. The cache's element type is the quantize op's `dtype` argument (ONNX attribute), int8 by default:
- int8: q = clamp(round_half_even(float32(x) / float32(scale)), -127, 127) as int8.
- float8e4m3fn: q = e4m3(float32(x) / float32(scale)): saturated to +-448, round to nearest even, float8_e4m3fn
  (ops/fp8_linear.quantize_e4m3; ONNX QuantizeLinear with a FLOAT8E4M3FN zero point, saturate=1).
Dequantize (either type, read from q): x = float32(q) * float32(scale), cast to the scale's dtype.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from glmc.modeling_patches.ops.fp8_linear import fp8_zero, quantize_e4m3
from glmc.modeling_patches.ops.onnx_defs import (
    FLOAT_TYPES,
    Builder,
    attribute,
    input_dims,
    input_elem_type,
    onnxscript_opset,
    register,
    set_output,
)

# The cache element types (the quantize op's `dtype`, named as ONNX names them) -> torch and ONNX types.
KV_DTYPES = {"int8": torch.int8, "float8e4m3fn": torch.float8_e4m3fn}
ONNX_KV_TYPES = {"int8": TensorProto.INT8, "float8e4m3fn": TensorProto.FLOAT8E4M3FN}


class _QdqAttrs(TypedDict, total=False):
    """QuantizeLinear/DequantizeLinear's attributes: none per tensor, the axis per KV head (saturate: fp8)."""

    axis: int
    saturate: int


def _broadcast(scale: torch.Tensor) -> torch.Tensor:
    s = scale.float()
    if s.dim() == 2:  # [H, D]
        return s[None, :, None, :]
    if s.numel() == 1:
        return s.reshape(1, 1, 1, 1)
    return s.reshape(1, -1, 1, 1)  # [H]


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in KV_DTYPES:
        raise ValueError(f"glmc::kv_cache_quantize: dtype '{dtype}' is not one of {', '.join(KV_DTYPES)}")
    return KV_DTYPES[dtype]


@torch.library.custom_op("glmc::kv_cache_quantize", mutates_args=())
def kv_cache_quantize(x: torch.Tensor, scale: torch.Tensor, dtype: str = "int8") -> torch.Tensor:
    if _check_dtype(dtype) == torch.float8_e4m3fn:
        return quantize_e4m3(x, _broadcast(scale))
    return torch.clamp(torch.round(x.float() / _broadcast(scale)), -127, 127).to(torch.int8)


@kv_cache_quantize.register_fake
def _(x, scale, dtype="int8"):
    return torch.empty_like(x, dtype=_check_dtype(dtype))


@torch.library.custom_op("glmc::kv_cache_dequantize", mutates_args=())
def kv_cache_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float() * _broadcast(scale)).to(scale.dtype)


@kv_cache_dequantize.register_fake
def _(q, scale):
    return torch.empty_like(q, dtype=scale.dtype)


# ---------------------------------------------------------------------------------------------- ONNX schema

def _dtype_attribute(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # ONNX STRING attributes read back as bytes


def _infer_quantize(ctx) -> None:
    set_output(ctx, 0, ONNX_KV_TYPES[_dtype_attribute(attribute(ctx, "dtype", "int8"))], input_dims(ctx, 0))


def _infer_dequantize(ctx) -> None:
    set_output(ctx, 0, input_elem_type(ctx, 1), input_dims(ctx, 0))


_SCALE_DOC = " Scale: [1] per tensor, [H] per KV head, [H, D] per KV head and channel (x is [B, H, T, D])."
_KV_TYPES = ["tensor(int8)", "tensor(float8e4m3fn)"]
QUANTIZE_SCHEMA = register(
    "KVCacheQuantize", "dtype int8 (default): q = int8(clamp(round_half_even(float32(x) / float32(scale)), -127, "
                       "127)); dtype float8e4m3fn: q = float8e4m3fn(saturate(float32(x) / float32(scale))), round to "
                       "nearest even." + _SCALE_DOC,
    inputs=[("X", "T", False), ("Scale", "T", False)], outputs=[("Q", "TQ")],
    types=[("T", FLOAT_TYPES), ("TQ", _KV_TYPES)], attributes=[("dtype", OpSchema.AttrType.STRING, "int8")],
    infer=_infer_quantize)
DEQUANTIZE_SCHEMA = register(
    "KVCacheDequantize", "x = cast_to_scale_dtype(float32(q) * float32(scale))." + _SCALE_DOC,
    inputs=[("Q", "TQ", False), ("Scale", "T", False)], outputs=[("X", "T")],
    types=[("T", FLOAT_TYPES), ("TQ", _KV_TYPES)], attributes=[], infer=_infer_dequantize)


def quantize_translation(x, scale, dtype: str = "int8"):
    """torch.ops.glmc.kv_cache_quantize -> glmc::KVCacheQuantize (with its dtype attribute, int8 included)."""
    return onnxscript_opset().KVCacheQuantize(x, scale, dtype=dtype)


def dequantize_translation(q, scale):
    """torch.ops.glmc.kv_cache_dequantize -> glmc::KVCacheDequantize."""
    return onnxscript_opset().KVCacheDequantize(q, scale)


# ---------------------------------------------------------------------------------------------- lowerings

def _scale(b: Builder) -> tuple[np.ndarray, int]:
    """The scale as float32 shaped to broadcast against [B, H, T, D], and its dtype as an ONNX type."""
    s = b.array(b.input(1))
    shape = (1, 1, 1, 1) if s.size == 1 else ((1, s.size, 1, 1) if s.ndim == 1 else (1, s.shape[0], 1, s.shape[1]))
    return s.astype(np.float32).reshape(shape), helper.np_dtype_to_tensor_dtype(s.dtype)


def _is_fp8(b: Builder) -> bool:
    """Whether this quantize (its dtype attribute) or dequantize (its input's type) node is the fp8 cache."""
    if b.node.op_type == "KVCacheQuantize":
        return _dtype_attribute(b.attr("dtype", "int8")) == "float8e4m3fn"
    return b.view.elem_type(b.input(0)) == TensorProto.FLOAT8E4M3FN


def _unit(b: Builder) -> tuple[str, str]:
    """A float32 scale 1 and a FLOAT8E4M3FN zero point: QuantizeLinear / DequantizeLinear as a saturating,
    round-to-nearest-even cast between float32 and e4m3 (ONNX Runtime and TensorRT both take them)."""
    return b.const(np.array(1.0, np.float32), "one"), b.const(fp8_zero(()), "fp8_zero")


def lower_quantize_plain(node, b: Builder) -> None:
    """reference: Cast -> Div -> Round (half to even) -> Clip(-127, 127) -> Cast(int8): exactly the op. fp8: Cast ->
    Div -> QuantizeLinear(scale 1, FLOAT8E4M3FN zero, saturate=1): exactly the op."""
    s, _ = _scale(b)
    x = b.op("Cast", b.input(0), to=TensorProto.FLOAT)
    if _is_fp8(b):
        one, zero = _unit(b)
        b.op("QuantizeLinear", b.op("Div", x, b.const(s, "scale")), one, zero, saturate=1, outputs=[node.output[0]])
        return
    r = b.op("Round", b.op("Div", x, b.const(s, "scale")))
    c = b.op("Clip", r, b.const(np.array(-127, np.float32), "lo"), b.const(np.array(127, np.float32), "hi"))
    b.op("Cast", c, to=TensorProto.INT8, outputs=[node.output[0]])


def lower_dequantize_plain(node, b: Builder) -> None:
    """reference: Cast(float32) -> Mul(scale) -> Cast(scale dtype): exactly the op (fp8: DequantizeLinear with scale
    1 in place of the first Cast, exact)."""
    s, dtype = _scale(b)
    x = b.op("DequantizeLinear", b.input(0), *_unit(b)) if _is_fp8(b) else b.op("Cast", b.input(0),
                                                                                    to=TensorProto.FLOAT)
    y = b.op("Mul", x, b.const(s, "scale"))
    b.op("Cast", y, to=dtype, outputs=[node.output[0]])


def _qdq_axis(b: Builder) -> int | None:
    """QuantizeLinear/DequantizeLinear axis for the scale's granularity: None = per tensor, 1 = per KV head,
    -1 = per head and channel (not expressible as one Q/DQ)."""
    s = b.array(b.input(1))
    return None if s.size == 1 else (1 if s.ndim == 1 else -1)


def _zero(b: Builder, s: np.ndarray, axis: int | None) -> str:
    """The zero point that sets Q/DQ's integer type: int8, or FLOAT8E4M3FN for the fp8 cache (scalar per tensor)."""
    if _is_fp8(b):
        return b.const(fp8_zero(() if axis is None else s.shape), "zero")
    return b.const(np.zeros(s.shape, np.int8), "zero")


def lower_quantize_qdq(node, b: Builder) -> None:
    """tensorrt: native QuantizeLinear (per tensor or per KV head). Q/DQ saturates to -128 where the op clamps to
    -127: they differ only for x / scale < -127.5, which calibrated scales rule out. fp8: a FLOAT8E4M3FN zero point
    and saturate=1, exactly the op."""
    axis = _qdq_axis(b)
    if axis == -1:
        return lower_quantize_plain(node, b)
    s = b.array(b.input(1)).reshape(-1)
    zero = _zero(b, s, axis)
    kw: _QdqAttrs = {} if axis is None else {"axis": axis}
    if _is_fp8(b):
        kw["saturate"] = 1
    b.op("QuantizeLinear", b.input(0), b.const(s.reshape(()) if axis is None else s, "scale"), zero,
         outputs=[node.output[0]], **kw)


def lower_dequantize_qdq(node, b: Builder) -> None:
    """tensorrt: native DequantizeLinear (per tensor or per KV head; output in the scale's dtype)."""
    axis = _qdq_axis(b)
    if axis == -1:
        return lower_dequantize_plain(node, b)
    s = b.array(b.input(1)).reshape(-1)
    zero = _zero(b, s, axis)
    kw: _QdqAttrs = {} if axis is None else {"axis": axis}
    b.op("DequantizeLinear", b.input(0), b.const(s.reshape(()) if axis is None else s, "scale"), zero,
         outputs=[node.output[0]], **kw)
