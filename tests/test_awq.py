"""int4-awq (glmc/quantization/awq.py) and AutoAWQ checkpoints (modeling_patches/awq_checkpoint.py, zero points in
glmc::QuantizedLinear): the search keeps the model's function, beats RTN on held-out text, round-trips through a
checkpoint and the CLI; an AutoAWQ GEMM checkpoint made by an independent packer loads, compiles and verifies."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from test_ops import LOWERED_TARGETS, one_node_model, random_quantized, rel_err, run_lowered

from glmc.assets import model_dir
from glmc.errors import CheckpointError, GlmcError
from glmc.modeling_patches import ops
from glmc.modeling_patches.checkpoint import load_model, random_model
from glmc.modeling_patches.modeling_chatglm import QuantLinear
from glmc.modeling_patches.ops.quantized_linear import dequantize_weight
from glmc.modeling_patches.tokenizer import load_tokenizer
from glmc.quantization.awq import apply_awq, awq_search, fake_quantize
from glmc.quantization.evaluate import evaluate, heldout_windows
from glmc.quantization.kv_calibration import calibration_samples
from glmc.quantization.scheme import apply_scheme, parse_precision, save_quantized

SHIPPED = model_dir(None)
needs_shipped = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped model is not here")


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    pos = torch.arange(s).expand(b, s)
    return model(ids, pos, torch.ones(b, s, dtype=torch.int64), model.empty_cache(b))[0].float()


def frobenius(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def shipped_state() -> dict[str, torch.Tensor]:
    """Every tensor of the shipped checkpoint (its shards, as its index lists them)."""
    files = set(json.loads((SHIPPED / "model.safetensors.index.json").read_text())["weight_map"].values())
    return {n: t for f in sorted(files) for n, t in load_file(str(SHIPPED / f)).items()}


@pytest.fixture(scope="module")
def shipped():
    """(float32 model, calibration samples, held-out windows) of the shipped model."""
    tok = load_tokenizer(SHIPPED)
    return (load_model(SHIPPED, "float32"), calibration_samples(tok.encode, num_samples=16, max_length=256),
            heldout_windows(tok.encode, max_tokens=2048))


# ---------------------------------------------------------------------------------------------- the search

def test_awq_folds_keep_the_function_and_beat_rtn_on_calibration():
    """On a random GQA model with a QKV bias and outlier input channels: the folds (norms, V rows tied per KV head,
    up rows) leave the float function unchanged; the quantized model is closer to the float one than RTN's."""
    config = tiny_config("chatglm3-6b")
    assert config.num_heads > config.num_kv_heads and config.qkv_bias
    model = random_model(config, seed=1, std=0.05)
    with torch.no_grad():  # outlier input channels, what AWQ is for
        for layer in model.transformer.encoder.blocks():
            layer.input_layernorm.weight[:4] *= 20
            layer.post_attention_layernorm.weight[4:8] *= 20
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, config.vocab_size, (1, 64), generator=g) for _ in range(4)]
    test = torch.randint(0, config.vocab_size, (2, 48), generator=g)
    searched = copy.deepcopy(model)
    report = awq_search(searched, calib, 4, 32, torch.float32, clip=False)  # clipping changes W on purpose
    assert rel_err(logits(searched, test), logits(model, test)) < 1e-5  # folding is exact up to float rounding
    assert set(report[0]) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert any(a > 0 for layer in report for a in layer.values())  # some group moved off s = 1 (RTN)
    rtn = apply_scheme(copy.deepcopy(model), parse_precision("fp32+int4-g32"))
    awq = apply_scheme(copy.deepcopy(model), parse_precision("fp32+int4-g32-awq"), calib)
    assert isinstance(awq.transformer.encoder.block(0).mlp.dense_4h_to_h, QuantLinear)
    for ids in (torch.cat(calib), test):  # the calibration text and text it never saw
        ref = logits(model, ids)
        err_rtn, err_awq = frobenius(logits(rtn, ids), ref), frobenius(logits(awq, ids), ref)
        assert err_awq < 0.85 * err_rtn, (err_awq, err_rtn)  # measured 0.39 vs 0.57 and 0.48 vs 0.59


def test_fake_quantize_is_what_glmc_stores():
    """The search's quantizer is the stored one: fake_quantize(W) == dequant of quantize_linear's codes."""
    from glmc.quantization.weight_only import quantize_linear
    lin = torch.nn.Linear(96, 40, bias=False)
    want = fake_quantize(lin.weight.detach(), 4, 32, torch.float16)
    q = quantize_linear(lin.half(), 4, 32)
    got = dequantize_weight(q.weight, q.weight_scale, 4, 32, 96).float()
    assert torch.equal(got, want)


