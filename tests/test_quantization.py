"""Weight-only int8/int4 quantization, KV-cache int8 calibration, quantized checkpoints and the eval table (tiny
models)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, tiny_model
from safetensors.torch import save_file

from glmc.errors import GlmcError
from glmc.modeling_patches.checkpoint import load_model, random_model
from glmc.modeling_patches.modeling_chatglm import QuantLinear
from glmc.modeling_patches.ops.quantized_linear import dequantize_weight, pack_int4
from glmc.quantization.evaluate import evaluate, heldout_windows
from glmc.quantization.kv_calibration import REDUCE_DIMS, calibrate_kv, calibration_samples
from glmc.quantization.scheme import Scheme, apply_scheme, parse_precision, save_quantized
from glmc.quantization.weight_only import quantize_linear, quantize_model, quantize_weight


def encode_bytes(vocab: int):
    """A stand-in tokenizer for random models: UTF-8 bytes folded into the vocabulary."""
    return lambda text: [b % vocab for b in text.encode()]


def official_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM2/3's quantization.py, verbatim in spirit: computed in the weight's own dtype."""
    weight_scale = weight.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)
    return torch.round(weight / weight_scale[:, None]).to(torch.int8), weight_scale


def official_pack_int4(q: torch.Tensor) -> torch.Tensor:
    """The official int4 storage (compress_int4_weight): byte j = (q[2j] << 4) | (q[2j+1] & 0xF), as int8."""
    hi = (q[:, 0::2].to(torch.int32) & 0xF) << 4
    lo = q[:, 1::2].to(torch.int32) & 0xF
    return (hi | lo).to(torch.uint8).view(torch.int8)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    with torch.no_grad():
        logits, _ = model(ids, torch.arange(s).expand(b, s), torch.ones(b, s, dtype=torch.int64),
                          model.empty_cache(b))
    return logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_formula_equals_official_in_fp32(bits):
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(bits)) * 0.05
    q, scale = quantize_weight(w, bits, 0)
    q_ref, scale_ref = official_quantize(w, bits)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)


def test_per_channel_formula_matches_official_in_fp16():
    """Same scales. The official code divides in fp16, rounding the quotient before rounding it to an integer; glmc
    divides in fp32 by the stored fp16 scale. About 1% of weights then differ by one step, glmc's always nearer."""
    w = (torch.randn(512, 1024, generator=torch.Generator().manual_seed(1)) * 0.05).half()
    q, scale = quantize_weight(w, 8, 0)
    q_ref, scale_ref = official_quantize(w, 8)
    assert scale.dtype == torch.float16 and torch.equal(scale, scale_ref)
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02
    s, w32 = scale.float()[:, None], w.float()
    assert bool(((q.float() * s - w32).abs() <= (q_ref.float() * s - w32).abs()).all())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [0, 32, 64, 128])
