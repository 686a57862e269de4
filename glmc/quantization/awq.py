"""AWQ (activation-aware weight quantization, Lin et al. 2023): per-input-channel scales searched on calibration
activations and folded into the op before each linear, so the stored model is an ordinary glmc int4/int8 model.

What it does, per layer, on the float32 model (METHODS["awq"] in scheme.py; the scheme's bits and group size):

1. Collect the inputs of the four block linears over the calibration samples (forward pre-hooks on one run of
   the layer). Every layer is fed the float32 model's own hidden states, as AutoAWQ and llm-awq do (`feed="float"`;
   `feed="quantized"` instead feeds each layer the output of the already-quantized layers before it, as GPTQ does:
   measured worse on the shipped model, docs/quantization.md).
2. Search one scale vector s [K] per group of linears sharing an input, on the float weights:
       s = m^a / sqrt(max(m^a) * min(m^a)),  m = mean |x| per input channel,  a in {0, 0.05, ..., 0.95}
   The candidate weight is Q(W * s) / s, Q being glmc's own quantizer (weight_only.quantize_weight with the scale
   rounded to the scheme's dtype, the weight rounded to it first), and the loss the mean squared error of the
   group's compared output against the float one over all calibration tokens. a = 0 (s = 1) is round to nearest,
   so the chosen scales never do worse than RTN on the calibration set.

       group              compared output          1/s folded into (exactly: the layer's function is unchanged)
       query_key_value    attention sublayer       input_layernorm.weight
       self_attention.    dense                    the V rows (and V bias) of query_key_value; s is tied across
         dense                                     the query heads of one KV head (m averaged over them), which
                                                   is what makes the fold exact for GQA/MQA: V channel (j, d)
                                                   feeds channel d of every query head of KV head j
       dense_h_to_4h      MLP                      post_attention_layernorm.weight
       dense_4h_to_h      dense_4h_to_h            the `up` half rows of dense_h_to_4h (silu(gate) * up is linear
                                                   in up)
       output_layer       output_layer             final_layernorm.weight (only when the scheme quantizes it)

   With apply_residual_connection_post_layernorm the norms' outputs are also the residual, so the two norm folds
   would change the model: those groups are skipped (kept RTN).
3. Apply all folds (W[:, k] *= s_k, the previous op / s).
4. Clip (`clip=True`, AWQ's second step): per output row and group, the weights clamped to r * absmax for the r in
   {1, 0.95, ..., 0.55} that minimises the group's squared output error on up to 512 calibration tokens (their
   inputs divided by s). query_key_value is not clipped (AutoAWQ's avoid_clipping: Q/K errors go through softmax).

Then the model is cast to the scheme's dtype and quantized by weight_only.quantize_model, the RTN code: the stored
format, quantization.json ("method": "awq" beside bits and group_size) and every lowering are the int4/int8 ones.
Cost: about 20 forwards of each layer's sublayers over the calibration tokens (4096 by default), plus the clip
search: the shipped 11.6M-parameter model's quantize stage took 99 s on the shared 2-core CPU (RTN: 0.2 s). A 6B
model needs ~20x one calibration pass through it: minutes on a GPU (apply_awq runs where the model is), hours in
the CPU quantize stage of `glmc compile` / `glmc quantize` (neither measured).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from glmc.errors import GlmcError
from glmc.modeling_patches.modeling_chatglm import GLMBlock, GLMForCausalLM, QuantLinear
from glmc.quantization.weight_only import quantize_model, quantize_weight

if TYPE_CHECKING:
    from glmc.quantization.scheme import Scheme

GRID = 20  # a in {0, 1/GRID, ..., (GRID - 1)/GRID}, AutoAWQ's n_grid
CLIP_STEPS = 10  # r in {1, 0.95, ..., 0.55}: AutoAWQ's max_shrink 0.5 over n_grid 20
CLIP_TOKENS = 512  # AutoAWQ's n_sample_token
CLIP_ROWS = 64  # output rows per clip-search batch (memory: rows x tokens x groups floats)
FEEDS = ("float", "quantized")


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Float32 [N, K] -> the weight glmc computes with after storing it, in float32: the weight rounded to `dtype`,
    weight_only.quantize_weight's codes times its `dtype` scales, the product in `dtype` (as the op dequantizes)."""
    q, scale = quantize_weight(weight.to(dtype), bits, group_size, scale_dtype=dtype)
    k = weight.shape[1]
    s = scale[:, None] if group_size == 0 else scale.repeat_interleave(group_size, dim=1)[:, :k]
    return (q.to(dtype) * s).float()


