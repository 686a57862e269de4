"""Decode tokens/s of the cuda backend (glmc's Triton kernels + CUDA graphs) at ChatGLM3-6B shape against the
memory-bandwidth bound, for fp16, int8 (per channel) and int4 (group 128), batch 1 and 16.

    python3 benchmarks/bench_cuda.py --out OUTDIR [--layers 28] [--tuned OUTDIR/tuned_h200.json]

Random fp16 weights are made on the GPU in memory (normal(0, 0.02), norms 1), then quantized on the GPU with
glmc.quantization (the same code the compile pipeline runs). Each run: prefill a 128-token prompt, one decode step
that captures the batch's CUDA graph, then NEW steps timed with CUDA events, each one graph replay plus three tiny
device updates (greedy ids stay on the device). The bound at batch 1: copy bandwidth over the bytes one step must
read (every linear with its scales and bias, the fp16 output layer, the KV cache at the mean context).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT, NEW = 128, 256
PRECISIONS = {"fp16": (16, 0), "int8": (8, 0), "int4-g128": (4, 128)}


def random_model_on_gpu(layers: int, seed: int = 0):
    from glmc.modeling_patches import variant
    from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM

    cfg = variant("chatglm3-6b", num_layers=layers, hidden_size=4096, ffn_hidden_size=13696, num_heads=32,
                  head_dim=128, vocab_size=65024, seq_length=8192)
    with torch.device("meta"):
        model = GLMForCausalLM(cfg, max_positions=PROMPT + NEW + 8)
    model = model.to_empty(device="cuda").to(torch.float16)
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.init_rotary("cuda")
    return model.eval()


def decode_rate(backend, batch: int, new: int) -> tuple[float, float]:
    """(tokens/s, ms per step) of `new` greedy decode steps after a PROMPT-token prefill, CUDA-graph replays."""
    ids = torch.randint(100, 60000, (batch, PROMPT))
    mask = torch.ones(batch, PROMPT, dtype=torch.int64)
    pos = torch.arange(PROMPT)[None].expand(batch, -1)
    cache = backend.new_cache(batch)
    _, nxt = backend._forward(ids, pos, mask, cache)
    mask1 = torch.ones(batch, PROMPT + 1, dtype=torch.int64)
    _, nxt = backend._forward(nxt[:, None], pos[:, -1:] + 1, mask1, cache)  # captures this batch's graph
    g = backend.graphs[batch]
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(new):
        g.ids.copy_(g.next_ids)
        g.pos.add_(1)
        g.past.add_(1)
        g.graph.replay()
    e.record()
    e.synchronize()
    sec = s.elapsed_time(e) / 1e3
    return batch * new / sec, 1e3 * sec / new


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("cuda-out"))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--tuned", type=Path, help="GEMV config table (bench_kernels.py's tuned_h200.json)")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--copy-bw", type=float, help="bytes/s (else measured)")
    args = ap.parse_args()
    if args.tuned:
        os.environ["GLMC_GEMV_TUNED"] = str(args.tuned)
    from benchmarks.bench_kernels import copy_bandwidth
    from glmc.quantization.weight_only import quantize_model
    from glmc.runtime.backend_cuda import CudaBackend

    args.out.mkdir(parents=True, exist_ok=True)
    bw = args.copy_bw or copy_bandwidth()
    results = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "copy_bw": bw,
               "layers": args.layers, "command": " ".join(sys.argv), "runs": {}}
    for prec in args.precisions:
        bits, group = PRECISIONS[prec]
        t0 = time.time()
        model = random_model_on_gpu(args.layers)
        if bits != 16:
            quantize_model(model, bits, group)
        backend = CudaBackend(model, max_batch=max(args.batches), max_length=PROMPT + NEW + 8)
        del model
        cfg = backend.config
        kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * (PROMPT + NEW // 2)
        bound = bw / (backend.weight_bytes + kv_bytes)
        run = {"weight_bytes": backend.weight_bytes, "bound_b1": bound, "build_s": time.time() - t0}
        for b in args.batches:
            tps, ms = decode_rate(backend, b, NEW)
            run[f"b{b}"] = {"tok_s": tps, "ms_step": ms}
            print(prec, f"batch {b}: {tps:.1f} tok/s, {ms:.3f} ms/step" +
                  (f", {100 * tps / bound:.0f}% of bound {bound:.1f}" if b == 1 else ""), flush=True)
        results["runs"][prec] = run
        del backend
        torch.cuda.empty_cache()
        (args.out / "cuda_results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{results['gpu']}, {results['date']}, {args.layers} layers, copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"prompt {PROMPT} + {NEW} new tokens")
    print("| build | decode b1 tok/s | bound b1 | % of bound | ms/step b1 | decode b16 tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for prec, r in results["runs"].items():
        b1, b16 = r.get("b1", {}), r.get("b16", {})
        print(f"| {prec} | {b1.get('tok_s', 0):.1f} | {r['bound_b1']:.1f} | "
              f"{100 * b1.get('tok_s', 0) / r['bound_b1']:.0f}% | {b1.get('ms_step', 0):.3f} | "
              f"{b16.get('tok_s', 0):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
