"""glmc::Fp8Linear: Y = DQ(Q(X, InputScale)) @ DQ(QWeight, WeightScale)^T + Bias, FP8 (e4m3) weights and activations.

Layout (the same in torch, checkpoints and every lowering; what a GEMV/GEMM kernel reads):
- QWeight: float8_e4m3fn [N, K], row-major (ONNX FLOAT8E4M3FN, the OCP "E4M3FN" format: bias 7, no infinities,
  largest finite 448, smallest subnormal 2^-9, S.1111.111 = NaN).
- WeightScale: X's dtype, [N] (one per output row: absmax(row) / 448) or [1] (per tensor).
- InputScale: X's dtype, [1]: one static scale for the activations (absmax over the calibration text / 448).
- Bias: optional, X's dtype, [N].

Semantics, elementwise e4m3(v) = v clamped to [-448, 448] (NaN stays NaN) then rounded to the nearest e4m3 value,
ties to even (subnormals included): ONNX QuantizeLinear with a FLOAT8E4M3FN zero point and saturate=1, and
torch's `.to(torch.float8_e4m3fn)` after the clamp.
  Xq = e4m3(X / InputScale), the division in X's dtype (as ONNX Runtime's QuantizeLinear computes it: for fp16 X,
       float32 division would round differently in about 0.5% of elements, by one e4m3 step)
  Xd = cast_to_X_dtype(float32(Xq) * float32(InputScale))           (DequantizeLinear of Xq)
  Wd = cast_to_X_dtype(float32(QWeight) * float32(WeightScale)[:, None])   (DequantizeLinear of QWeight)
  Y  = Xd @ Wd^T (+ Bias), a matrix product in X's dtype
The CPU reference dequantizes (above); TensorRT fuses the pattern into an FP8 x FP8 GEMM with float32 accumulation
(Ada sm89, Hopper, Blackwell sm120: TensorRT for RTX refuses sm80/sm86, "HW-specific datatypes: fp8_e4m3"), which
differs from the reference by summation order and rounding only (it also multiplies X by 1 / InputScale).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from glmc.modeling_patches.ops.onnx_defs import (
    FLOAT_TYPES,
    Builder,
    infer_linear,
    register,
)

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
FP8_TYPES = ["tensor(float8e4m3fn)"]


def to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """e4m3(v): saturating (to +-448; NaN stays NaN), round to nearest even (subnormals included), float8_e4m3fn."""
    return v.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(float32(x) / float32(scale)); `scale` broadcasts against x."""
    return to_e4m3(x.float() / scale.float())


