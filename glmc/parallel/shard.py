"""Megatron-style sharding of a loaded GLMForCausalLM for rank r of N, in place; collectives from torch.distributed.

What each rank holds (torch's [out, in] weight layout: "column-parallel" splits the output rows, "row-parallel"
splits the input columns):

- `query_key_value` (column-parallel): the q rows of this rank's heads [h0, h1) and the k and v rows of the KV
  groups those heads read; its bias rows likewise. ChatGLM's query heads use their KV group contiguously (head h
  reads group h // (Hq / Hkv)), so a rank's heads read one group, or a whole number of groups.
  N <= Hkv: each rank holds Hkv / N groups (nothing duplicated). N > Hkv (ChatGLM: 2 groups, so N = 4, 8, ...):
  each rank holds the ONE group its heads read; N / Hkv ranks hold a copy of each group (its k/v projection rows
  and its KV cache), as vLLM and TensorRT-LLM do. N must divide Hq and be a multiple or a divisor of Hkv.
- `dense` (row-parallel): the input columns of this rank's heads; one all-reduce of the [B, S, H] partial sums;
  a bias (none in ChatGLM) is added once, after the all-reduce.
- `dense_h_to_4h` (column-parallel): rows [f0, f1) of the gate half and the same rows of the up half, kept
  together as [gate_r | up_r] so that the MLP's chunk(2) still pairs them.
- `dense_4h_to_h` (row-parallel): input columns [f0, f1); one all-reduce, bias after it.
- `output_layer`: split by vocabulary rows (ceil(V / N) per rank, the last padded with zero rows); one all-gather
  of the logits, cut back to V. With `last_only` only the last position is projected and gathered (what the
  generation loop reads).
- Embedding, RMSNorms and the rotary tables are replicated (a vocabulary-parallel embedding would add a collective
  per step to save 0.5-1.2 GB per rank at 6B/9B).

Quantized (QuantLinear) layers split the same way: int8 codes and packed int4 bytes with their rows or columns;
per-output-channel scales follow the rows (column-parallel) or stay whole (row-parallel); grouped scales
[N, K / G] split along K with their groups, so a row-parallel split must fall on group boundaries (and on byte
boundaries for int4). The FFN split is chosen on those boundaries (ChatGLM's 13696 = 107 groups of 128 splits 54 /
53 at N = 2); the attention split is fixed by the heads and refused with a GlmcError when it cuts a group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from glmc.errors import GlmcError
from glmc.modeling_patches.config import GLMConfig
from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM, QuantLinear

KEY = "parallel.tensor"  # the compile YAML key (and what errors name)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` holds: half-open ranges of q heads, KV groups, FFN columns and vocabulary rows."""

    world: int
    rank: int
    heads: tuple[int, int]
    kv_groups: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]
    vocab_shard: int  # rows per rank in the output layer (ceil(V / N)); the gather is world * vocab_shard wide


