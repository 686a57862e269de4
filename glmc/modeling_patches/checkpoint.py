"""Checkpoint loading and saving: stream tensors from safetensors/.bin (single or sharded) into GLMForCausalLM.

Peak memory is about one copy of the model in the target dtype: the model is built on the meta device,
each parameter is allocated once in its final dtype, and source tensors are copied in one at a time.
Source names are mapped to model names through explicit tables, never by guessing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from glmc.errors import CheckpointError
from glmc.modeling_patches import awq_checkpoint
from glmc.modeling_patches.config import (
    QKV_PER_HEAD,
    GLMConfig,
    config_keys,
    from_hf,
    qkv_layout,
    read_config_json,
    torch_dtype,
)
from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM, enable_kv_int8, replace_linears

QUANT_FILE = "quantization.json"  # written next to glmc-quantized weights: the scheme they were made with

# transformers GlmForCausalLM name -> (our name, which part of a fused tensor along dim 0)
_GLM_NAMES = [
    (r"model\.embed_tokens\.weight", "transformer.embedding.word_embeddings.weight", None),
    (r"model\.norm\.weight", "transformer.encoder.final_layernorm.weight", None),
    (r"lm_head\.weight", "transformer.output_layer.weight", None),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "transformer.encoder.layers.{0}.input_layernorm.weight", None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight",
     "transformer.encoder.layers.{0}.post_attention_layernorm.weight", None),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)",
     "transformer.encoder.layers.{0}.self_attention.query_key_value.{2}", "{1}"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "transformer.encoder.layers.{0}.self_attention.dense.weight",
     None),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "transformer.encoder.layers.{0}.mlp.dense_h_to_4h.weight",
     None),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "transformer.encoder.layers.{0}.mlp.dense_4h_to_h.weight", None),
]
_IGNORED = re.compile(r"(transformer\.)?rotary_pos_emb\.inv_freq|model\.rotary_emb\.inv_freq")
# The fused QKV tensors whose rows a QKV_PER_HEAD checkpoint orders per head (config.qkv_layout): float weight and
# bias, and a quantized layer's int8/int4 codes and scales (quantized per output row, so rows move whole).
_QKV = re.compile(r".*\.self_attention\.query_key_value\.(weight|bias|weight_scale|weight_zero)")


@dataclass
class Target:
    name: str  # parameter/buffer name in GLMForCausalLM
    rows: slice | None = None  # rows of a fused tensor this source fills


def map_name(config: GLMConfig, name: str) -> Target | None:
    """Source tensor name -> where it goes in our model (None: not ours, an error unless ignorable)."""
    if config.source_format == "chatglm":
        return Target(name)
    for pattern, dest, part in _GLM_NAMES:
        m = re.fullmatch(pattern, name)
        if m:
            g = m.groups()
            rows = None
            if part is not None:
                q, kv = config.q_size, config.kv_size
                rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[part.format(*g)]
            return Target(dest.format(*g), rows)
    return None


# ---------------------------------------------------------------------------------------------- reading files

def _allowed_roots(d: Path) -> list[Path]:
    """Where a checkpoint's files may live: its own directory, and for a Hugging Face hub cache snapshot
    (`models--X/snapshots/REV/`, whose files are symlinks to `../../blobs/HASH`) that repository's blobs."""
    roots = [d.resolve()]
    if d.resolve().parent.name == "snapshots":
        roots.append(d.resolve().parent.parent / "blobs")
    return roots


def _shard_path(d: Path, index: Path, shard: str, roots: list[Path]) -> Path:
    """An index's shard name -> its path, refused (never opened) unless it names a file inside the checkpoint."""
    rel = Path(shard)
    if rel.is_absolute() or ".." in rel.parts or "\\" in shard or rel.drive:
        raise CheckpointError(f"{index}: shard '{shard}' points outside the checkpoint directory {d}; refused "
                              "(shard names must be relative and stay inside it)")
    resolved = (d / rel).resolve()  # follows symlinks to see where they lead; nothing is opened
    if not any(resolved.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{index}: shard '{shard}' is a symlink to {resolved}, outside the checkpoint "
                              f"directory {d}; refused")
    return d / rel


