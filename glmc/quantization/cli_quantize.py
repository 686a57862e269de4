"""`glmc quantize`: write a quantized checkpoint of a float model (int8/int4 weight-only, AWQ, sq8, fp8, KV caches).

It runs the compile pipeline's quantize stage (the same code and defaults as `glmc compile`; cached in
--cache-dir when given) and copies the quantized checkpoint it writes to --out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glmc.quantization.scheme import Scheme

# Files of a checkpoint directory that are not weights and travel unchanged to the quantized one (the quantize
# stage copies config.json and the tokenizer files itself).
COPIED = ("generation_config.json",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None, help="float checkpoint directory (default: shipped model)")
    p.add_argument("--family", choices=("chatglm2", "chatglm3", "glm4"), default=None)
    p.add_argument("--out", metavar="DIR", required=True,
                   help="directory for the quantized checkpoint (new, or empty; --force replaces it)")
    p.add_argument("--force", action="store_true", help="replace --out even when it already holds files")
    p.add_argument("--precision", default="int4-g128",
                   help="a precision name such as int8, int4, int4-g128, int4-g128-awq, sq8, sq8-a0.75, fp8, "
                        "int8+kv8, fp8+kvfp8, fp16+int4-g64+kv8-head (default: int4-g128; the float dtype defaults "
                        "to fp16)")
    add_calibration_arguments(p)
    p.add_argument("--layout", default="safetensors", choices=("safetensors", "sharded-safetensors"))
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="keep the pipeline's stage cache here (a later glmc compile with it reuses the stage)")


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    """--calibration / --num-samples / --calibration-length (glmc quantize and glmc eval)."""
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="calibration text (kv8, awq, sq8, fp8), .txt or .jsonl with {\"text\": ...} "
                        "(default: the shipped set)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="calibration samples (default: calibration.samples of a compile config, 16)")
    p.add_argument("--calibration-length", type=int, default=None,
                   help="tokens per calibration sample (default: calibration.max_length of a compile config, 256)")


def calibration_section(args: argparse.Namespace) -> dict:
    """The calibration section from the --calibration / --num-samples / --calibration-length flags given."""
    out = {"source": str(Path(args.calibration).resolve()) if args.calibration else None,
           "samples": args.num_samples, "max_length": args.calibration_length}
    return {k: v for k, v in out.items() if v is not None}


def quantize_stage(checkpoint: Path, scheme: Scheme, args: argparse.Namespace, cache: Path, command: str) -> Path:
    """The compile pipeline's quantize stage for `scheme` (compile's code and defaults, cached in `cache`): the
    checkpoint folder it writes."""
    from glmc.compiler import schema
    from glmc.compiler.pipeline import run_stages

    cfg = schema.from_options({"model": {"checkpoint": str(checkpoint.resolve()), "family": args.family},
                               "precision": schema.precision_section(scheme),
                               "calibration": calibration_section(args), "targets": ["onnx"],
                               "output": str(cache / "build"), "cache_dir": str(cache)}, command)
    ctx, _ = run_stages(cfg, until="quantize")
    return ctx.outputs["quantize"] / "model"


def run(args: argparse.Namespace) -> int:
    from glmc.assets import model_dir
    from glmc.errors import GlmcError
    from glmc.quantization.scheme import parse_precision

    scheme = parse_precision(args.precision)
    if not scheme.weight_bits and not scheme.kv_granularity:
        raise GlmcError(f"--precision {args.precision}: nothing to quantize (name int8, int4, sq8, fp8... or kv8)")
    src, out = model_dir(args.model), Path(args.out)
    if out.resolve() == src.resolve():
        raise GlmcError(f"--out {out}: must differ from the model directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise GlmcError(f"--out {out}: already exists and is not empty; choose a new directory, or pass --force to "
                        "replace its checkpoint files")
    with tempfile.TemporaryDirectory(prefix="glmc-quantize-") as tmp:
        cache = Path(args.cache_dir or tmp).resolve()
        quantized = quantize_stage(src, scheme, args, cache, "glmc quantize")
        tmp_out = out.parent / f".{out.name}.tmp-glmc"
        shutil.rmtree(tmp_out, ignore_errors=True)
        try:
            if args.layout == "safetensors":
                shutil.copytree(quantized, tmp_out)
            else:  # the stage writes one file; re-save sharded
                from glmc.modeling_patches.checkpoint import load_model
                from glmc.quantization.scheme import save_quantized
                save_quantized(load_model(quantized, scheme.dtype, family=args.family), tmp_out, scheme,
                               layout=args.layout)
                for p in quantized.iterdir():
                    if not (tmp_out / p.name).exists() and p.suffix not in (".safetensors", ".bin"):
                        shutil.copy2(p, tmp_out / p.name)
            for name in COPIED:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp_out / name)
            if out.exists():
                shutil.rmtree(out)
            tmp_out.rename(out)
        finally:
            shutil.rmtree(tmp_out, ignore_errors=True)
    print(f"glmc quantize: wrote {out} ({scheme.name})", file=sys.stderr)
    return 0