def test_awq_refuses_what_it_cannot_search():
    config = tiny_config()
    with pytest.raises(GlmcError, match="needs calibration text"):
        apply_scheme(random_model(config), parse_precision("int4-g32-awq"))
    with pytest.raises(GlmcError, match="AWQ needs int8/int4 weights"):
        apply_awq(random_model(config), parse_precision("fp16"), [torch.zeros(1, 4, dtype=torch.int64)])
    quantized = apply_scheme(random_model(config), parse_precision("fp32+int4-g32"))
    with pytest.raises(GlmcError, match="starts from the float32 model"):
        awq_search(quantized, [torch.zeros(1, 4, dtype=torch.int64)], 4, 32, torch.float32)


# ---------------------------------------------------------------------------------------------- the shipped model

@needs_shipped
def test_awq_beats_rtn_on_shipped_heldout(shipped):
    """The goal's measurement in small: held-out text the calibration never saw (2048 tokens of heldout.txt)."""
    base, calib, windows = shipped
    fp16, rtn, awq = evaluate(base, ["fp16", "int4-g128", "int4-g128-awq"], windows, calibration=calib)
    print(f"fp16 ppl {fp16.perplexity:.4f}  rtn {rtn.perplexity:.4f} err {rtn.rel_error:.4e} top1 "
          f"{rtn.top1_agreement:.4f}  awq {awq.perplexity:.4f} err {awq.rel_error:.4e} top1 {awq.top1_agreement:.4f}")
    assert awq.rel_error < 0.95 * rtn.rel_error
    assert awq.top1_agreement > rtn.top1_agreement
    assert awq.perplexity - fp16.perplexity <= rtn.perplexity - fp16.perplexity


@needs_shipped
def test_awq_checkpoint_round_trip(shipped, tmp_path):
    base, calib, windows = shipped
    scheme = parse_precision("int4-g128-awq")
    model = apply_scheme(copy.deepcopy(base), scheme, calib)
    save_quantized(model, tmp_path / "q", scheme)
    q = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert q == {"weights": {"bits": 4, "group_size": 128, "include_output": False, "method": "awq"}}
    back = load_model(tmp_path / "q", "float16")
    lin = back.transformer.encoder.block(0).self_attention.query_key_value
    assert isinstance(lin, QuantLinear) and lin.weight_zero is None and lin.group_size == 128
    ids = windows[0][:, :64]
    assert torch.equal(logits(back, ids), logits(model, ids))