def _checkpoint_files(d: Path) -> list[Path]:
    """The tensor files of a checkpoint directory, in one of the four supported layouts."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> file")
            for name, f in weight_map.items():
                if not isinstance(f, str) or not f:
                    raise CheckpointError(f"{index}: shard name {f!r} (for '{name}') is not a file name")
            roots = _allowed_roots(d)
            files = sorted(set(weight_map.values()))
            paths = [_shard_path(d, index, f, roots) for f in files]
            for f, path in zip(files, paths, strict=True):
                if not path.is_file():
                    names = [n for n, v in weight_map.items() if v == f]
                    raise CheckpointError(f"{index}: shard '{f}' (holding {names[0]} and {len(names) - 1} more) "
                                          f"is not in {d}")
            return paths
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            resolved = (d / single).resolve()
            if not any(resolved.is_relative_to(r) for r in _allowed_roots(d)):
                raise CheckpointError(f"{d / single} is a symlink to {resolved}, outside the checkpoint directory "
                                      f"{d}; refused")
            return [d / single]
    raise CheckpointError(f"{d}: no model.safetensors, pytorch_model.bin or shard index found")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one safetensors or .bin file, one tensor at a time where the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                names = f.keys()
                for name in names:
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        return
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; all mean the same here
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (truncated, corrupt, or not weights-only): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for name in list(state):
        yield name, state.pop(name)


# ---------------------------------------------------------------------------------------------- building

def read_quantization(checkpoint_dir: Path, config: GLMConfig) -> dict:
    """The quantization scheme of a checkpoint: glmc's quantization.json, or ChatGLM's `quantization_bit`."""
    qfile = checkpoint_dir / QUANT_FILE
    if qfile.is_file():
        try:
            return json.loads(qfile.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{qfile}: not valid JSON ({e})") from None
    if config.quantization_bit:
        return {"weights": {"bits": config.quantization_bit, "group_size": 0, "include_output": False,
                            "format": "chatglm"}}
    return {}


def _quantization(raw: dict, d: Path, config: GLMConfig) -> dict:
    return awq_checkpoint.quantization(raw, d) or read_quantization(d, config)  # AutoAWQ's config, else glmc's


def checkpoint_quantization(checkpoint_dir: str | Path, config: GLMConfig) -> dict:
    """What a checkpoint directory's weights already are, the structure load_model builds: AutoAWQ's config,
    glmc's quantization.json or ChatGLM's quantization_bit ({} for float weights). `config`: its load_config."""
    d = Path(checkpoint_dir)
    return _quantization(read_config_json(d), d, config)


def build_model(config: GLMConfig, dtype: torch.dtype, quantization: dict | None = None,
                max_positions: int | None = None, device: str | torch.device = "meta") -> GLMForCausalLM:
    """An (uninitialised, on `device`) model of `config` with the layer structure `quantization` implies."""
    with torch.device(device):
        model = GLMForCausalLM(config, max_positions=max_positions)
    model.to(dtype)
    quantization = quantization or {}
    w = quantization.get("weights")
    if w:
        replace_linears(model, int(w["bits"]), int(w.get("group_size", 0)), bool(w.get("include_output", False)),
                        method=w.get("method", "rtn"), zero_point=bool(w.get("zero_point", False)))
    kv = quantization.get("kv_cache")
    if kv:
        shape = {"tensor": (1,), "head": (config.num_kv_heads,),
                 "channel": (config.num_kv_heads, config.head_dim)}[kv["granularity"]]
        with torch.device(device):
            scales = [torch.ones(shape) for _ in range(config.num_layers)]
        enable_kv_int8(model, scales, [s.clone() for s in scales],  # k, v distinct: named_buffers dedups
                       dtype=torch.float8_e4m3fn if kv.get("dtype") == "fp8" else torch.int8)
    return model


def _swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """ChatGLM's official int4 puts element 2j in the high nibble; glmc (and ONNX) in the low one."""
    u = packed.view(torch.uint8)
    return ((u & 0x0F) << 4) | (u >> 4)