@pytest.mark.parametrize("k", [100, 131, 256])  # not a multiple of the group; odd; a multiple
def test_dequantization_error_is_at_most_half_a_step(bits, group_size, k):
    qmax = 2 ** (bits - 1) - 1
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(k)) * 0.1
    w[3, 5] = 2.0  # an outlier: only its row (or group) loses resolution
    q, scale = quantize_weight(w, bits, group_size)
    groups = -(-k // group_size) if group_size else 0
    assert scale.shape == ((48, groups) if groups else (48,))
    assert int(q.abs().max()) <= qmax
    step = scale.repeat_interleave(group_size, dim=1)[:, :k] if group_size else scale[:, None]
    # each group's (or row's) scale is its own abs-max / qmax, the last, shorter group included
    cols = [slice(i * group_size, min(k, (i + 1) * group_size)) for i in range(groups)] if groups else [slice(0, k)]
    for i, c in enumerate(cols):
        got = scale[:, i] if groups else scale
        assert torch.allclose(got, w[:, c].abs().amax(-1) / qmax, rtol=1e-6, atol=0)
    deq = dequantize_weight(q if bits == 8 else pack_int4(q), scale, bits, group_size, k)
    assert torch.equal(deq, q.float() * step)
    assert float(((deq - w).abs() - step / 2).max()) <= 1e-7
    # the relative error bound that follows: int8 <= 1/254 of the abs-max, int4 <= 1/14
    assert float(((deq - w).abs() / (step * qmax)).max()) <= 0.5 / qmax + 1e-6


def test_quantized_linear_layer_computes_with_the_dequantized_weight():
    lin = torch.nn.Linear(131, 40, bias=True).requires_grad_(False)
    x = torch.randn(3, 5, 131)
    for bits, group in ((8, 0), (4, 0), (4, 32), (8, 64)):
        ql = quantize_linear(lin, bits, group)
        q, scale = quantize_weight(lin.weight, bits, group)
        deq = dequantize_weight(q if bits == 8 else ql.weight, scale, bits, group, 131)
        assert torch.allclose(ql(x), x @ deq.T + lin.bias, atol=1e-5)
        bound = 0.02 if bits == 8 else 0.25
        assert rel_err(ql(x), lin(x)) < bound


def test_quantized_model_stays_close_to_float():
    model = tiny_model(std=0.05)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = logits_of(model, ids)
    errors = {}
    for bits, group in ((8, 0), (4, 0), (4, 32)):
        q = quantize_model(random_model(tiny_config(), std=0.05), bits, group)  # same seed: same float weights
        assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 4 * 2
        assert isinstance(q.transformer.output_layer, torch.nn.Linear)  # output layer stays float by default
        errors[(bits, group)] = rel_err(logits_of(q, ids), ref)
    assert errors[(8, 0)] < 0.03  # ~0.8% per linear on Gaussian weights, 8 linears deep
    assert errors[(4, 32)] < errors[(4, 0)] < 0.35  # int4 per channel: ~14% per linear on Gaussian weights
    q = quantize_model(random_model(tiny_config(), std=0.05), 8, 0, include_output=True)
    assert isinstance(q.transformer.output_layer, QuantLinear)
    with pytest.raises(GlmcError, match="already quantized"):
        quantize_model(q, 8)
    with pytest.raises(GlmcError, match="group_size 48"):
        quantize_model(tiny_model(), 4, 48)


# ---------------------------------------------------------------------------------------------- schemes

def test_precision_names():
    assert parse_precision("fp32") == Scheme("fp32")
    assert parse_precision("int4-g128") == Scheme("fp16", 4, 128)
    assert parse_precision("int8+kv8") == Scheme("fp16", 8, 0, False, "channel")
    assert parse_precision("fp32+int4-g64-out+kv8-head") == Scheme("fp32", 4, 64, True, "head")
    assert parse_precision("kv8-tensor").to_json() == {"kv_cache": {"granularity": "tensor", "dtype": "int8"}}
    assert parse_precision("int4-g32").to_json() == {"weights": {"bits": 4, "group_size": 32, "include_output": False}}
    assert parse_precision("int4-g128-awq") == Scheme("fp16", 4, 128, method="awq")
    assert parse_precision("sq8-a0.75+kv8") == Scheme("fp16", 8, 0, False, "channel", "sq8", 0.75)
    assert parse_precision("fp8+kvfp8") == Scheme("fp16", 8, 0, False, "tensor", "fp8", kv_dtype="fp8")
    assert [parse_precision(n).tag for n in ("int4-g128-awq", "sq8", "fp8+kvfp8", "bf16+sq8-a0.6")] == [
        "int4-g128-awq", "sq8", "fp8-kvfp8", "sq8-a0.6-bf16"]
    for bad in ("int3", "int4-g48", "kv8-row", "fp4", "sq8-a1.5", "fp8-out", "sq8-g128", "kvfp8-row"):
        with pytest.raises(GlmcError):
            parse_precision(bad)
    for name in ("fp16+int4-g128-out+kv8-head", "bf16+int8", "fp32+kv8-tensor", "fp16+int4-g64-awq",
                 "fp16+sq8-a0.8+kvfp8-tensor", "bf16+fp8"):
        scheme = parse_precision(name)
        assert Scheme.from_json(scheme.to_json(), scheme.dtype) == scheme and scheme.name == name
    with pytest.raises(GlmcError, match="granularity 'row'"):
        Scheme.from_json({"kv_cache": {"granularity": "row", "dtype": "int8"}})
    with pytest.raises(GlmcError, match=r"weights\.method 'gptq'"):
        Scheme.from_json({"weights": {"bits": 4, "group_size": 128, "method": "gptq"}})
    with pytest.raises(GlmcError, match="fp8 weights are 8-bit"):
        Scheme.from_json({"weights": {"bits": 4, "group_size": 0, "method": "fp8"}})


def test_save_and_load_round_trip(tmp_path):
    base = tiny_model()
    samples = calibration_samples(encode_bytes(300), num_samples=4, max_length=32)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    for precision in ("int4-g32+kv8-channel", "fp32+int8+kv8-tensor", "int4-out"):
        scheme = parse_precision(precision)
        model = apply_scheme(tiny_model(), scheme, samples)
        out = save_quantized(model, tmp_path / precision, scheme)
        assert json.loads((out / "quantization.json").read_text()) == scheme.to_json()
        loaded = load_model(out, dtype=scheme.torch_dtype)
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
        assert torch.equal(logits_of(model, ids), logits_of(loaded, ids))
        assert loaded.kv_dtype == (torch.int8 if scheme.kv_granularity else scheme.torch_dtype)
    del base


# ---------------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("granularity", ["tensor", "head", "channel"])
def test_kv_scales_bound_the_calibration_cache(granularity):
    model = tiny_model()
    samples = calibration_samples(encode_bytes(300), num_samples=3, max_length=40)
    for dtype in (torch.float32, torch.float16):
        k_scales, v_scales = calibrate_kv(model, samples, granularity, dtype=dtype)
        want = {"tensor": (1,), "head": (2,), "channel": (2, 32)}[granularity]
        assert all(s.shape == want and s.dtype == dtype for s in k_scales + v_scales)
        # per layer, the largest |x| / scale seen: <= 127 (bounded), close to 127 (tight)
        ratio: dict[tuple[int, str], torch.Tensor] = {}
        for ids in samples:
            with torch.no_grad():
                _, presents = model(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids), model.empty_cache(1))
            for i, (k, v) in enumerate(presents):
                for name, x, s in (("k", k, k_scales[i]), ("v", v, v_scales[i])):
                    shaped = {"tensor": (1, 1, 1, 1), "head": (1, 2, 1, 1), "channel": (1, 2, 1, 32)}[granularity]
                    r = (x.abs() / s.float().reshape(shaped)).amax(dim=REDUCE_DIMS[granularity])
                    ratio[i, name] = torch.maximum(ratio.get((i, name), r), r)
        for r in ratio.values():
            assert float(r.max()) <= 127.0
            assert float(r.min()) >= 127.0 * (1 - 2 * torch.finfo(dtype).eps) - 1e-4


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_kv8_model_runs_an_int8_cache_close_to_float(granularity):
    model = tiny_model(std=0.05)
    ids = heldout_windows(encode_bytes(300), max_length=30)[1]  # text like the calibration text, not seen by it
    samples = calibration_samples(encode_bytes(300), num_samples=8, max_length=64)
    kv8 = apply_scheme(tiny_model(std=0.05), Scheme("fp32", kv_granularity=granularity), samples)
    # prefill 20 tokens, then decode the rest one by one so they attend to the int8 cache
    logits = []
    for m in (model, kv8):
        cache = m.empty_cache(1)
        out, cache = m(ids[:, :20], torch.arange(20)[None], torch.ones(1, 20, dtype=torch.int64), cache)
        steps = [out[0]]
        for t in range(20, 30):
            with torch.no_grad():
                out, cache = m(ids[:, t:t + 1], torch.tensor([[t]]), torch.ones(1, t + 1, dtype=torch.int64), cache)
            steps.append(out[0])
        logits.append(torch.cat(steps))
        assert cache[0][0].dtype == (torch.int8 if m is kv8 else torch.float32)
    assert torch.equal(logits[0][:20], logits[1][:20])  # the prefill never reads the cache
    err = rel_err(logits[1][20:], logits[0][20:])
    assert 0 < err < 0.03


