"""`glmc quantize`: write a weight-only int8/int4 (and optionally int8-KV-cache) checkpoint of a float model."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# Files of a checkpoint directory that are not weights and travel unchanged to the quantized one.
COPIED = ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
          "generation_config.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", default=None, help="float checkpoint directory (default: shipped model)")
    p.add_argument("--family", choices=("chatglm2", "chatglm3", "glm4"), default=None)
    p.add_argument("--out", metavar="DIR", required=True, help="directory for the quantized checkpoint")
    p.add_argument("--precision", default="int4-g128",
                   help="a precision name such as int8, int4, int4-g128, int8+kv8, fp16+int4-g64+kv8-head "
                        "(default: int4-g128; the float dtype defaults to fp16)")
    p.add_argument("--calibration", metavar="FILE", default=None,
                   help="kv8 calibration text, .txt or .jsonl with {\"text\": ...} (default: the shipped set)")
    p.add_argument("--num-samples", type=int, default=32, help="calibration samples (default: 32)")
    p.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration sample (default: 256)")
    p.add_argument("--layout", default="safetensors", choices=("safetensors", "sharded-safetensors"))


def run(args: argparse.Namespace) -> int:
    import torch

    from glmc.assets import model_dir
    from glmc.errors import GlmcError
    from glmc.modeling_patches.checkpoint import load_model
    from glmc.quantization.kv_calibration import calibration_samples
    from glmc.quantization.scheme import apply_scheme, parse_precision, save_quantized

    scheme = parse_precision(args.precision)
    if not scheme.weight_bits and not scheme.kv_granularity:
        raise GlmcError(f"--precision {args.precision}: nothing to quantize (name int8, int4... or kv8)")
    src, out = model_dir(args.model), Path(args.out)
    if out.resolve() == src.resolve():
        raise GlmcError(f"--out {out}: must differ from the model directory")
    calibration = None
    # KV calibration runs the float model, so it is loaded in float32; weights alone load in the target dtype.
    model = load_model(src, dtype=torch.float32 if scheme.kv_granularity else scheme.torch_dtype,
                       family=args.family)
    if scheme.kv_granularity:
        from glmc.modeling_patches.tokenizer import load_tokenizer
        encode = load_tokenizer(src, family=args.family).encode
        calibration = calibration_samples(encode, args.calibration, args.num_samples, args.calibration_length)
    apply_scheme(model, scheme, calibration)
    save_quantized(model, out, scheme, layout=args.layout)
    for name in COPIED:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    print(f"glmc quantize: wrote {out} ({scheme.name})", file=sys.stderr)
    return 0
