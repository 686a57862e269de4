"""FP8 (e4m3): the cast against a hand-written encoder, glmc::Fp8Linear and the fp8 KV cache ops against their
formulas and their ONNX lowerings in ONNX Runtime, TensorRT for RTX engines for sm89/sm120, apply_fp8, quantized
checkpoints, `glmc quantize` / `glmc eval` / `glmc compile` with fp8, and the errors."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_model
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file

from glmc.compiler import schema
from glmc.errors import CheckpointError, ConfigError, GlmcError
from glmc.export.lower import lower_model
from glmc.modeling_patches.checkpoint import load_model
from glmc.modeling_patches.modeling_chatglm import Fp8Linear, QuantLinear
from glmc.modeling_patches.ops.fp8_linear import dequantize_weight, fp8_linear, fp8_tensor, to_e4m3
from glmc.modeling_patches.ops.kv_cache import kv_cache_dequantize, kv_cache_quantize
from glmc.modeling_patches.ops.onnx_defs import DOMAIN
from glmc.quantization.fp8 import apply_fp8
from glmc.quantization.kv_calibration import calibrate_kv
from glmc.quantization.scheme import Scheme, apply_scheme, parse_precision, save_quantized

HAVE_TRT = schema.tensorrt_available() is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx_bindings is installed")
REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = schema.shipped_model()
needs_shipped = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(),
                                   reason="the shipped model is not in the package")


# ---------------------------------------------------------------------------------------------- hand-written e4m3

def e4m3_magnitudes() -> np.ndarray:
    """Codes 0..126 (sign 0) decoded from the format's definition: 4 exponent bits (bias 7), 3 mantissa bits,
    exponent 0 subnormal (m/8 * 2^-6); code 127 (S.1111.111) is NaN. Increasing with the code."""
    out = []
    for code in range(127):
        e, m = code >> 3, code & 7
        out.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(out)


def e4m3_reference(x: np.ndarray) -> np.ndarray:
    """float64 values -> e4m3 bytes: saturate to +-448, nearest value, ties to the even code (mantissa LSB 0), the
    sign kept (negative values that round to zero give -0, 0x80), NaN -> 0x7F (its sign bit as the input's)."""
    mags = e4m3_magnitudes()
    a = np.minimum(np.abs(x), 448.0)
    hi = np.clip(np.searchsorted(mags, a), 0, 126)  # first magnitude >= a
    lo = np.clip(hi - 1, 0, 126)
    d_lo, d_hi = a - mags[lo], mags[hi] - a
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(a == mags[hi], hi, code)  # exact values (0 included)
    code = np.where(np.isnan(x), 0x7F, code).astype(np.uint8)
    return code | (np.signbit(x).astype(np.uint8) << 7)


def test_e4m3_tables_and_reference_agree_with_the_format():
    mags = e4m3_magnitudes()
    assert mags[1] == 2.0 ** -9 and mags[8] == 2.0 ** -6 and mags[126] == 448.0 and np.all(np.diff(mags) > 0)
    # the hand-written encoder on chosen points: ties go to the even code, beyond 448 saturates
    x = np.array([0.0, -0.0, 2.0 ** -10, 3 * 2.0 ** -10, 1.0 + 1 / 16, 1.0 + 3 / 16, 449.0, 464.0, 1e30, -1e30,
                  np.inf, -np.inf, -2.0 ** -11])
    assert e4m3_reference(x).tolist() == [0x00, 0x80, 0x00, 0x02, 0x38, 0x3A, 0x7E, 0x7E, 0x7E, 0xFE, 0x7E, 0xFE,
                                          0x80]


def cast_inputs(seed: int = 0) -> np.ndarray:
    """float32 values over every e4m3 binade and beyond (subnormals, saturation), every midpoint between two
    neighbouring codes (ties), the midpoints' float32 neighbours, and the special values."""
    rng = np.random.default_rng(seed)
    wide = rng.choice([-1.0, 1.0], 200000) * 2.0 ** rng.uniform(-13, 11, 200000)
    mags = e4m3_magnitudes()
    mid = (mags[:-1] + mags[1:]) / 2
    ties = np.concatenate([mid, -mid, np.nextafter(mid.astype(np.float32), np.float32(np.inf)),
                           np.nextafter(mid.astype(np.float32), np.float32(0))])
    special = np.array([0.0, -0.0, 448.0, 464.0, 465.0, 1e9, np.inf, -np.inf, np.nan, 2.0 ** -9, 2.0 ** -10,
                        2.0 ** -11, 3 * 2.0 ** -10])
    return np.concatenate([wide, mags, -mags, ties, special]).astype(np.float32)


def assert_same_codes(got: np.ndarray, want: np.ndarray) -> None:
    got, want = got.view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1)
    nan_got, nan_want = (got & 0x7F) == 0x7F, (want & 0x7F) == 0x7F
    assert np.array_equal(nan_got, nan_want)
    bad = np.flatnonzero((got != want) & ~nan_want)
    assert bad.size == 0, f"{bad.size} codes differ, first at {bad[:5]}: {got[bad[:5]]} vs {want[bad[:5]]}"


