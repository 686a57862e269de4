"""glmc::W8A8Linear: SmoothQuant linear, int8 weights per output channel and int8 activations per token.

Semantics (every lowering computes exactly this; all float math in float32):
- X [..., K] (T = float32 / float16 / bfloat16), QWeight int8 [N, K], WScales [N] (T), InvSmooth [K] (T, optional:
  absent = all ones; where SmoothQuant could fold it into the previous RMSNorm weight the stored vector is all ones
  and the lowerings drop its Mul), Bias [N] (T, optional).
- X' = float32(X) * float32(InvSmooth)                                      (per input channel)
- sx = max(max_k |X'[..., k]|, 1e-30) / 127                                  [..., 1], one scale per token (row)
- q = clamp(round_half_even(X' / sx), -127, 127)                             int8 codes (|X'/sx| <= 127 up to one
  float32 rounding, so the clamp, and the -128 of a saturating int8 cast, are never reached)
- acc = q @ QWeight^T                                                        exact, int32
- Y = cast_to_T(float32(acc) * (sx * float32(WScales)) + float32(Bias))

Targets may re-associate the two float32 scale products (acc * sw * sx): one float32 rounding (2^-24 relative), no
change to any code. The weight is the smoothed one (W * diag(1 / InvSmooth), quantized per row: sw = max|row| / 127,
glmc.quantization.smoothquant), so Y approximates X @ W^T + Bias.

Lowerings (docs/ops.md, docs/quantization.md):
- reference: standard ONNX, the integer GEMM as MatMulInteger with uint8 activations u = q + 128 (QuantizeLinear of
  X'/sx with scale 1 and zero point 128; same codes) against the int8 weight with a_zero_point 128: ONNX Runtime
  1.32's CPU MatMulInteger has a fast kernel for uint8 x int8 only (int8 x int8 runs a generic loop, ~100x slower:
  53 ms vs 0.56 ms for one 4096x4096 decode GEMM, measured here).
- onnxruntime: the same codes into com.microsoft.MatMulIntegerToFloat (uint8 x int8 -> float, the weight scales
  applied in the kernel), then * sx.
- tensorrt: TensorRT takes only constant Q/DQ scales (a dynamic per-token scale as a blocked QuantizeLinear fails
  TensorRT for RTX 1.7's builder: "CHECK(is_constant()) failed"; a dynamic per-axis one builds but runs as float
  math). So the lowering divides by sx in float, QuantizeLinear / DequantizeLinear with the constant scale 1 (the
  codes themselves), MatMul against the per-channel DequantizeLinear weight, then * sx: TensorRT fuses the two Q/DQ
  pairs into an int8 x int8 GEMM (engine layer type `gemm`, Int8 inputs, measured on the TensorRT for RTX build).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper

from glmc.modeling_patches.ops.onnx_defs import (
    FLOAT_TYPES,
    MS_DOMAIN,
    Builder,
    infer_linear,
    onnxscript_opset,
    register,
)

QMAX = 127
EPS = 1e-30  # floor of a token's abs-max: an all-zero row gives q = 0 instead of 0 / 0


def quantize_tokens(x: torch.Tensor, inv_smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """X -> (q int8 [..., K], sx float32 [..., 1]): the op's per-token symmetric activation quantization."""
    xf = x.float()
    if inv_smooth is not None:
        xf = xf * inv_smooth.float()
    sx = xf.abs().amax(dim=-1, keepdim=True).clamp_min(EPS) / QMAX
    return (xf / sx).round().clamp(-QMAX, QMAX).to(torch.int8), sx


