"""The glmc custom ops: torch references against float64 computations, int4 packing, ONNX schema shape inference,
and every lowering (run in ONNX Runtime as a one-node graph) against the torch op."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from glmc.artifact import TARGETS as ARTIFACT_TARGETS
from glmc.export.lower import TARGETS, lower_model
from glmc.modeling_patches import ops
from glmc.modeling_patches.ops.quantized_linear import pack_int4, unpack_int4

ONNX_TYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.int8: TensorProto.INT8,
             torch.uint8: TensorProto.UINT8, torch.int64: TensorProto.INT64}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------- int4 packing

def test_int4_nibble_order_is_onnx_order():
    q = torch.tensor([[1, -2, 7, -8, 3]], dtype=torch.int8)  # odd K: last high nibble is padding (0)
    packed = pack_int4(q)
    assert packed.tolist() == [[0xE1, 0x87, 0x03]]  # element 2j in the LOW nibble
    t = helper.make_tensor("w", TensorProto.INT4, [5], [1, -2, 7, -8, 3])  # onnx's own INT4 packing
    assert numpy_helper.to_array(t).astype(np.int8).tolist() == [1, -2, 7, -8, 3]
    from glmc.modeling_patches.ops.onnx_defs import int4_tensor
    assert int4_tensor(q.numpy()[0]).raw_data == bytes([0xE1, 0x87, 0x03])
    assert numpy_helper.to_array(int4_tensor(q.numpy())).astype(np.int8).tolist() == q.tolist()


@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (5, 64), (2, 129)])
def test_int4_pack_round_trip(n, k):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (k + 1) // 2)
    assert torch.equal(unpack_int4(packed, k), q)


@pytest.mark.parametrize("n,k", [(2, 1), (4, 7), (8, 33), (6, 64), (3, 5)])
def test_int4_transposed_matches_onnx_packing(n, k):
    from glmc.modeling_patches.ops.onnx_defs import int4_tensor
    from glmc.modeling_patches.ops.quantized_linear import int4_transposed
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    t = int4_transposed(pack_int4(q).numpy(), k)
    assert list(t.dims) == [k, n] and t.raw_data == int4_tensor(q.T.contiguous().numpy()).raw_data
    assert numpy_helper.to_array(t).astype(np.int8).tolist() == q.T.tolist()


# ---------------------------------------------------------------------------------------------- references vs float64

LINEAR_CASES = [  # (batch shape, K, N, bits, group)
    ((1,), 64, 16, 8, 0), ((3, 2), 67, 9, 8, 0), ((2,), 100, 24, 8, 32), ((4,), 33, 8, 8, 64),
    ((1,), 64, 16, 4, 0), ((2, 3), 67, 9, 4, 0), ((2,), 100, 24, 4, 32), ((5,), 129, 7, 4, 64), ((1,), 31, 5, 4, 128),
]


def random_quantized(n: int, k: int, bits: int, group: int, dtype=torch.float32, seed: int = 0):
    """Random integer codes (full range) and positive scales: (q int8 [N, K], stored weight, scales)."""
    g = torch.Generator().manual_seed(seed)
    lo = -(1 << (bits - 1))
    q = torch.randint(lo, -lo, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand((n, math.ceil(k / group)) if group else (n,), generator=g) * 0.1 + 0.01).to(dtype)
    return q, (pack_int4(q) if bits == 4 else q), scales


@pytest.mark.parametrize("batch,k,n,bits,group", LINEAR_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_reference_vs_float64(batch, k, n, bits, group, bias):
    q, stored, scales = random_quantized(n, k, bits, group)
    x = torch.randn(*batch, k)
    b = torch.randn(n) if bias else None
    s64 = scales.double()
    s64 = s64[:, None] if group == 0 else s64.repeat_interleave(group, dim=1)[:, :k]
    want = x.double() @ (q.double() * s64).T + (b.double() if b is not None else 0)
    got = ops.quantized_linear(x, stored, scales, b, bits, group, k)
    assert got.shape == (*batch, n)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("scale_shape", [(1,), (3,), (3, 16)])
def test_kv_quantize_reference_vs_float64(scale_shape):
    scale = 2.0 ** -torch.randint(3, 7, scale_shape).float()  # powers of two: x = 2.5 * scale is an exact tie
    s = scale.double().reshape(1, 3, 1, 16) if len(scale_shape) == 2 else scale.double().reshape(1, -1, 1, 1)
    x = torch.randn(2, 3, 5, 16) * 0.2
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, -0.5]) * s[0, 0, 0, :4].float()  # ties: round half to even
    x[1, 0, 0, :2] = torch.tensor([-200.0, 200.0]) * s[0, 0, 0, :2].float()  # clamps to -127 (not -128), 127
    q = ops.kv_cache_quantize(x, scale)
    want = torch.clamp(torch.round(x.double() / s), -127, 127)  # torch.round is half-to-even
    assert q.dtype == torch.int8 and torch.equal(q.double(), want)
    assert q[0, 0, 0, :4].tolist() == [0, 2, 2, 0] and q[1, 0, 0, :2].tolist() == [-127, 127]
    back = ops.kv_cache_dequantize(q, scale)
    assert back.dtype == scale.dtype and rel_err(back, q.double() * s) < 1e-7
    assert float((back.double() - x.double()).abs()[x.abs() < 127 * s].max()) <= float(s.max()) / 2 + 1e-6


def gqa_float64(q, k, v, past_k, past_v, positions, mask, cos, sin, hq, hkv, scale):
    """An independent float64 GQA: rotary as complex multiplication, attention query by query."""
    b, s, _ = q.shape
    d = past_k.shape[-1]
    r = 2 * cos.shape[1]
    p = past_k.shape[2]

    def rotate(x, heads):
        x = x.double().view(b, s, heads, d).clone()
        angle = torch.complex(cos[positions].double(), sin[positions].double())[:, :, None, :]  # [B, S, 1, R/2]
        pairs = torch.view_as_complex(x[..., :r].reshape(b, s, heads, r // 2, 2).contiguous())
        x[..., :r] = torch.view_as_real(pairs * angle).reshape(b, s, heads, r)
        return x

    qr, kr = rotate(q, hq), rotate(k, hkv)
    keys = torch.cat([past_k.double(), kr.transpose(1, 2)], dim=2)
    values = torch.cat([past_v.double(), v.double().view(b, s, hkv, d).transpose(1, 2)], dim=2)
    out = torch.zeros(b, s, hq, d, dtype=torch.float64)
    for bi, si, h in itertools.product(range(b), range(s), range(hq)):
        kv = h // (hq // hkv)
        allowed = [j for j in range(p + si + 1) if mask[bi, j]]
        if not allowed:
            continue  # a padding query: its output is not compared
        scores = keys[bi, kv, allowed] @ qr[bi, si, h] * scale
        out[bi, si, h] = torch.softmax(scores, 0) @ values[bi, kv, allowed]
    return out.view(b, s, hq * d), keys, values


GQA_CASES = [  # (B, S, P, Hq, Hkv, D, left pad per row)
    (1, 5, 0, 4, 2, 32, [0]), (2, 4, 0, 4, 2, 32, [0, 2]), (3, 1, 6, 4, 1, 32, [0, 3, 1]),
    (2, 3, 4, 4, 4, 64, [2, 0]), (1, 1, 0, 8, 2, 32, [0]), (2, 2, 5, 8, 2, 16, [4, 0]),
]


def gqa_inputs(b, s, p, hq, hkv, d, pads, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cos, sin = ops.rotary_tables(d // 2, 64, 10000.0)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, p:]
    return (torch.randn(b, s, hq * d, generator=g).to(dtype), torch.randn(b, s, hkv * d, generator=g).to(dtype),
            torch.randn(b, s, hkv * d, generator=g).to(dtype), torch.randn(b, hkv, p, d, generator=g).to(dtype),
            torch.randn(b, hkv, p, d, generator=g).to(dtype), positions, mask, cos.to(dtype), sin.to(dtype),
            hq, hkv, 1 / math.sqrt(d))


def real_queries(mask: torch.Tensor, s: int) -> torch.Tensor:
    return mask[:, -s:].bool()


@pytest.mark.parametrize("case", GQA_CASES)
def test_gqa_reference_vs_float64(case):
    args = gqa_inputs(*case)
    out, pk, pv = ops.group_query_attention(*args)
    want, wk, wv = gqa_float64(*args)
    real = real_queries(args[6], case[1])
    assert out.shape == want.shape and pk.shape == wk.shape
    assert rel_err(out[real], want[real]) < 1e-5
    assert rel_err(pk, wk) < 1e-5 and rel_err(pv, wv) < 1e-6


# ---------------------------------------------------------------------------------------------- ONNX: schemas

def one_node_model(op_type: str, inputs: list[torch.Tensor | None], attrs: dict, n_out: int, symbolic: bool = False,
                   constants: tuple[int, ...] = ()) -> onnx.ModelProto:
    """A graph of one glmc node; inputs listed in `constants` become initializers, None inputs are omitted."""
    names, graph_inputs, inits = [], [], []
    for i, t in enumerate(inputs):
        if t is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if i in constants:
            inits.append(numpy_helper.from_array(t.numpy(), name))
        else:
            dims = [f"d{i}_{j}" for j in range(t.dim())] if symbolic else list(t.shape)
            graph_inputs.append(helper.make_tensor_value_info(name, ONNX_TYPE[t.dtype], dims))
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op_type, names, outs, domain="glmc", name=op_type, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outs],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("glmc", 1)],
                             ir_version=11)


def inferred_shapes(model: onnx.ModelProto) -> list[list]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in types[o].tensor_type.shape.dim]
            for o in inferred.graph.node[0].output]


def linear_node(batch=(2, 3), k=67, n=9, bits=4, group=32, bias=True):
    _q, stored, scales = random_quantized(n, k, bits, group)
    x = torch.randn(*batch, k)
    b = torch.randn(n) if bias else None
    return [x, stored, scales, b], dict(bits=bits, group_size=group, in_features=k)


def gqa_node(case=GQA_CASES[3]):
    args = gqa_inputs(*case)
    return list(args[:9]), dict(num_heads=args[9], kv_num_heads=args[10], scale=args[11])


def test_schema_shape_inference_matches_torch():
    inputs, attrs = linear_node()
    want = ops.quantized_linear(*inputs, attrs["bits"], attrs["group_size"], attrs["in_features"])
    assert inferred_shapes(one_node_model("QuantizedLinear", inputs, attrs, 1)) == [list(want.shape)]
    x, scale = torch.randn(2, 3, 5, 16), torch.rand(3)
    assert inferred_shapes(one_node_model("KVCacheQuantize", [x, scale], {}, 1)) == [[2, 3, 5, 16]]
    assert inferred_shapes(one_node_model("KVCacheDequantize", [x.to(torch.int8), scale], {}, 1)) == [[2, 3, 5, 16]]
    inputs, attrs = gqa_node()
    want = ops.group_query_attention(*inputs, attrs["num_heads"], attrs["kv_num_heads"], attrs["scale"])
    assert inferred_shapes(one_node_model("GroupQueryAttention", inputs, attrs, 3)) == [list(t.shape) for t in want]


def test_schema_shape_inference_symbolic():
    inputs, attrs = gqa_node()
    shapes = inferred_shapes(one_node_model("GroupQueryAttention", inputs, attrs, 3, symbolic=True,
                                            constants=(3, 4, 7, 8)))
    # past_key is an initializer here (static D); batch, sequence and total come from query and attention_mask
    assert shapes[0] == ["d0_0", "d0_1", 4 * 64]
    assert shapes[1] == shapes[2] == ["d0_0", 4, "d6_1", 64]
    inputs, attrs = linear_node()
    assert inferred_shapes(one_node_model("QuantizedLinear", inputs, attrs, 1, symbolic=True,
                                          constants=(1, 2, 3))) == [["d0_0", "d0_1", 9]]


def test_schema_rejects_wrong_types():
    inputs, attrs = linear_node()
    inputs[2] = inputs[2].to(torch.int64)  # scales must be float
    model = one_node_model("QuantizedLinear", inputs, attrs, 1)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("out0", TensorProto.FLOAT, [2, 3, 9]))
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError), match=r"Scales|T"):
        onnx.checker.check_model(model, full_check=True)


# ---------------------------------------------------------------------------------------------- ONNX: lowerings

def run_lowered(model: onnx.ModelProto, target: str, feeds: dict) -> list[np.ndarray]:
    lowered = lower_model(model, target)
    assert not any(n.domain == "glmc" for n in lowered.graph.node)
    sess = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ARTIFACT_TARGETS[target].disabled_optimizers))
    return sess.run(None, feeds)


LOWERED_TARGETS = [t for t in TARGETS if t != "onnx"]


@pytest.mark.parametrize("target", LOWERED_TARGETS)
@pytest.mark.parametrize("batch,k,n,bits,group", LINEAR_CASES[1::2] + LINEAR_CASES[4:6])
def test_quantized_linear_lowerings(target, batch, k, n, bits, group):
    inputs, attrs = linear_node(batch, k, n, bits, group, bias=k % 2 == 1)
    want = ops.quantized_linear(*inputs, bits, group, k)
    model = one_node_model("QuantizedLinear", inputs, attrs, 1, constants=(1, 2, 3))
    got = run_lowered(model, target, {"in0": inputs[0].numpy()})[0]
    assert rel_err(torch.from_numpy(got), want) < 1e-5


@pytest.mark.parametrize("target", LOWERED_TARGETS)
@pytest.mark.parametrize("scale_shape", [(1,), (3,), (3, 16)])
def test_kv_cache_lowerings(target, scale_shape):
    scale = torch.rand(scale_shape) * 0.05 + 0.01
    x = torch.randn(2, 3, 5, 16)
    q = run_lowered(one_node_model("KVCacheQuantize", [x, scale], {}, 1, constants=(1,)), target,
                    {"in0": x.numpy()})[0]
    diff = (torch.from_numpy(q).int() - ops.kv_cache_quantize(x, scale).int()).abs().max()
    # QuantizeLinear (tensorrt) may multiply by 1/scale instead of dividing: a code can move by one at a tie
    assert q.dtype == np.int8 and diff <= (1 if target == "tensorrt" else 0)
    back = run_lowered(one_node_model("KVCacheDequantize", [torch.from_numpy(q), scale], {}, 1, constants=(1,)),
                       target, {"in0": q})[0]
    assert rel_err(torch.from_numpy(back), ops.kv_cache_dequantize(torch.from_numpy(q), scale)) < 1e-7


# ORT's GroupQueryAttention refuses batch > 1 with new tokens and a past at once (chunked prefill): skipped there.
@pytest.mark.parametrize("target", LOWERED_TARGETS)
@pytest.mark.parametrize("case", GQA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gqa_lowerings(target, case, dtype):
    b, s, p = case[:3]
    if target == "onnxruntime" and b > 1 and s > 1 and p > 0:
        pytest.skip("ORT GroupQueryAttention: batch must be 1 when sequence > 1 and past > 0")
    args = gqa_inputs(*case, dtype=dtype)
    inputs, attrs = list(args[:9]), dict(num_heads=args[9], kv_num_heads=args[10], scale=args[11])
    want = ops.group_query_attention(*args)
    model = one_node_model("GroupQueryAttention", inputs, attrs, 3, symbolic=True, constants=(7, 8))
    got = run_lowered(model, target, {f"in{i}": t.numpy() for i, t in enumerate(inputs) if i not in (7, 8)})
    real = real_queries(args[6], s)
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # fp16: a few units of 2^-11 (softmax/GEMM order)
    assert rel_err(torch.from_numpy(got[0])[real], want[0][real]) < tol
    assert rel_err(torch.from_numpy(got[1]), want[1]) < tol and rel_err(torch.from_numpy(got[2]), want[2]) < tol


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32)])
def test_matmul_nbits_accuracy_level_4(bits, group):
    """accuracy_level=4: ORT quantizes the activations to int8 per block (fast CPU kernels): close, not exact."""
    inputs, attrs = linear_node((4, 3), 256, 64, bits, group, bias=False)
    inputs[0] = torch.randn(4, 3, 256)
    want = ops.quantized_linear(*inputs, bits, group, 256)
    model = lower_model(one_node_model("QuantizedLinear", inputs, attrs, 1, constants=(1, 2, 3)), "onnxruntime",
                        accuracy_level=4)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "accuracy_level")) == 4
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"in0": inputs[0].numpy()})[0]
    err = rel_err(torch.from_numpy(got), want)
    assert 1e-6 < err < 2e-2, err  # int8 activations: about 1/127 of each block's range
