"""`glmc compile`: config schema and its errors, build directories, the TensorRT builder, the cached pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from glmc.artifact import read_manifest
from glmc.cli import main as glmc_main
from glmc.compiler import schema
from glmc.compiler.builddir import BuildDir, BuildLocked
from glmc.compiler.tensorrt import TensorRTError, build_engine, graph_inputs, profile_shapes
from glmc.errors import ConfigError, GlmcError
from glmc.modeling_patches.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "compile_configs"
HAVE_TRT = schema.tensorrt_available() is not None
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx_bindings is installed")
LIMITS = {"max_batch": 2, "max_input_length": 16, "max_sequence_length": 64}


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints of each family, with a context long enough for every shipped config."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, variant in (("chatglm2", "chatglm2-6b"), ("chatglm3", "chatglm3-6b"), ("glm4", "glm-4-9b-chat")):
        model = tiny_model(variant, seq_length=1 << 20, num_layers=1, vocab_size=64)
        out[name] = save_checkpoint(model, root / name)
    return out


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------- shipped configs

SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_shipped_config_set_is_complete():
    for model in ("chatglm2-6b", "chatglm3-6b", "chatglm3-6b-32k", "glm-4-9b-chat", "glm-4-9b-chat-1m"):
        for precision in ("fp16", "int8", "int4", "kv8", "int8-kv8"):
            assert f"{model}-{precision}.yaml" in SHIPPED
    # sq8 compiled in tests/test_smoothquant.py
    for precision in ("fp32", "int8", "int4", "int4-awq", "kv8", "sq8", "fp8"):
        assert f"glmc-tiny-{precision}.yaml" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_validates(name, checkpoints, tmp_path):
    """Every shipped config validates; the 6B/9B ones with a tiny checkpoint of their family set by --set."""
    path = CONFIGS / name
    overrides = [f"output={tmp_path / 'out'}"]
    if not name.startswith("glmc-tiny"):
        with pytest.raises(ConfigError, match=r"model\.checkpoint: must be set .*--set model\.checkpoint="):
            schema.load(path, overrides)
        family = schema.load(path, overrides + ["model.checkpoint=/x"], check_files=False).model.family
        overrides.append(f"model.checkpoint={checkpoints[family]}")
    cfg = schema.load(path, overrides, check_files=not name.startswith("glmc-tiny") or schema.shipped_model().is_dir())
    precision = name.removesuffix(".yaml").split("-", 2 if name.startswith("glmc") else 0)
    tag = cfg.precision_tag
    assert ("kv8" in tag) == ("kv8" in name)
    assert ("int8" in tag) == ("int8" in name) and ("int4" in tag) == ("int4" in name), (precision, tag)
    assert cfg.limits.max_input_length <= cfg.limits.max_sequence_length
    assert "tensorrt" in cfg.targets and not (tmp_path / "out").exists()


@pytest.mark.parametrize("overlay", sorted(p.name for p in (CONFIGS / "precisions").glob("*.yaml")))
def test_precision_overlays_validate_alone(overlay, checkpoints):
    cfg = schema.load(CONFIGS / "precisions" / overlay, [f"model.checkpoint={checkpoints['chatglm3']}"])
    expected = {"fp16": "fp16", "fp32": "fp32", "int8": "int8", "int4": "int4-g128", "kv8": "fp16-kv8",
                "int8-kv8": "int8-kv8", "sq8": "sq8", "fp8": "fp8", "fp8-kvfp8": "fp8-kvfp8",
                "int4-awq": "int4-g128-awq"}
    assert cfg.precision_tag == expected[overlay.removesuffix(".yaml")]


def test_overlays_and_set_merge_in_order(tmp_path):
    cfg = schema.load([CONFIGS / "models" / "glmc-tiny.yaml", CONFIGS / "precisions" / "int8-kv8.yaml"],
                      ["precision.dtype=fp32", "limits.max_batch=4", "targets=onnx"], check_files=False)
    assert cfg.precision_tag == "int8-fp32-kv8"
    assert cfg.limits.max_batch == 4 and cfg.targets == ("onnx",)
    assert cfg.limits.max_sequence_length == 256  # from the model file
    assert cfg.where["limits.max_batch"] == "--set limits.max_batch=4"
    assert cfg.where["precision.weights"].endswith("int8-kv8.yaml:2")
    assert cfg.tensorrt.opt_past_length == 128  # resolved default


# ---------------------------------------------------------------------------------------------- bad configs

BAD = {
    # name: (yaml text, --set overrides, regex the error must match)
    "unknown-section": ("precison:\n  weights: int8\n", [],
        r"cfg\.yaml:1: unknown key 'precison' \(did you mean 'precision'\?\)"),
    "unknown-key": ("limits:\n  max_bach: 2\n", [],
        r"cfg\.yaml:2: unknown key 'limits\.max_bach' \(did you mean 'max_batch'\?\)"),
    "wrong-type": ("limits:\n  max_batch: eight\n", [],
        r"cfg\.yaml:2: limits\.max_batch: expected an integer, found a string \('eight'\)"),
    "bool-for-int": ("limits:\n  max_batch: true\n", [],
        r"cfg\.yaml:2: limits\.max_batch: expected an integer, found a boolean"),
    "bad-choice": ("precision:\n  dtype: fp32\n  weights: int3\n", [],
        r"cfg\.yaml:3: precision\.weights: 'int3' is not one of float, int8, int4, sq8, fp8 \(did you mean 'int8'\?\)"),
    "below-minimum": ("limits:\n  max_batch: 0\n", [], r"cfg\.yaml:2: limits\.max_batch: 0 is below the minimum 1"),
    "section-not-mapping": ("limits: 5\n", [], r"cfg\.yaml:1: 'limits' is a section"),
    "missing-checkpoint": ("model:\n  checkpoint: no/such/dir\n", [],
        r"cfg\.yaml:2: model\.checkpoint: .*no/such/dir does not exist"),
    "checkpoint-must-be-set": ("model:\n  checkpoint: ???\n", [], r"cfg\.yaml:2: model\.checkpoint: must be set"),
    "impossible-limits": ("limits:\n  max_input_length: 512\n  max_sequence_length: 256\n", [],
        r"cfg\.yaml:2: limits\.max_input_length \(512\) is longer than limits\.max_sequence_length \(256\)"),
    "longer-than-model": ("limits:\n  max_sequence_length: 2000000\n  max_input_length: 8\n", [],
        r"cfg\.yaml:2: limits\.max_sequence_length \(2000000\) is longer than the model's context"),
    "opt-outside-limits": ("tensorrt:\n  opt_batch: 9\n", [],
        r"cfg\.yaml:2: tensorrt\.opt_batch \(9\) is outside the limits \(limits\.max_batch = 1\)"),
    "group-size-on-float": ("precision:\n  group_size: 128\n", [],
        r"cfg\.yaml:2: precision\.group_size 128 only applies to int8/int4"),
    "hopper-not-a-trt-rtx-target": ("tensorrt:\n  compute_capabilities: [sm90]\n", [],
        r"cfg\.yaml:2: tensorrt\.compute_capabilities: 'sm90' is not one of sm75"),
    "unknown-target": ("targets: [onnx, tensort]\n", [],
        r"cfg\.yaml:1: targets: 'tensort' is not one of .* \(did you mean 'tensorrt'\?\)"),
    "empty-targets": ("targets: []\n", [], r"cfg\.yaml:1: targets: the list is empty"),
    "duplicate-key": ("limits:\n  max_batch: 1\n  max_batch: 2\n", [],
        r"cfg\.yaml:3: key 'limits\.max_batch' appears twice"),
    "yaml-syntax": ("limits:\n  max_batch: [1\n", [], r"cfg\.yaml:3: not valid YAML"),
    "extends-missing": ("extends: nope.yaml\n", [], r"nope\.yaml: config file does not exist"),
    "extends-loop": ("extends: cfg.yaml\n", [], r"`extends` loop"),
    "calibration-file-missing": ("precision:\n  kv_cache: int8\ncalibration:\n  source: calib.txt\n", [],
        r"cfg\.yaml:4: calibration\.source: .*calib\.txt does not exist"),
    "bad-set-syntax": ("", ["limits.max_batch"], r"--set limits\.max_batch: expected key\.path=value"),
    "bad-set-value": ("", ["limits.max_batch=-3"],
        r"--set limits\.max_batch=-3: limits\.max_batch: -3 is below the minimum 1"),
    "extends-on-command-line": ("", ["extends=x.yaml"], r"--set extends=x\.yaml: extends works inside YAML files"),
    "bad-output-placeholder": ("", ["output=build/{modle}"], r"--set output=build/\{modle\}: output: bad placeholder"),
}


@settings(max_examples=60, deadline=None)
@given(section=st.sampled_from(schema.SECTIONS), key=st.from_regex(r"[a-z_]{1,20}", fullmatch=True))
def test_any_unknown_key_is_rejected_by_name(section, key):
    known = [k.split(".", 1)[1] for k in schema.FIELDS if k.startswith(section + ".")]
    if key in known:
        return
    with pytest.raises(ConfigError, match=rf"--set {section}\.{key}=1: unknown key '{section}\.{key}'"):
        schema.load([], [f"{section}.{key}=1"], check_files=False)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 4096), seq=st.integers(2, 1 << 20), inp=st.integers(1, 1 << 20))
def test_limits_either_validate_or_name_the_conflict(batch, seq, inp):
    sets = [f"limits.max_batch={batch}", f"limits.max_sequence_length={seq}", f"limits.max_input_length={inp}"]
    if inp > seq:
        with pytest.raises(ConfigError,
                           match=r"limits\.max_input_length .* is longer than limits\.max_sequence_length"):
            schema.load([], sets, check_files=False)
    else:
        cfg = schema.load([], sets, check_files=False)
        assert cfg.tensorrt.opt_batch == batch and cfg.tensorrt.opt_past_length == seq // 2


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_fails_clearly_and_builds_nothing(case, tmp_path, capsys, checkpoints):
    text, overrides, pattern = BAD[case]
    if "model:" not in text and "not valid YAML" not in pattern:  # appended last: the line numbers stay
        text += f"model:\n  checkpoint: {checkpoints['chatglm3']}\n"
    cfg = write(tmp_path, "cfg.yaml", text)
    out = tmp_path / "build"
    with pytest.raises(ConfigError, match=pattern):
        schema.load(cfg, [f"output={out}"] + overrides)
    code = glmc_main(["compile", str(cfg), "--set", f"output={out}"] + [a for o in overrides for a in ("--set", o)])
    assert code == 2
    err = capsys.readouterr().err
    assert "glmc compile: error:" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".build*")) and not list(tmp_path.glob("build.lock"))


def test_tensorrt_target_without_tensorrt(tmp_path, monkeypatch, capsys):
    """With neither TensorRT module importable (None in sys.modules makes import fail), the tensorrt target is refused
    at validation time, before anything is built."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    cfg = write(tmp_path, "cfg.yaml", "targets: [onnx, tensorrt]\n")
    out = tmp_path / "build"
    with pytest.raises(ConfigError, match=r"cfg\.yaml:1: targets: 'tensorrt' needs TensorRT, and neither"):
        schema.load(cfg, [f"output={out}"], check_files=False)
    from glmc.compiler.tensorrt import import_tensorrt
    with pytest.raises(Exception, match="neither `tensorrt` nor TensorRT for RTX"):
        import_tensorrt()
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- build directories