def test_calibration_files(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("abcdefghij" * 10)  # 100 tokens
    s = calibration_samples(encode_bytes(300), txt, num_samples=3, max_length=32)
    assert [x.shape[1] for x in s] == [32, 32, 32]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "hello world"}\n\n{"text": "' + "x" * 50 + '"}\n{"text": "a"}\n')
    s = calibration_samples(encode_bytes(300), jl, num_samples=10, max_length=20)
    assert [x.shape[1] for x in s] == [11, 20]  # the 1-token sample is dropped
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(GlmcError, match=r"bad\.jsonl:2"):
        calibration_samples(encode_bytes(300), bad)
    with pytest.raises(GlmcError, match="does not exist"):
        calibration_samples(encode_bytes(300), tmp_path / "none.txt")
    shipped = calibration_samples(encode_bytes(300))  # the shipped set fills the default 32 x 256 tokens
    assert [x.shape[1] for x in shipped] == [256] * 32


# ---------------------------------------------------------------------------------------------- official checkpoints

@pytest.mark.parametrize("bits", [8, 4])
def test_official_quantized_checkpoint_loads_into_quantlinear(tmp_path, bits):
    """A checkpoint as THUDM's quantize() leaves it: quantization_bit in config.json, int8 tensors, fp16 scales,
    int4 packed with element 2j in the HIGH nibble (written here independently of glmc's packing)."""
    float_model = random_model(tiny_config(), seed=3, std=0.05, dtype=torch.float16)
    cfg = float_model.config.to_chatglm_json()
    cfg["quantization_bit"] = bits
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors, dequantized = {}, {}
    for name, t in float_model.state_dict().items():
        linear = any(f".{p}.weight" in name for p in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"))
        if linear and ".encoder.layers." in name:
            q, scale = official_quantize(t, bits)
            tensors[name] = q if bits == 8 else official_pack_int4(q)
            tensors[name.replace(".weight", ".weight_scale")] = scale
            dequantized[name] = q.float() * scale.float()[:, None]
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path, dtype="float32")  # fp16 scales widen exactly
    qkv = model.transformer.encoder.block(1).self_attention.query_key_value
    assert isinstance(qkv, QuantLinear) and qkv.bits == bits and qkv.group_size == 0
    for name, want in dequantized.items():
        layer = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(layer, QuantLinear), name
        got = dequantize_weight(layer.weight, layer.weight_scale, bits, 0, layer.in_features)
        assert torch.equal(got, want), name
    # the same logits as a float model holding the dequantized weights
    ref = random_model(tiny_config(), seed=3, std=0.05, dtype=torch.float16).float()
    ref.load_state_dict(dequantized, strict=False)
    ref.init_rotary()  # float32 tables, as load_model builds them
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    assert rel_err(logits_of(model, ids), logits_of(ref, ids)) < 1e-6