def test_torch_cast_equals_the_hand_written_encoder():
    x = cast_inputs()
    codes = to_e4m3(torch.from_numpy(x)).view(torch.uint8).numpy()
    assert_same_codes(codes, e4m3_reference(x.astype(np.float64)))


# ---------------------------------------------------------------------------------------------- glmc::Fp8Linear

def fp8_linear_formula(x: torch.Tensor, q: torch.Tensor, sw: torch.Tensor, sx: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """The docstring's formula with the hand-written encoder, float64 products rounded once to x's dtype."""
    xq = e4m3_reference((x / sx.to(x.dtype)).double().numpy())
    vals = np.concatenate([e4m3_magnitudes(), [np.nan], -e4m3_magnitudes(), [np.nan]])
    xd = (torch.from_numpy(vals[xq]) * float(sx)).to(x.dtype)
    wd = (torch.from_numpy(vals[q.view(torch.uint8).numpy()]) * sw.double()[:, None]).to(x.dtype)
    return torch.nn.functional.linear(xd.double(), wd.double(), None if bias is None else bias.double())


def fp8_layer(n: int = 48, k: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    sw = (w.abs().amax(1) / 448).to(dtype)
    q = to_e4m3(w / sw.float()[:, None])
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    return q, sw, torch.tensor([0.01], dtype=dtype), bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_linear_equals_its_formula_with_saturation_and_subnormals(dtype):
    q, sw, sx, bias = fp8_layer(dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g) * 2 ** torch.randint(-14, 4, (3, 5, 64), generator=g).float()
    x[0, 0, :4] = torch.tensor([10.0, -10.0, 4.48, 1e-6])  # 1000x and -1000x the scale saturate to +-448
    x = x.to(dtype)
    y = fp8_linear(x, q, sw, sx, bias)
    assert y.dtype == dtype and y.shape == (3, 5, 48)
    want = fp8_linear_formula(x, q, sw, sx, bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert float((y.double() - want).abs().max()) <= tol * float(want.abs().max())
    # saturation: x beyond 448 * sx contributes exactly as 448 * sx does
    x2 = x.clone()
    x2[0, 0, 0], x2[0, 0, 1] = 4.48, -4.48
    assert torch.equal(fp8_linear(x2, q, sw, sx, bias)[0, 0], y[0, 0])
    # per-tensor weight scales broadcast the same way
    y1 = fp8_linear(x, q, sw[:1], sx, None)
    assert torch.allclose(y1.double(), fp8_linear_formula(x, q, sw[:1].expand(48), sx, None), rtol=tol, atol=tol)


def fp8_linear_graph(q, sw, sx, bias, dtype: int, shape=(2, 5, 64)) -> onnx.ModelProto:
    """One glmc::Fp8Linear node with its weights as initializers."""
    inits = [fp8_tensor(q.view(torch.uint8).numpy()), numpy_helper.from_array(sw.numpy(), "sw"),
             numpy_helper.from_array(sx.numpy(), "sx"), numpy_helper.from_array(bias.numpy(), "bias")]
    inits[0].name = "q"
    node = helper.make_node("Fp8Linear", ["x", "q", "sw", "sx", "bias"], ["y"], domain=DOMAIN, name="fp8")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", dtype, list(shape))],
                              [helper.make_tensor_value_info("y", dtype, [*shape[:-1], q.shape[0]])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 11
    return model


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("target", ["reference", "onnxruntime", "tensorrt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_linear_lowerings_in_onnxruntime_equal_the_op(target, dtype):
    q, sw, sx, bias = fp8_layer(dtype=dtype)
    x = (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)) * 1.5).to(dtype)
    x[0, 0, 0] = 50.0  # saturates
    onnx_type = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
    model = lower_model(fp8_linear_graph(q, sw, sx, bias, onnx_type), target)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert ("", "QuantizeLinear") in ops and ("", "MatMul") in ops and not any(d == DOMAIN for d, _ in ops)
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert [list(t.dims) for t in weights] == [[64, 48]]  # stored [K, N]
    if target == "onnxruntime":  # dequantized once at lowering: the op's own Wd values, in X's dtype
        assert weights[0].data_type == onnx_type
        assert torch.equal(torch.from_numpy(numpy_helper.to_array(weights[0]).copy()),
                           dequantize_weight(q, sw, dtype).T)
    else:  # e4m3 bytes, dequantized in the graph
        assert weights[0].data_type == TensorProto.FLOAT8E4M3FN
    (y,) = run_ort(model, {"x": x.numpy()})
    want = fp8_linear(x, q, sw, sx, bias)
    # fp32: the same quantized values, only MatMul's summation order differs; fp16: ORT multiplies in fp16
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert np.abs(y.astype(np.float64) - want.double().numpy()).max() <= tol * float(want.abs().max())


def test_onnxruntime_quantizelinear_float8_equals_the_hand_written_encoder():
    """ONNX Runtime 1.32 runs float8 QuantizeLinear on CPU (so the onnxruntime target needs no dequantize-at-load
    fallback): with saturate=1 its codes are the hand-written encoder's, ties and saturation included."""
    x = cast_inputs(seed=3)
    zero = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], b"\x00", raw=True)
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], saturate=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
                              [helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, [len(x)])],
                              initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "s"), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 11
    (q,) = run_ort(model, {"x": x})
    assert_same_codes(np.asarray(q).view(np.uint8), e4m3_reference(x.astype(np.float64)))