@needs_shipped
def test_cli_eval_and_quantize(tmp_path):
    from glmc.cli import main
    out = tmp_path / "eval.json"
    assert main(["eval", "--precisions", "fp16,int4-g128,int4-g128-awq", "--max-tokens", "512", "--json",
                 str(out)]) == 0
    rows = {r["precision"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"fp16", "int4-g128", "int4-g128-awq"}
    assert rows["int4-g128-awq"]["rel_error_raw"] < rows["int4-g128"]["rel_error_raw"]
    assert main(["quantize", "--precision", "int4-g128-awq", "--out", str(tmp_path / "q")]) == 0
    q = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert q["weights"]["method"] == "awq" and q["weights"]["bits"] == 4
    assert isinstance(load_model(tmp_path / "q", "float16").transformer.encoder.block(1).mlp.dense_4h_to_h,
                      QuantLinear)


# ---------------------------------------------------------------------------------------------- zero points

ZERO_CASES = [((2,), 100, 24, 4, 32), ((5,), 129, 8, 4, 64), ((2, 3), 67, 9, 4, 0), ((2,), 100, 24, 8, 32),
              ((3,), 64, 16, 8, 0), ((1,), 256, 16, 4, 128)]


def zero_node(batch, k, n, bits, group, bias):
    q, stored, scales = random_quantized(n, k, bits, group)
    lo = -(1 << (bits - 1))
    z = torch.randint(lo, -lo, scales.shape, generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    x = torch.randn(*batch, k)
    b = torch.randn(n) if bias else None
    s = scales[:, None] if group == 0 else scales.repeat_interleave(group, dim=1)[:, :k]
    zz = z[:, None] if group == 0 else z.repeat_interleave(group, dim=1)[:, :k]
    want = x.double() @ ((q.double() - zz.double()) * s.double()).T + (b.double() if b is not None else 0)
    return [x, stored, scales, b, z], dict(bits=bits, group_size=group, in_features=k), want


@pytest.mark.parametrize("batch,k,n,bits,group", ZERO_CASES)
def test_zero_point_reference_vs_float64(batch, k, n, bits, group):
    inputs, _attrs, want = zero_node(batch, k, n, bits, group, bias=True)
    x, stored, scales, b, z = inputs
    got = ops.quantized_linear(x, stored, scales, b, bits, group, k, z)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("target", LOWERED_TARGETS)
@pytest.mark.parametrize("batch,k,n,bits,group", ZERO_CASES)
def test_zero_point_lowerings(target, batch, k, n, bits, group):
    """Every lowering of a QuantizedLinear with zero points, run in ONNX Runtime, against the torch reference:
    DequantizeLinear's zero point (reference), MatMulNBits' zero_points (onnxruntime), the zero-point MatMul term
    beside a symmetric DequantizeLinear (tensorrt, which takes only zero zero points)."""
    inputs, attrs, want = zero_node(batch, k, n, bits, group, bias=k % 2 == 1)
    model = one_node_model("QuantizedLinear", inputs, attrs, 1, constants=(1, 2, 3, 4))
    got = torch.from_numpy(run_lowered(model, target, {"in0": inputs[0].numpy()})[0])
    assert rel_err(got, want) < 1e-5
    from glmc.export.lower import lower_model
    lowered = lower_model(model, target)
    dq = [len(nd.input) for nd in lowered.graph.node if nd.op_type == "DequantizeLinear"]
    if target == "tensorrt":
        assert dq == [2]  # no zero point given to TensorRT's dequantize
    elif target == "reference":
        assert dq == [3]


# ---------------------------------------------------------------------------------------------- AutoAWQ checkpoints
# An independent writer of AutoAWQ's GEMM format, following AutoAWQ's published code (awq/quantize/quantizer.py
# pseudo_quantize_tensor with zero_point=True; awq/modules/linear/gemm.py WQLinear_GEMM.from_linear), not glmc's.

def autoawq_pseudo_quantize(w: torch.Tensor, group: int):
    n, k = w.shape
    wg = w.reshape(-1, group)
    max_val, min_val = wg.amax(dim=1, keepdim=True), wg.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / 15
    zeros = (-torch.round(min_val / scales)).clamp_(0, 15)
    wq = (torch.clamp(torch.round(wg / scales) + zeros, 0, 15) - zeros) * scales
    return wq.reshape(n, k), scales.view(n, -1), zeros.view(n, -1)


def autoawq_gemm_pack(w: torch.Tensor, group: int):
    """Float [N, K] -> (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N], the float [N, K]
    weight AutoAWQ's kernels compute with)."""
    wq, scales, zeros = autoawq_pseudo_quantize(w.float(), group)
    scales, zeros = scales.t().contiguous().half(), zeros.t().contiguous()
    scale_zeros = zeros * scales.float()
    intweight = torch.cat([torch.round((wq[:, i] + scale_zeros[i // group]) / scales[i // group].float())
                           .to(torch.int)[:, None] for i in range(w.shape[1])], dim=1)
    intweight = intweight.t().contiguous().to(torch.int32)  # [K, N]
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    zeros = zeros.to(torch.int32)
    qzeros = torch.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=torch.int32)
    for col in range(zeros.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + order_map[i]] << (i * 4)
    rows = lambda t: t.float().repeat_interleave(group, 0)  # noqa: E731
    dequant = ((intweight.float() - rows(zeros)) * rows(scales)).t().contiguous()
    return qweight, qzeros, scales, dequant


LINEARS = ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}


@pytest.fixture(scope="module")
def autoawq(tmp_path_factory):
    """(AutoAWQ checkpoint of the shipped model, the float checkpoint of what it computes: dequantized in float)."""
    root = tmp_path_factory.mktemp("autoawq")
    awq_dir, ref_dir = root / "awq", root / "ref"
    awq_dir.mkdir()
    ref_dir.mkdir()
    state = shipped_state()
    packed, ref = {}, {}
    for name, t in state.items():
        if name.endswith(LINEARS):
            base = name[:-len(".weight")]
            packed[base + ".qweight"], packed[base + ".qzeros"], packed[base + ".scales"], ref[name] = \
                autoawq_gemm_pack(t, 128)
        else:
            packed[name] = ref[name] = t.half().contiguous()
    save_file(packed, str(awq_dir / "model.safetensors"))
    save_file({n: t.float() for n, t in ref.items()}, str(ref_dir / "model.safetensors"))
    cfg = json.loads((SHIPPED / "config.json").read_text())
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    (awq_dir / "config.json").write_text(json.dumps(cfg | {"quantization_config": AWQ_CONFIG}))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SHIPPED / f, awq_dir / f)
    return awq_dir, ref_dir


@needs_shipped
def test_autoawq_checkpoint_loads(autoawq):
    awq_dir, ref_dir = autoawq
    model, ref = load_model(awq_dir, "float32"), load_model(ref_dir, "float32")
    lin = model.transformer.encoder.block(2).mlp.dense_h_to_4h
    assert isinstance(lin, QuantLinear) and lin.weight_zero is not None and lin.group_size == 128
    assert int(lin.weight_zero.min()) >= -8 and int(lin.weight_zero.max()) <= 7
    # the stored weight is exactly AutoAWQ's (u - u_z) * s
    want = load_file(str(ref_dir / "model.safetensors"))["transformer.encoder.layers.2.mlp.dense_h_to_4h.weight"]
    got = dequantize_weight(lin.weight, lin.weight_scale, 4, 128, lin.in_features, lin.weight_zero)
    assert torch.equal(got, want)
    ids = torch.randint(0, 4000, (2, 48), generator=torch.Generator().manual_seed(0))
    assert rel_err(logits(model, ids), logits(ref, ids)) < 1e-5
    half = load_model(awq_dir, "float16")
    assert rel_err(logits(half, ids), logits(ref, ids)) < 2e-2  # fp16 activations


@needs_shipped
@pytest.mark.parametrize("group", [-1, 64])
def test_autoawq_quant_config_json_and_group_sizes(tmp_path, group):
    """AutoAWQ's own quant_config.json (w_bit, q_group_size, version GEMM); group -1 = one group per row."""
    state = shipped_state()
    packed = {}
    for name, t in state.items():
        if name.endswith(LINEARS):
            base = name[:-len(".weight")]
            qw, qz, sc, deq = autoawq_gemm_pack(t, t.shape[1] if group == -1 else group)
            packed[base + ".qweight"], packed[base + ".qzeros"], packed[base + ".scales"] = qw, qz, sc
            packed[name + ".ref"] = deq
        else:
            packed[name] = t
    refs = {n[:-4]: packed.pop(n) for n in list(packed) if n.endswith(".ref")}
    save_file(packed, str(tmp_path / "model.safetensors"))
    shutil.copy(SHIPPED / "config.json", tmp_path / "config.json")
    (tmp_path / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": group, "w_bit": 4,
                                                            "version": "GEMM"}))
    model = load_model(tmp_path, "float32")
    lin = model.transformer.encoder.block(0).self_attention.dense
    assert isinstance(lin, QuantLinear) and lin.group_size == (0 if group == -1 else group)
    got = dequantize_weight(lin.weight, lin.weight_scale, 4, lin.group_size, lin.in_features, lin.weight_zero)
    assert torch.equal(got, refs["transformer.encoder.layers.0.self_attention.dense.weight"])


