"""sq8 (SmoothQuant W8A8): glmc::W8A8Linear against a hand-written per-token reference, its lowerings in ONNX Runtime,
apply_sq8's smoothing and folding, the quantized checkpoint round trip, `glmc eval` / `glmc quantize` on the shipped
model and the shipped glmc-tiny-sq8 config compiled for every target (TensorRT for RTX included)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_model
from onnx import TensorProto, helper, numpy_helper

from glmc.artifact import TARGETS as ARTIFACT_TARGETS
from glmc.artifact import read_manifest
from glmc.cli import main
from glmc.compiler import schema
from glmc.errors import ConfigError, GlmcError
from glmc.export.lower import lower_model
from glmc.modeling_patches.checkpoint import load_model
from glmc.modeling_patches.modeling_chatglm import W8A8Linear
from glmc.modeling_patches.ops.w8a8_linear import quantize_tokens, w8a8_linear
from glmc.quantization import smoothquant
from glmc.quantization.scheme import Scheme, apply_scheme, parse_precision
from glmc.quantization.smoothquant import apply_sq8

CONFIGS = Path(__file__).resolve().parents[1] / "compile_configs"
SHIPPED = schema.shipped_model()
needs_shipped = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped model is not there")


def per_token_reference(x, qweight, sw, inv, bias) -> np.ndarray:
    """The op's docstring, one token (row) at a time in float64 / int64 loops over rows."""
    xs = x.float().reshape(-1, x.shape[-1]).numpy().astype(np.float32)
    w = qweight.numpy().astype(np.int64)
    out = []
    for row in xs:
        r = row * (inv.float().numpy() if inv is not None else np.float32(1))
        sx = np.float32(max(np.abs(r).max(), np.float32(1e-30))) / np.float32(127)
        q = np.clip(np.round(r / sx), -127, 127).astype(np.int64)  # np.round: half to even
        y = (q @ w.T).astype(np.float32) * (sx * sw.float().numpy())
        out.append(y + (bias.float().numpy() if bias is not None else 0))
    return np.stack(out).reshape(*x.shape[:-1], w.shape[0])


def layer(n=48, k=96, dtype=torch.float32, seed=0, inv=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    sw = (torch.rand(n, generator=g) / 50).to(dtype)
    iv = (torch.rand(k, generator=g) + 0.5).to(dtype) if inv else None
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return q, sw, iv, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inv, bias", [(True, True), (False, False), (True, False)])
def test_op_equals_the_hand_written_per_token_reference(dtype, inv, bias):
    q, sw, iv, b = layer(dtype=dtype, inv=inv, bias=bias)
    x = (torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    x[0, 0] = 0  # an all-zero token: q = 0, Y = bias
    got = w8a8_linear(x, q, sw, iv, b)
    want = torch.from_numpy(per_token_reference(x, q, sw, iv, b)).to(dtype)
    assert got.dtype == dtype and got.shape == (3, 7, 48)
    assert torch.equal(got, want)  # same float32 operations in the same order: bit-equal
    assert torch.equal(got[0, 0], b if b is not None else torch.zeros(48, dtype=dtype))


def test_activation_codes_round_half_to_even_and_stay_in_range():
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, -1.5, 126.5], [-254.0, 1.0, 3.0, -5.0, 0.0, 7.0]])
    q, sx = quantize_tokens(x, None)
    assert sx.flatten().tolist() == [1.0, 2.0]
    assert q.tolist() == [[127, 2, -4, 0, -2, 126], [-127, 0, 2, -2, 0, 4]]  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    q, _ = quantize_tokens(torch.randn(64, 512) * 1e3, torch.rand(512) + 0.1)
    assert int(q.abs().max()) == 127 and q.dtype == torch.int8