def _per_head_view(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[q_0 k_0 v_0 | q_1 k_1 v_1 | ...] rows (QKV_PER_HEAD) viewed as [3, heads, head_dim, ...] ([q | k | v])."""
    return t.reshape(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:]).transpose(0, 1)


def to_per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """glmc's [q | k | v] rows -> the original per-head order (a new contiguous tensor)."""
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    _per_head_view(out, heads).copy_(t.view(3, heads, t.shape[0] // (3 * heads), *t.shape[1:]))
    return out


def _shape_keys(config: GLMConfig, target: str) -> str:
    """Which config.json keys set a tensor's shape, with their values (for shape-mismatch messages)."""
    k = config_keys(config)
    hidden, vocab, ffn = f"{k['hidden_size']} {config.hidden_size}", f"{k['vocab_size']} {config.vocab_size}", \
        f"{k['ffn_hidden_size']} {config.ffn_hidden_size}"
    heads = (f"{k['num_heads']} {config.num_heads}, {k['num_kv_heads']} {config.num_kv_heads}, "
             f"{k['head_dim']} {config.head_dim}")
    for part, keys in (("word_embeddings", f"{vocab}, {hidden}"), ("output_layer", f"{vocab}, {hidden}"),
                       ("query_key_value", f"{heads}, {hidden}"), ("self_attention.dense", f"{heads}, {hidden}"),
                       ("dense_h_to_4h", f"2 x {ffn}, {hidden}"), ("dense_4h_to_h", f"{ffn}, {hidden}"),
                       ("scale", heads), ("layernorm", hidden)):
        if part in target:
            return f"config.json {keys}"
    return "config.json"


def _check_dtype(path: Path, name: str, tensor: torch.Tensor, want: torch.dtype) -> None:
    """Float weights must be floats; quantized codes int8/uint8 (either: they are reinterpreted, not converted);
    fp8 codes float8_e4m3fn (never converted from another float: that would quantize them here)."""
    if want == torch.float8_e4m3fn or tensor.dtype == torch.float8_e4m3fn:
        if tensor.dtype != want:
            raise CheckpointError(f"{path}: tensor '{name}' is {str(tensor.dtype).replace('torch.', '')}; "
                                  f"{str(want).replace('torch.', '')} belongs here"
                                  + (" (fp8 e4m3 codes)" if want == torch.float8_e4m3fn else ""))
    elif want.is_floating_point:
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor '{name}' is {str(tensor.dtype).replace('torch.', '')}; a float "
                                  "weight belongs here (float32, float16 or bfloat16)")
    elif tensor.dtype not in (torch.int8, torch.uint8):
        raise CheckpointError(f"{path}: tensor '{name}' is {str(tensor.dtype).replace('torch.', '')}; quantized "
                              "codes belong here (int8 or uint8)")


def _check_finite(path: Path, name: str, source: torch.Tensor, dest: torch.Tensor) -> None:
    """Refuse NaN/inf weights: one reduction, aminmax (min and max propagate NaN and show +-inf; it allocates
    nothing and runs at about copy speed, where isfinite().all() was 15x slower on a 224 MB fp16 tensor here).

    It reads the narrower of the two when the cast cannot overflow (fp16/bf16 into float32: half the bytes), else
    the destination, which also catches values that overflow the target dtype."""
    if dest.numel() == 0:
        return
    widening = dest.dtype in (torch.float32, torch.float64) and source.element_size() < dest.element_size()
    checked = source if source.is_floating_point() and (source.dtype == dest.dtype or widening) else dest
    lo, hi = torch.aminmax(checked)
    if math.isfinite(lo.item()) and math.isfinite(hi.item()):
        return
    bad = ~torch.isfinite(dest)  # the failure path only: count and locate
    where = tuple(int(i) for i in bad.nonzero()[0])
    if source.is_floating_point() and bool(torch.isfinite(source).all()):
        raise CheckpointError(f"{path}: tensor '{name}' overflows {str(dest.dtype).replace('torch.', '')} "
                              f"({int(bad.sum())} values become inf, first at {where}); load it in float32")
    raise CheckpointError(f"{path}: tensor '{name}' holds {int(bad.sum())} NaN/inf values (first at {where})")


def _check_scales(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Quantization scales as the ops need them: KV-cache scales > 0 (the cache divides by them), weight scales
    >= 0 (0 only for an all-zero group, whose codes are 0)."""
    for name, t in tensors.items():
        kv = name.endswith(("k_scale", "v_scale", "input_scale"))  # divisors (input_scale: fp8 activations)
        if not (kv or name.endswith("weight_scale")) or not t.is_floating_point():
            continue
        bad = ~(t > 0) if kv else ~(t >= 0)  # NaN fails both
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise CheckpointError(f"{d}: tensor '{name}' holds {int(bad.sum())} scales that are not "
                                  f"{'positive' if kv else 'non-negative'} (first {t[first].item()} at {first})")


def load_model(checkpoint_dir: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu",
               family: str | None = None, max_positions: int | None = None) -> GLMForCausalLM:
    """Load a ChatGLM2/3 / GLM-4 (or transformers GLM, or glmc-quantized) checkpoint directory."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory does not exist")
    raw = read_config_json(d)
    config = from_hf(raw, d, family=family, where=str(d / "config.json"))
    per_head = qkv_layout(raw, str(d / "config.json")) == QKV_PER_HEAD  # num_kv_heads == num_heads then
    dtype = torch_dtype(dtype, "load_model") if isinstance(dtype, str) else dtype
    quant = _quantization(raw, d, config)
    awq = quant.get("weights", {}).get("format") == awq_checkpoint.FORMAT
    model = build_model(config, dtype, quant, max_positions)
    official_int4 = quant.get("weights", {}).get("format") == "chatglm" and quant["weights"]["bits"] == 4

    expected: dict[str, torch.Tensor] = dict(model.named_parameters())
    expected.update({n: b for n, b in model.named_buffers() if n not in ("cos_cache", "sin_cache")})
    filled: dict[str, torch.Tensor] = {}
    coverage: dict[str, int] = {}  # rows filled so far, for fused tensors
    for path in _checkpoint_files(d):
        for name, tensor in iter_tensors(path):
            if awq:  # AutoAWQ's qweight / qzeros / scales -> glmc's weight / weight_zero / weight_scale
                name, tensor = awq_checkpoint.convert(path, name, tensor, quant["weights"])
            target = map_name(config, name)
            if target is None or target.name not in expected:
                if _IGNORED.fullmatch(name):
                    continue
                raise CheckpointError(f"{path}: unexpected tensor '{name}' (not part of a "
                                      f"{config.family} model with {config.num_layers} layers)")
            ref = expected[target.name]
            want_shape = tuple(ref.shape)
            if target.rows is not None:
                want_shape = (len(range(*target.rows.indices(ref.shape[0]))), *want_shape[1:])
            if tuple(tensor.shape) != want_shape:  # checked before anything is allocated for it
                raise CheckpointError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, expected "
                                      f"{want_shape} for {config.family} ({target.name}: "
                                      f"{_shape_keys(config, target.name)})")
            _check_dtype(path, name, tensor, ref.dtype)
            if target.name not in filled:
                want_dtype = ref.dtype if not ref.dtype.is_floating_point or ref.dtype == torch.float8_e4m3fn else dtype
                filled[target.name] = torch.empty(ref.shape, dtype=want_dtype, device=device)
            dest = filled[target.name]
            if target.rows is not None:
                dest = dest[target.rows]
            if official_int4 and tensor.dtype in (torch.int8, torch.uint8) and name.endswith(".weight"):
                tensor = _swap_nibbles(tensor)
            if not dest.dtype.is_floating_point and tensor.dtype != dest.dtype:
                tensor = tensor.view(dest.dtype)  # int8 <-> uint8 (same size: _check_dtype)
            rows = dest.shape[0]
            if per_head and _QKV.fullmatch(target.name):
                tensor = _per_head_view(tensor, config.num_heads)  # copied below into [q | k | v] order
                dest = dest.view(tensor.shape)
            dest.copy_(tensor)
            if dest.dtype == torch.float8_e4m3fn:  # e4m3 has no infinities; its NaN is S.1111.111
                nan = (dest.view(torch.uint8) & 0x7F) == 0x7F
                if nan.any():
                    raise CheckpointError(f"{path}: tensor '{name}' holds {int(nan.sum())} NaN fp8 codes")
            elif dest.is_floating_point():
                _check_finite(path, name, tensor, dest)
            coverage[target.name] = coverage.get(target.name, 0) + rows
            del tensor
    missing = [n for n in expected if n not in filled or coverage[n] < expected[n].shape[0]]
    if missing:
        raise CheckpointError(f"{d}: missing tensor '{missing[0]}'" + (f" and {len(missing) - 1} more" if
                                                                       len(missing) > 1 else ""))
    _check_scales(d, filled)
    model.load_state_dict(filled, strict=False, assign=True)
    model.init_rotary(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------- saving

def _chatglm_state(model: GLMForCausalLM, per_head: bool) -> dict[str, torch.Tensor]:
    """The tensors to write, fused QKV rows in the order the written config.json tells the original code to read."""
    heads = model.config.num_heads
    return {n: to_per_head(t.detach(), heads) if per_head and _QKV.fullmatch(n) else t.detach().contiguous()
            for n, t in model.state_dict().items()}


def save_checkpoint(model: GLMForCausalLM, out_dir: str | Path, layout: str = "safetensors",
                    shard_bytes: int = 2 << 30, quantization: dict | None = None) -> Path:
    """Save in the ChatGLM layout: config.json + model.safetensors | sharded safetensors | pytorch_model.bin |
    sharded bin."""
    layouts = ("safetensors", "sharded-safetensors", "bin", "sharded-bin")
    if layout not in layouts:
        raise CheckpointError(f"layout '{layout}' is not one of {', '.join(layouts)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_chatglm_json()
    cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if quantization:
        (out / QUANT_FILE).write_text(json.dumps(quantization, indent=2) + "\n")
    state = _chatglm_state(model, qkv_layout(cfg) == QKV_PER_HEAD)
    ext = "safetensors" if "safetensors" in layout else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"

    def write(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if ext == "safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    if not layout.startswith("sharded"):
        write(state, out / f"{stem}.{ext}")
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        write(shard, out / fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / f"{stem}.{ext}.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out


def random_model(config: GLMConfig, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.02,
                 max_positions: int | None = None) -> GLMForCausalLM:
    """A randomly initialised model (tests, benchmarks): normal(0, std) weights, norms near 1."""
    g = torch.Generator().manual_seed(seed)
    model = GLMForCausalLM(config, max_positions=max_positions)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.to(dtype).eval()


def write_random_checkpoint(config: GLMConfig, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                            shard_bytes: int = 2 << 30, seed: int = 0, std: float = 0.02) -> Path:
    """Write a random ChatGLM-layout sharded safetensors checkpoint shard by shard (memory: one shard at a time)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config.to_chatglm_json()
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shapes = {n: tuple(t.shape) for n, t in build_model(config, dtype).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for n in names:
            t = torch.randn(shapes[n], generator=g, dtype=torch.float32)
            shard[n] = (1.0 + 0.1 * t if n.endswith("layernorm.weight") else t * std).to(dtype)
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del shard
    total = sum(math.prod(s) for s in shapes.values()) * torch.finfo(dtype).bits // 8
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out