@needs_shipped
def test_autoawq_checkpoint_compiles_and_verifies(autoawq, tmp_path, capsys):
    """`glmc compile` of the AutoAWQ checkpoint (precision.weights float: the checkpoint's own int4 weights are
    kept) for every CPU-checked target; each lowering carries the zero points its own way and verifies."""
    from glmc.cli import main
    awq_dir, _ = autoawq
    configs = Path(__file__).resolve().parent.parent / "compile_configs"
    import importlib.util
    trt = importlib.util.find_spec("tensorrt_rtx") is not None
    targets = "[onnx,reference,onnxruntime,tensorrt]" if trt else "[onnx,reference,onnxruntime]"
    assert main(["compile", str(configs / "glmc-tiny-fp32.yaml"), "--set", f"model.checkpoint={awq_dir}",
                 "--set", f"output={tmp_path / 'b'}", "--set", f"cache_dir={tmp_path / 'c'}", "--set",
                 f"targets={targets}"]) == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["verification"]["passed"]
    # the manifest and `glmc inspect` say the weights are the checkpoint's int4, though precision.weights is float
    assert m["precision"]["weights"] == "float"
    assert m["model"]["checkpoint_quantization"]["weights"] == {"bits": 4, "group_size": 128, "include_output": False,
                                                               "method": "awq", "zero_point": True,
                                                               "format": "autoawq"}
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "b")]) == 0
    assert "the checkpoint's weights: int4 g128, awq with zero points (autoawq format), kept as they are" in \
        " ".join(capsys.readouterr().out.split())  # (rich wraps at the captured terminal's width)
    counts = {}
    for t in m["targets"]:
        if t == "onnx":
            continue
        g = onnx.load(str(tmp_path / "b" / "onnx" / t / "model.onnx"), load_external_data=False).graph
        counts[t] = sorted({(nd.op_type, len(nd.input)) for nd in g.node
                            if nd.op_type in ("DequantizeLinear", "MatMulNBits")})
    assert counts["reference"] == [("DequantizeLinear", 3)]
    assert counts["onnxruntime"] == [("MatMulNBits", 4)]
    if "tensorrt" in counts:
        assert counts["tensorrt"] == [("DequantizeLinear", 2)]


