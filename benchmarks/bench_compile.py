"""Benchmark `glmc compile` on a ChatGLM3-6B-shaped random checkpoint: per-stage time, peak memory, file sizes.

    python benchmarks/bench_compile.py --layers 2 --precision int4 --workdir /tmp/bench_compile

The checkpoint has the real layer shapes (hidden 4096, ffn 13696, 32 heads / 2 KV groups, vocab 65024) and
`--layers` of them; the config is compile_configs/chatglm3-6b-<precision>.yaml with verification on 2 short
id prompts (the random checkpoint has no tokenizer).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--precision", default="int4", choices=["fp16", "int8", "int4", "kv8", "int8-kv8"])
    ap.add_argument("--targets", default="[onnxruntime,tensorrt]")
    ap.add_argument("--workdir", default="/tmp/bench_compile")
    args = ap.parse_args()

    import torch

    from glmc.compiler import schema
    from glmc.compiler.pipeline import compile_config
    from glmc.modeling_patches.checkpoint import write_random_checkpoint
    from glmc.modeling_patches.config import variant

    work = Path(args.workdir)
    ckpt = work / f"chatglm3-6b-{args.layers}l"
    if not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        write_random_checkpoint(variant("chatglm3-6b", num_layers=args.layers), ckpt, torch.float16)
        print(f"random checkpoint: {time.perf_counter() - t0:.1f}s")
    cfg = schema.load(REPO / "compile_configs" / f"chatglm3-6b-{args.precision}.yaml", [
        f"model.checkpoint={ckpt}", f"targets={args.targets}", f"output={work}/build-{args.precision}",
        f"cache_dir={work}/cache", "verify.prompts=[[64790, 64792, 100, 200, 300], [64790, 64792, 7]]",
        "verify.steps=4", "limits.max_batch=4", "calibration.samples=2"])
    t0 = time.perf_counter()
    out = compile_config(cfg, force=True)
    total = time.perf_counter() - t0
    m = json.loads((out / "manifest.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nchatglm3-6b shapes, {args.layers} layers, {args.precision}: {total:.1f}s total, peak RSS {peak:.1f} GiB")
    print("| stage | seconds |\n| --- | --- |")
    for s in m["stages"]:
        print(f"| {s['name']} | {s['seconds']:.1f} |")
    sizes: dict[str, int] = {}
    for name, f in m["files"].items():
        part = name.split("/")[0] + ("/" + name.split("/")[1] if name.startswith("onnx/") else "")
        sizes[part] = sizes.get(part, 0) + f["bytes"]
    print("| part | MiB |\n| --- | --- |")
    for k, v in sorted(sizes.items()):
        print(f"| {k} | {v / 2**20:.1f} |")
    e = m["engines"].get("tensorrt")
    if e:
        print(f"engine: {e['engine_bytes'] / 2**20:.1f} MiB, {e['engine_layer_count']} layers, {e['library']} "
              f"{e['version']}, {', '.join(e['compute_capabilities'])}, built in {e['build_seconds']:.1f}s")
    print("verification:", m["verification"]["summary"] if m["verification"] else "off")


if __name__ == "__main__":
    main()
