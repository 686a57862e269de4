"""Token selection on CUDA: logits from the output layer's split-K partials, and greedy argmax on the device.

References: `GLMForCausalLM`'s output layer (logits in the model dtype; the backends return them as float32) and
`glmc.runtime.generate.sample` with temperature 0 (argmax, first maximum on ties, as numpy's).
"""

from __future__ import annotations

import torch

from glmc.kernels._cuda import pdl_kwargs, pdl_prologue
from glmc.kernels._jit import cdiv, jit, tl
from glmc.kernels.partials import split_block, sum_partials


@jit
def _logits_argmax_kernel(part_ptr, logits_ptr, bmax_ptr, bidx_ptr, M, V, NB, SPLIT: tl.constexpr, SB: tl.constexpr,
                          ROUND: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (row m, block j): logits[m, block] = sum of partials (rounded to fp16 (ROUND 1) or bf16 (2) as the
    reference's output layer), and the block's max and first argmax."""
    pdl_prologue(PDL)
    m = tl.program_id(0)
    j = tl.program_id(1)
    rv = j * BLOCK + tl.arange(0, BLOCK)
    mask = rv < V
    y = sum_partials(part_ptr + m * V, M * V, rv, mask, SPLIT, SB)
    if ROUND == 1:
        y = y.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        y = y.to(tl.bfloat16).to(tl.float32)
    tl.store(logits_ptr + m * V + rv, y, mask=mask)
    y = tl.where(mask, y, float("-inf"))
    mx, idx = tl.max(y, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(bmax_ptr + m * NB + j, mx)
    tl.store(bidx_ptr + m * NB + j, j * BLOCK + idx)


@jit
def _argmax_final_kernel(bmax_ptr, bidx_ptr, ids_ptr, NB, BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    m = tl.program_id(0)
    rb = tl.arange(0, BLOCK_B)
    mask = rb < NB
    mx = tl.load(bmax_ptr + m * NB + rb, mask=mask, other=float("-inf"))
    idx = tl.load(bidx_ptr + m * NB + rb, mask=mask, other=0)
    best = tl.max(mx, axis=0)
    # the first block holding the maximum has the smallest index (blocks are in order)
    first = tl.min(tl.where(mx == best, rb, NB), axis=0)
    tl.store(ids_ptr + m, tl.sum(tl.where(rb == first, idx, 0), axis=0).to(tl.int64))


_ROUND = {torch.float16: 1, torch.bfloat16: 2}


def logits_argmax(part: torch.Tensor, round_to: torch.dtype | None, logits: torch.Tensor | None = None,
                  ids: torch.Tensor | None = None, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """partials [SPLIT, M, V] -> (float32 logits [M, V] (rounded to `round_to` first), greedy ids int64 [M])."""
    split, m, v = part.shape
    nb = cdiv(v, block)
    logits = torch.empty((m, v), dtype=torch.float32, device=part.device) if logits is None else logits
    ids = torch.empty((m,), dtype=torch.int64, device=part.device) if ids is None else ids
    bmax = torch.empty((m, nb), dtype=torch.float32, device=part.device)
    bidx = torch.empty((m, nb), dtype=torch.int32, device=part.device)
    rnd = _ROUND.get(round_to, 0) if round_to is not None else 0
    _logits_argmax_kernel[(m, nb)](part, logits, bmax, bidx, m, v, nb, SPLIT=split,
                                   SB=split_block(split, block // (32 * 4)), ROUND=rnd, BLOCK=block, num_warps=4,
                                   **pdl_kwargs(part.device))
    _argmax_final_kernel[(m,)](bmax, bidx, ids, nb, BLOCK_B=max(2, 1 << (nb - 1).bit_length()), num_warps=1,
                                **pdl_kwargs(part.device))
    return logits, ids