def _write_awq(tmp_path: Path, config_patch: dict | None = None, quant_config: str | None = None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = json.loads((SHIPPED / "config.json").read_text())
    if config_patch is not None:
        cfg["quantization_config"] = AWQ_CONFIG | config_patch
    (d / "config.json").write_text(json.dumps(cfg))
    if quant_config is not None:
        (d / "quant_config.json").write_text(quant_config)
    for f in SHIPPED.glob("model*.safetensors*"):  # the shards and their index
        shutil.copy(f, d / f.name)
    return d


BAD_CONFIGS: dict[str, tuple[dict, str]] = {  # -> "<dir>/config.json: quantization_config.<message>"
    "gemv": ({"version": "gemv"}, r"version 'gemv': only the GEMM layout is read"),
    "gemv-fast": ({"version": "gemv_fast"}, r"version 'gemv_fast': only the GEMM layout"),
    "bits": ({"bits": 8}, r"bits 8: AWQ checkpoints are read with 4-bit weights only"),
    "desc-act": ({"desc_act": True}, r"desc_act true reorders the input channels"),
    "gptq": ({"quant_method": "gptq"}, r"quant_method 'gptq' is not supported"),
    "group": ({"group_size": 96}, r"group_size 96 is not one of 32, 64, 128 or -1"),
    "symmetric": ({"zero_point": False}, r"zero_point False: only AWQ's asymmetric codes"),
    "not-converted": ({"modules_to_not_convert": ["mlp.dense_4h_to_h"]},
                      r"modules_to_not_convert keeps 'mlp\.dense_4h_to_h' in floating point"),
}


@needs_shipped
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_awq_configs_are_refused(tmp_path, case):
    patch, message = BAD_CONFIGS[case]
    d = _write_awq(tmp_path, patch)
    with pytest.raises(CheckpointError) as e:
        load_model(d, "float32")
    assert re.match(re.escape(f"{d / 'config.json'}: quantization_config.") + message, str(e.value)), str(e.value)


@needs_shipped
def test_bad_awq_tensors_are_refused(tmp_path):
    d = _write_awq(tmp_path, {})  # a float checkpoint that claims AWQ: its float weights are not qweight
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: tensor 'transformer\.encoder\.layers\."
                       r"\d\.\w+\.\w+\.weight' is a float weight, but the checkpoint's quantization config says AWQ"):
        load_model(d, "float32")
    (d / "config.json").write_text((SHIPPED / "config.json").read_text())
    (d / "quant_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"quant_config\.json: not valid JSON"):
        load_model(d, "float32")
    state = shipped_state()
    for f in d.glob("model*.safetensors*"):  # one file instead of the copied shards
        f.unlink()
    name = "transformer.encoder.layers.0.mlp.dense_4h_to_h"
    state[name + ".qweight"] = state.pop(name + ".weight").to(torch.int16)  # not int32
    save_file(state, str(d / "model.safetensors"))
    (d / "quant_config.json").write_text(json.dumps({"w_bit": 4, "q_group_size": 128, "zero_point": True}))
    with pytest.raises(CheckpointError, match=rf"'{name}\.qweight' is int16 .*; AWQ GEMM qweight is int32"):
        load_model(d, "float32")


def test_gemm_unpack_order():
    """Nibble i of a word holds column ORDER[i]: AutoAWQ's reverse order (0, 4, 1, 5, 2, 6, 3, 7) read back."""
    from glmc.modeling_patches.awq_checkpoint import unpack_gemm
    cols = torch.arange(8, dtype=torch.int32)  # column c holds the code c
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    word = torch.zeros(1, 1, dtype=torch.int32)
    for i in range(8):
        word[0, 0] |= cols[order_map[i]] << (i * 4)
    assert unpack_gemm(word).tolist() == [list(range(8))]
    assert [(int(word) >> (4 * i)) & 0xF for i in range(8)] == order_map
    np.testing.assert_array_equal(unpack_gemm(torch.tensor([[-1]], dtype=torch.int32)).numpy(), [[15] * 8])
