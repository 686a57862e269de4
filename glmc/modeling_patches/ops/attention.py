"""glmc::GroupQueryAttention: ChatGLM rotary + KV-cache concat + causal grouped-query attention.

Inputs (S new tokens, P cached, T = P + S; Hq query heads, Hkv KV heads, D head dim, R = rotary dims):
  query [B, S, Hq*D], key [B, S, Hkv*D], value [B, S, Hkv*D]  (before rotary)
  past_key, past_value [B, Hkv, P, D]  (after rotary; P may be 0)
  position_ids [B, S] int64; attention_mask [B, T] int64 (1 = real token, 0 = left padding)
  cos_cache, sin_cache [M, R/2] (row p holds cos/sin of p * theta_i, any position scaling already applied)
Attributes: num_heads, kv_num_heads, scale (softmax scale, usually 1/sqrt(D)).
Outputs: output [B, S, Hq*D], present_key, present_value [B, Hkv, T, D] = concat(past, rotated new).

Rotary (ChatGLM style): on dims 0..R-1 of each q/k head, adjacent pairs (2i, 2i+1) rotate by angle
theta_i * pos: (a, b) -> (a cos - b sin, b cos + a sin); dims R..D-1 pass through.
Attention: query i (absolute index P + i) sees key j iff j <= P + i and attention_mask[b, j] == 1.
Scores are computed in the input dtype, softmax in float32; masked scores are the dtype's lowest value
(a fully masked row, i.e. a padding query, averages the values instead of producing NaN).
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch
from onnx import TensorProto
from onnx.defs import OpSchema

from glmc.modeling_patches.ops.onnx_defs import (
    FLOAT_TYPES,
    MASK_VALUE,
    MS_DOMAIN,
    Builder,
    attribute,
    input_dims,
    input_elem_type,
    onnxscript_opset,
    register,
    set_output,
)


class _GqaQuantAttrs(TypedDict, total=False):
    """GroupQueryAttention's attributes for an int8 KV cache (none for a float cache)."""

    k_quant_type: str
    v_quant_type: str
    kv_cache_bit_width: int


def rotary_tables(rotary_dim: int, max_positions: int, base: float, position_divisor: float = 1.0):
    """cos/sin tables [max_positions, rotary_dim/2]: angle = (p / divisor) * base^(-2i/R), in float32 as the
    original."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device="cpu") / rotary_dim))
    pos = torch.arange(max_positions, dtype=torch.float32, device="cpu")
    if position_divisor != 1.0:
        pos = pos / position_divisor
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos/sin [B, S, R/2] -> x with dims 0..R-1 rotated as adjacent pairs."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    rot = rot.unflatten(-1, (half, 2))
    a, b = rot[..., 0], rot[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


def gqa_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                  past_value: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                  cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int, kv_num_heads: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's semantics in plain (differentiable) torch; the custom op below runs exactly this."""
    b, s, _ = query.shape
    d = past_key.shape[-1]
    p = past_key.shape[2]
    group = num_heads // kv_num_heads
    cos = cos_cache[position_ids].to(query.dtype)  # [B, S, R/2]
    sin = sin_cache[position_ids].to(query.dtype)
    q = apply_rotary(query.view(b, s, num_heads, d), cos, sin)
    k = apply_rotary(key.view(b, s, kv_num_heads, d), cos, sin)
    v = value.view(b, s, kv_num_heads, d)
    present_key = torch.cat([past_key, k.transpose(1, 2).to(past_key.dtype)], dim=2)  # [B, Hkv, T, D]
    present_value = torch.cat([past_value, v.transpose(1, 2).to(past_value.dtype)], dim=2)
    t = p + s
    # [B, Hkv, G*S, D] so that each KV head serves its G query heads without copying K/V.
    qg = q.transpose(1, 2).reshape(b, kv_num_heads, group * s, d)
    scores = torch.matmul(qg, present_key.transpose(2, 3).to(q.dtype)).float() * scale  # [B, Hkv, G*S, T]
    causal = torch.arange(t, device=query.device)[None, :] <= (p + torch.arange(s, device=query.device))[:, None]
    allowed = causal[None] & (attention_mask[:, None, :] != 0)  # [B, S, T]
    allowed = allowed[:, None, None].expand(b, 1, group, s, t).reshape(b, 1, group * s, t)
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, present_value.to(q.dtype))  # [B, Hkv, G*S, D]
    out = out.view(b, kv_num_heads, group, s, d).reshape(b, num_heads, s, d)
    out = out.transpose(1, 2).reshape(b, s, num_heads * d)
    return out, present_key, present_value