def awq_scales(mean_abs: torch.Tensor, a: float) -> torch.Tensor:
    """AWQ's candidate s = m^a normalised so that max(s) * min(s) = 1 (m floored at 1e-4, as AutoAWQ)."""
    s = mean_abs.clamp(min=1e-4).pow(a)
    return s / (s.max() * s.min()).sqrt()


def _mse(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, refs, strict=True))
    return num / sum(r.numel() for r in refs)


@torch.no_grad()
def search_scale(linears: Sequence[nn.Linear], mean_abs: torch.Tensor, run: Callable[[], list[torch.Tensor]],
                 bits: int, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, float, list[float]]:
    """The grid search of one group: (best s [K], its a, the loss of every grid point). `run()` computes the
    compared output with the linears' current weights; the weights are restored before returning."""
    originals = [lin.weight.detach().clone() for lin in linears]
    refs = run()
    losses: list[float] = []
    best: tuple[float, torch.Tensor, float] | None = None
    try:
        for i in range(GRID):
            a = i / GRID
            s = awq_scales(mean_abs, a)
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.copy_(fake_quantize(w * s, bits, group_size, dtype) / s)
            loss = _mse(run(), refs)
            losses.append(loss)
            if best is None or loss < best[0]:
                best = (loss, s, a)
    finally:
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.copy_(w)
    assert best is not None
    return best[1], best[2], losses


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
                ) -> torch.Tensor:
    """AWQ's clipping search: weight [N, K] (scales folded in), x [T, K] its inputs (divided by s) -> the weight
    with each (row, group) clamped to the r * absmax that minimises that group's output error on <= CLIP_TOKENS
    tokens (r = 1: unclipped, chosen when nothing beats it)."""
    n, k = weight.shape
    g = group_size or k
    groups = -(-k // g)
    step = max(1, x.shape[0] // CLIP_TOKENS)
    xs = nn.functional.pad(x[::step][:CLIP_TOKENS].float(), (0, groups * g - k)).view(-1, groups, g)
    out = weight.clone()
    for r0 in range(0, n, CLIP_ROWS):
        w = nn.functional.pad(weight[r0:r0 + CLIP_ROWS].float(), (0, groups * g - k)).view(-1, groups, g)
        rows = w.shape[0]
        absmax = w.abs().amax(dim=-1, keepdim=True)  # [rows, groups, 1]
        ref = torch.einsum("tgk,ngk->ntg", xs, w)
        best_err = torch.full((rows, groups), float("inf"))
        best_max = absmax.clone()
        for i in range(CLIP_STEPS):
            limit = absmax * (1 - i / GRID)
            clipped = torch.maximum(torch.minimum(w, limit), -limit)
            q = fake_quantize(clipped.view(rows, -1)[:, :k], bits, group_size, dtype)
            q = nn.functional.pad(q, (0, groups * g - k)).view(rows, groups, g)
            err = (torch.einsum("tgk,ngk->ntg", xs, q) - ref).pow(2).mean(dim=1)  # [rows, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], limit, best_max)
        clipped = torch.maximum(torch.minimum(w, best_max), -best_max)
        out[r0:r0 + rows] = clipped.view(rows, -1)[:, :k].to(out.dtype)
    return out


def float_linear(module: nn.Module, name: str) -> nn.Linear:
    """The float nn.Linear AWQ works on (refused when it is already quantized)."""
    if not isinstance(module, nn.Linear):
        raise GlmcError(f"awq: {name} is already quantized ({module}); AWQ starts from the float model")
    return module


def _mean_abs(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs])
    return flat.abs().mean(dim=0)


def _flat(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs])


