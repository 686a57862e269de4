"""`glmc verify`: export a checkpoint at a precision, lower it, and check each lowering in ONNX Runtime against torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

TARGETS = ("reference", "onnxruntime")  # the lowerings ONNX Runtime can run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--family", default=None, help="chatglm2 | chatglm3 | glm4, when the checkpoint does not say")
    p.add_argument("--precision", default="fp32",
                   help="fp32, fp16, int8, int4, int4-g128, kv8, int8+kv8, ... (see glmc quantize); default fp32")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated lowerings ({', '.join(TARGETS)})")
    p.add_argument("--steps", type=int, default=16, help="greedy decode steps compared (default 16)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt text (repeatable; default: two prompts of different lengths, left-padded)")
    p.add_argument("--work-dir", default=None, help="keep the exported and lowered models here (default: temporary)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative logits error (default: by precision, see docs/onnx.md)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")


DEFAULT_PROMPTS = ["Hello, who are you?", "1 + 1 ="]


def run(args: argparse.Namespace) -> int:
    import torch

    from glmc.assets import model_dir
    from glmc.errors import GlmcError
    from glmc.export.lower import lower_file
    from glmc.export.onnx_export import export
    from glmc.export.simplify import simplify_file
    from glmc.runtime.verify import print_report, tolerance_for, verify
    from glmc.modeling_patches.checkpoint import load_model
    from glmc.quantization.kv_calibration import calibration_samples
    from glmc.quantization.scheme import apply_scheme, parse_precision
    from glmc.modeling_patches.tokenizer import load_tokenizer

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise GlmcError(f"--targets: '{','.join(unknown) or args.targets}' is not among {', '.join(TARGETS)}")
    if args.steps < 1:
        raise GlmcError("--steps must be at least 1")
    scheme = parse_precision(args.precision)
    d = model_dir(args.model)
    model = load_model(d, dtype=torch.float32, family=args.family)
    try:
        encode = load_tokenizer(d, family=args.family).encode
    except GlmcError:
        if args.prompt:
            raise
        encode = None  # no tokenizer: token-id prompts and calibration (verification needs no real text)
        print(f"glmc verify: {d} has no tokenizer; using fixed token-id prompts", file=sys.stderr)
    if encode is None:
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, model.config.vocab_size, (1, 64), generator=g) for _ in range(4)]
        prompts = [ids[0][0, :9].tolist(), ids[1][0, :4].tolist()]
    else:
        ids = calibration_samples(encode) if scheme.kv_granularity else None
        prompts = [encode(p) for p in (args.prompt or DEFAULT_PROMPTS)]
    apply_scheme(model, scheme, ids if scheme.kv_granularity else None)
    with tempfile.TemporaryDirectory(prefix="glmc-verify-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"glmc verify: {d.name} at {scheme.name}: exporting to {work}", file=sys.stderr)
        export(model, work / "model.onnx")
        simplify_file(work / "model.onnx", work / "model.sim.onnx")
        paths = {}
        for target in targets:
            paths[target] = work / f"model.{target}.onnx"
            lower_file(work / "model.sim.onnx", target, paths[target])
        tolerance = None
        if args.tolerance is not None:
            tolerance = dataclasses.replace(tolerance_for(model.dtype, scheme.weight_bits, bool(scheme.kv_granularity)),
                                            rel=args.tolerance)
        report = verify(model, paths, prompts, steps=args.steps, tolerance=tolerance)
    report.update(model=str(d), precision=scheme.name)
    print_report(report, title=f"glmc verify: {d.name} at {scheme.name}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1
