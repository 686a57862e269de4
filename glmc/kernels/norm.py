"""Residual add + RMSNorm, and SwiGLU, on CUDA: the epilogues that sum a linear's split-K partials.

References (modeling_chatglm.py): `GLMBlock.forward`'s `x = x + linear(...)` followed by `RMSNorm` (normalise and
scale in float32, cast back), and `MLP.forward`'s `silu(gate) * up`. Rounding follows the reference: the linear's
output is rounded to the activation dtype, the residual sum is rounded, silu(gate) is rounded before the product.
Partials P [SPLIT, M, N] are what `glmc.kernels.quantized_linear.linear_partials` returns (any float dtype).
"""

from __future__ import annotations

import torch

from glmc.kernels._cuda import pdl_kwargs, pdl_prologue
from glmc.kernels._jit import cdiv, jit, next_pow2, tl
from glmc.kernels.partials import split_block, sum_partials


@jit
def _add_rmsnorm_kernel(part_ptr, res_ptr, w_ptr, out_ptr, M, H, eps, SPLIT: tl.constexpr, SB: tl.constexpr,
                        BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """res[m] += sum_s part[s, m] (rounded as the reference); out[m] = rmsnorm(res[m]) * w."""
    pdl_prologue(PDL)
    m = tl.program_id(0)
    rh = tl.arange(0, BLOCK_H)
    mask = rh < H
    r = tl.load(res_ptr + m * H + rh, mask=mask, other=0.0)
    if SPLIT > 0:
        y = sum_partials(part_ptr + m * H, M * H, rh, mask, SPLIT, SB)
        r = (r.to(tl.float32) + y.to(r.dtype).to(tl.float32)).to(r.dtype)
        tl.store(res_ptr + m * H + rh, r, mask=mask)
    rf = r.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(rf * rf, axis=0) / H + eps)
    w = tl.load(w_ptr + rh, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * H + rh, (rf * inv * w).to(r.dtype), mask=mask)


@jit
def _swiglu_kernel(part_ptr, out_ptr, M, F, SPLIT: tl.constexpr, SB: tl.constexpr, BLOCK: tl.constexpr,
                   INTERLEAVED: tl.constexpr, PDL: tl.constexpr):
    """out[m, f] = silu(gate) * up with gate = sum_s part[s, m, f], up = sum_s part[s, m, F + f] (INTERLEAVED:
    columns 2f and 2f + 1)."""
    pdl_prologue(PDL)
    m = tl.program_id(0)
    rf = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rf < F
    base = part_ptr + m * 2 * F
    g = sum_partials(base, M * 2 * F, 2 * rf if INTERLEAVED else rf, mask, SPLIT, SB)
    u = sum_partials(base, M * 2 * F, 2 * rf + 1 if INTERLEAVED else F + rf, mask, SPLIT, SB)
    dt = out_ptr.dtype.element_ty
    g = g.to(dt).to(tl.float32)
    u = u.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out_ptr + m * F + rf, (act * u).to(dt), mask=mask)


def add_rmsnorm(part: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """residual [M, H] (updated in place by the partials' sum when `part` is given) -> rmsnorm(residual) * weight."""
    m, h = residual.shape
    out = torch.empty_like(residual) if out is None else out
    split = part.shape[0] if part is not None else 0
    block, warps = next_pow2(h), 16 if h >= 4096 else (8 if h >= 2048 else 4)
    _add_rmsnorm_kernel[(m,)](part if part is not None else residual, residual, weight, out, m, h, eps, SPLIT=split,
                              SB=split_block(split, block // (32 * warps)), BLOCK_H=block, num_warps=warps,
                              **pdl_kwargs(out.device))
    return out


def swiglu(part: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None,
           interleaved: bool = False) -> torch.Tensor:
    """partials [SPLIT, M, 2F] of dense_h_to_4h ([gate | up], or (gate, up) pairs when interleaved) -> silu(gate) *
    up [M, F] in `dtype`."""
    split, m, f2 = part.shape
    f = f2 // 2
    out = torch.empty((m, f), dtype=dtype, device=part.device) if out is None else out
    block, warps = 1024, 4
    _swiglu_kernel[(m, cdiv(f, block))](part, out, m, f, SPLIT=split, SB=split_block(split, block // (32 * warps)),
                                        BLOCK=block, INTERLEAVED=interleaved, num_warps=warps,
                                        **pdl_kwargs(out.device))
    return out
