"""FP8 (e4m3) weights and activations: calibrate each block linear's input range, then swap in Fp8Linear layers.

Scheme (ops/fp8_linear.py has the exact op):
- weights: one scale per output row, scale = absmax(row) / 448; codes = e4m3(W / scale) from the float32 weight
  (saturating, round to nearest even).
- activations: one static scale per linear, scale = absmax of that linear's input over the calibration text / 448,
  measured on the float32 model before anything is cast or quantized (each block linear sees the float model's
  inputs, as TensorRT-LLM's FP8 calibration does). Inputs beyond the calibrated range saturate at 448 x scale.
- every scale is computed in float32, floored at the model dtype's smallest normal number and rounded *up* to the
  model dtype (kv_calibration.scales_from_absmax), so 448 x scale bounds every calibration value; codes are made
  with the scale as stored.
- the output layer, embeddings and norms stay in the model dtype (as TensorRT-LLM's `--qformat fp8`).

The model is converted in place, one linear at a time (its fp32 weight freed as its Fp8Linear replaces it), then
cast to the scheme's dtype (Fp8Linear keeps its float8 codes through the cast).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from glmc.errors import GlmcError
from glmc.modeling_patches.modeling_chatglm import Fp8Linear, GLMForCausalLM
from glmc.modeling_patches.ops.fp8_linear import E4M3_MAX, quantize_e4m3
from glmc.quantization.kv_calibration import prefill_with_hooks, scales_from_absmax
from glmc.quantization.weight_only import BLOCK_LINEARS

if TYPE_CHECKING:
    from glmc.quantization.scheme import Scheme


def _block_linears(model: GLMForCausalLM) -> list[tuple[str, nn.Module, str]]:
    """(name, parent module, attribute) of every block linear, in layer order."""
    out = []
    for i, layer in enumerate(model.transformer.encoder.blocks()):
        for path in BLOCK_LINEARS:
            parent_name, attr = path.split(".")
            out.append((f"transformer.encoder.layers.{i}.{path}", getattr(layer, parent_name), attr))
    return out


@torch.no_grad()
def collect_input_absmax(model: GLMForCausalLM, samples: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 abs-max of each block linear's input over all calibration samples (one prefill each), by name."""
    if any(isinstance(m, Fp8Linear) for m in model.modules()):
        raise GlmcError("fp8 calibration: the model already has FP8 linears; calibrate the float model")
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for name, parent, attr in _block_linears(model):
        def hook(_module, args, _out, name=name):
            m = args[0].detach().float().abs().amax()
            absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)
        hooks.append(getattr(parent, attr).register_forward_hook(hook))
    prefill_with_hooks(model, samples, hooks)
    return absmax


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (codes float8_e4m3fn [N, K], scale [N] in `dtype`), `rows` rows at a time in float32."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=weight.device)
    scale = torch.empty(n, dtype=dtype, device=weight.device)
    for r in range(0, n, rows):
        w = weight[r:r + rows].detach().float()
        s = scales_from_absmax(w.abs().amax(dim=1), dtype, E4M3_MAX)
        scale[r:r + rows] = s
        q[r:r + rows] = quantize_e4m3(w, s.reshape(-1, 1))
    return q, scale


def apply_fp8(model: GLMForCausalLM, scheme: Scheme, calibration_ids: list[torch.Tensor] | None = None
              ) -> GLMForCausalLM:
    """METHODS["fp8"] (scheme.py): on a float32 model, measure the block linears' input ranges on the calibration
    samples, replace every block linear by an Fp8Linear (weights and activation scale as the module docstring
    says), then cast the rest to the scheme's dtype. Returns the model."""
    if not calibration_ids:
        raise GlmcError(f"precision {scheme.name}: fp8 needs calibration text for its activation scales")
    if model.dtype != torch.float32:
        raise GlmcError(f"precision {scheme.name}: fp8 quantizes a float32 model (this one is {model.dtype})")
    dtype = scheme.torch_dtype
    absmax = collect_input_absmax(model, calibration_ids)
    for name, parent, attr in _block_linears(model):
        lin = getattr(parent, attr)
        if name not in absmax:
            raise GlmcError(f"fp8 calibration: {name} saw no input (no calibration sample reached it)")
        new = Fp8Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype=dtype).to(lin.weight.device)
        new.weight, new.weight_scale = quantize_weight(lin.weight, dtype)
        new.input_scale = scales_from_absmax(absmax[name].reshape(1), dtype, E4M3_MAX)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().to(dtype))
        setattr(parent, attr, new)
        del lin
    model.to(dtype)
    return model