def dequantize_e4m3(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cast_to_dtype(float32(q) * float32(scale)) (`scale` broadcasts against q)."""
    return (q.float() * scale.float()).to(dtype)


def dequantize_weight(qweight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """QWeight [N, K] + WeightScale [N] or [1] -> the float weight [N, K] in `dtype`."""
    return dequantize_e4m3(qweight, weight_scale.reshape(-1, 1), dtype)


@torch.library.custom_op("glmc::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    xd = dequantize_e4m3(to_e4m3(x / input_scale.to(x.dtype)), input_scale, x.dtype)
    # (qweight may also arrive upcast, e.g. by Module.float(): its values are still exactly the e4m3 codes)
    return torch.nn.functional.linear(xd, dequantize_weight(qweight, weight_scale, x.dtype), bias)


@fp8_linear.register_fake
def _(x, qweight, weight_scale, input_scale, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


# ---------------------------------------------------------------------------------------------- ONNX schema

SCHEMA = register(
    "Fp8Linear", "Y = DQ(Q(X, InputScale)) @ DQ(QWeight, WeightScale)^T + Bias: FP8 e4m3 weights [N, K] with a "
                 "per-row (or per-tensor) scale and activations with one static scale, saturating, round to "
                 "nearest even (see docs/ops.md).",
    inputs=[("X", "T", False), ("QWeight", "TQ", False), ("WeightScale", "T", False), ("InputScale", "T", False),
            ("Bias", "T", True)],
    outputs=[("Y", "T")],
    types=[("T", FLOAT_TYPES), ("TQ", FP8_TYPES)], attributes=[], infer=infer_linear)


def onnx_translation(x, qweight, weight_scale, input_scale, bias=None):
    """torch.ops.glmc.fp8_linear -> glmc::Fp8Linear (for torch.onnx.export's custom_translation_table)."""
    from glmc.modeling_patches.ops.onnx_defs import onnxscript_opset
    op = onnxscript_opset()
    inputs = (x, qweight, weight_scale, input_scale) if bias is None else (x, qweight, weight_scale, input_scale, bias)
    return op.Fp8Linear(*inputs)


# ---------------------------------------------------------------------------------------------- lowerings

def fp8_tensor(codes: np.ndarray) -> TensorProto:
    """An ONNX FLOAT8E4M3FN tensor from e4m3 bytes (uint8, any shape; row-major)."""
    t = TensorProto(data_type=TensorProto.FLOAT8E4M3FN, dims=list(codes.shape))
    t.raw_data = np.ascontiguousarray(codes, dtype=np.uint8).tobytes()
    return t


def fp8_zero(shape: tuple[int, ...]) -> TensorProto:
    """A FLOAT8E4M3FN zero point of `shape` (it selects QuantizeLinear's output type; e4m3 +0 is byte 0)."""
    return fp8_tensor(np.zeros(shape, np.uint8))


def _parts(node, b: Builder) -> tuple[np.ndarray, np.ndarray, str]:
    """(e4m3 bytes [N, K], WeightScale flattened, Xd: the activations through float8 QuantizeLinear(InputScale,
    FLOAT8E4M3FN zero, saturate=1) -> DequantizeLinear)."""
    w = b.array(b.input(1)).view(np.uint8)
    sw, sx = b.array(b.input(2)).reshape(-1), b.array(b.input(3)).reshape(())
    n = w.shape[0]
    if sw.size not in (1, n):
        raise ValueError(f"node '{node.name}' (Fp8Linear): WeightScale has {sw.size} values; expected [N] = [{n}] "
                         "or [1]")
    zx, scale = b.const(fp8_zero(()), "input_zero"), b.const(sx, "input_scale")
    return w, sw, b.op("DequantizeLinear", b.op("QuantizeLinear", b.input(0), scale, zx, saturate=1), scale, zx)


def _matmul_bias(node, b: Builder, xd: str, wd: str) -> None:
    y = b.op("MatMul", xd, wd)
    if b.input(4):
        b.op("Add", y, b.input(4), outputs=[node.output[0]])
    else:
        b.op("Identity", y, outputs=[node.output[0]])


def lower_qdq_matmul(node, b: Builder) -> None:
    """reference / tensorrt: the activations' float8 Q/DQ, DequantizeLinear of the weight stored transposed [K, N]
    in FLOAT8E4M3FN (axis 1 for per-row scales, per tensor for [1]) -> MatMul (+ Add bias): exactly the op, the
    weights kept as e4m3 bytes. TensorRT (sm89/sm120) turns it into an FP8 GEMM."""
    w, sw, xd = _parts(node, b)
    n = w.shape[0]
    wq = b.const(fp8_tensor(np.ascontiguousarray(w.T)), "qweight")  # [K, N]: MatMul(X, W) needs no Transpose
    if sw.size == 1:
        wd = b.op("DequantizeLinear", wq, b.const(sw.reshape(()), "weight_scale"), b.const(fp8_zero(()), "zero"))
    else:
        wd = b.op("DequantizeLinear", wq, b.const(sw, "weight_scale"), b.const(fp8_zero((n,)), "zero"), axis=1)
    _matmul_bias(node, b, xd, wd)


def lower_qdq_dequantized_weight(node, b: Builder) -> None:
    """onnxruntime: the activations' float8 Q/DQ as above, and the weight dequantized here, once, into a [K, N]
    initializer of X's dtype: Wd = cast_T(float32(QWeight) * float32(WeightScale)), the op's own values (so still
    exactly the op). ONNX Runtime 1.32 runs float8 DequantizeLinear on CPU but has no float8 GEMM there and does not
    constant-fold it: a float8 weight is dequantized again on every run (glmc-tiny v2 fp32, 1 thread: decode 48
    tok/s against 570 for the fp32 build), so this target trades the 1-byte weights for the float build's speed."""
    import ml_dtypes

    w, sw, xd = _parts(node, b)
    codes = np.ascontiguousarray(w.T).view(ml_dtypes.float8_e4m3fn).astype(np.float32)  # [K, N], exact
    wd = (codes * sw.astype(np.float32).reshape(1, -1)).astype(sw.dtype)  # one float32 product, rounded once
    _matmul_bias(node, b, xd, b.const(wd, "weight"))