def check_world(config: GLMConfig, world: int, where: str = KEY) -> None:
    """Refuse a tensor-parallel size the model's heads cannot be split by, naming the key."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise GlmcError(f"{where}: tensor-parallel size {world!r} must be an integer >= 1")
    hq, hkv = config.num_heads, config.num_kv_heads
    if hq % world:
        sizes = ", ".join(str(n) for n in range(1, hq + 1) if hq % n == 0)
        raise GlmcError(f"{where}: tensor-parallel size {world} does not divide the model's {hq} attention heads "
                        f"(num_attention_heads); use one of {sizes}")
    if world % hkv and hkv % world:
        raise GlmcError(f"{where}: tensor-parallel size {world} is neither a multiple nor a divisor of the model's "
                        f"{hkv} KV groups (multi_query_group_num): a rank's query heads would read parts of two "
                        "groups")
    if config.ffn_hidden_size < world:
        raise GlmcError(f"{where}: tensor-parallel size {world} exceeds the {config.ffn_hidden_size} FFN columns")


def _k_unit(layer: nn.Module) -> int:
    """The input columns a row-parallel split of `layer` must keep together: its scale group, a packed int4 byte."""
    if isinstance(layer, QuantLinear):
        return layer.group_size or (2 if layer.bits == 4 else 1)
    return 1


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, QuantLinear):
        return f"int{layer.bits}" + (f" weights in groups of {layer.group_size}" if layer.group_size else
                                     " weights (two per byte)")
    return "float weights"


def balanced_split(total: int, world: int, unit: int) -> list[int]:
    """Boundaries [0, b1, ..., total] that cut `total` columns into `world` runs of whole `unit`s (the last unit may
    be short when total is not a multiple), as even as possible: the first ranks take one unit more."""
    units = -(-total // unit)
    if units < world:
        raise GlmcError(f"cannot split {total} columns in whole runs of {unit} over {world} ranks")
    base, extra = divmod(units, world)
    bounds, at = [0], 0
    for r in range(world):
        at += base + (r < extra)
        bounds.append(min(total, at * unit))
    return bounds


def plan(model: GLMForCausalLM, world: int, rank: int, where: str = KEY) -> ShardPlan:
    """The shard of rank `rank` of `world` for this (loaded, maybe quantized) model; GlmcError when impossible."""
    c = model.config
    check_world(c, world, where)
    if not 0 <= rank < world:
        raise GlmcError(f"{where}: rank {rank} is outside 0..{world - 1}")
    for name, m in model.named_modules():  # what the shards below know how to split
        if hasattr(m, "in_features") and (not isinstance(m, (nn.Linear, QuantLinear))
                                          or getattr(m, "weight_zero", None) is not None):
            kind = "zero-point (AutoAWQ) int4" if isinstance(m, QuantLinear) else type(m).__name__
            raise GlmcError(f"{where}: tensor parallelism splits float and symmetric weight-only int8/int4 linears; "
                            f"{name} is a {kind} layer (its activation or zero-point scales do not split by "
                            f"rows and columns): use {where} 1 for this precision")
    per = c.num_heads // world
    h0, h1 = rank * per, (rank + 1) * per
    group = c.num_heads // c.num_kv_heads
    g0, g1 = h0 // group, -(-h1 // group)
    layer: Any = model.transformer.encoder.layers[0]
    dense, down = layer.self_attention.dense, layer.mlp.dense_4h_to_h
    unit = _k_unit(dense)
    if (per * c.head_dim) % unit:
        raise GlmcError(f"{where}: tensor-parallel size {world} gives each rank {per} heads = {per * c.head_dim} "
                        f"input columns of self_attention.dense, which holds {_describe(dense)}: the split would cut "
                        f"a {'group' if unit > 2 else 'byte'}; use a smaller {where} or a smaller group_size")
    try:
        bounds = balanced_split(c.ffn_hidden_size, world, _k_unit(down))
    except GlmcError:
        raise GlmcError(f"{where}: tensor-parallel size {world}: the {c.ffn_hidden_size} FFN columns of "
                        f"mlp.dense_4h_to_h hold {_describe(down)}, too few whole groups for {world} ranks") from None
    shard = -(-c.vocab_size // world)
    v0 = min(rank * shard, c.vocab_size)
    return ShardPlan(world, rank, (h0, h1), (g0, g1), (bounds[rank], bounds[rank + 1]),
                     (v0, min(v0 + shard, c.vocab_size)), shard)


# ---------------------------------------------------------------------------------------------- layers

class RowParallel(nn.Module):
    """A row-parallel linear: this rank's input columns, one all-reduce of the partial sums, then the bias once."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, group: dist.ProcessGroup | None, world: int):
        super().__init__()
        self.inner, self.group, self.world = inner, group, world
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.world > 1:
            dist.all_reduce(y, group=self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelOutput(nn.Module):
    """The output layer split by vocabulary: local logits [B, S, V/N], all-gathered to [B, S, V]."""

    def __init__(self, inner: nn.Module, vocab_size: int, group: dist.ProcessGroup | None, world: int,
                 last_only: bool = True):
        super().__init__()
        self.inner, self.vocab_size, self.group, self.world, self.last_only = inner, vocab_size, group, world, last_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last_only:
            x = x[:, -1:]
        y = self.inner(x).contiguous()
        if self.world == 1:
            return y[..., :self.vocab_size]
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]