def w8a8_graph(q, sw, inv, bias, elem: int, shape=(2, 5, 96)) -> onnx.ModelProto:
    names = ["x", "w", "sw", "inv" if inv is not None else "", "b" if bias is not None else ""]
    inits = [numpy_helper.from_array(q.numpy(), "w"), numpy_helper.from_array(sw.numpy(), "sw")]
    inits += [numpy_helper.from_array(t.numpy(), n) for t, n in ((inv, "inv"), (bias, "b")) if t is not None]
    while names[-1] == "":
        names.pop()
    node = helper.make_node("W8A8Linear", names, ["y"], domain="glmc")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, list(shape))],
                          [helper.make_tensor_value_info("y", elem, [*shape[:-1], q.shape[0]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("glmc", 1)])
    m.ir_version = 11
    return m


@pytest.mark.parametrize("target", ["reference", "onnxruntime", "tensorrt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ones", [False, True])
def test_lowerings_in_onnxruntime_equal_the_op(target, dtype, ones):
    """Each lowering, run by ONNX Runtime with the session its target's runtime config asks for (all graph
    optimizations on), gives the op's values: the same codes, so float32 differs by re-associated scale products
    only (<= 1e-6 relative), fp16 after the final cast not at all. An all-ones InvSmooth (folded into the norm) is
    dropped from the graph."""
    q, sw, iv, b = layer(dtype=dtype)
    if ones:
        iv = torch.ones_like(iv)
    x = (torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    elem = TensorProto.FLOAT if dtype == torch.float32 else TensorProto.FLOAT16
    m = lower_model(w8a8_graph(q, sw, iv, b, elem), target)
    ops = [n.op_type for n in m.graph.node]
    assert {n.domain for n in m.graph.node} <= {"", "com.microsoft"}
    assert {"reference": "MatMulInteger", "onnxruntime": "MatMulIntegerToFloat", "tensorrt": "QuantizeLinear"}[
        target] in ops
    assert (ops.count("Mul") == {"reference": 2, "onnxruntime": 1, "tensorrt": 1}[target] + (0 if ones else 1))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(ARTIFACT_TARGETS[target].disabled_optimizers))
    got = s.run(None, {"x": x.numpy()})[0].astype(np.float32)
    want = w8a8_linear(x, q, sw, iv, b).float().numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= (1e-6 if dtype == torch.float32 else 0.0), rel


def test_reference_lowering_stays_out_of_onnxruntimes_bias_fusion():
    """Why the reference multiplies (acc * sx) * sw: ONNX Runtime 1.32 fuses MatMulInteger -> Cast ->
    Mul(sx * sw) -> Add(bias) into com.microsoft.MatMulIntegerToFloat, whose kernel then adds bias * sx. Measured
    here on the literal graph (a test of ORT: when it stops failing, the reassociation can go)."""
    q, sw, _, b = layer()
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(3)) * 3
    qx, sx = quantize_tokens(x, None)
    u = (qx.to(torch.int16) + 128).to(torch.uint8).numpy()
    nodes = [helper.make_node("MatMulInteger", ["u", "w", "zp"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["sx", "sw"], ["s"]), helper.make_node("Mul", ["accf", "s"], ["t"]),
             helper.make_node("Add", ["t", "b"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("u", TensorProto.UINT8, [2, 5, 96]),
                                       helper.make_tensor_value_info("sx", TensorProto.FLOAT, [2, 5, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 48])],
                          [numpy_helper.from_array(np.ascontiguousarray(q.numpy().T), "w"),
                           numpy_helper.from_array(sw.numpy(), "sw"), numpy_helper.from_array(b.numpy(), "b"),
                           numpy_helper.from_array(np.array(128, np.uint8), "zp")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    want = w8a8_linear(x, q, sw, None, b).numpy()
    errors = {}
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = s.run(None, {"u": u, "sx": sx.numpy()})[0]
        errors[level.name] = float(np.abs(got - want).max() / np.abs(want).max())
    assert errors["ORT_ENABLE_BASIC"] < 1e-6 and errors["ORT_ENABLE_ALL"] > 1e-3, errors


# ---------------------------------------------------------------------------------------------- apply_sq8

def calibration(vocab: int, n: int = 4, length: int = 48) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    s = ids.shape[1]
    with torch.no_grad():
        out, _ = model(ids, torch.arange(s)[None], torch.ones(1, s, dtype=torch.int64), model.empty_cache(1))
    return out.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_apply_sq8_folds_into_the_norms_and_smooths_the_rest():
    base = tiny_model(std=0.05).float()
    calib = calibration(base.config.vocab_size)
    stats = smoothquant.activation_absmax(base, calib)
    model = apply_sq8(copy.deepcopy(base), Scheme("fp32", 8, method="sq8", alpha=0.5), calib)
    for i, (blk, ref) in enumerate(zip(model.transformer.encoder.blocks(), base.transformer.encoder.blocks(),
                                       strict=True)):
        qkv, dense = blk.self_attention.query_key_value, blk.self_attention.dense
        up, down = blk.mlp.dense_h_to_4h, blk.mlp.dense_4h_to_h
        assert isinstance(qkv, W8A8Linear) and isinstance(dense, W8A8Linear) and qkv.bias is not None
        assert isinstance(up, W8A8Linear) and isinstance(down, W8A8Linear)
        assert torch.equal(qkv.inv_smooth, torch.ones(qkv.in_features))  # folded ...
        assert torch.equal(up.inv_smooth, torch.ones(up.in_features))
        s = smoothquant.smoothing_factors(stats[i]["self_attention.query_key_value"],
                                          ref.self_attention.query_key_value.weight, 0.5)
        torch.testing.assert_close(blk.input_layernorm.weight, ref.input_layernorm.weight / s)  # ... here
        s = smoothquant.smoothing_factors(stats[i]["mlp.dense_4h_to_h"], ref.mlp.dense_4h_to_h.weight, 0.5)
        torch.testing.assert_close(down.inv_smooth, 1 / s)  # carried by the op
        assert not torch.equal(dense.inv_smooth, torch.ones(dense.in_features))
    assert isinstance(model.transformer.output_layer, torch.nn.Linear)  # the output layer stays float
    ids = calibration(base.config.vocab_size, 1, 40)[0]
    err = rel(logits(model, ids), logits(base, ids))
    assert err < 0.03, err  # measured 1.1e-2 (per-token int8 on a random model: no outliers to migrate)


def test_smoothing_migrates_an_outlier_channel(monkeypatch):
    """An activation channel 40x the others (one RMSNorm weight scaled up; the next weight column scaled down so
    the float model is unchanged): per-token int8 alone loses the small channels, SmoothQuant keeps them."""
    base = tiny_model(std=0.05).float()
    for blk in base.transformer.encoder.blocks():
        blk.input_layernorm.weight.data[5] *= 40
        blk.self_attention.query_key_value.weight.data[:, 5] /= 40
        blk.post_attention_layernorm.weight.data[7] *= 40
        blk.mlp.dense_h_to_4h.weight.data[:, 7] /= 40
    calib = calibration(base.config.vocab_size)
    ids = calibration(base.config.vocab_size, 1, 40)[0]
    ref = logits(base, ids)
    errors: dict[float | None, float] = {}
    for alpha in (0.5, 0.8):
        errors[alpha] = rel(logits(apply_sq8(copy.deepcopy(base), parse_precision(f"fp32+sq8-a{alpha}"), calib),
                                   ids), ref)
    monkeypatch.setattr(smoothquant, "smoothing_factors", lambda a, w, alpha: torch.ones(w.shape[1]))
    errors[None] = rel(logits(apply_sq8(copy.deepcopy(base), parse_precision("fp32+sq8"), calib), ids), ref)
    assert errors[0.5] < errors[None] / 2 and errors[0.8] < errors[None] / 2, errors


def test_bad_alpha_and_missing_calibration_are_refused(tmp_path):
    with pytest.raises(GlmcError, match=r"alpha 1\.5 is outside"):
        parse_precision("sq8-a1.5")
    with pytest.raises(GlmcError, match=r"'sq8-ax' is not fp32"):
        parse_precision("sq8-ax")
    base = tiny_model(std=0.05).float()
    with pytest.raises(GlmcError, match=r"SmoothQuant alpha -0.1 is outside \[0, 1\]"):
        apply_sq8(copy.deepcopy(base), Scheme("fp16", 8, method="sq8", alpha=-0.1), calibration(300))
    with pytest.raises(GlmcError, match="needs calibration text"):
        apply_scheme(copy.deepcopy(base), parse_precision("sq8"), None)
    model = apply_sq8(copy.deepcopy(base), parse_precision("fp32+sq8"), calibration(300))
    with pytest.raises(GlmcError, match="already quantized"):
        apply_sq8(model, parse_precision("fp32+sq8"), calibration(300))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("extends: [" + str(CONFIGS / "glmc-tiny-sq8.yaml") + "]\nprecision:\n  smoothquant_alpha: 1.5\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:3: precision\.smoothquant_alpha: 1\.5 is above the maximum"):
        schema.load(cfg, [], check_files=False)
    cfg.write_text("extends: [" + str(CONFIGS / "glmc-tiny-int8.yaml") + "]\nprecision:\n  smoothquant_alpha: 0.6\n")
    with pytest.raises(ConfigError, match=r"precision\.smoothquant_alpha only applies to precision\.weights: sq8"):
        schema.load(cfg, [], check_files=False)


# ---------------------------------------------------------------------------------------------- shipped model

@needs_shipped
def test_quantize_command_and_reload_round_trip(tmp_path):
    """`glmc quantize --precision sq8-a0.75` writes int8 codes, scales and smoothing vectors with quantization.json
    method sq8; loading it back builds W8A8Linear layers that give the logits apply_scheme's model gives, bit for
    bit."""
    out = tmp_path / "q"
    assert main(["quantize", "--out", str(out), "--precision", "sq8-a0.75", "--num-samples", "4"]) == 0
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["weights"] == {"bits": 8, "group_size": 0, "include_output": False, "method": "sq8", "alpha": 0.75}
    q = load_model(out, "float16")
    blk = q.transformer.encoder.block(0)
    assert isinstance(blk.mlp.dense_4h_to_h, W8A8Linear) and blk.mlp.dense_4h_to_h.weight.dtype == torch.int8
    assert q.transformer.encoder.block(0).mlp.dense_4h_to_h.inv_smooth.dtype == torch.float16
    from glmc.modeling_patches.tokenizer import load_tokenizer
    from glmc.quantization.kv_calibration import calibration_samples
    calib = calibration_samples(load_tokenizer(SHIPPED).encode, num_samples=4, max_length=256)
    made = apply_scheme(load_model(SHIPPED, "float32"), parse_precision("sq8-a0.75"), calib)
    ids = torch.tensor([[5, 17, 200, 31, 9, 1000, 44, 3]])
    assert torch.equal(logits(q, ids), logits(made, ids))


@needs_shipped
def test_eval_command_sq8_within_one_percent_of_fp16(tmp_path, capsys):
    """`glmc eval --precisions fp16,sq8,sq8-a0.8` on the shipped model: the issue's goal, sq8 perplexity within 1%
    of fp16 (measured on the full held-out text: +0.03% / +0.01%, docs/quantization.md)."""
    report = tmp_path / "eval.json"
    assert main(["eval", "--precisions", "fp16,sq8,sq8-a0.8", "--max-tokens", "2048", "--cache-dir",
                 str(tmp_path / "cache"), "--json", str(report), "--markdown"]) == 0
    rows = {r["precision"]: r for r in json.loads(report.read_text())}
    fp16 = rows["fp16"]["perplexity_raw"]
    for name in ("sq8", "sq8-a0.8"):
        r = rows[name]
        assert abs(r["perplexity_raw"] / fp16 - 1) < 0.01, (name, r)
        assert r["rel_error_raw"] < 2e-2 and r["top1_raw"] > 0.95, (name, r)
    assert "| sq8-a0.8 | fp16+sq8-a0.8 |" in capsys.readouterr().out


@needs_shipped
@pytest.mark.skipif(schema.tensorrt_available() is None, reason="neither tensorrt nor tensorrt_rtx_bindings is "
                                                               "installed")
def test_shipped_sq8_config_compiles_and_verifies_on_every_target(tmp_path):
    """compile_configs/glmc-tiny-sq8.yaml (CI): every lowering verified against torch; the TensorRT for RTX engine
    runs every W8A8Linear as an int8 x int8 GEMM; ORT runs MatMulIntegerToFloat."""
    assert main(["compile", str(CONFIGS / "glmc-tiny-sq8.yaml"), "--set", f"output={tmp_path / 'b'}", "--set",
                 f"cache_dir={tmp_path / 'cache'}"]) == 0
    m = read_manifest(tmp_path / "b")
    assert m["precision"]["tag"] == "sq8-fp32"
    v = m["verification"]
    assert v["passed"] and set(v["targets"]) == {"reference", "onnxruntime", "tensorrt"}
    assert v["tolerance"]["rel"] == 2e-2  # verify.tolerance_for(float32, w8a8): code flips, not lowering bugs
    for t, r in v["targets"].items():  # measured: 4e-7 .. 7.4e-3 (one activation code flipped in a decode step)
        assert max(r["prefill_rel"], r["decode_rel"]) <= 2e-2 and r["greedy_agree"] == r["steps"], (t, r)
    layers = json.loads((tmp_path / "b" / m["engines"]["tensorrt"]["layers"]).read_text())
    int8_gemms = [x for x in layers["engine_layers"] if x.get("type") == "gemm"
                  and [i.get("dtype") for i in x.get("inputs", [])] == ["Int8"]]
    config = json.loads((SHIPPED / "config.json").read_text())
    assert len(int8_gemms) == 4 * config["num_layers"]
    ort_ops = {n.op_type for n in onnx.load(str(tmp_path / "b" / "onnx" / "onnxruntime" / "model.onnx"),
                                            load_external_data=False).graph.node}
    assert "MatMulIntegerToFloat" in ort_ops and "MatMulNBits" not in ort_ops
    from test_compiler import runs_what_was_verified
    runs_what_was_verified(tmp_path / "b", m)  # each lowering as glmc.load opens it, within its verified bound
