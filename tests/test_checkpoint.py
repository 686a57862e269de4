"""Checkpoint layouts load to identical tensors; bad checkpoints fail naming the tensor or file; configs normalise."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from glmc.errors import CheckpointError, ConfigError
from glmc.modeling_patches import from_hf, load_model, save_checkpoint, variant
from glmc.modeling_patches.config import VARIANTS
from glmc.modeling_patches.hf_glm import to_transformers

LAYOUTS = ["safetensors", "sharded-safetensors", "bin", "sharded-bin"]


def saved(tmp_path, layout="safetensors", name="chatglm3-6b"):
    model = tiny_model(name)
    return model, save_checkpoint(model, tmp_path / layout, layout=layout, shard_bytes=200_000)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_load_identical(tmp_path, layout):
    model, path = saved(tmp_path, layout)
    if layout.startswith("sharded"):
        assert len(list(path.glob("*-of-*"))) > 1
    loaded = load_model(path, dtype="float32")
    ref = model.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_load_casts(tmp_path, dtype):
    model, path = saved(tmp_path)
    loaded = load_model(path, dtype=dtype)
    name = "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"
    w = loaded.state_dict()[name]
    assert w.dtype == getattr(torch, dtype)
    assert torch.equal(w, model.state_dict()[name].to(w.dtype))


def test_transformers_glm_checkpoint(tmp_path):
    """A transformers-native GLM checkpoint (model_type glm, split q/k/v) loads through the name map."""
    model = tiny_model("glm-4-9b-chat")
    to_transformers(model).save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf", dtype="float32", family="glm4")  # a 300-token vocab can't tell the family
    assert loaded.config.source_format == "glm" and loaded.config.family == "glm4"
    assert loaded.config.rope_base == model.config.rope_base
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------- QKV row order

def _original_reading(fused: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as THUDM's modeling_chatglm.py reads an MHA (multi_query_attention false) fused tensor: rows viewed
    as [heads, 3 * head_dim] and split in three per head."""
    per_head = fused.reshape(heads, 3, -1, *fused.shape[1:])
    return tuple(per_head[:, i].reshape(-1, *fused.shape[1:]) for i in range(3))


@pytest.mark.parametrize("layout", ["safetensors", "sharded-bin"])
def test_mha_written_in_original_layout_and_read_back(tmp_path, layout):
    """An MHA model is written with multi_query_attention false and its QKV rows per head, as the original code reads
    them; loading the file gives back the same model."""
    from safetensors.torch import load_file
    model = tiny_model("chatglm3-6b", num_kv_heads=4)
    path = save_checkpoint(model, tmp_path / layout, layout=layout, shard_bytes=200_000)
    assert json.loads((path / "config.json").read_text())["multi_query_attention"] is False
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    written: dict[str, torch.Tensor] = {}
    for f in files:
        written.update(load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    c = model.config
    for i in range(c.num_layers):
        for kind in ("weight", "bias"):
            name = f"transformer.encoder.layers.{i}.self_attention.query_key_value.{kind}"
            mine = model.state_dict()[name].split([c.q_size, c.kv_size, c.kv_size])
            for got, want in zip(_original_reading(written[name], c.num_heads), mine, strict=True):
                assert torch.equal(got, want), name
            assert not torch.equal(written[name], model.state_dict()[name])  # the order really differs
    loaded = load_model(path, dtype="float32")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    again = save_checkpoint(loaded, tmp_path / "again", layout="safetensors")
    for k, v in load_file(again / "model.safetensors").items():
        assert torch.equal(v, written[k]), k


def test_gqa_written_split(tmp_path):
    """Grouped-query models keep multi_query_attention true and the [q | k | v] order (no reordering)."""
    from safetensors.torch import load_file
    model, path = saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["multi_query_attention"] is True and cfg["multi_query_group_num"] == 2
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    assert torch.equal(load_file(path / "model.safetensors")[name], model.state_dict()[name])


@pytest.mark.parametrize("precision", ["int8", "int4-g32", "int8+kv8-head"])
def test_mha_quantized_round_trip(tmp_path, precision):
    """Quantized MHA checkpoints (`glmc quantize` -> save_quantized) reorder codes, scales and bias alike."""
    from safetensors.torch import load_file

    from glmc.quantization.scheme import apply_scheme, parse_precision, save_quantized
    model = tiny_model("chatglm3-6b", num_kv_heads=4)
    scheme = parse_precision(precision)
    calibration = [torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    apply_scheme(model, scheme, calibration if scheme.kv_granularity else None)
    path = save_quantized(model, tmp_path / "q", scheme)
    written = load_file(path / "model.safetensors")
    c = model.config
    for kind in ("weight", "weight_scale", "bias"):
        name = f"transformer.encoder.layers.1.self_attention.query_key_value.{kind}"
        mine = model.state_dict()[name].split([c.q_size, c.kv_size, c.kv_size])
        for got, want in zip(_original_reading(written[name], c.num_heads), mine, strict=True):
            assert torch.equal(got, want), name
    loaded = load_model(path, dtype="float16")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids = torch.tensor([[5, 17, 42, 9, 100, 7]])
    mask, pos = torch.ones_like(ids), torch.arange(6)[None]
    with torch.no_grad():
        want, _ = model(ids, pos, mask, model.empty_cache(1))
        got, _ = loaded(ids, pos, mask, loaded.empty_cache(1))
    assert torch.equal(got, want)


def test_multi_query_attention_must_be_bool(tmp_path):
    _, path = saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "multi_query_attention": "yes"}))
    with pytest.raises(ConfigError, match=r"config\.json: 'multi_query_attention' must be true or false"):
        load_model(path)


