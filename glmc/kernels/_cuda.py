"""CUDA C++ kernels for glmc.kernels and programmatic dependent launch: NVRTC compilation through torch, launches
through the driver's cuLaunchKernelEx.

`compile_kernel(source, name)` compiles one `__global__` function (a template instantiation such as
`gemv_mma<4, 128, 2, 2, 8, 1, 1, 0>`) of a .cu file beside this module with NVRTC (torch.cuda._compile_kernel,
torch >= 2.8; no nvcc, no build step), once per process. `launch(kernel, grid, block, args)` launches it on the
current stream (CUDA-graph capture included) with programmatic stream serialization when `pdl_on()`.

Programmatic dependent launch (PDL, sm90+): a kernel launched with it may start while the kernel before it on the
stream is still running, once that one has executed `griddepcontrol.launch_dependents`; `griddepcontrol.wait`
blocks until the kernels before it have completed and their writes are visible. Every glmc kernel of the decode
step does both at its start (the Triton ones through `pdl_prologue`, the CUDA C++ GEMV after it has loaded its
first weights), so launch latency and the GEMVs' first weight loads overlap the previous kernel. GLMC_PDL=0 turns
it off (the kernels then run exactly as without it).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

import torch

from glmc.errors import GlmcError
from glmc.kernels._jit import HAVE_TRITON, jit, tl

HERE = Path(__file__).parent
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def pdl_on(device_index: int = 0) -> bool:
    """Whether kernels launch with programmatic dependent launch: a CUDA device of compute capability 9.0 or newer,
    triton compiling for it (not the interpreter), GLMC_PDL not 0."""
    if os.environ.get("GLMC_PDL", "1") == "0" or INTERPRET or not HAVE_TRITON or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_kwargs(device: torch.device) -> dict[str, Any]:
    """Launch options of a Triton kernel with a PDL parameter: {"PDL": bool, "launch_pdl": True when on}."""
    on = device.type == "cuda" and pdl_on(device.index or 0)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@jit
def pdl_prologue(PDL: tl.constexpr):
    """First statement of a Triton kernel launched by pdl_kwargs: wait for the kernels before it, then let the next
    one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def compile_kernel(source: str, name: str, device_index: int = 0) -> Any:
    """The kernel `name` of HERE/source compiled by NVRTC for the device (cached per process)."""
    if not hasattr(torch.cuda, "_compile_kernel"):
        raise GlmcError(f"glmc.kernels: {source} needs torch.cuda._compile_kernel (NVRTC; torch >= 2.8), this torch "
                        f"is {torch.__version__}")
    major, minor = torch.cuda.get_device_capability(device_index)
    return torch.cuda._compile_kernel((HERE / source).read_text(), name, compute_capability=f"{major}{minor}")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132, an H100/H200's, elsewhere: what the launch shapes assume)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def launch(kernel: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: list) -> None:
    """Launch an NVRTC kernel on the current stream (tensors become pointers, ints 32-bit ints), with programmatic
    stream serialization when PDL is on."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    keep = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(a) for a in args]
    params = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.byref(k), ctypes.c_void_p) for k in keep])
    attr = _LaunchAttribute(_PROGRAMMATIC_STREAM_SERIALIZATION, b"", (1).to_bytes(4, "little"))
    pdl = pdl_on(device.index or 0)
    cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), 0,
                        ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream),
                        ctypes.pointer(attr) if pdl else None, int(pdl))
    err = _libcuda().cuLaunchKernelEx(ctypes.byref(cfg), kernel.func, params, None)
    if err:
        raise GlmcError(f"glmc.kernels: cuLaunchKernelEx failed with CUresult {err}")
