"""Config normalisation: a checkpoint's config.json (ChatGLM remote code or transformers GLM) -> GLMConfig.

Only architecture facts live here; weight names are the checkpoint module's business.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from glmc.errors import ConfigError

FAMILIES = ("chatglm2", "chatglm3", "glm4")

# How a checkpoint's `rope_ratio` is applied (DESIGN.md, "ChatGLM facts").
ROPE_POSITIONS_DIVIDED = "positions_divided"  # chatglm2-6b-32k: t / rope_ratio
ROPE_BASE_MULTIPLIED = "base_multiplied"  # chatglm3-6b-32k, GLM-4: base * rope_ratio

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
           "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


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
    if value is None:
        return "float16"
    name = str(value).replace("torch.", "")
    if name not in _DTYPES:
        raise ConfigError(f"{where}: torch_dtype '{value}' is not one of float32, float16, bfloat16")
    return _DTYPES[name]


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
    if float(cfg.get("rope_ratio", 1.0)) != 1.0:
        raise ConfigError(
            "config.json: 'rope_ratio' means different things in chatglm2-6b-32k (positions divided) and "
            "chatglm3-6b-32k (base multiplied), and nothing in the checkpoint says which this is; "
            "name the family explicitly (family: chatglm2 | chatglm3)")
    return "chatglm3"


def from_hf(cfg: dict, checkpoint_dir: Path | None = None, family: str | None = None,
            where: str = "config.json") -> GLMConfig:
    """Normalise a config.json dict (ChatGLM remote code or transformers GLM) into a GLMConfig."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type == "glm" or "GlmForCausalLM" in archs:
        return _from_transformers_glm(cfg, family, where)
    if model_type != "chatglm" and not any("ChatGLM" in a for a in archs):
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
    fam = family or detect_family(cfg, checkpoint_dir)
    if not cfg.get("rmsnorm", True):
        raise ConfigError(f"{where}: rmsnorm=false (LayerNorm) is not a ChatGLM2/3/GLM-4 configuration")
    if cfg.get("add_bias_linear", False):
        raise ConfigError(f"{where}: add_bias_linear=true is not supported (no ChatGLM2/3/GLM-4 release uses it)")
    if not cfg.get("post_layer_norm", True):
        raise ConfigError(f"{where}: post_layer_norm=false is not supported")
    heads = int(_require(cfg, "num_attention_heads", where))
    hidden = int(_require(cfg, "hidden_size", where))
    head_dim = int(cfg.get("kv_channels", hidden // heads))
    kv_heads = int(cfg.get("multi_query_group_num", heads)) if cfg.get("multi_query_attention", False) else heads
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of multi_query_group_num {kv_heads}")
    ratio = float(cfg.get("rope_ratio", 1.0) or 1.0)
    base, scale = 10000.0, 1.0
    if ratio != 1.0:
        if fam == "chatglm2":
            scale = ratio
        else:
            base = 10000.0 * ratio
    vocab = int(cfg.get("padded_vocab_size", cfg.get("vocab_size", 0)) or 0)
    if vocab <= 0:
        raise ConfigError(f"{where}: missing key 'padded_vocab_size'")
    qbit = int(cfg.get("quantization_bit", 0) or 0)
    if qbit not in (0, 4, 8):
        raise ConfigError(f"{where}: quantization_bit {qbit} is not 4 or 8")
    return GLMConfig(
        family=fam,
        num_layers=int(_require(cfg, "num_layers", where)),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "ffn_hidden_size", where)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        seq_length=int(cfg.get("seq_length", 2048)),
        rms_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
        rope_base=base,
        rope_position_divisor=scale,
        qkv_bias=bool(cfg.get("add_qkv_bias", True)),
        residual_post_layernorm=bool(cfg.get("apply_residual_connection_post_layernorm", False)),
        torch_dtype=_dtype(cfg.get("torch_dtype"), where),
        quantization_bit=qbit,
        source_format="chatglm",
    )


def _from_transformers_glm(cfg: dict, family: str | None, where: str) -> GLMConfig:
    heads = int(_require(cfg, "num_attention_heads", where))
    hidden = int(_require(cfg, "hidden_size", where))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    partial = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5)))
    if partial != 0.5:
        raise ConfigError(f"{where}: partial_rotary_factor {partial} is not ChatGLM's 0.5")
    base = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scale = 1.0
    if rope.get("rope_type", "default") == "linear":
        scale = float(rope["factor"])
    elif rope.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"{where}: rope type '{rope.get('rope_type')}' is not supported")
    vocab = int(_require(cfg, "vocab_size", where))
    fam = family or ("glm4" if vocab >= 150000 else ("chatglm2" if scale != 1.0 else "chatglm3"))
    return GLMConfig(
        family=fam,
        num_layers=int(_require(cfg, "num_hidden_layers", where)),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "intermediate_size", where)),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
        head_dim=head_dim,
        vocab_size=vocab,
        seq_length=int(cfg.get("max_position_embeddings", 2048)),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_base=base,
        rope_position_divisor=scale,
        qkv_bias=bool(cfg.get("attention_bias", True)),
        torch_dtype=_dtype(cfg.get("torch_dtype") or cfg.get("dtype"), where),
        source_format="glm",
    )


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


# Variants of DESIGN.md's table, as small dicts; tests and benchmarks shrink them with `tiny()`.
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
    """A full-size config of a named variant (DESIGN.md table), with optional overrides (e.g. to shrink it)."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant '{name}'; known: {', '.join(VARIANTS)}")
    base: dict[str, Any] = dict(hidden_size=4096, ffn_hidden_size=13696, num_heads=32, head_dim=128, rms_eps=1e-5)
    base.update(VARIANTS[name])
    base.update(overrides)
    return GLMConfig(**base)