def _edit_single(path, fn):
    from safetensors.torch import load_file
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_tensor(tmp_path):
    _, path = saved(tmp_path)
    _edit_single(path, lambda s: s.pop("transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.encoder\.layers\.1\.mlp\.dense_4h_to_h"):
        load_model(path)


def test_unexpected_tensor(tmp_path):
    _, path = saved(tmp_path)
    _edit_single(path, lambda s: s.__setitem__("transformer.encoder.layers.7.mlp.extra", torch.zeros(2)))
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: unexpected tensor 'transformer\.encoder\.layers\.7"):
        load_model(path)


def test_wrong_shape(tmp_path):
    _, path = saved(tmp_path)
    _edit_single(path, lambda s: s.__setitem__("transformer.output_layer.weight", torch.zeros(299, 128)))
    with pytest.raises(CheckpointError, match=r"'transformer\.output_layer\.weight' has shape \(299, 128\), "
                                              r"expected \(300, 128\)"):
        load_model(path)


def test_index_points_to_missing_shard(tmp_path):
    _, path = saved(tmp_path, "sharded-safetensors")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: shard '{shard.name}'"):
        load_model(path)


@pytest.mark.parametrize("layout,file", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_truncated_file(tmp_path, layout, file):
    _, path = saved(tmp_path, layout)
    data = (path / file).read_bytes()
    (path / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{file}: cannot read"):
        load_model(path)


def test_bin_refuses_pickled_objects(tmp_path):
    _, path = saved(tmp_path, "bin")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read"):
        load_model(path)


def test_no_weights(tmp_path):
    _, path = saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(path)


# ---------------------------------------------------------------------------------------------- config.json

BASE = {"model_type": "chatglm", "num_layers": 28, "padded_vocab_size": 65024, "hidden_size": 4096,
        "ffn_hidden_size": 13696, "kv_channels": 128, "num_attention_heads": 32, "multi_query_attention": True,
        "multi_query_group_num": 2, "seq_length": 32768, "layernorm_epsilon": 1e-5, "rmsnorm": True,
        "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True, "torch_dtype": "float16"}


@pytest.mark.parametrize("extra,family,base,divisor", [
    ({"_name_or_path": "THUDM/chatglm2-6b"}, "chatglm2", 1e4, 1.0),
    ({"_name_or_path": "THUDM/chatglm2-6b-32k", "rope_ratio": 16}, "chatglm2", 1e4, 16.0),
    ({"_name_or_path": "THUDM/chatglm3-6b"}, "chatglm3", 1e4, 1.0),
    ({"_name_or_path": "THUDM/chatglm3-6b-32k", "rope_ratio": 50}, "chatglm3", 5e5, 1.0),
    ({"padded_vocab_size": 151552, "rope_ratio": 500, "layernorm_epsilon": 1.5625e-07}, "glm4", 5e6, 1.0),
    ({"padded_vocab_size": 151552, "rope_ratio": 10000, "multi_query_group_num": 4}, "glm4", 1e8, 1.0),
])
def test_rope_ratio_meanings(extra, family, base, divisor):
    c = from_hf({**BASE, **extra})
    assert (c.family, c.rope_base, c.rope_position_divisor) == (family, base, divisor)
    assert c.num_kv_heads == extra.get("multi_query_group_num", 2) and c.head_dim == 128 and c.rotary_dim == 64


def test_rope_ratio_from_modeling_code(tmp_path):
    (tmp_path / "modeling_chatglm.py").write_text("seq_idx = torch.arange(seq_len) / self.rope_ratio\n")
    assert from_hf({**BASE, "rope_ratio": 16}, tmp_path).rope_position_divisor == 16.0
    (tmp_path / "modeling_chatglm.py").write_text("base = base * self.rope_ratio\n")
    assert from_hf({**BASE, "rope_ratio": 50}, tmp_path).rope_base == 5e5


def test_ambiguous_rope_ratio_asks_for_family():
    with pytest.raises(ConfigError, match="name the family explicitly"):
        from_hf({**BASE, "rope_ratio": 16})
    assert from_hf({**BASE, "rope_ratio": 16}, family="chatglm2").rope_position_divisor == 16.0


def test_refuses_chatglm_v1():
    v1 = {"model_type": "chatglm", "hidden_size": 4096, "inner_hidden_size": 16384, "num_attention_heads": 32,
          "num_layers": 28, "position_encoding_2d": True, "vocab_size": 130528}
    with pytest.raises(ConfigError, match="ChatGLM-6B v1"):
        from_hf(v1)


def test_config_errors_name_the_key(tmp_path):
    bad = dict(BASE)
    del bad["num_layers"]
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"config\.json: missing key 'num_layers'"):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        from_hf({**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})


# ---------------------------------------------------------------------------------------------- refused checkpoints

@pytest.mark.parametrize("bad_dtype", [torch.int32, torch.int64, torch.int8, torch.bool])
def test_integer_or_bool_weight_refused(tmp_path, bad_dtype):
    _, path = saved(tmp_path)
    name = "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"
    _edit_single(path, lambda s: s.__setitem__(name, torch.ones(s[name].shape, dtype=bad_dtype)))
    kind = str(bad_dtype).replace("torch.", "")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(name)}' is {kind}; a float "
                                              "weight belongs here"):
        load_model(path)


def test_float_where_quantized_codes_belong_refused(tmp_path):
    from glmc.quantization.scheme import apply_scheme, parse_precision, save_quantized
    scheme = parse_precision("int8")
    path = save_quantized(apply_scheme(tiny_model(), scheme), tmp_path / "q", scheme)
    name = "transformer.encoder.layers.0.self_attention.dense.weight"
    _edit_single(path, lambda s: s.__setitem__(name, s[name].half()))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' is float16; quantized codes belong here"):
        load_model(path, dtype="float16")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("layout", ["safetensors", "sharded-bin"])
def test_non_finite_weight_refused(tmp_path, value, layout):
    _, path = saved(tmp_path, layout)
    name = "transformer.encoder.layers.1.self_attention.query_key_value.bias"
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model-*.bin"))
    for f in files:  # poison the tensor in whichever shard holds it
        state = load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
        if name in state:
            state[name][17] = value
            save_file(state, str(f)) if f.suffix == ".safetensors" else torch.save(state, f)
            break
    with pytest.raises(CheckpointError, match=rf"{re.escape(f.name)}: tensor '{re.escape(name)}' holds 1 NaN/inf "
                                              r"values \(first at \(17,\)\)"):
        load_model(path)


def test_overflow_in_half_precision_refused(tmp_path):
    """A finite float32 weight past float16's range would load as inf: refused, saying why."""
    _, path = saved(tmp_path)
    name = "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"
    _edit_single(path, lambda s: s[name].__setitem__((3, 4), 1e6))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' overflows float16 \(1 values become inf, "
                                              r"first at \(3, 4\)\); load it in float32"):
        load_model(path, dtype="float16")
    assert load_model(path, dtype="float32").state_dict()[name][3, 4] == 1e6