def test_build_dir_appears_atomically_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "b"
    with BuildDir(out) as b:
        (b.tmp / "x.txt").write_text("one")
        assert not out.exists() and b.lock.path.exists()
        b.commit({"format": "test"}, "report\n")
    assert (out / "x.txt").read_text() == "one" and read_manifest(out)["format"] == "test"
    with BuildDir(out) as b:
        (b.tmp / "y.txt").write_text("two")
        assert (out / "x.txt").exists()  # the old build stays usable until the new one commits
        b.commit({"format": "test2"}, "report\n")
    assert sorted(p.name for p in out.iterdir()) == ["REPORT.md", "manifest.json", "y.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_or_interrupt_leaves_nothing_and_keeps_the_old_build(tmp_path, error):
    out = tmp_path / "b"
    with pytest.raises(error), BuildDir(out) as b:
        (b.tmp / "half.bin").write_bytes(b"x" * 100)
        raise error("stop")
    assert list(tmp_path.iterdir()) == []
    with BuildDir(out) as b:
        b.commit({"format": "ok"}, "")
    with pytest.raises(error), BuildDir(out) as b:
        (b.tmp / "half.bin").write_bytes(b"x")
        raise error("stop")
    assert read_manifest(out)["format"] == "ok" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_directory_that_is_not_a_build_is_never_replaced(tmp_path):
    precious = tmp_path / "b"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(GlmcError, match=r"b: exists and is not a glmc build directory \(no manifest\.json\)"):
        BuildDir(precious).__enter__()
    assert (precious / "thesis.tex").read_text() == "years of work" and sorted(tmp_path.iterdir()) == [precious]


def test_concurrent_compile_is_refused_and_stale_lock_taken_over(tmp_path):
    out = tmp_path / "b"
    with BuildDir(out), pytest.raises(BuildLocked, match=r"b\.lock: another glmc compile \(pid \d+"):
        BuildDir(out).__enter__()
    # a lock left by a process that no longer exists (on this host) is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (tmp_path / "b.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    (tmp_path / f".b.tmp-{int(dead.stdout)}").mkdir()  # what a SIGKILLed compile leaves
    with BuildDir(out) as b:
        b.commit({"format": "ok"}, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ---------------------------------------------------------------------------------------------- TensorRT builder

def mini_decoder(path: Path, weights: str = "int8", kv: str = "float", dtype: int = T.FLOAT16, vocab: int = 64,
                 hidden: int = 32, heads: int = 2, kv_heads: int = 1, head_dim: int = 16, max_pos: int = 256,
                 seed: int = 0, external_data: bool = False) -> Path:
    """A one-layer decoder with glmc's I/O contract in standard opset-23 ONNX, in the form the `tensorrt` lowering
    produces: int8 per-channel or INT4 blocked DequantizeLinear + MatMul, RotaryEmbedding-23, the past concatenated
    outside Attention-23, and for an int8 KV cache QuantizeLinear/DequantizeLinear on the cache tensors."""
    rng = np.random.default_rng(seed)
    npd = np.float16 if dtype == T.FLOAT16 else np.float32
    inits, nodes = [], []

    def init(name, arr):
        inits.append(nh.from_array(arr, name))
        return name

    def node(op, ins, outs, **kw):
        nodes.append(h.make_node(op, ins, outs, name=outs[0] + "_node", **kw))
        return outs[0]

    def linear(x, name, n_in, n_out):
        if weights == "int8":
            w = rng.integers(-127, 128, (n_in, n_out)).astype(np.int8)
            s = (rng.random(n_out) * 0.01 + 0.001).astype(npd)
            wd = node("DequantizeLinear", [init(name + ".qweight", w), init(name + ".scales", s)], [name + ".w"],
                      axis=1)
        elif weights == "int4":
            w = rng.integers(-8, 8, (n_in, n_out)).astype(np.int8)
            inits.append(h.make_tensor(name + ".qweight", T.INT4, w.shape, w.flatten().tolist()))
            s = (rng.random((n_in // 16, n_out)) * 0.01 + 0.001).astype(npd)
            wd = node("DequantizeLinear", [name + ".qweight", init(name + ".scales", s)], [name + ".w"], axis=0,
                      block_size=16)
        else:
            wd = init(name + ".w", (rng.standard_normal((n_in, n_out)) * 0.05).astype(npd))
        return node("MatMul", [x, wd], [name + ".y"])

    x = node("Gather", [init("embed", (rng.standard_normal((vocab, hidden)) * 0.1).astype(npd)), "input_ids"], ["x"])
    q = linear(x, "q", hidden, heads * head_dim)
    k = linear(x, "k", hidden, kv_heads * head_dim)
    v = linear(x, "v", hidden, kv_heads * head_dim)
    init("shape_q", np.array([0, 0, heads, head_dim], np.int64))
    init("shape_kv", np.array([0, 0, kv_heads, head_dim], np.int64))
    q4 = node("Transpose", [node("Reshape", [q, "shape_q"], ["q4r"])], ["q4"], perm=[0, 2, 1, 3])
    k4 = node("Transpose", [node("Reshape", [k, "shape_kv"], ["k4r"])], ["k4"], perm=[0, 2, 1, 3])
    v4 = node("Transpose", [node("Reshape", [v, "shape_kv"], ["v4r"])], ["v4"], perm=[0, 2, 1, 3])
    rot = head_dim // 2
    angles = np.outer(np.arange(max_pos), 1.0 / (10000 ** (np.arange(0, rot, 2) / rot)))
    init("cos", np.cos(angles).astype(npd))
    init("sin", np.sin(angles).astype(npd))
    qr = node("RotaryEmbedding", [q4, "cos", "sin", "position_ids"], ["qr"], interleaved=1, rotary_embedding_dim=rot)
    kr = node("RotaryEmbedding", [k4, "cos", "sin", "position_ids"], ["kr"], interleaved=1, rotary_embedding_dim=rot)
    cache_type = T.INT8 if kv == "int8" else dtype
    past_k, past_v = "past_key_values.0.key", "past_key_values.0.value"
    if kv == "int8":
        init("kv_scale", np.array(0.05, npd))
        init("kv_zero", np.array(0, np.int8))
        past_k = node("DequantizeLinear", [past_k, "kv_scale", "kv_zero"], ["pk"])
        past_v = node("DequantizeLinear", [past_v, "kv_scale", "kv_zero"], ["pv"])
    k_all = node("Concat", [past_k, kr], ["k_all"], axis=2)
    v_all = node("Concat", [past_v, v4], ["v_all"], axis=2)
    if kv == "int8":
        node("QuantizeLinear", [k_all, "kv_scale", "kv_zero"], ["present.0.key"])
        node("QuantizeLinear", [v_all, "kv_scale", "kv_zero"], ["present.0.value"])
    else:
        node("Identity", [k_all], ["present.0.key"])
        node("Identity", [v_all], ["present.0.value"])
    init("axes12", np.array([1, 2], np.int64))
    init("one", np.array([1], np.int64))
    mask_shape = node("Concat", [node("Shape", ["input_ids"], ["b_dim"], end=1), "one",
                                 node("Shape", ["input_ids"], ["s_dim"], start=1),
                                 node("Shape", ["attention_mask"], ["t_dim"], start=1)], ["mask_shape"], axis=0)
    mask = node("Expand", [node("Unsqueeze", [node("Cast", ["attention_mask"], ["mask_b"], to=T.BOOL), "axes12"],
                                ["mask_u"]), mask_shape], ["mask4"])
    att = node("Attention", [qr, k_all, v_all, mask], ["att"], q_num_heads=heads, kv_num_heads=kv_heads)
    init("shape_o", np.array([0, 0, heads * head_dim], np.int64))
    o = node("Reshape", [node("Transpose", [att], ["att_t"], perm=[0, 2, 1, 3]), "shape_o"], ["o_in"])
    hidden_out = linear(o, "o", heads * head_dim, hidden)
    node("MatMul", [hidden_out, init("lm_head", (rng.standard_normal((hidden, vocab)) * 0.05).astype(npd))], ["logits"])
    cache: list[str | int] = ["batch", kv_heads, "past", head_dim]
    graph = h.make_graph(nodes, "mini_decoder", [
        h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
        h.make_tensor_value_info("position_ids", T.INT64, ["batch", "seq"]),
        h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "total"]),
        h.make_tensor_value_info("past_key_values.0.key", cache_type, cache),
        h.make_tensor_value_info("past_key_values.0.value", cache_type, cache),
    ], [h.make_tensor_value_info("logits", dtype, ["batch", "seq", vocab]),
        h.make_tensor_value_info("present.0.key", cache_type, ["batch", kv_heads, "total", head_dim]),
        h.make_tensor_value_info("present.0.value", cache_type, ["batch", kv_heads, "total", head_dim])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path), save_as_external_data=external_data, location=path.name + ".data", size_threshold=512)
    return path


def run_ort(path: Path, batch: int = 2, seq: int = 3, past: int = 2, int8_cache: bool = False) -> list[np.ndarray]:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cache_dtype = np.int8 if int8_cache else (
        np.float16 if sess.get_inputs()[3].type == "tensor(float16)" else np.float32)
    zeros = np.zeros((batch, 1, past, 16), cache_dtype)
    return sess.run(None, {"input_ids": np.arange(batch * seq).reshape(batch, seq) % 64,
                           "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)),
                           "attention_mask": np.ones((batch, past + seq), np.int64),
                           "past_key_values.0.key": zeros, "past_key_values.0.value": zeros})


def test_profile_shapes_follow_the_limits(tmp_path):
    inputs = graph_inputs(mini_decoder(tmp_path / "m.onnx"))
    opt = {"batch": 1, "input_length": 8, "past_length": 32}
    full = profile_shapes(inputs, LIMITS, "full", opt)
    assert full["input_ids"] == ((1, 1), (1, 8), (2, 16))
    assert full["attention_mask"] == ((1, 1), (1, 40), (2, 64))
    assert full["past_key_values.0.key"] == ((1, 1, 0, 16), (1, 1, 32, 16), (2, 1, 63, 16))
    decode = profile_shapes(inputs, LIMITS, "decode", opt)
    assert decode["input_ids"] == ((1, 1), (1, 1), (2, 1)) and decode["past_key_values.0.value"][2] == (2, 1, 63, 16)
    prefill = profile_shapes(inputs, LIMITS, "prefill", opt)
    assert prefill["past_key_values.0.key"] == ((1, 1, 0, 16), (1, 1, 0, 16), (2, 1, 0, 16))


ENGINE_CASES = {  # name: (weights, kv cache, dtype, the engine's constants must include this type)
    "int8-per-channel": ("int8", "float", T.FLOAT16, "Int8"),
    "int8-external-data": ("int8", "float", T.FLOAT16, "Int8"),
    "int4-blocked": ("int4", "float", T.FLOAT16, "Int4"),
    "int8-kv8": ("int8", "int8", T.FLOAT16, "Int8"),
    "fp32-decomposed-attention": ("float", "float", T.FLOAT, "Float"),
}


@needs_trt
@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_tensorrt_builds_standard_graphs_and_records_layers(case, tmp_path):
    weights, kv, dtype, const_type = ENGINE_CASES[case]
    path = mini_decoder(tmp_path / "m.onnx", weights, kv, dtype, external_data="external" in case)
    assert (tmp_path / "m.onnx.data").exists() == ("external" in case)
    outs = run_ort(path, int8_cache=kv == "int8")  # the graph is valid ONNX that ONNX Runtime runs
    assert outs[0].shape == (2, 3, 64) and np.isfinite(outs[0].astype(np.float32)).all()
    profiles = ["full", "decode"] if case == "int8-kv8" else ["full"]
    info = build_engine(path, tmp_path / "m.engine", LIMITS, profiles=profiles, compute_capabilities=["sm86", "sm89"],
                        workspace_mb=64, optimization_level=0, log_path=tmp_path / "build.log")
    assert (tmp_path / "m.engine").stat().st_size == info["engine_bytes"] > 10_000
    assert info["strongly_typed"] and list(info["profiles"]) == profiles
    if info["library"] == "tensorrt_rtx_bindings":
        assert info["compute_capabilities"] == ["sm86", "sm89"]
    io = {t["name"]: t for t in info["io"]}
    assert io["past_key_values.0.key"]["dtype"] == ("INT8" if kv == "int8" else
                                                   ("HALF" if dtype == T.FLOAT16 else "FLOAT"))
    assert io["logits"]["mode"] == "output" and io["logits"]["shape"] == [-1, -1, 64]
    layers = info["engine_layers"]
    assert layers, "no layers parsed from the build log"
    nodes = {n for layer in layers for n in layer["onnx_nodes"]}
    assert {"q.y_node", "att_node", "logits_node"} <= nodes
    consts = {c["dtype"] for layer in layers for c in layer["constants"]}
    assert const_type in consts, consts
    net_types = {layer["type"] for layer in info["network_layers"]}
    assert ("DEQUANTIZE" in net_types) == (weights != "float" or kv == "int8")
    assert "ATTENTION_INPUT" in net_types and info["attention_layers_decomposable"] == 1
    assert "Layers:" in (tmp_path / "build.log").read_text()
    # the engine inspector needs a GPU the engine runs on; without one the build log's record stands alone
    assert info["inspector"] == "m.inspector.json" or info["inspector"].startswith("unavailable: ")


@needs_trt
def test_tensorrt_refuses_custom_ops_before_parsing(tmp_path):
    """A glmc:: (plugin) node would abort a GPU-less TensorRT process: it is refused with the node named."""
    g = h.make_graph([h.make_node("QuantizedLinear", ["x", "w", "s"], ["y"], name="ql", domain="glmc", bits=8)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 4])], [h.make_tensor_value_info("y", T.FLOAT, [1, 4])],
                     [nh.from_array(np.zeros((4, 4), np.int8), "w"), nh.from_array(np.ones(4, np.float32), "s")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("glmc", 1)])
    onnx.save(m, str(tmp_path / "c.onnx"))
    with pytest.raises(TensorRTError, match=r"node 'ql' is glmc::QuantizedLinear, not standard ONNX"):
        build_engine(tmp_path / "c.onnx", tmp_path / "c.engine", LIMITS)
    assert not (tmp_path / "c.engine").exists()


@needs_trt
def test_tensorrt_dynamic_dim_without_a_limit_is_named(tmp_path):
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT16, ["n", 4])],
                     [h.make_tensor_value_info("y", T.FLOAT16, ["n", 4])])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 23)]), str(tmp_path / "r.onnx"))
    m = onnx.load(str(tmp_path / "r.onnx"))
    m.ir_version = 10
    onnx.save(m, str(tmp_path / "r.onnx"))
    with pytest.raises(TensorRTError, match=r"input 'x' dimension 0 \('n'\) is dynamic"):
        build_engine(tmp_path / "r.onnx", tmp_path / "r.engine", LIMITS)


