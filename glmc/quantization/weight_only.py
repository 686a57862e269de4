"""Weight-only round-to-nearest int8/int4 quantization of a float GLMForCausalLM, per output channel or per group.

Symmetric, no zero point: scale = max|W| / (2^(bits-1) - 1) over a row (group_size 0) or over each run of
`group_size` columns of a row (the last group of a row may be shorter when K is not a multiple of the group),
q = clamp(round_half_even(W / scale), -qmax, qmax). For per-channel this is ChatGLM's official formula
(`weight.abs().max(dim=-1).values / (2 ** (bit_width - 1) - 1)`, then `round(weight / scale)`). The scale is
rounded to the model dtype *before* q is computed, so q is the nearest integer for the scale that is stored.
int4 values are packed two per byte with the op's nibble order (ops/quantized_linear.py: element 2j low).

The model is converted in place, one linear at a time: each float weight is freed as soon as its QuantLinear
replaces it, so peak memory is the float model plus one layer's fp32 temporaries (a 6B fp16 model fits in 24 GiB).
"""

from __future__ import annotations

import torch
from torch import nn

from glmc.errors import GlmcError
from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM, QuantLinear
from glmc.modeling_patches.ops.quantized_linear import pack_int4
from glmc.quantization.scheme import Scheme, check_scheme

BLOCK_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 0, scale_dtype: torch.dtype | None = None,
                    rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (q, scale): q int8 [N, K] in [-qmax, qmax] (not packed), scale [N] or [N, ceil(K/G)].

    Works on `rows` rows at a time in float32, so temporaries stay small whatever the layer size.
    """
    check_scheme(bits, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale_dtype = scale_dtype or weight.dtype
    n, k = weight.shape
    g = group_size or k  # per channel = one group spanning the row
    groups = -(-k // g)
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, groups, dtype=scale_dtype, device=weight.device)
    for r in range(0, n, rows):
        # [rows, groups, g]; zero padding of a short last group never raises its max
        w = nn.functional.pad(weight[r:r + rows].detach().float(), (0, groups * g - k)).view(-1, groups, g)
        s = (w.abs().amax(dim=-1) / qmax).to(scale_dtype)
        scale[r:r + rows] = s
        s = s.float()
        s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero group: q = 0 whatever the divisor
        q[r:r + rows] = w.div_(s[..., None]).round_().clamp_(-qmax, qmax).view(len(w), -1)[:, :k]
    return q, (scale if group_size else scale[:, 0])


def quantize_linear(linear: nn.Linear, bits: int, group_size: int = 0) -> QuantLinear:
    """An nn.Linear -> a QuantLinear holding its quantized weight (scales and bias in the linear's dtype)."""
    w = linear.weight
    q, scale = quantize_weight(w, bits, group_size, scale_dtype=w.dtype)
    out = QuantLinear(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                      dtype=w.dtype).to(w.device)
    out.weight = q if bits == 8 else torch.cat([pack_int4(q[r:r + 512]) for r in range(0, len(q), 512)])
    out.weight_scale = scale
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return out


def _swap(parent: nn.Module, dotted: str, bits: int, group_size: int) -> None:
    *path, name = dotted.split(".")
    for p in path:
        parent = getattr(parent, p)
    lin = getattr(parent, name)
    if isinstance(lin, QuantLinear):
        raise GlmcError(f"quantization: {dotted} is already quantized ({lin.extra_repr()})")
    setattr(parent, name, quantize_linear(lin, bits, group_size))
    del lin  # the float weight goes with the last reference


@torch.no_grad()
def quantize_model(model: GLMForCausalLM, bits: int, group_size: int = 0, include_output: bool = False,
                   progress=None) -> GLMForCausalLM:
    """Quantize every block linear (and optionally the output layer) of a float model in place; returns it.

    Embeddings, norms and (by default) the output layer stay in floating point, as in the official checkpoints.
    `progress(i, n)` is called after each layer.
    """
    check_scheme(bits, group_size)
    layers = model.transformer.encoder.layers
    for i, layer in enumerate(layers):
        for dotted in BLOCK_LINEARS:
            _swap(layer, dotted, bits, group_size)
        if progress:
            progress(i + 1, len(layers))
    if include_output:
        _swap(model.transformer, "output_layer", bits, group_size)
    return model


def apply_rtn(model: GLMForCausalLM, scheme: Scheme, calibration_ids: list[torch.Tensor] | None = None
              ) -> GLMForCausalLM:
    """METHODS["rtn"] (scheme.py): cast a float32 model to the scheme's dtype, then round-to-nearest weight-only
    quantization when the scheme has integer weights. Needs no calibration."""
    model.to(scheme.torch_dtype)
    if scheme.weight_bits:
        quantize_model(model, scheme.weight_bits, scheme.group_size, scheme.include_output)
    return model
