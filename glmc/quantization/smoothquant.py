"""SmoothQuant (precision sq8): migrate activation outliers into the weights, then int8 weights and int8 activations.

On the float32 model, forward hooks record each block linear's per-input-channel activation abs-max over the
calibration text (max_j = max over tokens |X[:, j]|). With the migration strength alpha (0..1, default 0.5):

    s_j = max_j^alpha / max_i |W[i, j]|^(1 - alpha)      (both floored at 1e-5; s clamped to [1e-5, 1e5])
    X @ W^T = (X / s) @ (W * s)^T                         (exact in real arithmetic)

so the activations a linear quantizes (per token: one int8 scale per row) have their channel outliers divided by
s and the weight (per output channel: one int8 scale per row of W * s) absorbs them. Where the division is free it
is folded: query_key_value's input is input_layernorm's output and dense_h_to_4h's is post_attention_layernorm's
(ChatGLM's residual comes from before the norm), so the norm weight becomes norm_w / s (rounded to the model
dtype; the weight takes the exact ratio of old to stored norm weight) and the op's InvSmooth stays all ones, which
the lowerings drop. self_attention.dense (input: the attention output) and mlp.dense_4h_to_h (input: silu(gate) *
up) have no such norm: they carry 1 / s as the op's InvSmooth (one Mul per token row, fused into the quantization
in every lowering; `smooth_unfoldable=False` leaves them unsmoothed instead: docs/quantization.md has both
measured). With apply_residual_connection_post_layernorm the norm output is also the residual, so nothing is folded.

The output layer stays in floating point. The operator and its lowerings: glmc/modeling_patches/ops/w8a8_linear.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from glmc.errors import GlmcError
from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM, QuantLinear, RMSNorm, W8A8Linear
from glmc.quantization.kv_calibration import prefill_with_hooks
from glmc.quantization.weight_only import BLOCK_LINEARS, quantize_weight

if TYPE_CHECKING:
    from glmc.quantization.scheme import Scheme

FLOOR = 1e-5  # of the abs-maxima (a channel never seen non-zero) and of s
CEILING = 1e5
# linear -> the RMSNorm whose weight can absorb its smoothing (None: carried by the op)
FOLDS = {"self_attention.query_key_value": "input_layernorm", "self_attention.dense": None,
         "mlp.dense_h_to_4h": "post_attention_layernorm", "mlp.dense_4h_to_h": None}


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


@torch.no_grad()
def activation_absmax(model: GLMForCausalLM, samples: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per layer, {block linear: float32 [K] abs-max of its input per channel} over every calibration token."""
    if not samples:
        raise GlmcError("sq8: SmoothQuant needs calibration text (no samples given)")
    if model.dtype != torch.float32:
        raise GlmcError(f"sq8: calibrate the float32 model (this one is {str(model.dtype).replace('torch.', '')})")
    stats: list[dict[str, torch.Tensor]] = [{} for _ in model.transformer.encoder.layers]
    hooks = []
    for i, layer in enumerate(model.transformer.encoder.blocks()):
        for name in BLOCK_LINEARS:
            lin = _get(layer, name)
            if not isinstance(lin, nn.Linear):
                raise GlmcError(f"sq8: layer {i} {name} is already quantized ({type(lin).__name__}); SmoothQuant "
                                "starts from a float model")

            def hook(_module, args, i=i, name=name):
                m = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
                stats[i][name] = torch.maximum(stats[i][name], m) if name in stats[i] else m
            hooks.append(lin.register_forward_pre_hook(hook))
    prefill_with_hooks(model, samples, hooks)
    return stats


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = max|X_j|^alpha / max_i |W_ij|^(1 - alpha), float32."""
    w = weight.detach().float().abs().amax(dim=0).clamp_min(FLOOR)
    a = act_absmax.float().clamp_min(FLOOR)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(FLOOR, CEILING)


def _w8a8(weight: torch.Tensor, bias: torch.Tensor | None, inv_smooth: torch.Tensor, dtype: torch.dtype
          ) -> W8A8Linear:
    """A W8A8Linear of a (smoothed) float32 weight: int8 per output channel, scales and bias in `dtype`."""
    n, k = weight.shape
    q, scale = quantize_weight(weight, 8, 0, scale_dtype=dtype)
    out = W8A8Linear(k, n, bias is not None, dtype=dtype).to(weight.device)
    out.weight, out.weight_scale, out.inv_smooth = q, scale, inv_smooth.to(dtype)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return out


@torch.no_grad()
def apply_sq8(model: GLMForCausalLM, scheme: Scheme, calibration_ids: list[torch.Tensor] | None = None,
              smooth_unfoldable: bool = True) -> GLMForCausalLM:
    """METHODS["sq8"] (scheme.py): smooth with `scheme.alpha` from the float32 model's activations on
    `calibration_ids`, cast to the scheme's dtype, swap the four block linears of every layer for W8A8Linear.
    `smooth_unfoldable`: dense and dense_4h_to_h carry 1 / s in the op (True) or are not smoothed (False)."""
    if scheme.method != "sq8":
        raise GlmcError(f"sq8: scheme {scheme.name} is not a SmoothQuant scheme")
    if not 0.0 <= scheme.alpha <= 1.0:
        raise GlmcError(f"sq8: SmoothQuant alpha {scheme.alpha} is outside [0, 1] (the migration strength)")
    if scheme.weight_bits != 8 or scheme.group_size or scheme.include_output:
        raise GlmcError(f"sq8: scheme {scheme.name}: SmoothQuant weights are int8 per output channel and the "
                        "output layer stays in floating point")
    if any(isinstance(m, QuantLinear | W8A8Linear) for m in model.modules()):
        raise GlmcError("sq8: the model is already quantized; SmoothQuant starts from a float model")
    stats = activation_absmax(model.float(), calibration_ids or [])
    dtype = scheme.torch_dtype
    foldable = not model.config.residual_post_layernorm
    for layer, absmax in zip(model.transformer.encoder.blocks(), stats, strict=True):
        for name in BLOCK_LINEARS:
            *path, attr = name.split(".")
            parent = _get(layer, ".".join(path))
            lin = getattr(parent, attr)
            w = lin.weight.detach().float()
            s = smoothing_factors(absmax[name], w, scheme.alpha)
            norm_name = FOLDS[name] if foldable else None
            if norm_name is not None:
                norm: RMSNorm = getattr(layer, norm_name)
                old = norm.weight.detach().float()
                new = (old / s).to(dtype).float()  # the norm weight as the model will hold it
                # the input's effective scaling is new / old; an all-zero channel (old == 0) keeps 1 / s
                ratio = torch.where((old == 0) | (new == 0), 1 / s, new / old.where(old != 0, torch.ones_like(old)))
                norm.weight.copy_(new)
                weight, inv = w / ratio, torch.ones_like(s)
            elif smooth_unfoldable:
                inv = (1 / s).to(dtype)
                weight = w / inv.float()
            else:
                weight, inv = w, torch.ones_like(s)
            setattr(parent, attr, _w8a8(weight, lin.bias, inv, dtype))
            del lin, w, weight
    return model.to(dtype)