def _rows(layer: nn.Module, index: torch.Tensor, pad_to: int | None = None) -> nn.Module:
    """A column-parallel shard: the output rows `index` (codes, scales and bias alike), zero rows up to `pad_to`."""
    n = pad_to or len(index)

    def take(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        out = torch.full((n, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        out[:len(index)] = t.index_select(0, index.to(t.device))
        return out

    if isinstance(layer, QuantLinear):
        q = QuantLinear(layer.in_features, n, layer.bits, layer.group_size, layer.bias is not None,
                        dtype=layer.weight_scale.dtype).to(layer.weight.device)
        q.weight, q.weight_scale = take(layer.weight), take(layer.weight_scale, 1.0)
        if layer.bias is not None:
            q.bias = nn.Parameter(take(layer.bias.data), requires_grad=False)
        return q
    assert isinstance(layer, nn.Linear)
    out = nn.Linear(layer.in_features, n, bias=layer.bias is not None, device="meta")
    out.weight = nn.Parameter(take(layer.weight.data), requires_grad=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(take(layer.bias.data), requires_grad=False)
    return out


def _columns(layer: nn.Module, k0: int, k1: int, name: str) -> tuple[nn.Module, torch.Tensor | None]:
    """A row-parallel shard: input columns [k0, k1) (no bias), and the bias to add after the all-reduce."""
    b = getattr(layer, "bias", None)
    bias = b.detach().clone() if isinstance(b, torch.Tensor) else None
    if isinstance(layer, QuantLinear):
        k = layer.in_features
        unit = _k_unit(layer)
        if k0 % unit or (k1 % unit and k1 != k):
            raise GlmcError(f"{KEY}: {name}: columns [{k0}, {k1}) of {k} cut a "
                            f"{'scale group' if layer.group_size else 'packed int4 byte'} of its {_describe(layer)}")
        q = QuantLinear(k1 - k0, layer.out_features, layer.bits, layer.group_size, False,
                        dtype=layer.weight_scale.dtype).to(layer.weight.device)
        c0, c1 = (k0 // 2, -(-k1 // 2)) if layer.bits == 4 else (k0, k1)
        q.weight = layer.weight[:, c0:c1].clone()
        g = layer.group_size
        q.weight_scale = (layer.weight_scale[:, k0 // g:-(-k1 // g)] if g else layer.weight_scale).clone()
        return q, bias
    assert isinstance(layer, nn.Linear)
    out = nn.Linear(k1 - k0, layer.out_features, bias=False, device="meta")
    out.weight = nn.Parameter(layer.weight.data[:, k0:k1].clone(), requires_grad=False)
    return out, bias


def _range(a: int, b: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset + a, offset + b)


def shard_model(model: GLMForCausalLM, world: int, rank: int, group: dist.ProcessGroup | None = None,
                last_only: bool = True) -> ShardPlan:
    """Cut `model` (loaded whole, on any device) down to rank `rank`'s shard, in place, and return the plan.

    Afterwards `model.config` describes the local shapes (heads, KV groups, FFN columns: what the KV cache and the
    attention read) and `model.full_config` the whole model; forward() runs the collectives of `group` (the
    default process group when None), so every rank must call it in lockstep. world == 1 leaves the layers whole
    (the output layer still gives the last position only when `last_only`)."""
    p = plan(model, world, rank)
    c = model.config
    d = c.head_dim
    (h0, h1), (g0, g1), (f0, f1), (v0, v1) = p.heads, p.kv_groups, p.ffn, p.vocab
    qkv_rows = torch.cat([_range(h0 * d, h1 * d), _range(g0 * d, g1 * d, c.q_size),
                          _range(g0 * d, g1 * d, c.q_size + c.kv_size)])
    ffn_rows = torch.cat([_range(f0, f1), _range(f0, f1, c.ffn_hidden_size)])
    layer: Any
    for i, layer in enumerate(model.transformer.encoder.layers):
        attn, mlp = layer.self_attention, layer.mlp
        if world > 1:
            attn.query_key_value = _rows(attn.query_key_value, qkv_rows)
            mlp.dense_h_to_4h = _rows(mlp.dense_h_to_4h, ffn_rows)
        inner, bias = _columns(attn.dense, h0 * d, h1 * d, f"layer {i} self_attention.dense") \
            if world > 1 else (attn.dense, None)
        attn.dense = RowParallel(inner, bias, group, world)
        inner, bias = _columns(mlp.dense_4h_to_h, f0, f1, f"layer {i} mlp.dense_4h_to_h") \
            if world > 1 else (mlp.dense_4h_to_h, None)
        mlp.dense_4h_to_h = RowParallel(inner, bias, group, world)
        attn.num_heads, attn.num_kv_heads = h1 - h0, g1 - g0
        for name in ("k_scale", "v_scale"):  # int8 KV cache: [1] stays, [Hkv] / [Hkv, D] keep this rank's groups
            s = getattr(attn, name)
            if s is not None and s.numel() > 1:
                setattr(attn, name, s[g0:g1].clone())
    out: nn.Module = model.transformer.output_layer
    if world > 1:
        out = _rows(out, _range(v0, v1), pad_to=p.vocab_shard)
    # output_layer is typed for one process (nn.Linear | QuantLinear); a sharded model holds the vocabulary-parallel one
    model.transformer.output_layer = VocabParallelOutput(  # type: ignore[assignment]
        out, c.vocab_size, group, world, last_only)
    setattr(model, "full_config", c)  # noqa: B010 - plain attributes the class does not declare
    setattr(model, "shard_plan", p)  # noqa: B010
    model.config = dataclasses.replace(c, num_heads=h1 - h0, num_kv_heads=g1 - g0, ffn_hidden_size=f1 - f0)
    return p
