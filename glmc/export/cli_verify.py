"""`glmc verify`: compile a checkpoint at a precision through the pipeline and report each lowering against torch.

It builds a compile config from its flags (the compile command's defaults for everything else: prompts, steps,
limits, graph forms) and runs the same pipeline as `glmc compile`, so both report the same numbers for the same
model and precision.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from glmc.artifact import TARGETS as ARTIFACT_TARGETS

TARGETS = tuple(t for t, spec in ARTIFACT_TARGETS.items() if spec.onnxruntime)  # the lowerings ONNX Runtime runs
DEFAULT_TARGETS = ("reference", "onnxruntime")  # (tensorrt also builds an engine: slower, same ORT check)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--family", default=None, help="chatglm2 | chatglm3 | glm4, when the checkpoint does not say")
    p.add_argument("--precision", default="fp32",
                   help="fp32, fp16, int8, int4, int4-g128, kv8, int8+kv8, ... (see glmc quantize); default fp32")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated lowerings ({', '.join(TARGETS)}; default: {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--steps", type=int, default=None, help="greedy decode steps compared (default: verify.steps of "
                                                           "a compile config, 8)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt text (repeatable; default: verify.prompts of a compile config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="any other compile-config key (e.g. limits.max_batch=4); repeatable")
    p.add_argument("--work-dir", default=None, help="keep the build and its stage cache here (default: temporary)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative logits error (default: by precision, see docs/onnx.md)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from glmc.assets import model_dir
    from glmc.compiler import schema
    from glmc.compiler.pipeline import StageError, VerificationFailed, compile_config
    from glmc.errors import GlmcError
    from glmc.quantization.scheme import parse_precision
    from glmc.runtime.verify import print_report

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise GlmcError(f"--targets: '{','.join(unknown) or args.targets}' is not among {', '.join(TARGETS)}")
    if args.steps is not None and args.steps < 1:
        raise GlmcError("--steps must be at least 1")
    scheme = parse_precision(args.precision)
    d = model_dir(args.model)
    verify: dict = {"max_rel_error": args.tolerance}
    if args.steps is not None:
        verify["steps"] = args.steps
    if args.prompt:
        verify["prompts"] = list(args.prompt)
    elif not (d / "tokenizer.model").is_file():  # verification needs no real text: fixed token ids
        print(f"glmc verify: {d} has no tokenizer; using fixed token-id prompts", file=sys.stderr)
        verify["prompts"] = [[5, 17, 42, 99, 3, 250, 7, 8, 61], [11, 12, 13, 14]]
    with tempfile.TemporaryDirectory(prefix="glmc-verify-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        tree: dict[str, Any] = {"model": {"checkpoint": str(d.resolve()), "family": args.family},
                "precision": schema.precision_section(scheme), "targets": targets, "verify": verify,
                "output": str(work / "build"), "cache_dir": str(work / "cache")}
        for option in args.overrides:
            key, value = schema.parse_set(option)
            node = tree
            for part in key.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[key.split(".")[-1]] = value
        cfg = schema.from_options(tree, "glmc verify")
        print(f"glmc verify: {d.name} at {scheme.name}: compiling into {work}", file=sys.stderr)
        try:
            compile_config(cfg, console=Console(stderr=True))
            report = json.loads((cfg.output / "verify.json").read_text())
        except StageError as e:
            failed = e if isinstance(e, VerificationFailed) else e.__cause__
            if not isinstance(failed, VerificationFailed):
                raise
            report = failed.report
    report.update(model=str(d), precision=scheme.name)
    print_report(report, title=f"glmc verify: {d.name} at {scheme.name}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1
