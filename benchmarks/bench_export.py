"""Benchmark export -> simplify -> lower on a ChatGLM3-6B-shaped random fp16 checkpoint: time, peak RSS, file sizes.

Each stage runs in its own process (so its peak RSS is its own) under an address-space limit (so a stage that
would not fit fails with MemoryError instead of waking the OOM killer):

    python benchmarks/bench_export.py --work /tmp/glmc-bench [--layers 28] [--json out.json]
    python benchmarks/bench_export.py --work /tmp/glmc-bench --stages export,simplify,lower-onnxruntime \
        --precision int4-g128 --out-name int4   # reuses the checkpoint; quantizes (RTN) before the export
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("checkpoint", "export", "simplify", "lower-reference", "lower-onnxruntime", "lower-tensorrt")


def run_stage(stage: str, work: Path, layers: int, precision: str, out_name: str) -> dict:
    """One stage, in this process; returns its stats (seconds, peak RSS, files written)."""
    import torch

    from glmc.modeling_patches import variant
    config = variant("chatglm3-6b", num_layers=layers)
    ckpt, onnx_dir = work / "checkpoint", work / out_name
    start = time.perf_counter()
    stats: dict = {}
    if stage == "checkpoint":
        from glmc.modeling_patches.checkpoint import write_random_checkpoint
        write_random_checkpoint(config, ckpt, dtype=torch.float16)
        files = list(ckpt.iterdir())
    elif stage == "export":
        from glmc.export.onnx_export import export
        from glmc.modeling_patches.checkpoint import load_model
        model = load_model(ckpt, dtype="float16")
        stats["load_seconds"] = round(time.perf_counter() - start, 1)
        if precision != "fp16":  # weight-only: round to nearest, layer by layer in place
            from glmc.quantization.scheme import apply_scheme, parse_precision
            apply_scheme(model, parse_precision(precision))
            stats["quantize_seconds"] = round(time.perf_counter() - start - stats["load_seconds"], 1)
        export(model, onnx_dir / "model.onnx", external_data=True)
        files = [onnx_dir / "model.onnx", onnx_dir / "model.onnx.data"]
    elif stage == "simplify":
        from glmc.export.simplify import simplify_file
        stats.update(simplify_file(onnx_dir / "model.onnx", onnx_dir / "model.sim.onnx"))
        files = [onnx_dir / "model.sim.onnx"]  # its weights stay in model.onnx.data
    else:
        from glmc.export.lower import lower_file
        target = stage.removeprefix("lower-")
        dst = onnx_dir / f"model.{target}.onnx"  # next to model.onnx.data, whose weights it shares
        lower_file(onnx_dir / "model.sim.onnx", target, dst)
        files = [dst, dst.with_suffix(".json"), dst.with_name(dst.name + ".data")]
    stats.update(seconds=round(time.perf_counter() - start, 1),
                 peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                 files={p.name: p.stat().st_size for p in files if p.exists()})
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working directory (needs about 40 GB free for 28 layers)")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--precision", default="fp16", help="fp16, or a weight-only scheme such as int4-g128 or int8")
    p.add_argument("--out-name", default="onnx", help="folder (under --work) for the ONNX files")
    p.add_argument("--limit-gib", type=float, default=22.0, help="address-space limit of each stage process")
    p.add_argument("--json", default=None)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = p.parse_args()
    work = Path(args.work)
    if args.stage:
        limit = int(args.limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(run_stage(args.stage, work, args.layers, args.precision, args.out_name)))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}  # stage -> the child's JSON report, or {"error": ...}
    for stage in args.stages.split(","):
        proc = subprocess.run([sys.executable, __file__, "--work", str(work), "--layers", str(args.layers),
                               "--limit-gib", str(args.limit_gib), "--precision", args.precision, "--out-name",
                               args.out_name, "--stage", stage], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            results[stage] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            break
        results[stage] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(stage, results[stage], file=sys.stderr)
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"glmc export benchmark: ChatGLM3-6B shape, {args.layers} layers, random fp16 checkpoint, "
                        f"exported at {args.precision}")
    for col in ("stage", "seconds", "peak RSS GiB", "files written"):
        table.add_column(col)
    for stage, r in results.items():
        files = ", ".join(f"{n} {s / 2**30:.2f} GiB" if s > 2**27 else f"{n} {s / 2**10:.0f} KiB"
                          for n, s in sorted(r.get("files", {}).items()))
        table.add_row(stage, str(r.get("seconds", "-")), str(r.get("peak_rss_gib", "-")), r.get("error", files))
    Console(width=160).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