@torch.library.custom_op("glmc::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                          cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int, kv_num_heads: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gqa_reference(query, key, value, past_key, past_value, position_ids, attention_mask, cos_cache, sin_cache,
                         num_heads, kv_num_heads, scale)


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, position_ids, attention_mask, cos_cache, sin_cache, num_heads,
      kv_num_heads, scale):
    b, s, _ = query.shape
    hkv, p, d = past_key.shape[1:]
    present = past_key.new_empty(b, hkv, p + s, d)
    return query.new_empty(b, s, num_heads * d), present, past_value.new_empty(b, hkv, p + s, d)


# ---------------------------------------------------------------------------------------------- ONNX schema

def _infer(ctx) -> None:
    q, past, mask = input_dims(ctx, 0), input_dims(ctx, 3), input_dims(ctx, 6)
    heads = attribute(ctx, "num_heads")
    kv_heads = attribute(ctx, "kv_num_heads")
    d = past[3] if past else None
    b, s = (q[0], q[1]) if q else (None, None)
    hidden = heads * d if isinstance(d, int) else (q[2] if q else None)
    total = mask[1] if mask else None
    set_output(ctx, 0, input_elem_type(ctx, 0), [b, s, hidden])
    for i in (1, 2):
        set_output(ctx, i, input_elem_type(ctx, 3), [b, kv_heads, total, d])


SCHEMA = register(
    "GroupQueryAttention",
    "ChatGLM rotary (adjacent pairs on the first 2*width(cos_cache) dims of each head) + KV-cache concat + causal "
    "grouped-query attention with a left-padding mask; see docs/ops.md.",
    inputs=[("query", "T", False), ("key", "T", False), ("value", "T", False), ("past_key", "T", False),
            ("past_value", "T", False), ("position_ids", "I", False), ("attention_mask", "I", False),
            ("cos_cache", "T", False), ("sin_cache", "T", False)],
    outputs=[("output", "T"), ("present_key", "T"), ("present_value", "T")],
    types=[("T", FLOAT_TYPES), ("I", ["tensor(int64)"])],
    attributes=[("num_heads", OpSchema.AttrType.INT, None), ("kv_num_heads", OpSchema.AttrType.INT, None),
                ("scale", OpSchema.AttrType.FLOAT, None)],
    infer=_infer)


def onnx_translation(query, key, value, past_key, past_value, position_ids, attention_mask, cos_cache, sin_cache,
                     num_heads: int, kv_num_heads: int, scale: float):
    """torch.ops.glmc.group_query_attention -> glmc::GroupQueryAttention (3 outputs)."""
    return onnxscript_opset().GroupQueryAttention(
        query, key, value, past_key, past_value, position_ids, attention_mask, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, _outputs=3)


# ---------------------------------------------------------------------------------------------- lowerings

def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _rotary(b: Builder, x: str, heads: int) -> str:
    """RotaryEmbedding-23, interleaved (adjacent pairs), on the first 2*width(cos_cache) dims, at position_ids."""
    width = b.array(b.input(7)).shape[1]
    return b.op("RotaryEmbedding", x, b.input(7), b.input(8), b.input(5), interleaved=1, num_heads=heads,
                rotary_embedding_dim=2 * width)


