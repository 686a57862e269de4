"""Config normalisation: a checkpoint's config.json (ChatGLM remote code or transformers GLM) -> GLMConfig.

Only architecture facts live here; weight names are the checkpoint module's business.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from glmc.errors import ConfigError

FAMILIES = ("chatglm2", "chatglm3", "glm4")

# How a checkpoint's `rope_ratio` is applied (docs/design.md, "ChatGLM facts").
ROPE_POSITIONS_DIVIDED = "positions_divided"  # chatglm2-6b-32k: t / rope_ratio
ROPE_BASE_MULTIPLIED = "base_multiplied"  # chatglm3-6b-32k, GLM-4: base * rope_ratio

# The one table of float type names: config.json's torch_dtype names, the short names of compile configs and
# precision names (fp32 | fp16 | bf16) and common aliases -> the canonical name (a torch dtype's name).
DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
               "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def dtype_name(value: Any, where: str = "dtype") -> str:
    """A float type given by any of its names (or a torch dtype) -> its canonical name (float32 | float16 |
    bfloat16)."""
    name = str(value).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise ConfigError(f"{where}: '{value}' is not one of float32, float16, bfloat16 (or fp32, fp16, bf16)")
    return DTYPE_NAMES[name]


def torch_dtype(value: Any, where: str = "dtype") -> Any:
    """The torch dtype of a float type name (imports torch; this module otherwise does not)."""
    import torch
    return getattr(torch, dtype_name(value, where))


@dataclasses.dataclass(frozen=True)
class GLMConfig:
    """One normalised description of a ChatGLM2/ChatGLM3/GLM-4 architecture."""

    family: str  # chatglm2 | chatglm3 | glm4 (decides chat format and rope_ratio meaning)
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    seq_length: int
    rms_eps: float
    rope_base: float = 10000.0  # effective base, rope_ratio already applied when it multiplies
    rope_position_divisor: float = 1.0  # positions are divided by this (rope_ratio for chatglm2-32k)
    qkv_bias: bool = True
    residual_post_layernorm: bool = False  # apply_residual_connection_post_layernorm
    torch_dtype: str = "float16"
    quantization_bit: int = 0  # official pre-quantized checkpoints: 4 or 8
    source_format: str = "chatglm"  # chatglm (remote code) | glm (transformers GlmForCausalLM)

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head: ChatGLM rotates the first half, as adjacent pairs."""
        return self.head_dim // 2

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_parameters(self) -> int:
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        qkv = h * (self.q_size + 2 * self.kv_size) + (self.q_size + 2 * self.kv_size) * self.qkv_bias
        layer = qkv + self.q_size * h + 2 * f * h + f * h + 2 * h
        return self.num_layers * layer + 2 * v * h + h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> GLMConfig:
        return dataclasses.replace(self, **changes)

    def to_chatglm_json(self) -> dict[str, Any]:
        """The config.json a ChatGLM remote-code checkpoint of this architecture carries."""
        ratio = 1.0
        if self.rope_position_divisor != 1.0:
            ratio = self.rope_position_divisor
        elif self.rope_base != 10000.0:
            ratio = self.rope_base / 10000.0
        out = {
            "architectures": ["ChatGLMModel"],
            "model_type": "chatglm",
            "_name_or_path": {"chatglm2": "glmc/chatglm2", "chatglm3": "glmc/chatglm3",
                              "glm4": "glmc/glm-4"}[self.family],
            "glmc_family": self.family,
            "num_layers": self.num_layers,
            "padded_vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "kv_channels": self.head_dim,
            "num_attention_heads": self.num_heads,
            "multi_query_attention": self.num_kv_heads != self.num_heads,
            "multi_query_group_num": self.num_kv_heads,
            "seq_length": self.seq_length,
            "layernorm_epsilon": self.rms_eps,
            "rmsnorm": True,
            "add_qkv_bias": self.qkv_bias,
            "add_bias_linear": False,
            "post_layer_norm": True,
            "apply_residual_connection_post_layernorm": self.residual_post_layernorm,
            "original_rope": True,
            "torch_dtype": self.torch_dtype,
        }
        if ratio != 1.0:
            out["rope_ratio"] = ratio
        if self.quantization_bit:
            out["quantization_bit"] = self.quantization_bit
        return out


