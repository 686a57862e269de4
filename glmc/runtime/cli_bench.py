"""`glmc bench BUILD`: time to first token, prefill and decode tokens/s at batch 1 and a larger batch, peak memory.

Prints a table and writes (or prints, with --json -) the same numbers as JSON. Prompts are synthetic token ids
(the same every run); no stop ids, so every row decodes every step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from glmc.errors import GlmcError
from glmc.runtime.cli_run import add_backend_arguments, load_build
from glmc.runtime.generate import SamplingConfig, stream


def synthetic_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """Deterministic ids away from the special tokens at both ends of small vocabularies."""
    span = max(vocab - 200, 2)
    return [[100 % vocab + (i * 37 + r * 11) % span for i in range(length)] for r in range(batch)]


def measure(backend, batch: int, prompt_len: int, new_tokens: int, vocab: int, repeats: int = 3) -> dict:
    """Best of `repeats` runs: time to first token (prefill + first sample), prefill tokens/s (batch * prompt /
    that time), decode tokens/s (batch * the remaining steps / their time)."""
    prompts = synthetic_prompts(batch, prompt_len, vocab)
    list(stream(backend, prompts, SamplingConfig(max_new_tokens=2)))  # warm-up (allocations, kernel choice)
    cfg = SamplingConfig(max_new_tokens=new_tokens)
    ttft, decode = float("inf"), 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        steps = stream(backend, prompts, cfg)
        next(steps)
        t1 = time.perf_counter()
        n = sum(1 for _ in steps)
        t2 = time.perf_counter()
        ttft = min(ttft, t1 - t0)
        if n:
            decode = max(decode, batch * n / (t2 - t1))
    return {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "ttft_s": ttft,
            "prefill_tps": batch * prompt_len / ttft, "decode_tps": decode}


def peak_memory(backend) -> dict:
    """Peak host RSS of this process, and on CUDA the device memory in use (all processes) and the KV buffers."""
    out = {"host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if hasattr(backend, "cache_bytes"):
        out["kv_buffers_mib"] = backend.cache_bytes / 2**20
    if str(getattr(backend, "device", "cpu")).startswith("cuda"):
        import torch
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            out["device_used_mib"] = (total - free) / 2**20
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_backend_arguments(p)
    p.add_argument("--prompt-length", type=int, default=None,
                   help="prompt tokens per row (default: 128, or the build's max_input_length when smaller; a longer "
                        "one is refused)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated per row (default: 64, or what the context leaves when less; more is refused)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes (default: 1 and min(8, the build's max_batch))")
    p.add_argument("--repeats", type=int, default=3, help="runs per batch size; the best is reported")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON here ('-': stdout)")


def run(args: argparse.Namespace) -> int:
    model = load_build(args, max_batch=None)
    backend = model.backend
    limit = getattr(backend, "max_batch", 8)
    batches = args.batch or sorted({1, min(8, limit)})
    if max(batches) > limit:
        raise GlmcError(f"--batch {max(batches)} exceeds the build's max_batch of {limit}")
    if args.repeats < 1 or min(batches) < 1:
        raise GlmcError("--repeats and --batch must be at least 1")
    max_input = min(int(getattr(backend, "max_input_length", backend.max_length)), backend.max_length - 1)
    prompt_len = min(128, max_input) if args.prompt_length is None else args.prompt_length
    if not 1 <= prompt_len <= max_input:
        raise GlmcError(f"--prompt-length {prompt_len}: the build takes prompts of 1 to {max_input} tokens (its "
                        f"max_input_length; {args.build})")
    room = backend.max_length - prompt_len
    new_tokens = min(64, room) if args.new_tokens is None else args.new_tokens
    if not 1 <= new_tokens <= room:
        raise GlmcError(f"--new-tokens {new_tokens}: after a prompt of {prompt_len} tokens the build's "
                        f"max_sequence_length of {backend.max_length} leaves room for 1 to {room} new tokens")
    vocab = getattr(backend, "vocab_size", None) or model.tokenizer.vocab_size
    console = Console(stderr=args.json == "-")
    rows = []
    for b in batches:
        with console.status(f"batch {b} ..."):
            rows.append(measure(backend, b, prompt_len, new_tokens, vocab, args.repeats))
    result = {"build": str(args.build), "backend": backend.name, "device": str(getattr(backend, "device", "cpu")),
              "target": getattr(backend, "path", None) and str(backend.path), "machine":
              f"{platform.machine()}, {os.cpu_count()} cores", "load_average": os.getloadavg(),
              "results": rows, "memory": peak_memory(backend)}
    table = Table(title=f"glmc bench {args.build} ({backend.name} on {result['device']})")
    for col in ("batch", "prompt", "new", "TTFT ms", "prefill tok/s", "decode tok/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), str(r["prompt_tokens"]), str(r["new_tokens"]), f"{1e3 * r['ttft_s']:.1f}",
                      f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.1f}")
    console.print(table)
    console.print("memory: " + ", ".join(f"{k} {v:.0f}" for k, v in result["memory"].items()))
    if args.json == "-":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