def _attention_bias(b: Builder) -> str:
    """[B, 1, S, T] additive bias in the query dtype: 0 where key j is allowed (j <= P + i and mask[b, j] == 1),
    MASK_VALUE elsewhere. Built once per graph."""
    mask, query = b.input(6), b.input(0)
    t = b.op("Shape", mask, start=1, end=2)
    s = b.op("Shape", query, start=1, end=2)
    t0, p0 = b.op("Squeeze", t), b.op("Squeeze", b.op("Sub", t, s))
    one, zero = b.const(np.array(1, np.int64), "one"), b.const(np.array(0, np.int64), "zero")
    keys = b.op("Unsqueeze", b.op("Range", zero, t0, one), b.const(_i64(0), "axes"))  # [1, T]
    queries = b.op("Unsqueeze", b.op("Range", p0, t0, one), b.const(_i64(1), "axes"))  # [S, 1]
    causal = b.op("LessOrEqual", keys, queries)  # [S, T]
    real = b.op("Unsqueeze", b.op("Cast", mask, to=TensorProto.BOOL), b.const(_i64(1, 2), "axes"))  # [B, 1, 1, T]
    allowed = b.op("And", causal, real)  # [B, 1, S, T]
    bias = b.op("Where", allowed, b.const(np.array(0, np.float32), "zero_f"),
                b.const(np.array(MASK_VALUE, np.float32), "mask_value"))
    return b.op("CastLike", bias, query)


def _heads(b: Builder, x: str, heads: int) -> str:
    """[B, S, H*D] -> [B, H, S, D]."""
    return b.op("Transpose", b.op("Reshape", x, b.const(_i64(0, 0, heads, -1), "shape")), perm=[0, 2, 1, 3])


def lower_attention23(node, b: Builder) -> None:
    """reference / tensorrt: RotaryEmbedding-23 on q and k, Concat(past, new) for the presents, then Attention-23
    (one output, no past inside the node, grouped heads from the 4D shapes) with an additive causal+padding bias."""
    hq, hkv, scale = b.attr("num_heads"), b.attr("kv_num_heads"), b.attr("scale")
    q = _heads(b, _rotary(b, b.input(0), hq), hq)
    k = _heads(b, _rotary(b, b.input(1), hkv), hkv)
    v = _heads(b, b.input(2), hkv)
    present_key = b.op("Concat", b.input(3), k, axis=2, outputs=[node.output[1]])
    present_value = b.op("Concat", b.input(4), v, axis=2, outputs=[node.output[2]])
    bias = b.shared("attention_bias", _attention_bias)
    y = b.op("Attention", q, present_key, present_value, bias, scale=scale)  # [B, Hq, S, D]
    b.op("Reshape", b.op("Transpose", y, perm=[0, 2, 1, 3]), b.const(_i64(0, 0, -1), "shape"),
         outputs=[node.output[0]])


def _gqa_lengths(b: Builder) -> tuple[str, str]:
    """ORT GQA's seqlens_k [B] int32 (= T - 1 for every row: left padding is masked by the bias instead) and
    total_sequence_length (scalar int32 T)."""
    t = b.op("Shape", b.input(6), start=1, end=2)
    batch = b.op("Shape", b.input(0), start=0, end=1)
    last = b.op("Cast", b.op("Sub", t, b.const(_i64(1), "one")), to=TensorProto.INT32)
    return b.op("Expand", last, batch), b.op("Cast", b.op("Squeeze", t), to=TensorProto.INT32)


def _gqa_lengths_dense(b: Builder) -> tuple[str, str]:
    """Unpadded rows: seqlens_k = ReduceSum(mask) - 1 per row (int32) and total_sequence_length = mask width (int32
    scalar). With a fixed-width mask (ones then zeros: a CUDA-graph decode step) both stay right: the sum counts the
    tokens, and GQA reads the shared cache only up to seqlens_k."""
    mask = b.input(6)
    total = b.op("ReduceSum", mask, b.const(_i64(1), "axes"), keepdims=0)
    seqlens = b.op("Cast", b.op("Sub", total, b.const(np.array(1, np.int64), "one")), to=TensorProto.INT32)
    width = b.op("Cast", b.op("Squeeze", b.op("Shape", mask, start=1, end=2)), to=TensorProto.INT32)
    return seqlens, width