def _require(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{where}: missing key '{key}'")
    return cfg[key]


def _dtype(value: Any, where: str) -> str:
    return "float16" if value is None else dtype_name(value, f"{where}: torch_dtype")


def detect_family(cfg: dict, checkpoint_dir: Path | None = None) -> str:
    """Tell chatglm2 / chatglm3 / glm4 apart (the key that changes chat format and rope_ratio meaning)."""
    if cfg.get("glmc_family") in FAMILIES:
        return cfg["glmc_family"]
    if int(cfg.get("padded_vocab_size", cfg.get("vocab_size", 0))) >= 150000:
        return "glm4"
    if checkpoint_dir is not None:
        code = checkpoint_dir / "modeling_chatglm.py"
        if code.is_file():
            text = code.read_text(errors="replace")
            if re.search(r"base\s*=\s*base\s*\*\s*self\.rope_ratio", text):
                return "chatglm3"
            if re.search(r"/\s*self\.rope_ratio", text):
                return "chatglm2"
    name = str(cfg.get("_name_or_path", "")).lower().replace("_", "-")
    for family, pattern in (("glm4", r"glm-?4"), ("chatglm3", r"chatglm-?3"), ("chatglm2", r"chatglm-?2")):
        if re.search(pattern, name):
            return family
    if checkpoint_dir is not None and (checkpoint_dir / "tokenizer_config.json").is_file():
        tok = (checkpoint_dir / "tokenizer_config.json").read_text(errors="replace")
        if "<|user|>" in tok or "ChatGLM3" in tok or "chatglm3" in tok.lower():
            return "chatglm3"
    if float(cfg.get("rope_ratio") or 1.0) != 1.0:
        raise ConfigError(
            "config.json: 'rope_ratio' means different things in chatglm2-6b-32k (positions divided) and "
            "chatglm3-6b-32k (base multiplied), and nothing in the checkpoint says which this is; "
            "name the family explicitly (family: chatglm2 | chatglm3)")
    return "chatglm3"


# ---------------------------------------------------------------------------------------------- checked values

# Upper bounds on config.json sizes: far above every released model, low enough that a typo or a hostile file fails
# at once with the key named instead of hanging or allocating gigabytes. (Largest released ChatGLM-architecture model:
# GLM-4-9B, 40 layers x 4096 hidden x 13696 ffn, vocabulary 151552, seq_length 1048576 for -chat-1m.)
MAX_LAYERS = 1024  # deepest released decoders have ~126 layers (Llama-3.1-405B)
MAX_HIDDEN = 1 << 16  # hidden size 65536: 2.5x the widest released decoders (~25600)
MAX_FFN = 1 << 18  # ffn 262144: ~5x the widest released MLPs
MAX_HEADS = 1024  # attention heads (and KV groups)
MAX_HEAD_DIM = 1024  # kv_channels; released models use 64-256
MAX_VOCAB = 1 << 22  # 4194304 ids: 16x the largest released vocabularies (~256k)
# Rotary tables hold positions as float32 (ops.rotary_tables), exact integers only up to 2^24: past that two
# positions share one angle row. The tables (cos and sin, float32, head_dim / 4 angles per position) are also
# allocated whole at load, so their size is capped too.
MAX_SEQ_LENGTH = 1 << 24
MAX_ROTARY_TABLE_BYTES = 4 << 30  # glm-4-9b-chat-1m: 2^20 positions x 32 angles x 2 x 4 bytes = 256 MiB
MAX_PARAMETERS = 10**12  # 2 TB in fp16: no host loads it; ~100x the largest ChatGLM-architecture release
_REQUIRED = object()


def _int(cfg: dict, key: str, where: str, default: Any = _REQUIRED, limit: int | None = None,
         why: str = "") -> int:
    """An integer size from config.json: an int (not a bool, not a float), at least 1, at most `limit`."""
    if key not in cfg or cfg[key] is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: missing key '{key}'")
        return int(default)
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}: '{key}' must be an integer, got {v!r}")
    if v < 1:
        raise ConfigError(f"{where}: '{key}' is {v}; a model needs at least 1")
    if limit is not None and v > limit:
        raise ConfigError(f"{where}: '{key}' is {v}, over glmc's limit of {limit}{why}; is the config.json damaged?")
    return v


def _float(cfg: dict, key: str, where: str, default: float, positive: bool = True) -> float:
    """A finite number from config.json (int or float, not a bool or string), > 0 when `positive`."""
    if key not in cfg or cfg[key] is None:
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{where}: '{key}' must be a number, got {v!r}")
    if not math.isfinite(v) or (positive and v <= 0):
        raise ConfigError(f"{where}: '{key}' is {v}; it must be a finite number above 0")
    return float(v)


