"""`glmc run BUILD "prompt" [...]`: generate on a compiled build (one prompt streams; several run as one batch)."""

from __future__ import annotations

import argparse
import sys
import time

from glmc.errors import GlmcError
from glmc.runtime.cli_generate import _DEFAULTS, SAMPLING_FLAGS, sampling_from_args
from glmc.runtime.loader import BACKENDS


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that choose what runs a build (shared with `glmc bench`)."""
    p.add_argument("build", help="a glmc build directory (or a lowered model directory, or a checkpoint)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: on a CUDA GPU the build's cuda engine, else its TensorRT engine where it runs; else "
                        "ONNX Runtime; else torch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when available)")
    p.add_argument("--target", default=None, help="which ONNX lowering ONNX Runtime runs (default: onnxruntime, "
                                                  "else reference, else tensorrt's graph)")
    p.add_argument("--max-length", type=int, default=None, help="cap on prompt + generation (<= the build's)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for ONNX Runtime (0: its default)")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="split the model over N processes (torch backend; one GPU each with NCCL, gloo on CPU; "
                        "default: the build's parallel.tensor, else 1); docs/parallel.md")


def load_build(args: argparse.Namespace, max_batch: int | None = None):
    from glmc.api import load
    return load(args.build, backend=args.backend, device=args.device, target=args.target,
                max_length=args.max_length, max_batch=max_batch, threads=args.threads,
                tensor_parallel=args.tensor_parallel)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_backend_arguments(p)
    p.add_argument("prompt", nargs="+", help="prompt text; several prompts run as one left-padded batch")
    p.add_argument("--raw", action="store_true", help="send the text as is, without the chat template")
    p.add_argument("--stats", action="store_true", help="print tokens/s and the backend to stderr")
    for name, (kind, help_text) in SAMPLING_FLAGS.items():
        default = getattr(_DEFAULTS, name)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                       help=f"{help_text} (default: {default})")


def run(args: argparse.Namespace) -> int:
    model = load_build(args)
    backend = model.backend
    sampling = sampling_from_args(args)
    t0 = time.perf_counter()
    if len(args.prompt) == 1:
        for piece in model.stream(args.prompt[0], chat=not args.raw, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        limit = getattr(backend, "max_batch", None)
        if limit is not None and len(args.prompt) > limit:
            raise GlmcError(f"{len(args.prompt)} prompts exceed the build's max_batch of {limit}; pass fewer")
        answers = model.generate_batch(args.prompt, chat=not args.raw, **sampling)
        for i, answer in enumerate(answers):
            print(f"[{i}] {answer}")
    if args.stats:
        sys.stdout.flush()
        device = getattr(backend, "device", "cpu")
        print(f"glmc run: {backend.name} on {device}, {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0