class _Inputs:
    """The inputs of a layer's four linears, captured by forward pre-hooks while the layer runs."""

    NAMES = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

    def __init__(self, layer: GLMBlock):
        self.seen: dict[str, list[torch.Tensor]] = {n: [] for n in self.NAMES}
        self.handles = [layer.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in self.NAMES]

    def _hook(self, name: str):
        def hook(module, args):
            self.seen[name].append(args[0].detach())
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def awq_layer(layer: GLMBlock, model: GLMForCausalLM, xs: list[torch.Tensor], metas: list[tuple], bits: int,
              group_size: int, dtype: torch.dtype, clip: bool, fold_v: bool = True
              ) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Search, fold and clip one float32 layer in place; returns its float outputs on `xs` (before the folds:
    the folds do not change them) and the chosen a per group."""
    cfg = model.config
    attn, mlp = layer.self_attention, layer.mlp
    qkv, dense, h_to_4h, four_h_to_h = (float_linear(layer.get_submodule(n), n) for n in _Inputs.NAMES)
    rec = _Inputs(layer)
    try:
        outs = [layer(x, pos, mask, model.cos_cache, model.sin_cache, pk, pv)[0] for x, (pos, mask, pk, pv)
                in zip(xs, metas, strict=True)]
    finally:
        rec.close()
    seen = rec.seen
    h1, att, h2, act = (seen[n] for n in _Inputs.NAMES)
    chosen: dict[str, float] = {}
    norms_foldable = not cfg.residual_post_layernorm

    def attention_out() -> list[torch.Tensor]:
        return [attn(h, pos, mask, model.cos_cache, model.sin_cache, pk, pv)[0] for h, (pos, mask, pk, pv)
                in zip(h1, metas, strict=True)]

    qkv_w, qkv_b = qkv.weight, qkv.bias
    v_rows = slice(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
    f = cfg.ffn_hidden_size
    s_qkv = s_h4 = None
    if norms_foldable:
        s_qkv, chosen["query_key_value"], _ = search_scale([qkv], _mean_abs(h1), attention_out, bits, group_size,
                                                           dtype)
        s_h4, chosen["dense_h_to_4h"], _ = search_scale([h_to_4h], _mean_abs(h2),
                                                        lambda: [mlp(h) for h in h2], bits, group_size, dtype)
    # dense: s tied over the query heads of each KV head (the fold into V is exact then)
    group = cfg.num_heads // cfg.num_kv_heads
    s_dense = None
    if fold_v:
        m = _mean_abs(att).view(cfg.num_kv_heads, group, cfg.head_dim).mean(dim=1, keepdim=True)
        s_dense, chosen["dense"], _ = search_scale([dense], m.expand(-1, group, -1).reshape(-1),
                                                   lambda: [dense(a) for a in att], bits, group_size, dtype)
    s_4h, chosen["dense_4h_to_h"], _ = search_scale([four_h_to_h], _mean_abs(act),
                                                    lambda: [four_h_to_h(a) for a in act], bits, group_size, dtype)
    # folds
    if s_qkv is not None and s_h4 is not None:
        layer.input_layernorm.weight.div_(s_qkv)
        qkv_w.mul_(s_qkv)
        layer.post_attention_layernorm.weight.div_(s_h4)
        h_to_4h.weight.mul_(s_h4)
    if s_dense is not None:
        s_v = s_dense.view(cfg.num_kv_heads, group, cfg.head_dim)[:, 0].reshape(-1)  # equal across the group
        qkv_w[v_rows].div_(s_v[:, None])
        if qkv_b is not None:
            qkv_b[v_rows].div_(s_v)
        dense.weight.mul_(s_dense)
    h_to_4h.weight[f:].div_(s_4h[:, None])
    four_h_to_h.weight.mul_(s_4h)
    if clip:
        for lin, x, s in ((dense, att, s_dense), (h_to_4h, h2, s_h4), (four_h_to_h, act, s_4h)):
            flat = _flat(x) / (s if s is not None else 1.0)
            lin.weight.copy_(search_clip(lin.weight, flat, bits, group_size, dtype))
    return outs, chosen


class _FakeQuantized:
    """Context: the layer's four linears hold fake_quantize(W) (what the stored model computes), restored on exit."""

    def __init__(self, layer: GLMBlock, bits: int, group_size: int, dtype: torch.dtype):
        self.linears = [float_linear(layer.get_submodule(n), n) for n in _Inputs.NAMES]
        self.args = (bits, group_size, dtype)

    def __enter__(self):
        self.saved = [lin.weight.detach().clone() for lin in self.linears]
        for lin in self.linears:
            lin.weight.copy_(fake_quantize(lin.weight.float(), *self.args))
        return self

    def __exit__(self, *exc):
        for lin, w in zip(self.linears, self.saved, strict=True):
            lin.weight.copy_(w)