# ---------------------------------------------------------------------------------------------- the pipeline

TINY_YAML = """\
extends: {configs}/models/glmc-tiny.yaml
model: {{checkpoint: {ckpt}, name: rnd}}
precision: {{dtype: fp32}}
verify: {{prompts: [[1, 2, 3, 4, 5], [6, 7]], steps: 4}}
cache_dir: {cache}
output: {out}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A random-weight ChatGLM3-architecture checkpoint (no tokenizer: the prompts are token ids) and its config."""
    root = tmp_path_factory.mktemp("pipeline")
    ckpt = save_checkpoint(tiny_model("chatglm3-6b", num_layers=2, vocab_size=300), root / "ckpt")
    cfg = write(root, "rnd.yaml", TINY_YAML.format(configs=CONFIGS, ckpt=ckpt, cache=root / "cache",
                                                   out=root / "builds" / "{model}-{precision}"))
    return {"root": root, "ckpt": ckpt, "config": cfg, "cache": root / "cache"}


def compile_(cfg: Path, *sets: str, force: bool = False) -> dict:
    """Run `glmc compile` in-process; return the new build's manifest."""
    args = ["compile", str(cfg)] + [a for s in sets for a in ("--set", s)] + (["--force"] if force else [])
    assert glmc_main(args) == 0
    out = schema.load(cfg, list(sets)).output
    return read_manifest(out)


