"""Open what a user points at (a build directory, a lowered ONNX model, a checkpoint) and pick its backend and device.

    from glmc.runtime.loader import load
    model = load("build/glmc-tiny-int8")                       # auto: TensorRT on a GPU that runs the engine,
    model = load("build/glmc-tiny-int8", backend="onnxruntime")  # else ONNX Runtime, else torch
    print(model.generate("def main(", max_new_tokens=20))

A build directory (manifest.json) carries its limits (max_batch, max_input_length, max_sequence_length): every
backend enforces them, so a prompt longer than the build's context fails with a message naming the build.
A directory holding `model.onnx` and its runtime config `model.json` (one `onnx/<target>/` of a build, or the
output of `glmc.export.lower.lower_file`) runs on ONNX Runtime; its limits come from the build it sits in, else
from the arguments.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from glmc.assets import model_dir
from glmc.compiler.builddir import MANIFEST, read_manifest
from glmc.errors import GlmcError

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
ORT_TARGETS = ("onnxruntime", "reference")  # the lowerings ONNX Runtime runs, fastest first
DEFAULT_MAX_LENGTH = 2048  # a lowered model outside a build, with no --max-length


@dataclasses.dataclass
class Build:
    """What a path offers: ONNX models per target, a TensorRT engine, weights for torch, tokenizer, limits."""

    root: Path
    onnx: dict[str, Path]  # target -> model.onnx
    engine: Path | None
    engine_info: dict
    checkpoint: Path | None  # a directory load_model reads (the build's model/ or the original checkpoint)
    tokenizer_dir: Path
    family: str | None
    limits: dict  # max_batch, max_input_length, max_sequence_length
    manifest: dict


def _limits(manifest: dict) -> dict:
    lim = manifest.get("config", {}).get("limits", {})
    return {"max_batch": int(lim.get("max_batch", 1)), "max_input_length": int(lim.get("max_input_length", 512)),
            "max_sequence_length": int(lim.get("max_sequence_length", 2048))}


def _has_weights(d: Path) -> bool:
    return (d / "config.json").is_file() and any(p.suffix in (".safetensors", ".bin") for p in d.iterdir())


def open_build(path: str | Path | None) -> Build:
    """Describe a build directory, an ONNX model (file or directory) or a checkpoint directory."""
    p = Path(path) if path is not None else model_dir(None)
    if not p.exists():
        raise GlmcError(f"{p}: does not exist (expected a glmc build directory, an ONNX model or a checkpoint)")
    if p.is_file() and p.suffix == ".onnx":
        p = p.parent
    if (p / MANIFEST).is_file():
        m = read_manifest(p)
        onnx = {t: p / d["onnx"] for t, d in m.get("targets", {}).items() if (p / d["onnx"]).is_file()}
        eng = m.get("engines", {}).get("tensorrt")
        engine = p / eng["path"] if eng and (p / eng["path"]).is_file() else None
        tok = p / m.get("tokenizer", {}).get("dir", "model/")
        ckpt = tok if _has_weights(tok) else None
        original = m.get("model", {}).get("checkpoint")
        if ckpt is None and original and Path(original).is_dir() and _has_weights(Path(original)):
            ckpt = Path(original)
        return Build(p, onnx, engine, eng or {}, ckpt, tok, m.get("model", {}).get("family"), _limits(m), m)
    if (p / "model.onnx").is_file():  # one lowered model; inside a build when ../../manifest.json exists
        up = p.parent.parent
        if (up / MANIFEST).is_file():
            b = open_build(up)
            return dataclasses.replace(b, onnx={p.name: p / "model.onnx"}, engine=None)
        from glmc.runtime.backend_onnxruntime import read_runtime_config
        target = read_runtime_config(p / "model.onnx").get("model", {}).get("target", "onnxruntime")
        tok = p if (p / "tokenizer.model").is_file() else p.parent
        return Build(p, {target: p / "model.onnx"}, None, {}, None, tok, None, {}, {})
    if (p / "config.json").is_file():
        return Build(p, {}, None, {}, p, p, None, {}, {})
    raise GlmcError(f"{p}: not a glmc build directory ({MANIFEST}), an ONNX model directory (model.onnx) or a "
                    "checkpoint directory (config.json)")


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


def pick(build: Build, backend: str, device: str, target: str | None) -> tuple[str, str, str | None]:
    """(backend, device, ONNX target) for a request; `auto` resolves to the fastest the machine runs."""
    if backend not in BACKENDS:
        raise GlmcError(f"backend '{backend}': expected one of {', '.join(BACKENDS)}")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if backend == "auto":
        if build.engine is not None and device.startswith("cuda") and tensorrt_runnable(build) is None:
            backend = "tensorrt"
        elif build.onnx and any(t in build.onnx for t in (target,) + ORT_TARGETS if t):
            backend = "onnxruntime"
        elif build.checkpoint is not None:
            backend = "torch"
        else:
            raise GlmcError(f"{build.root}: nothing here that a backend can run (no onnxruntime/reference "
                            "lowering, no engine, no weights)")
    if backend == "onnxruntime":
        if target is None:
            target = next((t for t in ORT_TARGETS if t in build.onnx), None)
        if target not in build.onnx:
            have = ", ".join(build.onnx) or "none"
            raise GlmcError(f"{build.root}: no '{target or 'onnxruntime'}' lowering to run on ONNX Runtime "
                            f"(lowerings here: {have})")
    if backend == "tensorrt":
        why = tensorrt_runnable(build)
        if why:
            raise GlmcError(f"{build.root}: cannot run the TensorRT engine: {why}")
        device = device if device.startswith("cuda") else "cuda"
    if backend == "torch" and build.checkpoint is None:
        raise GlmcError(f"{build.root}: the torch backend needs weights, and this build has none outside its "
                        f"ONNX files (float build) and its checkpoint "
                        f"{build.manifest.get('model', {}).get('checkpoint')} is not here")
    return backend, device, target


def make_backend(build: Build, backend: str = "auto", device: str = "cpu", target: str | None = None,
                 max_length: int | None = None, max_batch: int | None = None, threads: int = 0,
                 dtype: str | None = None) -> Any:
    """The generation-loop backend for a build, with the build's limits (a smaller max_length/max_batch may be
    asked for; a larger one is an error)."""
    backend, device, target = pick(build, backend, device, target)
    lim = dict(build.limits)
    for key, asked in (("max_sequence_length", max_length), ("max_batch", max_batch)):
        if asked is not None and key in lim and asked > lim[key]:
            raise GlmcError(f"{build.root}: {key} {asked} exceeds the build's limit of {lim[key]} "
                            f"(limits.{key} in its compile config)")
        if asked is not None:
            lim[key] = asked
    length = lim.get("max_sequence_length", DEFAULT_MAX_LENGTH)
    if backend == "onnxruntime":
        from glmc.runtime.backend_onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend(build.onnx[target], max_length=length, max_batch=lim.get("max_batch", 8),
                                  device=device, max_input_length=lim.get("max_input_length"), threads=threads)
    if backend == "tensorrt":
        from glmc.runtime.backend_tensorrt import TensorRTBackend
        return TensorRTBackend(build.engine, build.engine_info, max_length=length, max_batch=lim["max_batch"],
                               max_input_length=lim["max_input_length"], device=device)
    from glmc.modeling_patches.checkpoint import load_model
    from glmc.runtime.backend_torch import TorchBackend
    dtype = dtype or {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(
        build.manifest.get("precision", {}).get("dtype", "fp32"), "float32")
    if not device.startswith("cuda") and dtype != "float32":
        dtype = "float32"  # half-precision matmuls on CPU are slow and not what the build verified against
    model = load_model(build.checkpoint, dtype=dtype, device=device, family=build.family,
                       max_positions=length if build.limits else None)
    return TorchBackend(model, length if build.limits else max_length)


def load(path: str | Path | None = None, backend: str = "auto", device: str = "cpu", target: str | None = None,
         max_length: int | None = None, max_batch: int | None = None, family: str | None = None,
         threads: int = 0):
    """A `glmc.api.Model` (tokenizer + backend) for a build directory, an ONNX model or a checkpoint."""
    from glmc.api import Model
    from glmc.runtime.tokenizer import load_tokenizer

    build = open_build(path)
    if not build.limits and build.onnx and max_length is None:
        max_length = DEFAULT_MAX_LENGTH
    be = make_backend(build, backend, device, target, max_length, max_batch, threads)
    tokenizer = load_tokenizer(build.tokenizer_dir, family or build.family)
    return Model(build.root, tokenizer, be)
