"""Tensor parallelism: decode tok/s at TP=1 (the one-process torch backend) and TP=N (glmc.parallel), greedy tokens
compared, against the memory-bandwidth bound of the devices used.

    python3 benchmarks/bench_parallel.py                                  # CPU, gloo: the shipped model, TP 1 and 2
    python3 benchmarks/bench_parallel.py --shape chatglm3-6b --tp 1 2 --batch 1 16 --json tp.json   # 2 GPUs, NCCL
    python3 benchmarks/bench_parallel.py --shape glm-4-9b-chat --tp 1 2 --batch 1 16

--shape writes a random checkpoint of that variant's shapes (fp16 on GPUs; --layers to shrink it) to a temporary
folder; --model runs a checkpoint or build weights folder. Decode tok/s is glmc bench's: best of --repeats runs,
batch x (new tokens - 1) / the time after the first token. The bound is batch / (bytes one rank reads per decode step
/ the device's bandwidth): each rank reads its shard of the weights (q/o and FFN by 1/N, its KV groups' k/v rows,
1/N of the output layer) and its KV cache; the bandwidth is measured (a 1 GiB device copy, read + write, as
benchmarks/bench_kernels.py) on GPUs, or given with --bandwidth-gbs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmc.assets import model_dir  # noqa: E402
from glmc.modeling_patches.checkpoint import load_model, write_random_checkpoint  # noqa: E402
from glmc.modeling_patches.config import GLMConfig, load_config, torch_dtype, variant  # noqa: E402
from glmc.parallel import TensorParallelBackend, start  # noqa: E402
from glmc.runtime.backend_torch import TorchBackend  # noqa: E402
from glmc.runtime.cli_bench import measure, synthetic_prompts  # noqa: E402
from glmc.runtime.generate import SamplingConfig, generate  # noqa: E402


def rank_bytes(c: GLMConfig, world: int, batch: int, context: int, elt: int) -> int:
    """Bytes one rank reads per decode step: its weight shard and its KV cache at `context` tokens."""
    d, h, f = c.head_dim, c.hidden_size, c.ffn_hidden_size
    kv_local = max(c.num_kv_heads // world, 1)
    per_layer = ((c.num_heads // world + 2 * kv_local) * d * h + h * (c.num_heads // world) * d
                 + 3 * -(-f // world) * h)
    weights = c.num_layers * per_layer + -(-c.vocab_size // world) * h
    kv = c.num_layers * 2 * batch * kv_local * context * d
    return (weights + kv) * elt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--shape", default=None, help="a variant's shapes with random weights (chatglm3-6b, "
                                                 "glm-4-9b-chat, ...)")
    p.add_argument("--layers", type=int, default=None, help="with --shape: this many layers")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (TP=N uses cuda:0..N-1)")
    p.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default: fp16 on GPUs, fp32 on CPU)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="per-device bandwidth for the bound, GB/s "
                                                                     "(default: measured on GPUs, none on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads per rank (default: the cores "
                                                             "shared out among the ranks; TP=1 takes them all)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = args.dtype or ("fp16" if device == "cuda" else "fp32")
    tmp = None
    if args.shape:
        tmp = tempfile.TemporaryDirectory(prefix="glmc-bench-tp-")
        over = {"num_layers": args.layers} if args.layers else {}
        t0 = time.perf_counter()
        ckpt = write_random_checkpoint(variant(args.shape, **over), tmp.name, dtype=torch_dtype(dtype))
        print(f"random {args.shape} checkpoint written in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    else:
        ckpt = Path(args.model) if args.model else model_dir(None)
    config = load_config(ckpt)
    length = args.prompt + args.new + 1
    from benchmarks.bench_kernels import copy_bandwidth  # (the one copy-bandwidth measurement of the kernels)
    bw = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else (copy_bandwidth() if device == "cuda" else None)
    elt = torch.finfo(torch_dtype(dtype)).bits // 8
    check_prompts = synthetic_prompts(2, 16, config.vocab_size)
    check_cfg = SamplingConfig(max_new_tokens=16)
    rows, reference = [], None
    for world in args.tp:
        t0 = time.perf_counter()
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        saved = torch.get_num_threads()
        backend: TorchBackend | TensorParallelBackend
        if world == 1:
            torch.set_num_threads(threads)
            backend = TorchBackend(load_model(ckpt, dtype=dtype, device=device, max_positions=length), length)
        else:
            backend = start(ckpt, world, dtype=dtype, device=device, max_length=length, threads=threads)
        started = time.perf_counter() - t0
        tokens = generate(backend, check_prompts, check_cfg)
        reference = reference or tokens
        for b in args.batch:
            m = measure(backend, b, args.prompt, args.new, config.vocab_size, args.repeats)
            bound = b / (rank_bytes(config, world, b, args.prompt + args.new // 2, elt) / bw) if bw else None
            rows.append({"tp": world, "threads": threads if device == "cpu" else None, **m, "start_s": started,
                         "tokens_equal_tp1": tokens == reference, "bound_tps": bound})
            print(f"tp {world} batch {b}: decode {m['decode_tps']:.1f} tok/s, prefill {m['prefill_tps']:.0f} "
                  f"tok/s, TTFT {1e3 * m['ttft_s']:.1f} ms" + (f", bound {bound:.0f}" if bound else ""),
                  file=sys.stderr)
        if isinstance(backend, TensorParallelBackend):
            backend.close()
        torch.set_num_threads(saved)
        del backend
    base = {r["batch"]: r["decode_tps"] for r in rows if r["tp"] == 1}  # (the last TP=1 run of each batch)
    print("\n| TP | threads/rank | batch | decode tok/s | x TP=1 | bound tok/s | % of bound | tokens = TP=1 |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        x = f"{r['decode_tps'] / base[r['batch']]:.2f}" if r["batch"] in base else "-"
        bound = f"{r['bound_tps']:.0f} | {100 * r['decode_tps'] / r['bound_tps']:.0f}%" if r["bound_tps"] else "- | -"
        print(f"| {r['tp']} | {r['threads']} | {r['batch']} | {r['decode_tps']:.1f} | {x} | {bound} "
              f"| {r['tokens_equal_tp1']} |")
    result = {"model": str(args.shape or ckpt), "layers": config.num_layers, "device": device, "dtype": dtype,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"
              + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if device == "cuda" else ""),
              "load_average": os.getloadavg(), "bandwidth_Bps": bw, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if tmp:
        tmp.cleanup()
    return 0 if all(r["tokens_equal_tp1"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