# ---------------------------------------------------------------------------------------------- fp8 KV cache

SCALES = {"tensor": (1,), "head": (2,), "channel": (2, 16)}


@pytest.mark.parametrize("granularity", list(SCALES))
def test_kv_cache_fp8_quantize_equals_the_hand_written_encoder(granularity):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 7, 16, generator=g) * 2 ** torch.randint(-12, 6, (2, 2, 7, 16), generator=g).float()
    scale = (torch.rand(SCALES[granularity], generator=g) * 0.05 + 1e-3).to(torch.float16)
    q = kv_cache_quantize(x.half(), scale, "float8e4m3fn")
    assert q.dtype == torch.float8_e4m3fn
    s = scale.float()
    s = s.reshape(1, 1, 1, 1) if s.numel() == 1 else (s.reshape(1, 2, 1, 1) if s.dim() == 1 else s[None, :, None])
    assert_same_codes(q.view(torch.uint8).numpy(), e4m3_reference((x.half().float() / s).double().numpy()))
    back = kv_cache_dequantize(q, scale)
    assert back.dtype == torch.float16 and torch.equal(back, (q.float() * s).half())
    # int8 stays the int8 op: the default and the named element type are the same bytes as the formula
    i8 = kv_cache_quantize(x.half(), scale)
    assert i8.dtype == torch.int8 and torch.equal(i8, kv_cache_quantize(x.half(), scale, "int8"))
    assert torch.equal(i8, torch.clamp(torch.round(x.half().float() / s), -127, 127).to(torch.int8))
    with pytest.raises(ValueError, match="dtype 'fp4' is not one of int8, float8e4m3fn"):
        kv_cache_quantize(x, scale.float(), "fp4")