def _gqa_int8_cache(b: Builder, hkv: int) -> tuple[list[str], _GqaQuantAttrs]:
    """GQA inputs 12, 13 (k/v scales) and attributes for an int8 cache folded into GQA (lower.fold_kv_cache_quantization
    appended the scales as inputs 9 and 10): PER_TENSOR for a [1] scale, else PER_CHANNEL with the scale as float32
    [Hkv, 1, D] (a per-head scale repeated over D)."""
    d = (b.view.dims(b.input(3)) or [None] * 4)[3]
    if not isinstance(d, int):
        raise ValueError(f"past key '{b.input(3)}' needs a static head dim for an int8 cache in GQA")
    scales = [b.array(b.input(i)).astype(np.float32) for i in (9, 10)]
    kind = "PER_TENSOR" if scales[0].size == 1 else "PER_CHANNEL"
    scales = [s.reshape(-1) if kind == "PER_TENSOR" else np.broadcast_to(s.reshape(hkv, 1, -1), (hkv, 1, d)).copy()
              for s in scales]
    return ([b.const(scales[0], "k_scale"), b.const(scales[1], "v_scale")],
            _GqaQuantAttrs(k_quant_type=kind, v_quant_type=kind, kv_cache_bit_width=8))


def _packed_qkv(b: Builder) -> list[str]:
    """query, key, value for GQA: the fused [B, S, (Hq + 2 Hkv) D] tensor with empty key and value when the three
    are the parts, in order, of one Split along the last axis (the Split then goes: lower._drop_dead_nodes)."""
    split = b.view.producer(b.input(0))
    if (split is not None and split.op_type == "Split" and list(split.output) == [b.input(i) for i in range(3)]
            and {a.name: a.i for a in split.attribute}.get("axis") in (-1, 2)):
        return [split.input[0], "", ""]
    return [b.input(0), b.input(1), b.input(2)]


def lower_ort_gqa(node, b: Builder) -> None:
    """onnxruntime: com.microsoft.GroupQueryAttention, past and present [B, Hkv, P|T, D] (the runtime may bind one
    buffer as both). With inputs 9 and 10 (k/v scales, appended by lower.fold_kv_cache_quantization) the cache is
    int8 inside GQA. Two forms, by the lowering option `padded_batches` (default True):

    - padded: RotaryEmbedding-23 on q and k before GQA (ORT GQA's own rotary ignores position_ids at the first
      prompt: measured on 1.31 CPU, wrong for left padding), GQA with do_rotary=0, left padding masked through
      an attention_bias built once per graph. General, but ORT's CUDA GQA then runs no flash/XQA decode kernel,
      takes no int8 cache, and the bias's shape grows every step (no CUDA graph).
    - unpadded (False): every row of a batch is the same length. GQA rotates q and k itself (do_rotary=1,
      interleaved: positions are cache indices, which are ChatGLM's positions when no row is padded), no bias,
      seqlens_k from the mask's sum, the fused QKV packed: GQA's fast decode path, the int8 cache inside it, CUDA
      graphs possible."""
    hq, hkv, scale = b.attr("num_heads"), b.attr("kv_num_heads"), b.attr("scale")
    padded = b.view.options.get("padded_batches", True)
    if padded:
        q, k = _rotary(b, b.input(0), hq), _rotary(b, b.input(1), hkv)
        seqlens_k, total = b.shared("gqa_lengths", _gqa_lengths)
        inputs = [q, k, b.input(2), b.input(3), b.input(4), seqlens_k, total, "", "", "",
                  b.shared("attention_bias", _attention_bias)]
        rotary = {}
    else:
        seqlens_k, total = b.shared("gqa_lengths_dense", _gqa_lengths_dense)
        inputs = [*_packed_qkv(b), b.input(3), b.input(4), seqlens_k, total, b.input(7), b.input(8)]
        rotary = dict(do_rotary=1, rotary_interleaved=1)
    quant: _GqaQuantAttrs = {}
    if b.input(9):
        scales, quant = _gqa_int8_cache(b, hkv)
        inputs += [""] * (12 - len(inputs)) + scales
    b.op("GroupQueryAttention", *inputs, domain=MS_DOMAIN, outputs=list(node.output[:3]), num_heads=hq,
         kv_num_heads=hkv, scale=scale, **rotary, **quant)