@torch.no_grad()
def awq_search(model: GLMForCausalLM, calibration_ids: Sequence[torch.Tensor], bits: int, group_size: int,
               dtype: torch.dtype, include_output: bool = False, clip: bool = True, feed: str = "float",
               fold_v: bool = True) -> list[dict[str, float]]:
    """Steps 1-4 of the module docstring on a float32 model, in place (the model computes the same function
    after it, up to float rounding). Returns the chosen a per group, per layer (and "output_layer")."""
    if feed not in FEEDS:
        raise GlmcError(f"awq: feed '{feed}' is not one of {', '.join(FEEDS)}")
    if not calibration_ids:
        raise GlmcError("awq: needs calibration text (the activations it searches scales on)")
    if model.dtype != torch.float32 or any(isinstance(m, QuantLinear) for m in model.modules()):
        raise GlmcError("awq: starts from the float32 model (load it with dtype float32, unquantized)")
    device = model.cos_cache.device
    xs, metas = [], []
    for ids in calibration_ids:
        ids = ids.to(device)
        b, s = ids.shape
        positions = torch.arange(s, device=device).expand(b, s)
        mask = torch.ones(b, s, dtype=torch.int64, device=device)
        (pk, pv), = model.empty_cache(b, device)[:1]
        xs.append(model.transformer.embedding.word_embeddings(ids))
        metas.append((positions, mask, pk, pv))
    report = []
    for layer in model.transformer.encoder.blocks():
        outs, chosen = awq_layer(layer, model, xs, metas, bits, group_size, dtype, clip, fold_v)
        if feed == "quantized":
            with _FakeQuantized(layer, bits, group_size, dtype):
                outs = [layer(x, pos, mask, model.cos_cache, model.sin_cache, pk, pv)[0]
                        for x, (pos, mask, pk, pv) in zip(xs, metas, strict=True)]
        xs = outs
        report.append(chosen)
    if include_output:
        final = model.transformer.encoder.final_layernorm
        out = model.transformer.output_layer
        assert isinstance(out, nn.Linear)
        h = [final(x) for x in xs]
        scale, a, _ = search_scale([out], _mean_abs(h), lambda: [out(x) for x in h], bits, group_size, dtype)
        final.weight.div_(scale)
        out.weight.mul_(scale)
        if clip:
            out.weight.copy_(search_clip(out.weight, _flat(h) / scale, bits, group_size, dtype))
        report.append({"output_layer": a})
    return report


def apply_awq(model: GLMForCausalLM, scheme: Scheme, calibration_ids: list[torch.Tensor] | None = None,
              clip: bool = True, feed: str = "float") -> GLMForCausalLM:
    """METHODS["awq"] (scheme.py): AWQ on the float32 model (awq_search), then the cast to the scheme's dtype and
    the same weight quantization as RTN (weight_only.quantize_model). Returns the model."""
    if not scheme.weight_bits:
        raise GlmcError(f"precision {scheme.name}: AWQ needs int8/int4 weights")
    if not calibration_ids:
        raise GlmcError(f"precision {scheme.name}: AWQ needs calibration text (the activations it searches "
                        "scales on)")
    model.float()
    # An int8 KV cache's scales were calibrated on the float model before this (scheme.apply_scheme): a fold into
    # V would change the V the cache holds, so the dense group keeps s = 1 then.
    awq_search(model, calibration_ids, scheme.weight_bits, scheme.group_size, scheme.torch_dtype,
               scheme.include_output, clip, feed, fold_v=not scheme.kv_granularity)
    model.to(scheme.torch_dtype)
    quantize_model(model, scheme.weight_bits, scheme.group_size, scheme.include_output)
    return model
