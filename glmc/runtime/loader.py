"""Pick the backend and device for what a path holds (glmc.artifact.open_build describes it) and construct it.

    from glmc.artifact import open_build
    backend = make_backend(open_build("build/glmc-tiny-int8"), backend="auto")  # on a CUDA device: the cuda engine
    # (glmc's kernels) when the build has one and the machine runs it, else TensorRT on a GPU that runs the engine;
    # then ONNX Runtime (onnxruntime, else reference, else tensorrt lowering), else torch

`glmc.load` (glmc/api.py) wraps this with the tokenizer. A build directory (manifest.json) carries its limits
(max_batch, max_input_length, max_sequence_length): every backend enforces them. A path that names one lowering
(`.../onnx/<target>/model.onnx` or its folder) runs that graph on ONNX Runtime, in the session its runtime config
asks for, or is refused with the reason: it is never swapped for another engine.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from glmc.artifact import ORT_PREFERENCE, Build, describe_target
from glmc.errors import GlmcError

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "cuda")
DEFAULT_MAX_LENGTH = 2048  # a lowered model outside a build, with no --max-length


def cuda_available() -> bool:
    try:
        import onnxruntime as ort
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return True
    except ImportError:
        pass
    import torch
    return torch.cuda.is_available()


def tensorrt_runnable(build: Build) -> str | None:
    """None when this machine can run the build's engine, else the reason it cannot."""
    if build.engine is None:
        return f"{build.root} has no TensorRT engine (compile with the tensorrt target)"
    lib = build.engine_info.get("library", "tensorrt")
    if importlib.util.find_spec(lib) is None:
        return f"the engine was built with {lib}, which is not importable here"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU here (TensorRT engines need one)"
    caps = build.engine_info.get("compute_capabilities") or []
    major, minor = torch.cuda.get_device_capability()
    if caps and f"sm{major}{minor}" not in caps:
        return (f"the engine targets {', '.join(caps)} but this GPU ({torch.cuda.get_device_name()}) is "
                f"sm{major}{minor}")
    return None


def cuda_runnable(build: Build) -> str | None:
    """None when this machine can run the build's cuda engine, else the reason it cannot."""
    if build.cuda is None:
        return f"{build.root} has no cuda engine (compile with the cuda target: targets: [..., cuda])"
    from glmc.runtime.backend_cuda import runnable
    return runnable()


def pick(build: Build, backend: str, device: str, target: str | None) -> tuple[str, str, str | None]:
    """(backend, device, ONNX target) for a request; `auto` resolves to the fastest the machine runs."""
    if backend not in BACKENDS:
        raise GlmcError(f"backend '{backend}': expected one of {', '.join(BACKENDS)}")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if build.named is not None:  # the path names one lowering: that graph on ONNX Runtime, or a refusal
        if backend not in ("auto", "onnxruntime") or target not in (None, build.named):
            asked = f"the {backend} backend" if backend not in ("auto", "onnxruntime") else f"target '{target}'"
            raise GlmcError(f"{build.onnx[build.named]}: this path names the '{build.named}' lowering, which runs on "
                            f"ONNX Runtime; {asked} was asked for: point at the build directory to choose another")
        describe_target(build, build.named)
        return "onnxruntime", device, build.named
    if backend == "auto":
        runnable = [t for t in ((target,) if target else ORT_PREFERENCE) if t in build.onnx]
        if build.cuda is not None and device.startswith("cuda") and target is None and cuda_runnable(build) is None:
            backend = "cuda"
        elif build.engine is not None and device.startswith("cuda") and tensorrt_runnable(build) is None:
            backend = "tensorrt"
        elif runnable:
            backend = "onnxruntime"
        elif build.checkpoint is not None:
            backend = "torch"
        else:
            raise GlmcError(f"{build.root}: nothing here that a backend can run (no ONNX Runtime lowering, no "
                            "engine, no weights)")
    if backend == "onnxruntime":
        if target is None:
            target = next((t for t in ORT_PREFERENCE if t in build.onnx), None)
            if target is None:
                raise GlmcError(f"{build.root}: no lowering that ONNX Runtime runs (lowerings here: "
                                f"{', '.join(build.onnx) or 'none'})")
        describe_target(build, target)
    if backend == "tensorrt":
        why = tensorrt_runnable(build)
        if why:
            raise GlmcError(f"{build.root}: cannot run the TensorRT engine: {why}")
        device = device if device.startswith("cuda") else "cuda"
    if backend == "cuda":
        why = cuda_runnable(build)
        if why:
            raise GlmcError(f"{build.root}: cannot run the cuda engine: {why}")
        device = device if device.startswith("cuda") else "cuda"
    if backend == "torch" and build.checkpoint is None:
        raise GlmcError(f"{build.root}: the torch backend needs weights, and this build has none outside its "
                        f"ONNX files (float build) and its checkpoint "
                        f"{build.manifest.get('model', {}).get('checkpoint')} is not here")
    return backend, device, target


def check_limits(build: Build, max_length: int | None, max_batch: int | None) -> None:
    """A smaller max_length / max_batch than the build's may be asked for; a larger one is an error."""
    lim = build.limits
    for key, asked, limit in (("max_sequence_length", max_length, lim and lim.max_sequence_length),
                              ("max_batch", max_batch, lim and lim.max_batch)):
        if asked is not None and limit and asked > limit:
            raise GlmcError(f"{build.root}: {key} {asked} exceeds the build's limit of {limit} "
                            f"(limits.{key} in its compile config)")


def make_backend(build: Build, backend: str = "auto", device: str = "cpu", target: str | None = None,
                 max_length: int | None = None, max_batch: int | None = None, threads: int = 0,
                 dtype: str | None = None, **options: Any) -> Any:
    """The generation-loop backend for a build, with the build's limits (a smaller max_length/max_batch may be
    asked for; a larger one is an error). `options` go to the ONNX Runtime backend (e.g. cuda_graph)."""
    backend, device, target = pick(build, backend, device, target)
    check_limits(build, max_length, max_batch)
    lim = build.limits
    length = max_length or (lim.max_sequence_length if lim else DEFAULT_MAX_LENGTH)
    batch = max_batch or (lim.max_batch if lim else 8)
    if backend == "onnxruntime":
        from glmc.runtime.backend_onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(build.onnx[str(target)], max_length=length, max_batch=batch, device=device,
                                  max_input_length=lim.max_input_length if lim else None, threads=threads,
                                  **options)
    if backend == "cuda":
        from glmc.runtime.backend_cuda import load_cuda_build
        assert build.cuda is not None  # pick() checked
        return load_cuda_build(build.cuda, device=device, max_batch=batch, max_length=length,
                               max_input_length=lim.max_input_length if lim else None)
    if backend == "tensorrt":
        from glmc.runtime.backend_tensorrt import TensorRTBackend
        assert lim is not None and build.engine is not None  # pick() checked: an engine comes with a build
        return TensorRTBackend(build.engine, build.engine_info, max_length=length, max_batch=batch,
                               max_input_length=lim.max_input_length, device=device)
    from glmc.modeling_patches.checkpoint import load_model
    from glmc.runtime.backend_torch import TorchBackend
    assert build.checkpoint is not None  # pick() checked
    if dtype is None:
        dtype = build.dtype if lim else "fp32"  # a name load_model reads (fp32 | fp16 | bf16)
        if not device.startswith("cuda"):
            dtype = "fp32"  # half-precision matmuls on CPU are slow and not what the build verified against
    model = load_model(build.checkpoint, dtype=dtype, device=device, family=build.family,
                       max_positions=lim.max_sequence_length if lim else max_length)
    return TorchBackend(model, max_length)
