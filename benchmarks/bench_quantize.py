"""Benchmark: quantize a ChatGLM3-6B-shaped random fp16 checkpoint to int4 (load -> quantize -> save), time and memory.

    python benchmarks/bench_quantize.py [--workdir /tmp] [--group-size 128] [--layers 28] [--keep]

Step 0 writes the random checkpoint (28 layers, hidden 4096, ffn 13696, vocab 65024; about 12.5 GB fp16) shard
by shard in a child process, never holding more than one shard. Then, in this process: load it in fp16, quantize
the block linears in place, save the quantized checkpoint (sharded safetensors). For each stage: wall time, the
process's CPU time (user + system; on a shared machine this says more than wall time), its resident memory after
it, and its peak so far (getrusage ru_maxrss, which only grows). Both checkpoints are deleted at the end unless
--keep.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from glmc.modeling_patches.checkpoint import load_model, write_random_checkpoint
from glmc.modeling_patches.config import variant
from glmc.quantization.scheme import Scheme, save_quantized
from glmc.quantization.weight_only import quantize_model

GIB = 1 << 30


def rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / GIB


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def write_checkpoint(out: Path, num_layers: int) -> None:
    """A ChatGLM-layout fp16 checkpoint of random weights, written one shard at a time."""
    write_random_checkpoint(variant("chatglm3-6b", num_layers=num_layers), out, dtype=torch.float16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    root = Path(tempfile.mkdtemp(prefix="glmc-bench-quantize-", dir=args.workdir))
    src, dst = root / "fp16", root / "int4"
    rows: list[tuple[str, float, float | None, float | None, float | None]] = []  # stage, wall, CPU, RSS, peak
    try:
        t = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(src, args.layers))
        child.start()
        child.join()
        if child.exitcode:
            raise SystemExit(f"writing the random checkpoint failed (exit {child.exitcode})")
        size = sum(f.stat().st_size for f in src.iterdir()) / GIB
        rows.append((f"write random fp16 checkpoint ({size:.2f} GiB, child process)", time.perf_counter() - t,
                     None, None, None))

        t, c = time.perf_counter(), cpu_seconds()
        model = load_model(src, dtype="float16")
        rows.append(("load fp16", time.perf_counter() - t, cpu_seconds() - c, rss_now(), rss_peak()))

        t, c = time.perf_counter(), cpu_seconds()
        quantize_model(model, bits=4, group_size=args.group_size)
        rows.append((f"quantize int4 g{args.group_size}", time.perf_counter() - t, cpu_seconds() - c, rss_now(),
                     rss_peak()))

        t, c = time.perf_counter(), cpu_seconds()
        save_quantized(model, dst, Scheme("fp16", 4, args.group_size), layout="sharded-safetensors")
        size = sum(f.stat().st_size for f in dst.iterdir()) / GIB
        rows.append((f"save int4 ({size:.2f} GiB)", time.perf_counter() - t, cpu_seconds() - c, rss_now(),
                     rss_peak()))
        del model

        t, c = time.perf_counter(), cpu_seconds()
        load_model(dst, dtype="float16")
        rows.append(("reload int4 (same process)", time.perf_counter() - t, cpu_seconds() - c, rss_now(), rss_peak()))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    print("| stage | wall (s) | CPU (s) | RSS after (GiB) | peak RSS so far (GiB) |\n| --- | --- | --- | --- | --- |")
    for name, secs, cpu, now, peak in rows:
        fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        print(f"| {name} | {secs:.1f} | {fmt(cpu, 1)} | {fmt(now)} | {fmt(peak)} |")


if __name__ == "__main__":
    main()