def int_matmul(q: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [N, K]^T -> int32 [M, N], exact (torch._int_mm where it takes the shapes, else float64,
    exact while K * 127^2 < 2^53)."""
    if q.device.type == "cpu" or (q.shape[0] > 16 and q.shape[1] % 8 == 0 and qweight.shape[0] % 8 == 0):
        return torch._int_mm(q, qweight.t())
    return (q.double() @ qweight.double().t()).to(torch.int32)


@torch.library.custom_op("glmc::w8a8_linear", mutates_args=())
def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, inv_smooth: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
    q, sx = quantize_tokens(x, inv_smooth)
    lead = x.shape[:-1]
    acc = int_matmul(q.reshape(-1, q.shape[-1]).contiguous(), qweight).reshape(*lead, qweight.shape[0])
    y = acc.float() * (sx * weight_scale.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@w8a8_linear.register_fake
def _(x, qweight, weight_scale, inv_smooth, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


# ---------------------------------------------------------------------------------------------- ONNX schema

SCHEMA = register(
    "W8A8Linear", "Y = (q(X * InvSmooth) @ QWeight^T) * (sx * WScales) + Bias: int8 weights per output channel, "
                  "int8 activations per token (sx = max|row| / 127, round half to even), float32 math; see "
                  "docs/ops.md.",
    inputs=[("X", "T", False), ("QWeight", "TQ", False), ("WScales", "T", False), ("InvSmooth", "T", True),
            ("Bias", "T", True)],
    outputs=[("Y", "T")],
    types=[("T", FLOAT_TYPES), ("TQ", ["tensor(int8)"])],
    attributes=[], infer=infer_linear)


def onnx_translation(x, qweight, weight_scale, inv_smooth=None, bias=None):
    """torch.ops.glmc.w8a8_linear -> glmc::W8A8Linear (for torch.onnx.export's custom_translation_table)."""
    return onnxscript_opset().W8A8Linear(x, qweight, weight_scale, inv_smooth, bias)


# ---------------------------------------------------------------------------------------------- lowerings

def _consts(b: Builder) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(int8 weight transposed to [K, N], float32 weight scales [N], float32 InvSmooth [K] or None when absent or
    all ones, the ONNX type of X and Y)."""
    w = b.array(b.input(1)).view(np.int8)
    sw = b.array(b.input(2))
    inv = b.array(b.input(3)).astype(np.float32) if b.input(3) else None
    if inv is not None and np.all(inv == 1.0):
        inv = None  # x * 1 == x: the Mul is exact to drop
    return np.ascontiguousarray(w.T), sw.astype(np.float32), inv, helper.np_dtype_to_tensor_dtype(sw.dtype)


def _scaled_tokens(b: Builder, inv: np.ndarray | None, dtype: int) -> tuple[str, str]:
    """X -> (X' / sx, sx [..., 1]) in float32: the op's per-token scale and the scaled row it quantizes."""
    x = b.input(0) if dtype == TensorProto.FLOAT else b.op("Cast", b.input(0), to=TensorProto.FLOAT)
    if inv is not None:
        x = b.op("Mul", x, b.const(inv, "inv_smooth"))
    amax = b.op("ReduceMax", b.op("Abs", x), b.const(np.array([-1], np.int64), "axes"), keepdims=1)
    sx = b.op("Div", b.op("Max", amax, b.const(np.array(EPS, np.float32), "eps")),
              b.const(np.array(QMAX, np.float32), "qmax"))
    return b.op("Div", x, sx), sx


def _finish(b: Builder, y: str, dtype: int, node) -> None:
    """+ Bias (float32), cast to X's type, under the node's output name."""
    if b.input(4):
        bias = b.array(b.input(4)).astype(np.float32)
        y = b.op("Add", y, b.const(bias, "bias"))
    if dtype == TensorProto.FLOAT:
        b.op("Identity", y, outputs=[node.output[0]])
    else:
        b.op("Cast", y, to=dtype, outputs=[node.output[0]])


def _uint8_codes(b: Builder, scaled: str) -> tuple[str, str]:
    """X' / sx -> (u = q + 128 as uint8, the zero point 128): QuantizeLinear with scale 1 rounds half to even and
    saturates to [0, 255], which the codes' range [1, 255] never reaches."""
    zero = b.const(np.array(128, np.uint8), "zero_point")
    return b.op("QuantizeLinear", scaled, b.const(np.array(1.0, np.float32), "one"), zero), zero


def lower_matmul_integer(node, b: Builder) -> None:
    """reference: standard ONNX, the op's math: Abs/ReduceMax/Max/Div (sx), Div + QuantizeLinear (u = q + 128),
    MatMulInteger(u, W^T [K, N], a_zero_point 128) -> int32, Cast, Mul(sx), Mul(sw), Add bias, Cast.

    (acc * sx) * sw, not acc * (sx * sw): ONNX Runtime 1.32's MatMulIntegerToFloatFusion rewrites MatMulInteger ->
    Cast -> Mul(a * b) -> Add(bias) into one com.microsoft.MatMulIntegerToFloat whose CPU kernel, given a per-row
    a_scale and a bias, adds bias * a_scale instead of the bias (measured: relative error 2-3e-2 on this op, 0.03
    on the shipped model's logits), so the reference keeps its Muls out of that pattern."""
    w, sw, inv, dtype = _consts(b)
    scaled, sx = _scaled_tokens(b, inv, dtype)
    u, zero = _uint8_codes(b, scaled)
    acc = b.op("Cast", b.op("MatMulInteger", u, b.const(w, "qweight"), zero), to=TensorProto.FLOAT)
    y = b.op("Mul", b.op("Mul", acc, sx), b.const(sw, "weight_scale"))
    _finish(b, y, dtype, node)


def lower_matmul_integer_to_float(node, b: Builder) -> None:
    """onnxruntime: the same codes into com.microsoft.MatMulIntegerToFloat(u, W^T, a_scale 1, b_scale sw,
    a_zero_point 128) (the integer GEMM and the weight scales in one kernel), then * sx, + bias, Cast."""
    w, sw, inv, dtype = _consts(b)
    scaled, sx = _scaled_tokens(b, inv, dtype)
    u, zero = _uint8_codes(b, scaled)
    y = b.op("MatMulIntegerToFloat", u, b.const(w, "qweight"), b.const(np.array(1.0, np.float32), "one"),
             b.const(sw, "weight_scale"), zero, domain=MS_DOMAIN)
    _finish(b, b.op("Mul", y, sx), dtype, node)


def lower_qdq(node, b: Builder) -> None:
    """tensorrt: X' / sx through QuantizeLinear / DequantizeLinear with the constant scale 1 (int8, zero point 0:
    the codes q), MatMul against DequantizeLinear(W^T int8, sw, axis 1), then * sx, + bias, Cast. TensorRT fuses
    the Q/DQ pairs into an int8 GEMM; ONNX Runtime (verification) runs it as float math on the same codes."""
    w, sw, inv, dtype = _consts(b)
    scaled, sx = _scaled_tokens(b, inv, dtype)
    one, zero = b.const(np.array(1.0, np.float32), "one"), b.const(np.array(0, np.int8), "zero_point")
    codes = b.op("DequantizeLinear", b.op("QuantizeLinear", scaled, one, zero), one, zero)
    weight = b.op("DequantizeLinear", b.const(w, "qweight"), b.const(sw, "weight_scale"),
                  b.const(np.zeros(sw.shape, np.int8), "weight_zero_point"), axis=1)
    _finish(b, b.op("Mul", b.op("MatMul", codes, weight), sx), dtype, node)