# ---------------------------------------------------------------------------------------------- eval

def test_evaluate_table_numbers():
    model = tiny_model(std=0.05)
    windows = heldout_windows(encode_bytes(300), max_length=48, max_tokens=96)
    samples = calibration_samples(encode_bytes(300), num_samples=4, max_length=48)
    results = evaluate(model, ["fp32", "fp16", "int8", "int4", "kv8", "int8+kv8"], windows, samples, chunk=4)
    r = {x.name: x for x in results}
    assert r["fp32"].rel_error == 0 and r["fp32"].top1_agreement == 1 and r["fp32"].tokens == 94
    nll = torch.nn.functional.cross_entropy(
        torch.cat([logits_of(model, w)[0, :-1] for w in windows]), torch.cat([w[0, 1:] for w in windows]))
    assert abs(r["fp32"].perplexity - float(nll.exp())) < 1e-3 * float(nll.exp())
    assert r["fp16"].rel_error < 5e-3
    assert r["fp16"].rel_error < r["int8"].rel_error < r["int4"].rel_error < 0.4
    assert 0 < r["kv8"].rel_error < 0.05 and r["int8+kv8"].rel_error > r["int8"].rel_error * 0.5
    assert r["fp16"].top1_agreement > 0.98 and r["int8"].top1_agreement > 0.9 and r["kv8"].top1_agreement > 0.9


@pytest.mark.parametrize("precision", ["int8", "fp32+sq8", "fp32+fp8", "fp32+kvfp8", "kv8"])
def test_evaluate_refuses_a_quantized_base(precision):
    model = tiny_model()
    samples = calibration_samples(encode_bytes(300), num_samples=2, max_length=24)
    apply_scheme(model, parse_precision(precision), samples)
    windows = heldout_windows(encode_bytes(300), max_length=24, max_tokens=24)
    with pytest.raises(GlmcError, match="holds a quantized checkpoint; evaluate its float original"):
        evaluate(model, ["fp16"], windows, samples)


def test_quantize_and_eval_commands(tmp_path, capsys):
    """`glmc quantize` then `glmc eval` on a checkpoint directory with a real SentencePiece tokenizer."""
    from test_tokenizer import build_sentencepiece

    from glmc.cli import main
    from glmc.modeling_patches.checkpoint import save_checkpoint
    from glmc.modeling_patches.tokenizer import load_tokenizer

    src = build_sentencepiece(tmp_path / "float")
    save_checkpoint(random_model(tiny_config(vocab_size=512), std=0.05), src)
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "q"), "--precision", "int4-g32+kv8",
                 "--num-samples", "4", "--calibration-length", "32"]) == 0
    q = load_model(tmp_path / "q")
    mlp_in = q.transformer.encoder.block(0).mlp.dense_h_to_4h
    assert isinstance(mlp_in, QuantLinear) and mlp_in.bits == 4 and q.kv_dtype == torch.int8
    assert load_tokenizer(tmp_path / "q").encode("hello world") == load_tokenizer(src).encode("hello world")
    capsys.readouterr()
    assert main(["eval", "--model", str(src), "--precisions", "fp32,int8,kv8-head", "--max-tokens", "40",
                 "--max-length", "20", "--chunk", "5", "--num-samples", "2", "--markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| precision | scheme | perplexity |") and len(out) == 5
    assert out[2].startswith("| fp32 | fp32 |") and "| 0.00e+00 | 100.00% |" in out[2]
    assert out[4].startswith("| kv8-head | fp16+kv8-head |")
    assert main(["eval", "--model", str(src), "--precisions", "int3"]) == 2  # a GlmcError, reported