def _bool(cfg: dict, key: str, where: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, got {v!r}")
    return v


def _check_model(c: GLMConfig, keys: dict[str, str], where: str) -> None:
    """Checks across keys, on the normalised config; `keys` names each field's config.json key for the message."""
    if c.num_heads % c.num_kv_heads:
        raise ConfigError(f"{where}: '{keys['num_heads']}' {c.num_heads} is not a multiple of "
                          f"'{keys['num_kv_heads']}' {c.num_kv_heads} (each KV group serves a whole number of heads)")
    if c.head_dim % 4:
        raise ConfigError(f"{where}: '{keys['head_dim']}' {c.head_dim} is not a multiple of 4 (ChatGLM rotates the "
                          "first head_dim / 2 dims as adjacent pairs)")
    if not 0 < c.rms_eps < 1:
        raise ConfigError(f"{where}: '{keys['rms_eps']}' {c.rms_eps} is outside (0, 1): RMSNorm adds it to mean(x^2) "
                          "(released models: 1e-5, 1.5625e-7)")
    table = c.seq_length * (c.rotary_dim // 2) * 2 * 4
    if table > MAX_ROTARY_TABLE_BYTES:
        raise ConfigError(f"{where}: '{keys['seq_length']}' {c.seq_length} with '{keys['head_dim']}' {c.head_dim} "
                          f"needs rotary tables of {table / 2**30:.1f} GiB, over glmc's limit of "
                          f"{MAX_ROTARY_TABLE_BYTES >> 30} GiB")
    n = c.num_parameters
    if n > MAX_PARAMETERS:
        sizes = ", ".join(f"'{keys[f]}' {getattr(c, f)}" for f in
                          ("num_layers", "hidden_size", "ffn_hidden_size", "vocab_size"))
        raise ConfigError(f"{where}: the model would have {n:.3g} parameters ({sizes}), over glmc's limit of "
                          f"{MAX_PARAMETERS:.0e}; is the config.json damaged?")


_CHATGLM_KEYS = {"num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
                 "num_heads": "num_attention_heads", "num_kv_heads": "multi_query_group_num",
                 "head_dim": "kv_channels", "vocab_size": "padded_vocab_size", "seq_length": "seq_length",
                 "rms_eps": "layernorm_epsilon"}
_GLM_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
             "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
             "vocab_size": "vocab_size", "seq_length": "max_position_embeddings", "rms_eps": "rms_norm_eps"}


def config_keys(config: GLMConfig) -> dict[str, str]:
    """GLMConfig field -> the config.json key it came from (for messages that name the key)."""
    return _GLM_KEYS if config.source_format == "glm" else _CHATGLM_KEYS


def from_hf(cfg: dict, checkpoint_dir: Path | None = None, family: str | None = None,
            where: str = "config.json") -> GLMConfig:
    """Normalise a config.json dict (ChatGLM remote code or transformers GLM) into a GLMConfig.

    Every value is type- and range-checked before anything is derived from it: the error names the key.
    """
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise ConfigError(f"{where}: 'architectures' must be a list, got {archs!r}")
    if model_type == "glm" or "GlmForCausalLM" in archs:
        return _from_transformers_glm(cfg, family, where)
    if model_type != "chatglm" and not any("ChatGLM" in str(a) for a in archs):
        raise ConfigError(f"{where}: model_type '{model_type}' is not a ChatGLM2/ChatGLM3/GLM-4 checkpoint "
                          "(expected model_type 'chatglm' or 'glm')")
    if "num_layers" not in cfg and "num_hidden_layers" not in cfg and "inner_hidden_size" in cfg:
        raise ConfigError(f"{where}: this is ChatGLM-6B v1 (or GLM-10B), a different architecture "
                          "(2D positions, GELU, LayerNorm); glmc supports ChatGLM2, ChatGLM3 and GLM-4")
    if "position_encoding_2d" in cfg or "inner_hidden_size" in cfg or "block_position_encoding" in cfg:
        raise ConfigError(f"{where}: this is ChatGLM-6B v1 / GLM-10B (2D rotary positions), a different "
                          "architecture; glmc supports ChatGLM2, ChatGLM3 and GLM-4")
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"family '{family}' is not one of {', '.join(FAMILIES)}")
    if not _bool(cfg, "rmsnorm", where, True):
        raise ConfigError(f"{where}: rmsnorm=false (LayerNorm) is not a ChatGLM2/3/GLM-4 configuration")
    if _bool(cfg, "add_bias_linear", where, False):
        raise ConfigError(f"{where}: add_bias_linear=true is not supported (no ChatGLM2/3/GLM-4 release uses it)")
    if not _bool(cfg, "post_layer_norm", where, True):
        raise ConfigError(f"{where}: post_layer_norm=false is not supported")
    heads = _int(cfg, "num_attention_heads", where, limit=MAX_HEADS)
    hidden = _int(cfg, "hidden_size", where, limit=MAX_HIDDEN)
    head_dim = _int(cfg, "kv_channels", where, default=max(hidden // heads, 1), limit=MAX_HEAD_DIM)
    mqa = _bool(cfg, "multi_query_attention", where, False)
    # Without multi-query attention the original code ignores multi_query_group_num: every head has its own K/V.
    kv_heads = _int(cfg, "multi_query_group_num", where, default=1, limit=MAX_HEADS) if mqa else heads
    vocab_key = "padded_vocab_size" if "padded_vocab_size" in cfg or "vocab_size" not in cfg else "vocab_size"
    vocab = _int(cfg, vocab_key, where, limit=MAX_VOCAB)
    layers = _int(cfg, "num_layers", where, limit=MAX_LAYERS)
    ffn = _int(cfg, "ffn_hidden_size", where, limit=MAX_FFN)
    seq = _int(cfg, "seq_length", where, default=2048, limit=MAX_SEQ_LENGTH,
               why=" (rotary positions are float32, exact integers up to 2^24)")
    eps = _float(cfg, "layernorm_epsilon", where, 1e-5)
    ratio = _float(cfg, "rope_ratio", where, 1.0)
    qbit = cfg.get("quantization_bit", 0) or 0
    if isinstance(qbit, bool) or not isinstance(qbit, int) or qbit not in (0, 4, 8):
        raise ConfigError(f"{where}: quantization_bit {qbit!r} is not 4 or 8")
    fam = family or detect_family(cfg, checkpoint_dir)
    base, scale = 10000.0, 1.0
    if ratio != 1.0:
        if fam == "chatglm2":
            scale = ratio
        else:
            base = 10000.0 * ratio
    config = GLMConfig(
        family=fam,
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        seq_length=seq,
        rms_eps=eps,
        rope_base=base,
        rope_position_divisor=scale,
        qkv_bias=_bool(cfg, "add_qkv_bias", where, True),
        residual_post_layernorm=_bool(cfg, "apply_residual_connection_post_layernorm", where, False),
        torch_dtype=_dtype(cfg.get("torch_dtype"), where),
        quantization_bit=int(qbit),
        source_format="chatglm",
    )
    _check_model(config, {**_CHATGLM_KEYS, "vocab_size": vocab_key}, where)
    return config


def _from_transformers_glm(cfg: dict, family: str | None, where: str) -> GLMConfig:
    heads = _int(cfg, "num_attention_heads", where, limit=MAX_HEADS)
    hidden = _int(cfg, "hidden_size", where, limit=MAX_HIDDEN)
    head_dim = _int(cfg, "head_dim", where, default=max(hidden // heads, 1), limit=MAX_HEAD_DIM)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: 'rope_parameters' must be an object, got {rope!r}")
    partial = _float(rope, "partial_rotary_factor", where, _float(cfg, "partial_rotary_factor", where, 0.5))
    if partial != 0.5:
        raise ConfigError(f"{where}: partial_rotary_factor {partial} is not ChatGLM's 0.5")
    base = _float(rope, "rope_theta", where, _float(cfg, "rope_theta", where, 10000.0))
    scale = 1.0
    if rope.get("rope_type", "default") == "linear":
        if "factor" not in rope:
            raise ConfigError(f"{where}: missing key 'factor' in linear rope scaling")
        scale = _float(rope, "factor", where, 1.0)
    elif rope.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"{where}: rope type '{rope.get('rope_type')}' is not supported")
    vocab = _int(cfg, "vocab_size", where, limit=MAX_VOCAB)
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"family '{family}' is not one of {', '.join(FAMILIES)}")
    fam = family or ("glm4" if vocab >= 150000 else ("chatglm2" if scale != 1.0 else "chatglm3"))
    config = GLMConfig(
        family=fam,
        num_layers=_int(cfg, "num_hidden_layers", where, limit=MAX_LAYERS),
        hidden_size=hidden,
        ffn_hidden_size=_int(cfg, "intermediate_size", where, limit=MAX_FFN),
        num_heads=heads,
        num_kv_heads=_int(cfg, "num_key_value_heads", where, default=heads, limit=MAX_HEADS),
        head_dim=head_dim,
        vocab_size=vocab,
        seq_length=_int(cfg, "max_position_embeddings", where, default=2048, limit=MAX_SEQ_LENGTH,
                        why=" (rotary positions are float32, exact integers up to 2^24)"),
        rms_eps=_float(cfg, "rms_norm_eps", where, 1e-5),
        rope_base=base,
        rope_position_divisor=scale,
        qkv_bias=_bool(cfg, "attention_bias", where, True),
        torch_dtype=_dtype(cfg.get("torch_dtype") or cfg.get("dtype"), where),
        source_format="glm",
    )
    _check_model(config, _GLM_KEYS, where)
    return config


# How a ChatGLM checkpoint orders the rows of each fused `query_key_value` weight/bias/scale (a checkpoint fact
# that only the `multi_query_attention` key tells). glmc's model always holds QKV_SPLIT.
QKV_SPLIT = "split"  # [q (all heads) | k (all groups) | v (all groups)]: multi_query_attention true, and GLM-format
QKV_PER_HEAD = "per_head"  # [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]: multi_query_attention false (the original default)


def qkv_layout(cfg: dict, where: str = "config.json") -> str:
    """The row order of a checkpoint's fused QKV tensors, from its config.json dict.

    The original ChatGLM2/ChatGLM3/GLM-4 modeling code (THUDM's modeling_chatglm.py, SelfAttention.forward; read
    in THUDM/language_filter_chatglm3 and a chatglm2-6b copy, bq-xiao/chatglm2-6b-model) reads it two ways:

        if self.multi_query_attention:
            (query_layer, key_layer, value_layer) = mixed_x_layer.split([np * hn, ng * hn, ng * hn], dim=-1)
        else:
            new_tensor_shape = mixed_x_layer.size()[:-1] + (np, 3 * hn)
            mixed_x_layer = mixed_x_layer.view(*new_tensor_shape)
            # [sq, b, np, 3 * hn] --> 3 [sq, b, np, hn]
            (query_layer, key_layer, value_layer) = split_tensor_along_last_dim(mixed_x_layer, 3)

    so without multi-query attention (ChatGLMConfig's default: multi_query_attention=False) output row
    h * 3 * hn + j is q of head h for j < hn, k for hn <= j < 2 hn, v above: interleaved per head.
    """
    if cfg.get("model_type") == "glm" or "GlmForCausalLM" in (cfg.get("architectures") or []):
        return QKV_SPLIT  # transformers GLM: separate q_proj/k_proj/v_proj, fused here in glmc's order
    mqa = cfg.get("multi_query_attention", False)
    if not isinstance(mqa, bool):
        raise ConfigError(f"{where}: 'multi_query_attention' must be true or false, got {mqa!r}")
    return QKV_SPLIT if mqa else QKV_PER_HEAD


def read_config_json(checkpoint_dir: str | Path) -> dict:
    """`checkpoint_dir/config.json` as a dict (errors name the file)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the checkpoint directory")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def load_config(checkpoint_dir: str | Path, family: str | None = None) -> GLMConfig:
    """Read and normalise `checkpoint_dir/config.json`."""
    path = Path(checkpoint_dir) / "config.json"
    return from_hf(read_config_json(checkpoint_dir), Path(checkpoint_dir), family=family, where=str(path))


# Variants of the table in docs/design.md ("ChatGLM facts"), as small dicts; tests and benchmarks shrink them
# with `tiny()`.
VARIANTS: dict[str, dict[str, Any]] = {
    "chatglm2-6b": dict(family="chatglm2", num_layers=28, num_kv_heads=2, vocab_size=65024, seq_length=32768),
    "chatglm2-6b-32k": dict(family="chatglm2", num_layers=28, num_kv_heads=2, vocab_size=65024, seq_length=32768,
                            rope_position_divisor=16.0),
    "chatglm3-6b": dict(family="chatglm3", num_layers=28, num_kv_heads=2, vocab_size=65024, seq_length=8192),
    "chatglm3-6b-32k": dict(family="chatglm3", num_layers=28, num_kv_heads=2, vocab_size=65024, seq_length=32768,
                            rope_base=10000.0 * 50),
    "glm-4-9b-chat": dict(family="glm4", num_layers=40, num_kv_heads=2, vocab_size=151552, seq_length=131072,
                          rope_base=10000.0 * 500, rms_eps=1.5625e-07),
    "glm-4-9b-chat-1m": dict(family="glm4", num_layers=40, num_kv_heads=4, vocab_size=151552, seq_length=1048576,
                             rope_base=10000.0 * 10000, rms_eps=1.5625e-07),
}


def variant(name: str, **overrides: Any) -> GLMConfig:
    """A full-size config of a named variant (docs/design.md, "ChatGLM facts"), with optional overrides (e.g. to
    shrink it)."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant '{name}'; known: {', '.join(VARIANTS)}")
    base: dict[str, Any] = dict(hidden_size=4096, ffn_hidden_size=13696, num_heads=32, head_dim=128, rms_eps=1e-5)
    base.update(VARIANTS[name])
    base.update(overrides)
    return GLMConfig(**base)
