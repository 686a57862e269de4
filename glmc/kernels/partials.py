"""The split-K partials' read side: how the kernels that consume a linear's partials (quantized_linear's
P [SPLIT, M, N], summed over SPLIT) load and add them, a tile of splits per memory round trip."""

from __future__ import annotations

from glmc.kernels._jit import jit, tl


@jit
def sum_partials(ptr, stride, offs, mask, SPLIT: tl.constexpr, SB: tl.constexpr):
    """sum over s < SPLIT of ptr[s * stride + offs] in float32 (0 where ~mask): how the consumer kernels read a
    linear's partials. SB splits (a power of 2) are loaded as one [SB, N] tile, so SPLIT partials cost
    ceil(SPLIT / SB) dependent L2 round trips, not SPLIT."""
    rs = tl.arange(0, SB)
    acc = tl.sum(tl.load(ptr + rs[:, None] * stride + offs[None, :], mask=(rs < SPLIT)[:, None] & mask[None, :],
                         other=0.0).to(tl.float32), axis=0)
    for s0 in tl.static_range(SB, SPLIT, SB):
        acc += tl.sum(tl.load(ptr + (s0 + rs)[:, None] * stride + offs[None, :],
                              mask=(s0 + rs < SPLIT)[:, None] & mask[None, :], other=0.0).to(tl.float32), axis=0)
    return acc


def split_block(split: int, per_thread: int) -> int:
    """`sum_partials`' SB for a program whose threads hold `per_thread` elements of N: up to ~64 values of the tile
    per thread in flight."""
    return min(1 << max(0, (split - 1).bit_length()), max(1, 64 // max(1, per_thread)))
