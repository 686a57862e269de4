"""`glmc eval`: the accuracy table of precision combinations (perplexity, logits error, top-1) on held-out text."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PRECISIONS = "fp32,fp16,int8,int4,int4-g128,kv8,int8+kv8"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from glmc.quantization.cli_quantize import add_calibration_arguments

    p.add_argument("--model", metavar="DIR", default=None,
                   help="float checkpoint directory with its tokenizer.model (default: the shipped model)")
    p.add_argument("--family", choices=("chatglm2", "chatglm3", "glm4"), default=None)
    p.add_argument("--precisions", default=DEFAULT_PRECISIONS,
                   help="comma-separated precision names: '+'-joined fp32|fp16|bf16, int8|int4[-g32|-g64|-g128]"
                        "[-awq][-out], sq8[-aALPHA], fp8, kv8|kvfp8[-tensor|-head|-channel], e.g. "
                        f"fp16,int4-g128,int4-g128-awq,sq8,fp8,kv8,fp16+kvfp8 (default: {DEFAULT_PRECISIONS})")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="held-out text to evaluate on (default: the held-out text shipped with glmc)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per evaluation window (default: 256)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many tokens of the text")
    p.add_argument("--chunk", type=int, default=1,
                   help="tokens per forward within a window for kv8/kvfp8 precisions; 1 (default) reads the "
                        "quantized cache for every prediction, as generation does")
    add_calibration_arguments(p)
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="keep the pipeline's stage cache here (quantized models are reused by later runs)")
    p.add_argument("--device", default="cpu", help="torch device for every precision (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: one-token forwards of small models lose more to thread "
                        "hand-offs than they gain, worst on a shared machine)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead of a rich one")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import torch

    from glmc.assets import model_dir
    from glmc.errors import GlmcError
    from glmc.modeling_patches.checkpoint import load_model
    from glmc.modeling_patches.tokenizer import load_tokenizer
    from glmc.quantization.cli_quantize import quantize_stage
    from glmc.quantization.evaluate import evaluate, heldout_windows, print_table, table_rows
    from glmc.quantization.scheme import Scheme, parse_precision

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions:
        raise GlmcError("--precisions: no precision given")
    schemes = [parse_precision(p) for p in precisions]  # fail on a bad name before loading anything
    d = model_dir(args.model)
    tokenizer = load_tokenizer(d, family=args.family)
    model = load_model(d, dtype=torch.float32, family=args.family, device=args.device)
    windows = heldout_windows(tokenizer.encode, args.text, args.max_length, args.max_tokens)
    n = sum(w.shape[1] - 1 for w in windows)
    print(f"glmc eval: {d} on {n} predicted tokens in {len(windows)} windows of <= {args.max_length}, "
          f"chunk {args.chunk}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="glmc-eval-") as tmp:
        cache = Path(args.cache_dir or tmp).resolve()

        def quantized(scheme: Scheme):
            """The precision's model as `glmc compile` makes it: the pipeline's quantize stage, loaded back."""
            src = quantize_stage(d, scheme, args, cache, "glmc eval") if scheme.to_json() else d
            return load_model(src, dtype=scheme.dtype, family=args.family, device=args.device)

        results = evaluate(model, precisions, windows, chunk=args.chunk, make=quantized,
                           progress=lambda name, i, k: print(f"  {name}: window {i}/{k}   ", file=sys.stderr,
                                                             end="\r"))
    print(file=sys.stderr)
    assert len(results) == len(schemes)
    print_table(results, title=f"glmc eval: {d.name}", markdown=args.markdown)
    if args.json:
        header, rows = table_rows(results)
        with open(args.json, "w") as f:
            json.dump([dict(zip(header, row, strict=True)) | {"perplexity_raw": r.perplexity,
                                                              "rel_error_raw": r.rel_error,
                                                              "top1_raw": r.top1_agreement}
                       for row, r in zip(rows, results, strict=True)], f, indent=2)
    return 0
