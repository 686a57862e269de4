"""Lazy Triton access for glmc.kernels: the kernel modules import without triton (CI has no GPU and no triton).

Kernel modules write `from glmc.kernels._jit import jit, tl`. With triton installed these are `triton.jit` and
`triton.language`; without it `tl` is a stand-in whose attributes exist (so annotations such as `tl.constexpr`
evaluate) and `jit` returns a kernel that raises GlmcError when launched.
"""

from __future__ import annotations

from typing import Any

from glmc.errors import GlmcError

try:  # pragma: no cover - depends on the machine
    import triton as _triton
    import triton.language as _tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    _triton = None
    _tl = None
    HAVE_TRITON = False


class _Missing:
    """Stands in for triton.language when triton is not installed."""

    def __getattr__(self, name: str) -> Any:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self


class _MissingKernel:
    def __init__(self, fn: Any):
        self.fn = fn

    def __getitem__(self, grid: Any) -> Any:
        raise GlmcError(f"glmc.kernels: kernel '{self.fn.__name__}' needs triton (pip install -e '.[cuda]') and a "
                        "CUDA GPU")


tl: Any = _tl if HAVE_TRITON else _Missing()


def jit(fn: Any) -> Any:
    """triton.jit when triton is installed, else a kernel that refuses to launch."""
    return _triton.jit(fn) if HAVE_TRITON else _MissingKernel(fn)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