def _retarget_shard(path, fn):
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    data["weight_map"] = {n: (fn(f) if f == first else f) for n, f in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return first


@pytest.mark.parametrize("how", ["dotdot", "absolute", "nested-dotdot"])
def test_index_escaping_the_directory_refused(tmp_path, how):
    """A shard name outside the checkpoint directory is refused before anything is opened, even if the file exists."""
    _, path = saved(tmp_path, "sharded-safetensors")
    outside = tmp_path / "outside.safetensors"
    first = sorted(path.glob("model-*.safetensors"))[0]
    outside.write_bytes(first.read_bytes())  # a valid shard there: it must still not be read
    shard = {"dotdot": "../outside.safetensors", "absolute": str(outside),
             "nested-dotdot": "sub/../../outside.safetensors"}[how]
    _retarget_shard(path, lambda f: shard)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: shard '{re.escape(shard)}' points "
                                              "outside the checkpoint directory"):
        load_model(path)


def test_index_symlink_escaping_refused(tmp_path):
    _, path = saved(tmp_path, "sharded-safetensors")
    first = sorted(path.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    first.rename(outside)
    first.symlink_to(outside)  # same name in the index; the file itself leads out
    with pytest.raises(CheckpointError, match=rf"shard '{first.name}' is a symlink to .*elsewhere.*, outside the "
                                              "checkpoint directory"):
        load_model(path)


def test_single_file_symlink_escaping_refused(tmp_path):
    _, path = saved(tmp_path)
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    (path / "model.safetensors").rename(outside)
    (path / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a symlink to .*elsewhere.*, outside the "
                                              "checkpoint directory"):
        load_model(path)


@pytest.mark.parametrize("tensor, value, what", [("self_attention.k_scale", 0.0, "positive"),
                                                 ("self_attention.v_scale", -1e-3, "positive"),
                                                 ("mlp.dense_4h_to_h.weight_scale", -0.5, "non-negative")])
def test_bad_quantization_scales_refused(tmp_path, tensor, value, what):
    from glmc.quantization.scheme import apply_scheme, parse_precision, save_quantized
    model = tiny_model("chatglm3-6b")
    scheme = parse_precision("fp32+int8+kv8-head")
    apply_scheme(model, scheme, [torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))])
    path = save_quantized(model, tmp_path / "q", scheme)
    name = f"transformer.encoder.layers.1.{tensor}"

    def poison(state):
        state[name] = state[name].clone()
        state[name].view(-1)[1] = value
    _edit_single(path, poison)
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' holds 1 scales that are not {what}"):
        load_model(path)


