"""The export-friendly ChatGLM2/ChatGLM3/GLM-4 model: one file, plain torch, glmc custom ops for what targets differ on.

Parameter names are the ChatGLM checkpoint names (`transformer.encoder.layers.N...`), so loading a ChatGLM
checkpoint is a straight copy. The forward has no data-dependent Python control flow, so it exports as is.

Shapes: B batch, S new tokens, P cached tokens, T = P + S, H hidden, Hq/Hkv heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from glmc.modeling_patches import ops
from glmc.modeling_patches.config import GLMConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key, value), each [B, Hkv, P, D]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As ChatGLM: normalise and scale in float32, cast back to the input dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class QuantLinear(nn.Module):
    """A weight-only quantized linear layer: `weight` int8 [N, K] or packed int4, `weight_scale` [N] or [N, groups],
    and with `zero_point` a `weight_zero` int8 of the scales' shape (asymmetric checkpoints: AutoAWQ's)."""

    weight: torch.Tensor  # buffers (register_buffer in __init__)
    weight_scale: torch.Tensor
    weight_zero: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 dtype: torch.dtype = torch.float16, zero_point: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        cols = in_features if bits == 8 else (in_features + 1) // 2
        groups = (in_features + group_size - 1) // group_size if group_size else 0
        wdtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("weight", torch.zeros(out_features, cols, dtype=wdtype))
        self.register_buffer("weight_scale", torch.ones((out_features, groups) if groups else (out_features,),
                                                        dtype=dtype))
        self.register_buffer("weight_zero", torch.zeros(self.weight_scale.shape, dtype=torch.int8)
                             if zero_point else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quantized_linear(x, self.weight, self.weight_scale, self.bias, self.bits, self.group_size,
                                    self.in_features, self.weight_zero)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class Fp8Linear(nn.Module):
    """An FP8 (e4m3) linear layer, ops.fp8_linear: `weight` float8_e4m3fn [N, K], `weight_scale` [N] and the
    activations' static `input_scale` [1], both in the model dtype."""

    weight: torch.Tensor  # buffers (register_buffer in __init__)
    weight_scale: torch.Tensor
    input_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype))
        self.register_buffer("input_scale", torch.ones(1, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)

    def _apply(self, fn, recurse=True):
        """Module.to(dtype), .half() and .float() cast every floating buffer, float8 included: the codes go back to
        float8 (exactly: every e4m3 value is a float16, bfloat16 and float32 value); devices move as asked."""
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float8_e4m3fn:
            self.weight = self.weight.to(torch.float8_e4m3fn)
        return self

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3"


class W8A8Linear(nn.Module):
    """A SmoothQuant linear layer, ops.w8a8_linear: `weight` int8 [N, K] (the smoothed weight, per output channel),
    `weight_scale` [N], `inv_smooth` [K] (the activations' smoothing divisor; all ones where it was folded into the
    previous RMSNorm), int8 activations per token."""

    weight: torch.Tensor  # buffers (register_buffer in __init__)
    weight_scale: torch.Tensor
    inv_smooth: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype))
        self.register_buffer("inv_smooth", torch.ones(in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.w8a8_linear(x, self.weight, self.weight_scale, self.inv_smooth, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w8a8 (SmoothQuant)"


# a float linear, or its quantized replacement (replace_linears)
LinearLayer = nn.Linear | QuantLinear | Fp8Linear | W8A8Linear


class SelfAttention(nn.Module):
    k_scale: torch.Tensor | None  # buffers (register_buffer in __init__)
    v_scale: torch.Tensor | None

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        # nn.Linear, or QuantLinear once replace_linears has swapped them
        self.query_key_value: LinearLayer = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size,
                                                      bias=config.qkv_bias)
        self.dense: LinearLayer = nn.Linear(config.q_size, config.hidden_size, bias=False)
        # Set by KV-cache quantization: [1], [Hkv] or [Hkv, D] scales; the cache is then int8 (or kv_cache_dtype).
        self.register_buffer("k_scale", None)
        self.register_buffer("v_scale", None)
        self.kv_cache_dtype = torch.int8  # the quantized cache's element type: int8 | float8_e4m3fn

    def forward(self, x, position_ids, attention_mask, cos, sin, past_key, past_value):
        qkv = self.query_key_value(x)  # [B, S, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        if self.k_scale is not None:  # int8 cache: dequantize the past, quantize the present
            past_key = ops.kv_cache_dequantize(past_key, self.k_scale)
            past_value = ops.kv_cache_dequantize(past_value, self.v_scale)
        # Training needs gradients: it runs the op's plain-torch reference (the same function) instead of the op.
        attention = ops.gqa_reference if self.training else ops.group_query_attention
        out, present_key, present_value = attention(  # out [B, S, Hq D]
            q, k, v, past_key, past_value, position_ids, attention_mask, cos, sin,
            self.num_heads, self.num_kv_heads, 1.0 / math.sqrt(self.head_dim))
        if self.k_scale is not None:
            if self.kv_cache_dtype == torch.int8:
                present_key = ops.kv_cache_quantize(present_key, self.k_scale)
                present_value = ops.kv_cache_quantize(present_value, self.v_scale)
            else:  # fp8 (e4m3)
                present_key = ops.kv_cache_quantize(present_key, self.k_scale, "float8e4m3fn")
                present_value = ops.kv_cache_quantize(present_value, self.v_scale, "float8e4m3fn")
        return self.dense(out), present_key, present_value


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        # [gate | up]
        self.dense_h_to_4h: LinearLayer = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h: LinearLayer = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.residual_post_layernorm = config.residual_post_layernorm
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x, position_ids, attention_mask, cos, sin, past_key, past_value):
        h = self.input_layernorm(x)
        attn, present_key, present_value = self.self_attention(h, position_ids, attention_mask, cos, sin,
                                                               past_key, past_value)
        x = (h if self.residual_post_layernorm else x) + attn
        h = self.post_attention_layernorm(x)
        x = (h if self.residual_post_layernorm else x) + self.mlp(h)
        return x, present_key, present_value


class Embedding(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


class Encoder(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_eps)

    def block(self, i: int) -> GLMBlock:
        """Layer i as its class (a ModuleList's items are typed as plain Modules)."""
        return cast(GLMBlock, self.layers[i])

    def blocks(self) -> list[GLMBlock]:
        """The layers, in order, as their class."""
        return [cast(GLMBlock, layer) for layer in self.layers]


class Transformer(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer: LinearLayer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class GLMForCausalLM(nn.Module):
    """ChatGLM2/ChatGLM3/GLM-4 decoder: forward(ids, positions, mask, past) -> (logits, present)."""

    cos_cache: torch.Tensor  # buffers (register_buffer in __init__)
    sin_cache: torch.Tensor

    def __init__(self, config: GLMConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.max_positions = max_positions or config.seq_length
        self.register_buffer("cos_cache", torch.empty(0), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0), persistent=False)
        if not self.transformer.output_layer.weight.is_meta:  # meta-built models get tables after loading
            self.init_rotary()

    def init_rotary(self, device: torch.device | str | None = None) -> None:
        """(Re)build the float32 rotary tables [max_positions, R/2] (also after loading onto a meta-built model)."""
        cos, sin = ops.rotary_tables(self.config.rotary_dim, self.max_positions, self.config.rope_base,
                                     self.config.rope_position_divisor)
        device = device or (self.transformer.output_layer.weight.device
                            if self.transformer.output_layer.weight.device.type != "meta" else "cpu")
        # Built in float32 for every family, stored in the model dtype (the op casts to it anyway).
        dtype = self.transformer.embedding.word_embeddings.weight.dtype
        self.cos_cache, self.sin_cache = cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        attn = self.transformer.encoder.block(0).self_attention
        return attn.kv_cache_dtype if attn.k_scale is not None else self.dtype

    def empty_cache(self, batch: int, device: torch.device | str | None = None) -> KVCache:
        """A past of length 0 for every layer (what prefill takes)."""
        c = self.config
        device = device or self.cos_cache.device
        shape = (batch, c.num_kv_heads, 0, c.head_dim)
        return [(torch.empty(shape, dtype=self.kv_dtype, device=device),
                 torch.empty(shape, dtype=self.kv_dtype, device=device)) for _ in range(c.num_layers)]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: KVCache) -> tuple[torch.Tensor, KVCache]:
        """input_ids/position_ids [B, S] int64, attention_mask [B, T] int64 -> logits [B, S, V], present (T long)."""
        x = self.transformer.embedding.word_embeddings(input_ids)  # [B, S, H]
        presents: KVCache = []
        for layer, (past_key, past_value) in zip(self.transformer.encoder.layers, past_key_values, strict=False):
            x, k, v = layer(x, position_ids, attention_mask, self.cos_cache, self.sin_cache, past_key, past_value)
            presents.append((k, v))
        x = self.transformer.encoder.final_layernorm(x)
        return self.transformer.output_layer(x), presents


def replace_linears(model: GLMForCausalLM, bits: int, group_size: int = 0, include_output: bool = False,
                    method: str = "rtn", zero_point: bool = False) -> None:
    """Swap the block linears (and optionally the output layer) for QuantLinear placeholders of the same shape
    (Fp8Linear ones for method fp8, W8A8Linear for sq8; with zero points for an asymmetric checkpoint)."""
    def swap(parent: nn.Module, name: str) -> None:
        lin = getattr(parent, name)
        new: nn.Module
        if method == "fp8":
            new = Fp8Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype=lin.weight.dtype)
        elif method == "sq8":
            new = W8A8Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype=lin.weight.dtype)
        else:
            new = QuantLinear(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None,
                              dtype=lin.weight.dtype, zero_point=zero_point)
        setattr(parent, name, new.to(lin.weight.device))
    for layer in model.transformer.encoder.blocks():
        swap(layer.self_attention, "query_key_value")
        swap(layer.self_attention, "dense")
        swap(layer.mlp, "dense_h_to_4h")
        swap(layer.mlp, "dense_4h_to_h")
    if include_output:
        swap(model.transformer, "output_layer")


def enable_kv_int8(model: GLMForCausalLM, k_scales: list[torch.Tensor], v_scales: list[torch.Tensor],
                   dtype: torch.dtype = torch.int8) -> None:
    """Give every layer its K/V scales ([1], [Hkv] or [Hkv, D]); the cache becomes int8 (or `dtype`:
    torch.float8_e4m3fn for the fp8 cache)."""
    if dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"enable_kv_int8: a quantized KV cache is int8 or float8_e4m3fn, not {dtype}")
    for layer, ks, vs in zip(model.transformer.encoder.blocks(), k_scales, v_scales, strict=False):
        layer.self_attention.k_scale = ks.to(model.dtype)
        layer.self_attention.v_scale = vs.to(model.dtype)
        layer.self_attention.kv_cache_dtype = dtype
