"""Benchmark the torch model: decode tokens/s against transformers' GlmForCausalLM, and checkpoint-loading peak memory.

    python benchmarks/bench_modeling.py            # ~100M-param decode race + ~1B-param sharded load
    python benchmarks/bench_modeling.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from glmc.modeling_patches import variant
from glmc.modeling_patches.checkpoint import random_model, write_random_checkpoint
from glmc.modeling_patches.hf_glm import TransformersBackend, to_transformers
from glmc.runtime.backend_torch import TorchBackend
from glmc.runtime.generate import SamplingConfig, generate

DECODE_SHAPE = dict(num_layers=6, hidden_size=1024, ffn_hidden_size=3424, num_heads=8, head_dim=128, vocab_size=8192,
                    seq_length=1024)  # ~96M parameters, GLM proportions (head_dim 128, 2 KV groups)
LOAD_SHAPE = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=6848, num_heads=16, head_dim=128,
                  vocab_size=65024, seq_length=4096)  # ~1.09B parameters


def decode_race(backends: dict, prompt_len: int, new_tokens: int, rounds: int = 3) -> dict[str, float]:
    """Decode tokens/s per backend, best of `rounds`; the backends take turns so that load changes hit all alike."""
    prompt = [[(i * 37) % 8000 + 1 for i in range(prompt_len)]]
    cfg = SamplingConfig(max_new_tokens=new_tokens)
    best = {name: 0.0 for name in backends}
    for b in backends.values():
        generate(b, prompt, SamplingConfig(max_new_tokens=4))  # warm-up
    for _ in range(rounds):
        for name, b in backends.items():
            t0 = time.perf_counter()
            out = generate(b, prompt, cfg)
            best[name] = max(best[name], len(out[0]) / (time.perf_counter() - t0))
    return best


# Peak RSS of a fresh process: VmHWM belongs to the process image (reset by exec). ru_maxrss is not: a child
# started from a large parent inherits the parent's high-water mark.
HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"


def load_peak(ckpt: str, dtype: str) -> dict:
    """Load in a fresh process and report its peak RSS."""
    code = (f"import time, torch; torch.set_num_threads(2); from glmc.modeling_patches import load_model; "
            f"t = time.perf_counter(); m = load_model({ckpt!r}, dtype={dtype!r}); t = time.perf_counter() - t; "
            f"import json; print(json.dumps({{'seconds': t, 'peak_rss': {HWM}, "
            f"'params': sum(p.numel() for p in m.parameters())}}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    dshape, lshape = dict(DECODE_SHAPE), dict(LOAD_SHAPE)
    if args.quick:
        dshape.update(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_heads=2)
        lshape.update(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_heads=2, vocab_size=4096)
    console = Console()
    results: dict = {"machine": "2-core x86-64 CPU, 24 GiB, no GPU", "torch": torch.__version__}

    cfg = variant("chatglm3-6b", **dshape)
    model = random_model(cfg, std=0.02)
    params = sum(p.numel() for p in model.parameters())
    race = decode_race({"ours": TorchBackend(model),
                        "theirs": TransformersBackend(to_transformers(model), cfg.seq_length)}, 16, args.new_tokens)
    ours, theirs = race["ours"], race["theirs"]
    results["decode"] = {"params": params, "glmc_torch_tps": ours, "transformers_tps": theirs}
    t = Table(title=f"Decode, batch 1, prompt 16, {args.new_tokens} new tokens, fp32, {params / 1e6:.0f}M params")
    for col in ("implementation", "tokens/s", "vs transformers"):
        t.add_column(col)
    t.add_row("glmc torch (GLMForCausalLM)", f"{ours:.1f}", f"{ours / theirs:.2f}x")
    t.add_row("transformers GlmForCausalLM", f"{theirs:.1f}", "1.00x")
    console.print(t)

    lcfg = variant("chatglm3-6b", **lshape)
    with tempfile.TemporaryDirectory() as d:
        write_random_checkpoint(lcfg, d, dtype=torch.float16, shard_bytes=500 << 20)
        size = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
        shards = len(list(Path(d).glob("*.safetensors")))
        rows = {dt: load_peak(d, dt) for dt in ("float16", "float32")}
    base = load_peak_baseline()
    t = Table(title=f"Loading a {lcfg.num_parameters / 1e9:.2f}B-param fp16 checkpoint ({shards} safetensors shards, "
                    f"{size / 2**30:.2f} GiB)")
    for col in ("target dtype", "model bytes", "peak RSS", "peak - python/torch baseline", "ratio to model", "seconds"):
        t.add_column(col)
    results["load"] = {"checkpoint_bytes": size, "shards": shards, "baseline_rss": base, "runs": {}}
    for dt, r in rows.items():
        model_bytes = r["params"] * (2 if dt == "float16" else 4)
        extra = r["peak_rss"] - base
        results["load"]["runs"][dt] = {**r, "model_bytes": model_bytes}
        t.add_row(dt, f"{model_bytes / 2**30:.2f} GiB", f"{r['peak_rss'] / 2**30:.2f} GiB", f"{extra / 2**30:.2f} GiB",
                  f"{extra / model_bytes:.2f}", f"{r['seconds']:.1f}")
    console.print(t)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def load_peak_baseline() -> int:
    code = f"import torch, glmc.modeling_patches; print({HWM})"
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main()