def ran(manifest: dict) -> set[str]:
    return {s["name"] for s in manifest["stages"] if s["status"] == "ran"} - {"package"}


def no_leftovers(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock") or ".old-" in p.name]
    assert leftovers == [], leftovers


@needs_trt
@pytest.mark.parametrize("weights", ["float", "int8", "int4"])
def test_compile_end_to_end_all_targets(project, weights, capsys):
    sets = [f"precision.weights={weights}"] + (["precision.group_size=32"] if weights == "int4" else [])
    m = compile_(project["config"], *sets)
    out = Path(m["config"]["output"])
    assert set(m["targets"]) == {"onnx", "reference", "onnxruntime", "tensorrt"}
    for t in m["targets"].values():
        assert (out / t["onnx"]).is_file() and (out / t["onnx"]).with_suffix(".json").is_file()
        names = [i["name"] for i in t["inputs"]]
        assert names == ["input_ids", "position_ids", "attention_mask"] + [
            f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
        assert t["outputs"][0]["name"] == "logits"
        assert t["inputs"][3]["shape"] == ["batch", 2, "past_sequence", 32]
    onnx_model = onnx.load(str(out / "onnx" / "onnx" / "model.onnx"))
    assert any(n.domain == "glmc" for n in onnx_model.graph.node)  # the vendor target keeps the custom ops
    trt_model = onnx.load(str(out / "onnx" / "tensorrt" / "model.onnx"))
    assert all(n.domain in ("", "ai.onnx") for n in trt_model.graph.node)
    # the engine, its layers, and what they are made of
    e = m["engines"]["tensorrt"]
    assert (out / e["path"]).stat().st_size == e["engine_bytes"] > 10_000
    assert e["profiles"]["full"]["past_key_values.0.key"] == {"min": [1, 2, 0, 32], "opt": [2, 2, 128, 32],
                                                               "max": [2, 2, 255, 32]}
    layers = json.loads((out / e["layers"]).read_text())
    consts = {c["dtype"] for layer in layers["engine_layers"] for c in layer["constants"]}
    assert {"float": "Float", "int8": "Int8", "int4": "Int4"}[weights] in consts
    assert ("DEQUANTIZE" in {x["type"] for x in layers["network_layers"]}) == (weights != "float")
    # verification: torch vs every lowering ONNX Runtime runs, tensorrt's graph included
    v = m["verification"]
    assert v["passed"] and set(v["targets"]) == {"reference", "onnxruntime", "tensorrt"}
    for t, metrics in v["targets"].items():  # (int8/int4: onnxruntime's int8 activations have their own bound)
        assert metrics["greedy_agree"] == 4 and metrics["top1"] == 1.0
        bound = metrics.get("tolerance", v["tolerance"])["rel"]  # measured 3.3e-2 (int8, int4) against 1e-1
        assert bound == (1e-1 if t == "onnxruntime" and weights != "float" else 1e-4)
        assert max(metrics["prefill_rel"], metrics["decode_rel"]) <= bound, (t, metrics)
    # quantized weights + quantization.json travel in model/; float weights live in the ONNX files
    assert (out / "model" / "config.json").is_file()
    assert (out / "model" / "quantization.json").is_file() == (weights != "float")
    assert m["model"]["checkpoint_quantization"] == {}  # a float checkpoint, quantized by the build
    assert m["packages"]["onnxruntime"] and m["packages"]["torch"]
    capsys.readouterr()
    assert glmc_main(["inspect", str(out), "--check-files"]) == 0
    shown = capsys.readouterr().out
    assert "every file matches its sha256" in shown and "passed" in shown and "model.engine" in shown
    no_leftovers(project["root"])


@needs_trt
def test_cache_reruns_only_what_changed(project, monkeypatch, capsys):
    # glmc's source hash is part of every stage key; pinned here so that a colleague editing glmc/ in a shared
    # checkout while this runs does not invalidate the cache between the compiles below
    from glmc.compiler import pipeline
    fixed = pipeline.code_fingerprint()
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: fixed)
    first = compile_(project["config"], "precision.weights=float")
    assert "export" in ran(first) or first["stages"][2]["status"] == "cached"
    assert ran(compile_(project["config"], "precision.weights=float")) == set()
    assert ran(compile_(project["config"], "precision.weights=float", "verify.steps=3")) == {"verify"}
    assert ran(compile_(project["config"], "precision.weights=float", "tensorrt.workspace_mb=128")) == \
        {"engine:tensorrt"}
    # verification runs batches within max_batch, as users must: it reads the limits too
    assert ran(compile_(project["config"], "precision.weights=float", "limits.max_batch=3")) == {"engine:tensorrt",
                                                                                                   "verify"}
    # batch 1: the onnxruntime lowering drops padding support (onnxruntime.padded_batches defaults to max_batch > 1)
    assert ran(compile_(project["config"], "precision.weights=float", "limits.max_batch=1")) == {
        "engine:tensorrt", "lower:onnxruntime", "verify"}
    changed = ran(compile_(project["config"], "precision.weights=float", "limits.max_sequence_length=128"))
    assert changed == {"export", "simplify", "lower:onnx", "lower:reference", "lower:onnxruntime", "lower:tensorrt",
                       "engine:tensorrt", "verify"}  # the rotary tables in the graph are that long
    # --plan says the same before building anything
    capsys.readouterr()
    assert glmc_main(["compile", str(project["config"]), "--set", "precision.weights=float", "--set",
                      "tensorrt.optimization_level=0", "--plan"]) == 0
    status = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert status["engine:tensorrt"] == "runs" and status["export"] == status["verify"] == "cached"
    everything = ran(compile_(project["config"], "precision.weights=float", force=True))
    assert {"quantize", "export", "simplify", "engine:tensorrt", "verify"} <= everything
    no_leftovers(project["root"])


@needs_trt
def test_failing_stage_is_named_and_leaves_no_build(project, capsys):
    """A verification that cannot pass (tolerance 0) fails in stage 'verify': no build directory, but the stages
    before it stay cached."""
    out = project["root"] / "failing"
    code = glmc_main(["compile", str(project["config"]), "--set", "precision.weights=float",
                      "--set", "verify.max_rel_error=0", "--set", f"output={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "error: stage 'verify' failed: verification failed against torch" in err
    assert not out.exists()
    no_leftovers(project["root"])


def test_concurrent_compile_into_the_same_directory_is_refused(project, capsys):
    out = project["root"] / "locked"
    with BuildDir(out):
        code = glmc_main(["compile", str(project["config"]), "--set", f"output={out}"])
    assert code == 2 and "another glmc compile" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_compile_leaves_nothing(project, tmp_path, sig):
    """Interrupt `glmc compile` while the export stage runs: no build dir, no lock, no half-written stage."""
    out, cache = tmp_path / "build", tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "glmc.cli", "compile", str(project["config"]), "--set",
                             f"output={out}", "--set", f"cache_dir={cache}", "--set", "targets=[onnx]"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob(".export-*.tmp-*")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert list(cache.glob(".export-*.tmp-*")), "the export stage never started"
    assert (tmp_path / "build.lock").exists() and list(tmp_path.glob(".build.tmp-*"))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    assert not out.exists()
    no_leftovers(tmp_path)
    assert [p.name for p in cache.iterdir() if not p.name.startswith(("quantize-", "load"))] == []


SHIPPED_MODEL = schema.shipped_model()


@needs_trt
@pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="the shipped model is not in the package")
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4", "int4-awq", "kv8", "fp8"])
def test_shipped_configs_compile_and_verify(precision, tmp_path_factory):
    """The CI configs: the shipped model, every target, TensorRT for RTX included; verification passes."""
    root = tmp_path_factory.getbasetemp() / "shipped"
    m = compile_(CONFIGS / f"glmc-tiny-{precision}.yaml", f"output={root}/{precision}", f"cache_dir={root}/cache")
    out = Path(m["config"]["output"])
    assert set(m["targets"]) == {"onnx", "reference", "onnxruntime", "tensorrt"}
    assert m["verification"]["passed"] and set(m["verification"]["targets"]) == {"reference", "onnxruntime",
                                                                                  "tensorrt"}
    assert m["tokenizer"]["files"] and (out / "model" / "tokenizer.model").is_file()
    e = m["engines"]["tensorrt"]
    assert (out / e["path"]).stat().st_size == e["engine_bytes"] and e["engine_layer_count"] > 0
    kv8 = precision == "kv8"
    cache_type = {t["name"]: t["dtype"] for t in m["targets"]["tensorrt"]["inputs"]}["past_key_values.0.key"]
    assert cache_type == ("int8" if kv8 else "float")
    layers = json.loads((out / e["layers"]).read_text())
    net_types = {x["type"] for x in layers["network_layers"]}
    assert ("DEQUANTIZE" in net_types) == (precision != "fp32")
    assert ("QUANTIZE" in net_types) == (kv8 or precision == "fp8")  # fp8: activations quantized to e4m3
    if kv8:
        assert m["precision"]["quantization"]["kv_cache"]["granularity"] == "head"
        assert m["verification"]["prompts"] and json.loads((out / "verify.json").read_text())["passed"]
    runs_what_was_verified(out, m)
    no_leftovers(root)


def runs_what_was_verified(out: Path, m: dict) -> None:
    """Every lowering, opened the way a user opens it (glmc.load on its model.onnx), is within the verified bound
    of the torch model; the glmc:: graph is refused with the reason, never swapped for another engine."""
    import glmc
    from glmc.runtime.verify import compare, greedy_trace
    prompts, steps = m["verification"]["prompts"], m["config"]["verify"]["steps"]
    reference = glmc.load(out, backend="torch").backend
    ref = greedy_trace(reference, prompts, steps)
    for t in m["targets"]:
        tolerance = m["verification"]["targets"].get(t, {}).get("tolerance", m["verification"]["tolerance"])
        bound = tolerance["rel"]
        path = out / "onnx" / t / "model.onnx"
        if t == "onnx":
            with pytest.raises(GlmcError, match="cannot run the 'onnx' lowering: it keeps the glmc:: custom ops"):
                glmc.load(path)
            continue
        backend = glmc.load(path).backend
        assert backend.name == "onnxruntime" and backend.path == path
        forced, free = greedy_trace(backend, prompts, steps, forced=ref.tokens), greedy_trace(backend, prompts, steps)
        got = compare(ref, forced, free)
        # a lowering verified with ties allowed (int8 activations) may leave torch's greedy path at a near-tie: a
        # step where torch's top two logits are closer than twice the lowering's error (as the verifier counts)
        tie_abs = 2 * max(got["prefill_max_abs"], got["decode_max_abs"]) if tolerance["ties_within_error"] else 0.0
        tied = compare(ref, forced, free, tie_abs=tie_abs)["greedy_diverged_at_tie"]
        greedy_ok = got["greedy_agree"] == steps or (tolerance["ties_within_error"] and tied)
        assert max(got["prefill_rel"], got["decode_rel"]) <= bound and greedy_ok, (t, got)


@needs_trt
def test_large_model_path_external_weights(project, tmp_path, monkeypatch):
    """Models over 1 GiB keep their weights in .data files; the export threshold lowered to 0 sends the tiny model
    down that path: every lowering still runs in ONNX Runtime (verification) and the engine still builds."""
    from glmc.export import onnx_export
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    m = compile_(project["config"], "precision.weights=int8", f"output={tmp_path}/b", f"cache_dir={tmp_path}/c",
                 "targets=[onnxruntime,tensorrt]")
    out = Path(m["config"]["output"])
    assert m["verification"]["passed"]
    for t in ("onnxruntime", "tensorrt"):  # (int8: each lowering's own data file; the export's codes are not kept)
        assert [f.name for f in (out / "onnx" / t).glob("*.data")] == ["model.onnx.data"]
        assert (out / "onnx" / t / "model.onnx.data").stat().st_size > 100_000
    assert m["engines"]["tensorrt"]["engine_bytes"] > 10_000


@needs_trt
def test_a_builder_that_dies_is_reported_by_signal(tmp_path):
    """The engine is built in a child process: killing it (as an abort or the OOM killer would) surfaces as a
    TensorRTError naming the signal, and the parent carries on."""
    import threading

    from glmc.compiler.tensorrt import build_engine_isolated
    path = mini_decoder(tmp_path / "m.onnx")
    outcome: dict = {}

    def build() -> None:
        try:
            build_engine_isolated(path, tmp_path / "m.engine", LIMITS)
        except TensorRTError as e:
            outcome["error"] = str(e)

    def children() -> list[int]:
        pids = []
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    before = set(children())
    thread = threading.Thread(target=build)
    thread.start()
    deadline = time.time() + 30
    while time.time() < deadline and not (set(children()) - before):
        time.sleep(0.01)
    for pid in set(children()) - before:
        os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert "the TensorRT builder process died (signal SIGKILL)" in outcome.get("error", ""), outcome
    assert not (tmp_path / "m.engine").exists() and not list(tmp_path.glob("*.request.json"))


@pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="the shipped model is not in the package")
def test_int8_activations_option(tmp_path):
    """precision.int8_activations lowers MatMulNBits with accuracy_level 4 and verifies it against its own bound;
    the reference lowering keeps the exact tolerance."""
    import onnx
    m = compile_(CONFIGS / "glmc-tiny-int8.yaml", f"output={tmp_path}/b", f"cache_dir={tmp_path}/c",
                 "precision.int8_activations=true", "targets=[reference,onnxruntime]")
    graph = onnx.load(str(tmp_path / "b" / m["targets"]["onnxruntime"]["onnx"]), load_external_data=False).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    ver = m["verification"]["targets"]
    assert m["verification"]["passed"] and 0 < ver["onnxruntime"]["prefill_rel"] < 3e-2
    assert ver["reference"]["prefill_rel"] < 1e-4


def test_unpadded_and_folded_kv8_options(tmp_path):
    """onnxruntime.padded_batches defaults to limits.max_batch > 1; false (with fold_kv8 on an int8 cache) lowers
    GroupQueryAttention to its unpadded form with the int8 cache inside, verified row by row to fold_kv8's bound;
    the runtime config says so, and the backend shares the int8 buffer."""
    assert schema.load([], ["limits.max_batch=1"], check_files=False).onnxruntime.padded_batches is False
    assert schema.load([], ["limits.max_batch=2"], check_files=False).onnxruntime.padded_batches is True
    with pytest.raises(ConfigError, match=r"--set onnxruntime\.fold_kv8=true: .*precision\.kv_cache is float"):
        schema.load([], ["onnxruntime.fold_kv8=true"], check_files=False)
    m = compile_(CONFIGS / "glmc-tiny-kv8.yaml", f"output={tmp_path}/b", f"cache_dir={tmp_path}/c",
                 "onnxruntime.padded_batches=false", "onnxruntime.fold_kv8=true", "targets=[onnxruntime]")
    assert m["targets"]["onnxruntime"]["lowering"]["kv_cache"]["padding"] == "none"
    ver = m["verification"]
    assert ver["passed"] and ver["targets"]["onnxruntime"]["greedy_agree"] == ver["targets"]["onnxruntime"]["steps"]
    assert 0 < ver["targets"]["onnxruntime"]["prefill_rel"] < 0.2
    from glmc.artifact import open_build
    from glmc.runtime.loader import make_backend
    backend = make_backend(open_build(tmp_path / "b"), "onnxruntime", "cpu")
    assert backend.shared and backend.kv_type == np.int8 and not backend.padded