def kv_graph(scale: torch.Tensor, fp8: bool) -> onnx.ModelProto:
    """x -> glmc::KVCacheQuantize -> q (an output) -> glmc::KVCacheDequantize -> y."""
    qt = TensorProto.FLOAT8E4M3FN if fp8 else TensorProto.INT8
    attrs = {"dtype": "float8e4m3fn"} if fp8 else {}
    nodes = [helper.make_node("KVCacheQuantize", ["x", "s"], ["q"], domain=DOMAIN, name="kvq", **attrs),
             helper.make_node("KVCacheDequantize", ["q", "s"], ["y"], domain=DOMAIN, name="kvdq")]
    shape = [2, 2, 7, 16]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, shape)],
                              [helper.make_tensor_value_info("q", qt, shape),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT16, shape)],
                              initializer=[numpy_helper.from_array(scale.numpy(), "s")],
                              value_info=[helper.make_tensor_value_info("q", qt, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 11
    return model


@pytest.mark.parametrize("target", ["reference", "onnxruntime", "tensorrt"])
@pytest.mark.parametrize("granularity", list(SCALES))
def test_kv_cache_fp8_lowerings_in_onnxruntime_equal_the_op(target, granularity):
    """Plain (Div + QuantizeLinear scale 1) and Q/DQ (per tensor / per head: QuantizeLinear with the scale)
    lowerings: the fp8 bytes of the op where the division is float32 (plain); the Q/DQ form divides in fp16 as ONNX
    Runtime does, one e4m3 step off in a few elements."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 2, 7, 16, generator=g) * 3).half()
    scale = (torch.rand(SCALES[granularity], generator=g) * 0.02 + 1e-3).half()
    model = lower_model(kv_graph(scale, fp8=True), target)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert TensorProto.FLOAT8E4M3FN in types.values() and not any(n.domain == DOMAIN for n in model.graph.node)
    q, y = run_ort(model, {"x": x.numpy()})
    want = kv_cache_quantize(x, scale, "float8e4m3fn").view(torch.uint8).numpy()
    got = np.asarray(q).view(np.uint8)
    qdq = target == "tensorrt" and granularity != "channel"
    differ = int((got != want).sum())
    assert differ == 0 if not qdq else differ <= 0.02 * got.size
    back = kv_cache_dequantize(torch.from_numpy(got.copy()).view(torch.float8_e4m3fn), scale)
    assert torch.equal(torch.from_numpy(np.asarray(y)), back)


def test_int8_kv_graph_is_unchanged():
    """The int8 cache's lowerings still emit int8 (no float8 anywhere): what the int8 path did before the element
    type became a parameter."""
    scale = torch.full((2,), 0.0625, dtype=torch.float16)  # a power of two: x / scale is exact in fp16 too
    x = (torch.randn(2, 2, 7, 16, generator=torch.Generator().manual_seed(6)) * 2).clamp(-7.9, 7.9).half()
    for target in ("reference", "onnxruntime", "tensorrt"):
        model = lower_model(kv_graph(scale, fp8=False), target)
        assert not any(t.data_type == TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)
        q, _ = run_ort(model, {"x": x.numpy()})
        assert np.array_equal(q, kv_cache_quantize(x, scale).numpy())


# ---------------------------------------------------------------------------------------------- apply_fp8, checkpoints

def calib(vocab: int, n: int = 4, length: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    with torch.no_grad():
        logits, _ = model(ids, torch.arange(s).expand(b, s), torch.ones(b, s, dtype=torch.int64),
                          model.empty_cache(b))
    return logits.float()


def test_apply_fp8_scales_codes_and_accuracy():
    base = tiny_model(std=0.05)
    ids = calib(300)
    model = apply_fp8(tiny_model(std=0.05), parse_precision("fp8"), ids)
    lins = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(lins) == 4 * 2 and not any(isinstance(m, QuantLinear) for m in model.modules())
    assert isinstance(model.transformer.output_layer, torch.nn.Linear)  # the output layer stays float
    qkv = model.transformer.encoder.block(0).self_attention.query_key_value
    assert isinstance(qkv, Fp8Linear)
    w = base.transformer.encoder.block(0).self_attention.query_key_value.weight.detach()
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.dtype == torch.float16
    # per-row scale absmax / 448, rounded up: the row maximum lands within one e4m3 step below 448
    assert torch.all(qkv.weight_scale.float() * 448 >= w.abs().amax(1))
    assert torch.all(qkv.weight.float().abs().amax(1) >= 416)
    # the activation scale: absmax of the layer's input over the calibration samples / 448, rounded up
    seen = []
    hook = base.transformer.encoder.block(0).self_attention.query_key_value.register_forward_hook(
        lambda m, a, o: seen.append(a[0].abs().amax()))
    for x in ids:
        logits_of(base, x)
    hook.remove()
    absmax = float(torch.stack(seen).max())
    assert absmax <= float(qkv.input_scale) * 448 <= absmax * (1 + 2 ** -9)
    # accuracy against the float model on text it was not calibrated on
    test_ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(8))
    ref, got = logits_of(base, test_ids), logits_of(model, test_ids)
    int4 = logits_of(apply_scheme(tiny_model(std=0.05), parse_precision("int4"), ids), test_ids)
    err, err4 = float((got - ref).norm() / ref.norm()), float((int4 - ref).norm() / ref.norm())
    # 4 significant bits on both operands: ~3.6% rms per element on a random model (measured 8.3%; int8
    # weight-only 1.6%, int4 27%); a wrong scale or saturation is off by O(1)
    assert 0.02 < err < 0.12 and err < err4 / 2, (err, err4)
    # Module.to keeps the codes float8 (the values are exact in any float type)
    model.float()
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.dtype == torch.float32


def test_fp8_kv_cache_through_apply_scheme():
    base = tiny_model(std=0.05)
    ids = calib(300)
    model = apply_scheme(tiny_model(std=0.05), parse_precision("fp16+kvfp8"), ids)
    attn = model.transformer.encoder.block(0).self_attention
    assert model.kv_dtype == torch.float8_e4m3fn and attn.k_scale.shape == (1,)
    k_scales, _ = calibrate_kv(tiny_model(std=0.05), ids, "tensor", torch.float16, kv_dtype="fp8")
    i8_scales, _ = calibrate_kv(tiny_model(std=0.05), ids, "tensor", torch.float16)
    assert torch.equal(attn.k_scale, k_scales[0]) and math.isclose(float(k_scales[0]) * 448, float(i8_scales[0])
                                                                     * 127, rel_tol=2e-3)
    cache = model.empty_cache(1)
    assert cache[0][0].dtype == torch.float8_e4m3fn
    x = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits, present = model(x, torch.arange(30)[None], torch.ones(1, 30, dtype=torch.int64), cache)
    assert present[0][0].dtype == torch.float8_e4m3fn and present[0][0].shape[2] == 30
    ref = logits_of(base, x)
    assert float((logits.float() - ref).norm() / ref.norm()) < 0.05
    for name, want in (("kvfp8-head", (2,)), ("kvfp8-channel", (2, 32))):
        m = apply_scheme(tiny_model(std=0.05), parse_precision(name), ids)
        assert m.transformer.encoder.block(1).self_attention.v_scale.shape == want


def safetensors_dtypes(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return {k: v["dtype"] for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}


def test_quantized_checkpoint_round_trip_and_errors(tmp_path):
    ids = calib(300)
    scheme = parse_precision("fp8+kvfp8-head")
    model = apply_scheme(tiny_model(std=0.05), scheme, ids)
    save_quantized(model, tmp_path / "q", scheme)
    q = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert q == {"weights": {"bits": 8, "group_size": 0, "include_output": False, "method": "fp8"},
                 "kv_cache": {"granularity": "head", "dtype": "fp8"}}
    dtypes = safetensors_dtypes(tmp_path / "q" / "model.safetensors")
    key = "transformer.encoder.layers.0.mlp.dense_4h_to_h"
    assert dtypes[f"{key}.weight"] == "F8_E4M3" and dtypes[f"{key}.weight_scale"] == "F16"
    assert dtypes[f"{key}.input_scale"] == "F16"
    back = load_model(tmp_path / "q", dtype="float16")
    assert back.kv_dtype == torch.float8_e4m3fn
    lin = back.transformer.encoder.block(0).mlp.dense_4h_to_h
    assert isinstance(lin, Fp8Linear) and lin.weight.dtype == torch.float8_e4m3fn
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(10))
    assert torch.equal(logits_of(back, x), logits_of(model, x))

    def corrupt(name: str, value: torch.Tensor, where: str) -> None:
        d = tmp_path / where
        d.mkdir()
        for f in ("config.json", "quantization.json"):
            (d / f).write_bytes((tmp_path / "q" / f).read_bytes())
        tensors = load_file(tmp_path / "q" / "model.safetensors")
        tensors[name] = value
        save_file(tensors, d / "model.safetensors")

    w = load_file(tmp_path / "q" / "model.safetensors")[f"{key}.weight"]
    corrupt(f"{key}.weight", w.half(), "as_half")  # fp8 codes must arrive as float8_e4m3fn, never quantized here
    with pytest.raises(CheckpointError, match=rf"'{key}.weight' is float16; float8_e4m3fn belongs here"):
        load_model(tmp_path / "as_half")
    nan = w.clone().view(torch.uint8)
    nan[3, 5] = 0xFF
    corrupt(f"{key}.weight", nan.view(torch.float8_e4m3fn), "nan")
    with pytest.raises(CheckpointError, match=rf"'{key}.weight' holds 1 NaN fp8 codes"):
        load_model(tmp_path / "nan")
    corrupt(f"{key}.input_scale", torch.zeros(1, dtype=torch.float16), "zero_scale")
    with pytest.raises(CheckpointError, match=rf"'{key}.input_scale' holds 1 scales that are not positive"):
        load_model(tmp_path / "zero_scale")


def test_fp8_errors(tmp_path):
    with pytest.raises(GlmcError, match="fp8 needs calibration text"):
        apply_fp8(tiny_model(), parse_precision("fp8"), None)
    with pytest.raises(GlmcError, match="fp8 quantizes a float32 model"):
        apply_fp8(tiny_model().half(), parse_precision("fp8"), calib(300))
    model = apply_fp8(tiny_model(), parse_precision("fp32+fp8"), calib(300))
    with pytest.raises(GlmcError, match="already has FP8 linears"):
        apply_fp8(model, parse_precision("fp32+fp8"), calib(300))
    cfg = REPO / "compile_configs" / "glmc-tiny-fp8.yaml"
    with pytest.raises(ConfigError, match=r"tensorrt\.compute_capabilities: sm86 cannot run FP8"):
        schema.load(cfg, ["tensorrt.compute_capabilities=[sm86, sm89]", f"output={tmp_path / 'o'}"],
                    check_files=False)
    with pytest.raises(ConfigError, match=r"quantize_output_layer=true: fp8 keeps the output layer"):
        schema.load(cfg, ["precision.quantize_output_layer=true", f"output={tmp_path / 'o'}"], check_files=False)
    with pytest.raises(GlmcError, match="fp8 weights are 8-bit with one scale per output channel"):
        Scheme.from_json({"weights": {"bits": 8, "group_size": 128, "method": "fp8"}})


# ---------------------------------------------------------------------------------------------- TensorRT for RTX

@needs_trt
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.FLOAT])
def test_tensorrt_for_rtx_builds_an_fp8_gemm_for_sm89_and_sm120_and_refuses_sm86(dtype, tmp_path):
    from glmc.compiler.tensorrt import TensorRTError, build_engine
    torch_dtype = torch.float16 if dtype == TensorProto.FLOAT16 else torch.float32
    q, sw, sx, bias = fp8_layer(n=64, k=128, dtype=torch_dtype)
    model = lower_model(fp8_linear_graph(q, sw, sx, bias, dtype, shape=(2, 8, 128)), "tensorrt")
    path = tmp_path / "fp8.onnx"
    onnx.save(model, path)
    limits = {"max_batch": 2, "max_input_length": 8, "max_sequence_length": 16}
    info = build_engine(path, tmp_path / "fp8.engine", limits, compute_capabilities=["sm89", "sm120"],
                        workspace_mb=64, optimization_level=1)
    assert info["compute_capabilities"] == ["sm89", "sm120"] and info["engine_bytes"] > 0
    gemms = [x for x in info["engine_layers"] if x["type"] == "gemm"]
    assert len(gemms) == 1, info["engine_layers"]  # an FP8 x FP8 GEMM: activations and weights stay e4m3
    assert [t["dtype"] for t in gemms[0]["inputs"]] == ["FP8"] and gemms[0]["constants"][0]["dtype"] == "FP8", gemms
    with pytest.raises(TensorRTError, match=r"sm86.*fp8_e4m3"):
        build_engine(path, tmp_path / "old.engine", limits, compute_capabilities=["sm86"], workspace_mb=64,
                     optimization_level=1)


# ---------------------------------------------------------------------------------------------- commands

@needs_shipped
def test_glmc_quantize_fp8_loads_back_equal(tmp_path):
    from glmc.cli import main
    from glmc.modeling_patches.tokenizer import load_tokenizer
    from glmc.quantization.kv_calibration import calibration_samples
    assert main(["quantize", "--precision", "fp8+kvfp8", "--out", str(tmp_path / "q")]) == 0
    q = load_model(tmp_path / "q", dtype="float16")
    assert q.kv_dtype == torch.float8_e4m3fn and isinstance(q.transformer.encoder.block(0).mlp.dense_h_to_4h,
                                                           Fp8Linear)
    ids = calibration_samples(load_tokenizer(SHIPPED_MODEL).encode, None, 16, 256)  # compile's defaults
    direct = apply_scheme(load_model(SHIPPED_MODEL), parse_precision("fp8+kvfp8"), ids)
    x = ids[0][:, :64]
    assert torch.equal(logits_of(q, x), logits_of(direct, x))
    assert main(["quantize", "--precision", "fp8+kvfp8-row", "--out", str(tmp_path / "bad")]) == 2


@needs_shipped
def test_glmc_eval_fp8_rows(tmp_path, capsys):
    """`glmc eval` on the shipped model, the first 2048 held-out tokens: the fp8 rows sit between fp16 and int4's
    errors. (The issue's goal, fp8 within 0.5% of fp16 perplexity, is judged on the whole held-out text in
    docs/quantization.md: +0.50% there; on 2048 tokens FP8's rounding noise alone moves it by about 0.2%.)"""
    from glmc.cli import main
    out = tmp_path / "eval.json"
    assert main(["eval", "--precisions", "fp16,fp8,fp16+kvfp8,kv8", "--max-tokens", "2048", "--chunk", "8",
                 "--json", str(out), "--markdown"]) == 0
    rows = {r["precision"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["fp16", "fp8", "fp16+kvfp8", "kv8"]
    base = rows["fp16"]["perplexity_raw"]
    delta = {name: rows[name]["perplexity_raw"] / base - 1 for name in rows}
    assert abs(delta["kv8"]) < 0.002 and abs(delta["fp8"]) < 0.01 and abs(delta["fp16+kvfp8"]) < 0.01, delta
    err = {name: rows[name]["rel_error_raw"] for name in rows}
    assert err["fp16"] < err["kv8"] < err["fp16+kvfp8"] < 0.04 and err["fp16"] < err["fp8"] < 0.04, err
    assert rows["fp8"]["top1_raw"] > 0.93 and rows["fp16+kvfp8"]["top1_raw"] > 0.93
    table = capsys.readouterr().out
    assert "| fp8 | fp16+fp8 |" in table and "| fp16+kvfp8 | fp16+kvfp8-tensor |" in table


@needs_trt
@needs_shipped
def test_glmc_compile_fp8_kv_cache_every_target(tmp_path):
    """glmc-tiny-fp8 with the fp8 cache: every target lowered, the TensorRT for RTX engine built with FP8 cache
    I/O, and verification through ONNX Runtime passes."""
    from glmc.artifact import read_manifest
    from glmc.cli import main
    cfg = REPO / "compile_configs" / "glmc-tiny-fp8.yaml"
    sets = ["precision.kv_cache=fp8", f"output={tmp_path / 'b'}", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["compile", str(cfg)] + [a for s in sets for a in ("--set", s)]) == 0
    m = read_manifest(tmp_path / "b")
    assert m["verification"]["passed"] and set(m["verification"]["targets"]) == {"reference", "onnxruntime",
                                                                                  "tensorrt"}
    inputs = {t["name"]: t["dtype"] for t in m["targets"]["onnxruntime"]["inputs"]}
    assert inputs["past_key_values.0.key"] == "float8e4m3fn", inputs
    assert m["engines"]["tensorrt"]["compute_capabilities"] == ["sm89", "sm120"]
    graph = onnx.load(str(tmp_path / "b" / "onnx" / "onnx" / "model.onnx"), load_external_data=False).graph
    kinds = {(n.op_type, a.s.decode()) for n in graph.node for a in n.attribute if a.name == "dtype"}
    assert kinds == {("KVCacheQuantize", "float8e4m3fn")}
    layers = json.loads((SHIPPED_MODEL / "config.json").read_text())["num_layers"]
    assert sum(n.op_type == "Fp8Linear" for n in graph.node) == 4 * layers  # the output layer stays float