def test_index_symlinks_inside_allowed(tmp_path):
    """Symlinks that stay inside (and a hub cache snapshot's links into its repository's blobs) still load."""
    model, path = saved(tmp_path, "sharded-safetensors")
    hub = tmp_path / "models--THUDM--tiny"
    snap = hub / "snapshots" / "abc123"
    (hub / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in path.iterdir():
        blob = hub / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/{blob.name}")
    loaded = load_model(snap)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_index_bad_weight_map(tmp_path):
    _, path = saved(tmp_path, "sharded-safetensors")
    _retarget_shard(path, lambda f: 7)
    with pytest.raises(CheckpointError, match=r"index\.json: shard name 7 \(for '.*'\) is not a file name"):
        load_model(path)


def test_shape_mismatch_names_the_config_keys(tmp_path):
    _, path = saved(tmp_path)
    name = "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"
    _edit_single(path, lambda s: s.__setitem__(name, torch.zeros(500, 128)))
    with pytest.raises(CheckpointError, match=r"has shape \(500, 128\), expected \(512, 128\) for chatglm3 .*"
                                              r"config\.json 2 x ffn_hidden_size 256, hidden_size 128"):
        load_model(path)


# ---------------------------------------------------------------------------------------------- refused configs

@pytest.mark.parametrize("key,value,message", [
    ("rope_ratio", 0, r"'rope_ratio' is 0; it must be a finite number above 0"),
    ("rope_ratio", -16, r"'rope_ratio' is -16; it must be a finite number above 0"),
    ("layernorm_epsilon", -1e-5, r"'layernorm_epsilon' is -1e-05; it must be a finite number above 0"),
    ("layernorm_epsilon", 0, r"'layernorm_epsilon' is 0; it must be a finite number above 0"),
    ("layernorm_epsilon", float("nan"), r"'layernorm_epsilon' is nan; it must be a finite number above 0"),
    ("layernorm_epsilon", 2.0, r"'layernorm_epsilon' 2\.0 is outside \(0, 1\)"),
    ("layernorm_epsilon", "1e-5", r"'layernorm_epsilon' must be a number, got '1e-5'"),
    ("num_layers", 0, r"'num_layers' is 0; a model needs at least 1"),
    ("num_layers", -2, r"'num_layers' is -2; a model needs at least 1"),
    ("hidden_size", 0, r"'hidden_size' is 0; a model needs at least 1"),
    ("ffn_hidden_size", -1, r"'ffn_hidden_size' is -1"),
    ("num_attention_heads", 0, r"'num_attention_heads' is 0"),
    ("kv_channels", 0, r"'kv_channels' is 0"),
    ("kv_channels", 30, r"'kv_channels' 30 is not a multiple of 4"),
    ("padded_vocab_size", 0, r"'padded_vocab_size' is 0"),
    ("seq_length", 0, r"'seq_length' is 0"),
    ("multi_query_group_num", 3, r"'num_attention_heads' 4 is not a multiple of 'multi_query_group_num' 3"),
    ("multi_query_group_num", 0, r"'multi_query_group_num' is 0"),
    ("num_layers", 1000000, r"'num_layers' is 1000000, over glmc's limit of 1024"),
    ("hidden_size", 3_000_000_000, r"'hidden_size' is 3000000000, over glmc's limit of 65536"),
    ("padded_vocab_size", 2_000_000_000, r"'padded_vocab_size' is 2000000000, over glmc's limit of 4194304"),
    ("ffn_hidden_size", 10**10, r"'ffn_hidden_size' is 10000000000, over glmc's limit"),
    ("num_attention_heads", 10**6, r"'num_attention_heads' is 1000000, over glmc's limit"),
    ("seq_length", 1e9, r"'seq_length' must be an integer, got 1000000000\.0"),
    ("seq_length", 10**9, r"'seq_length' is 1000000000, over glmc's limit of 16777216 \(rotary positions are "
                          r"float32"),
    ("num_layers", 2.5, r"'num_layers' must be an integer, got 2\.5"),
    ("num_layers", 2.0, r"'num_layers' must be an integer, got 2\.0"),
    ("num_layers", "2", r"'num_layers' must be an integer, got '2'"),
    ("num_layers", True, r"'num_layers' must be an integer, got True"),
    ("add_qkv_bias", "false", r"'add_qkv_bias' must be true or false, got 'false'"),
    ("quantization_bit", 4.0, r"quantization_bit 4\.0 is not 4 or 8"),
])
def test_config_without_a_model_refused_naming_the_key(tmp_path, key, value, message):
    """Each bad value fails at once (no tensor read, nothing allocated) with config.json and the key named."""
    _, path = saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, key: value}))
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path / 'config.json'))}: .*{message}"):
        load_model(path)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("changes,message", [
    ({"num_layers": 1024, "hidden_size": 65536, "ffn_hidden_size": 262144, "num_attention_heads": 512},
     r"the model would have 5\.5e\+13 parameters \('num_layers' 1024, 'hidden_size' 65536, 'ffn_hidden_size' "
     r"262144, 'padded_vocab_size' 300\), over glmc's limit of 1e\+12"),
    ({"seq_length": 1 << 24, "kv_channels": 1024, "num_attention_heads": 1, "multi_query_group_num": 1},
     r"'seq_length' 16777216 with 'kv_channels' 1024 needs rotary tables of 32\.0 GiB, over glmc's limit of 4 GiB"),
])
def test_config_too_large_together_refused(tmp_path, changes, message):
    """Sizes each within bounds but too large together: refused from the config alone, before allocation."""
    _, path = saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"config\.json: {message}"):
        load_model(path)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("key,value,message", [
    ("num_hidden_layers", 0, r"'num_hidden_layers' is 0"),
    ("rms_norm_eps", -1e-6, r"'rms_norm_eps' is -1e-06; it must be a finite number above 0"),
    ("num_key_value_heads", 3, r"'num_attention_heads' 4 is not a multiple of 'num_key_value_heads' 3"),
    ("vocab_size", 5_000_000_000, r"'vocab_size' is 5000000000, over glmc's limit"),
    ("max_position_embeddings", 1e9, r"'max_position_embeddings' must be an integer"),
])
def test_transformers_glm_config_refused_naming_the_key(tmp_path, key, value, message):
    to_transformers(tiny_model("glm-4-9b-chat")).save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ConfigError, match=rf"config\.json: {message}"):
        load_model(tmp_path / "hf", family="glm4")


def test_released_variants_pass_the_checks():
    """The bounds leave every released ChatGLM2/3 / GLM-4 configuration (DESIGN.md table) through unchanged."""
    for name in VARIANTS:
        c = variant(name)
        assert from_hf(c.to_chatglm_json()) == c, name
