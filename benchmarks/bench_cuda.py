"""Decode tokens/s of the cuda backend (glmc's own kernels + CUDA graphs) at ChatGLM3-6B shape against the
memory-bandwidth bound, for fp16, int8 (per channel) and int4 (group 128), batch 1 and 16; the int8 KV cache against
the fp16 one at batch 16 and an 8k context; and the torch.compile peers of issue 12, all in one process.

    python3 benchmarks/bench_cuda.py --out OUTDIR [--layers 28] [--tuned OUTDIR/tuned_h200.json] [--peers]
    python3 benchmarks/bench_cuda.py --report OUTDIR/cuda_results.json --out OUTDIR   # tables + plot again, no GPU
    python3 benchmarks/bench_cuda.py --out OUTDIR --versus NEW.json [--tuned OLD.json] --kv8 --peers   # two GEMV
                                                     # tables, each precision's decode rows timed in turn

Random fp16 weights are made on the GPU in memory (normal(0, 0.02), norms 1), then quantized on the GPU with
glmc.quantization (the same code the compile pipeline runs). Each run: prefill a 128-token prompt, one decode step
that captures the batch's CUDA graph, then NEW steps timed with CUDA events, each one graph replay plus three tiny
device updates (greedy ids stay on the device). The bound at batch 1: copy bandwidth over the bytes one step must
read (every linear with its scales and bias, the fp16 output layer, the KV cache at the mean context).

kv8 rows (`fp16 kv16 @8k` / `fp16 kv8 @8k`): fp16 weights, batch 16, the cache filled with random values (codes) up
to slot KV_CONTEXT - KV_NEW, then KV_NEW decode steps timed (mean context ~8k), the two caches' runs taken in turn
KV_REPEAT times and the median kept; int8 cache scales per KV head and channel. Cache bytes are the backend's whole
static cache (K and V, every layer, 16 rows, 8192 slots).

Peers (batch 1, prompt 128 + NEW, the same random fp16 weights through `hf_glm.to_transformers`), each decode step
`torch.compile(mode="reduce-overhead", fullgraph=True)` (CUDA graphs) over transformers' `GlmForCausalLM` with a
`StaticCache`, greedy on the device, as transformers' documentation writes the loop:
- fp16: the model as it is;
- int8: gpt-fast's `WeightOnlyInt8Linear` (int8 weights, one fp16 scale per output channel:
  `F.linear(x, w.to(x.dtype)) * scales`) for every block linear; output layer fp16 (as glmc's int8 build);
- int4: bf16 model, every block linear through torch's tinygemm `_weight_int4pack_mm` (gpt-fast's int4: group 128,
  asymmetric scale + zero, inner k tiles 8); output layer bf16.
fp8 (e4m3 weights with a per-row scale, activations with a static scale: glmc::fp8_linear) has no peer here.

--versus TABLE: for each precision two engines, one on the run's table (--tuned, else the shipped one) and one on
TABLE (a table decides each layer's layout when the engine is made and each GEMV's config when a batch's graph is
captured), then their decode rows timed in turn KV_REPEAT times, medians kept: a sweep's table against the shipped
one without the drift between separate runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT, NEW = 128, 256
KV_CONTEXT, KV_NEW, KV_BATCH, KV_REPEAT = 8192, 128, 16, 3
PRECISIONS = {"fp16": (16, 0), "int8": (8, 0), "int4-g128": (4, 128), "fp8": (8, -1)}  # fp8: e4m3 W8A8
PEERS = {"fp16": "transformers GlmForCausalLM + StaticCache, torch.compile",
         "int8": "gpt-fast WeightOnlyInt8Linear, torch.compile",
         "int4-g128": "tinygemm _weight_int4pack_mm bf16 g128, torch.compile"}


def random_model_on_gpu(layers: int, seed: int = 0, max_positions: int = PROMPT + NEW + 8):
    from glmc.modeling_patches import variant
    from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM

    cfg = variant("chatglm3-6b", num_layers=layers, hidden_size=4096, ffn_hidden_size=13696, num_heads=32,
                  head_dim=128, vocab_size=65024, seq_length=max(8192, max_positions))
    with torch.device("meta"):
        model = GLMForCausalLM(cfg, max_positions=max_positions)
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


def replay_step(g) -> None:
    """One decode step of a captured batch graph: the last step's greedy ids become the input, position and cache
    slot advance, the graph replays."""
    g.ids.copy_(g.next_ids)
    g.pos.add_(1)
    g.past.add_(1)
    g.graph.replay()


def decode_rate(backend, batch: int, new: int, context: int = 0) -> tuple[float, float]:
    """(tokens/s, ms per step) of `new` greedy decode steps after a PROMPT-token prefill, CUDA-graph replays. With
    `context`, the steps start at that cache slot, the cache before it filled with random values."""
    ids = torch.randint(100, 60000, (batch, PROMPT))
    mask = torch.ones(batch, PROMPT, dtype=torch.int64)
    pos = torch.arange(PROMPT)[None].expand(batch, -1)
    cache = backend.new_cache(batch)
    _, nxt = backend._forward(ids, pos, mask, cache)
    mask1 = torch.ones(batch, PROMPT + 1, dtype=torch.int64)
    _, nxt = backend._forward(nxt[:, None], pos[:, -1:] + 1, mask1, cache)  # captures this batch's graph
    g = backend.graphs[batch]
    if context:
        for c in (backend.k_cache, backend.v_cache):
            if c.dtype == torch.int8:
                c.random_(-100, 100)
            else:
                c.normal_(0.0, 1.0)
        g.past.fill_(context)
        g.pos.fill_(context)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(new):
        replay_step(g)
    e.record()
    e.synchronize()
    sec = s.elapsed_time(e) / 1e3
    return batch * new / sec, 1e3 * sec / new


def profile_decode(backend, steps: int = 16) -> dict:
    """Where a batch-1 decode step's GPU time goes: torch.profiler (CUPTI) over `steps` graph replays after
    decode_rate captured the graph; per kernel name (templates cut at '<'), calls and microseconds per step. With
    programmatic dependent launch kernels overlap, so the sum may exceed the step."""
    from torch.profiler import ProfilerActivity, profile
    g = backend.graphs[1]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay_step(g)
        torch.cuda.synchronize()
    rows: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(e.name.split("<")[0].split("(")[0], [0.0, 0.0])
            r[0] += 1 / steps
            r[1] += e.time_range.elapsed_us() / steps
    top = sorted(rows.items(), key=lambda kv: -kv[1][1])
    return {k: {"calls": round(c, 2), "us": round(us, 2)} for k, (c, us) in top}


def with_kv8(model, granularity: str = "channel"):
    """An int8 KV cache on `model` with fixed scales (speed does not depend on them): 0.05 / 127 per KV head and
    channel, as a calibrated absmax of 0.05 would give."""
    from glmc.modeling_patches.modeling_chatglm import enable_kv_int8
    c = model.config
    shape = {"tensor": (1,), "head": (c.num_kv_heads,), "channel": (c.num_kv_heads, c.head_dim)}[granularity]
    scales = [torch.full(shape, 0.05 / 127, device="cuda") for _ in range(c.num_layers)]
    enable_kv_int8(model, scales, [s.clone() for s in scales])
    return model


def engine(layers: int, prec: str, slots: int, batch: int, kv8: bool = False):
    """The cuda backend over a random model of `prec` weights (quantized on the GPU as the pipeline does), a KV cache
    of `slots` slots (int8 with `kv8`) for up to `batch` rows."""
    from glmc.quantization.weight_only import quantize_model
    from glmc.runtime.backend_cuda import CudaBackend
    bits, group = PRECISIONS[prec]
    model = random_model_on_gpu(layers, max_positions=slots)
    if prec == "fp8":
        model = fp8_model(model)
    elif bits != 16:
        quantize_model(model, bits, group)
    if kv8:
        with_kv8(model)
    return CudaBackend(model, max_batch=batch, max_length=slots, max_input_length=PROMPT)


def fp8_model(model):
    """fp8 weights and activations (glmc.quantization.fp8 through apply_scheme, as the pipeline runs it) on the
    float32 model, activation scales from 4 random 128-token samples."""
    from glmc.quantization.scheme import apply_scheme, parse_precision
    ids = [torch.randint(100, 60000, (1, PROMPT)) for _ in range(4)]
    return apply_scheme(model.float(), parse_precision("fp16+fp8"), ids)


# ---------------------------------------------------------------------------------------------- torch.compile peers

class Int8Linear(torch.nn.Module):
    """gpt-fast's WeightOnlyInt8Linear: int8 weights, a scale per output channel, dequantized in the matmul."""

    weight: torch.Tensor  # buffers (register_buffer in __init__)
    scales: torch.Tensor

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scales = w.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(lin.weight.dtype))
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight.to(dtype=x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias


class Int4Linear(torch.nn.Module):
    """gpt-fast's WeightOnlyInt4Linear: torch's tinygemm kernel, bf16, asymmetric groups of 128 along K."""

    weight: torch.Tensor  # buffers (register_buffer in __init__)
    scales_and_zeros: torch.Tensor

    def __init__(self, lin: torch.nn.Linear, group: int = 128, inner_k_tiles: int = 8):
        super().__init__()
        w = lin.weight.detach().float()
        n, k = w.shape
        wg = w.reshape(n, k // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scales = (hi - lo).clamp(min=1e-6) / 15
        zeros = lo + scales * 8
        q = ((wg - lo) / scales).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles))
        self.register_buffer("scales_and_zeros", torch.cat([scales.reshape(n, -1, 1), zeros.reshape(n, -1, 1)], 2)
                             .transpose(0, 1).contiguous().to(torch.bfloat16))
        self.group, self.out_features = group, n
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.group,
                                               self.scales_and_zeros).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def swap_linears(hf, make) -> float:
    """Every nn.Linear of the decoder layers -> make(linear); returns the first swap's relative output error."""
    err = None
    for layer in hf.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    new = make(lin)
                    if err is None:
                        with torch.no_grad():
                            x = torch.randn(4, lin.in_features, device=lin.weight.device, dtype=lin.weight.dtype)
                            ref = lin(x).float()
                            err = float((new(x).float() - ref).norm() / ref.norm())
                    setattr(parent, name, new)
    return err if err is not None else float("nan")


def peer_rate(hf, new: int) -> dict:
    """Batch-1 greedy decode tok/s of `hf` with a StaticCache, each step torch.compile'd (reduce-overhead)."""
    from transformers import StaticCache
    torch._dynamo.reset()
    dev = hf.device

    def decode_one(tok, cache_position, cache):
        logits = hf(tok, cache_position=cache_position, past_key_values=cache, return_dict=False, use_cache=True)[0]
        return torch.argmax(logits[:, -1], dim=-1)[:, None]
    step = torch.compile(decode_one, mode="reduce-overhead", fullgraph=True)
    out: dict = {}
    # one cache for both rounds: its tensors are static addresses of the CUDA graphs (a new cache would re-record)
    cache = StaticCache(config=hf.config, max_cache_len=PROMPT + new + 8)
    with torch.no_grad():
        for rnd in range(2):  # round 0 compiles (and is timed as compile time), round 1 is measured
            if rnd:
                cache.reset()
            ids = torch.randint(100, 60000, (1, PROMPT), device=dev)
            t0 = time.perf_counter()
            logits = hf(ids, cache_position=torch.arange(PROMPT, device=dev), past_key_values=cache,
                        return_dict=False, use_cache=True)[0]
            tok = torch.argmax(logits[:, -1], dim=-1)[:, None]
            pos = torch.tensor([PROMPT], device=dev)
            steps = 8 if rnd == 0 else new
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(steps):
                tok = step(tok.clone(), pos, cache)
                pos += 1
            e.record()
            e.synchronize()
            if rnd == 0:
                out["compile_s"] = time.perf_counter() - t0
            else:
                out["tok_s"] = new / (s.elapsed_time(e) / 1e3)
                out["ms_step"] = s.elapsed_time(e) / new
    return out


def run_peers(args, results: dict, save) -> None:
    from glmc.modeling_patches.hf_glm import to_transformers
    model = random_model_on_gpu(args.layers)
    with torch.device("cuda"):
        hf = to_transformers(model)
    del model
    torch.cuda.empty_cache()
    for prec in args.peers:
        t0 = time.time()
        try:
            run: dict = {"peer": PEERS[prec]}
            if prec == "int8":
                run["linear_rel_err"] = swap_linears(hf, Int8Linear)
            elif prec == "int4-g128":
                torch.nn.Module.to(hf, torch.bfloat16)
                run["linear_rel_err"] = swap_linears(hf, Int4Linear)
            run.update(peer_rate(hf, NEW))
            print(f"peer {prec} ({PEERS[prec]}): batch 1: {run['tok_s']:.1f} tok/s, {run['ms_step']:.3f} ms/step "
                  f"(compile + 8 steps {run['compile_s']:.0f} s; swapped linear rel err "
                  f"{run.get('linear_rel_err', 0):.2g})", flush=True)
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, the table still printed
            run = {"peer": PEERS[prec], "error": f"{type(e).__name__}: {e}"[-1500:]}
            print(f"peer {prec}: {run['error'][:400]}", flush=True)
        run["seconds"] = time.time() - t0
        results["peers"][prec] = run
        save()
        if prec == "int8" and "int4-g128" in args.peers:  # int4 starts from float weights again
            del hf
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
            model = random_model_on_gpu(args.layers)
            with torch.device("cuda"):
                hf = to_transformers(model)
            del model


# ---------------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("cuda-out"))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--tuned", type=Path, help="GEMV config table (bench_kernels.py's tuned_h200.json)")
    ap.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--cache-slots", type=int, default=PROMPT + NEW + 8,
                    help="KV cache length of the decode rows' engines (default: just the run's tokens; a user's "
                         "engine holds the model's whole context, 8192 slots for ChatGLM3-6B)")
    ap.add_argument("--kv8", nargs="*", default=["fp16"], choices=["fp16", "int8", "int4-g128"],
                    help="weights of the kv8 rows (fp16 vs int8 cache at batch 16, 8k context); none to skip")
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS),
                    help="torch.compile peers to run (batch 1); none to skip")
    ap.add_argument("--versus", type=Path, metavar="TABLE",
                    help="a second GEMV config table: each precision's decode rows on both tables, timed in turn")
    ap.add_argument("--copy-bw", type=float, help="bytes/s (else measured)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile 16 batch-1 steps of each precision (torch.profiler); print the N costliest kernels")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="no run: print the tables and write the plot of a saved cuda_results.json into --out")
    args = ap.parse_args()
    if args.report:
        args.out.mkdir(parents=True, exist_ok=True)
        report(json.loads(args.report.read_text()), args.out)
        return 0
    for flag, path in (("--tuned", args.tuned), ("--versus", args.versus)):
        if path is not None and not path.is_file():
            ap.error(f"{flag} {path}: no such file (a GEMV config table, bench_kernels.py's tuned_h200.json)")
    if args.tuned:
        use_table(args.tuned)
    from benchmarks.bench_kernels import copy_bandwidth

    args.out.mkdir(parents=True, exist_ok=True)
    bw = args.copy_bw or copy_bandwidth()
    results = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "copy_bw": bw,
               "layers": args.layers, "cache_slots": args.cache_slots, "command": " ".join(sys.argv), "runs": {},
               "kv8": {}, "peers": {}}

    def save() -> None:
        (args.out / "cuda_results.json").write_text(json.dumps(results, indent=1) + "\n")

    def one(prec: str) -> dict:
        t0 = time.time()
        backend = engine(args.layers, prec, args.cache_slots, max(args.batches))
        cfg = backend.config
        kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * (PROMPT + NEW // 2)
        bound = bw / (backend.weight_bytes + kv_bytes)
        gc.collect()  # what the engine holds on the device once the model it was made from is gone
        run = {"weight_bytes": backend.weight_bytes, "bound_b1": bound, "build_s": time.time() - t0,
               "device_bytes": torch.cuda.memory_allocated()}
        lay = backend.layers[0]
        run["layouts"] = {n: "tiles" if getattr(lay, n).tiled else "rows" for n in ("qkv", "dense", "up", "down")}
        print(prec, f"engine: {run['device_bytes'] / 2**30:.2f} GiB on the device (weights read per step "
              f"{backend.weight_bytes / 2**30:.2f} GiB, KV cache {backend.cache_bytes / 2**30:.2f} GiB); layouts "
              f"{run['layouts']}{', SwiGLU epilogue' if lay.swiglu_fused else ''}", flush=True)
        for b in args.batches:
            tps, ms = decode_rate(backend, b, NEW)
            run[f"b{b}"] = {"tok_s": tps, "ms_step": ms}
            print(prec, f"batch {b}: {tps:.1f} tok/s, {ms:.3f} ms/step" +
                  (f", {100 * tps / bound:.0f}% of bound {bound:.1f}" if b == 1 else ""), flush=True)
            if b == 1 and args.profile:
                run["profile_b1"] = prof = profile_decode(backend)
                total = sum(r["us"] for r in prof.values())
                print(f"  {prec} batch 1 profile: kernels {total:.0f} us per step of {1e3 * ms:.0f}")
                for name, r in list(prof.items())[:args.profile]:
                    print(f"  {r['us']:8.1f} us {r['calls']:6.1f}x  {name}")
        return run

    for prec in args.precisions if args.versus else ():
        try:
            results.setdefault("versus", {})[prec] = versus(args, prec)
        except Exception as e:  # noqa: BLE001 - reported; the other rows still run
            results.setdefault("errors", {})[f"{prec} versus"] = f"{type(e).__name__}: {e}"[-1500:]
            print(f"{prec} versus: {results['errors'][f'{prec} versus'][:400]}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        save()
    for prec in args.precisions if not args.versus else ():
        try:
            results["runs"][prec] = one(prec)
        except Exception as e:  # noqa: BLE001 - reported; the other rows still run
            results.setdefault("errors", {})[prec] = f"{type(e).__name__}: {e}"[-1500:]
            print(f"{prec}: {results['errors'][prec][:400]}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        save()
    for prec in args.kv8:  # both caches built, then timed in turn KV_REPEAT times: drift hits both alike
        backends: dict = {}
        try:
            for kv in ("kv16", "kv8"):
                backends[kv] = engine(args.layers, prec, KV_CONTEXT, KV_BATCH, kv8=kv == "kv8")
            rates = in_turn(backends, lambda be: decode_rate(be, KV_BATCH, KV_NEW, context=KV_CONTEXT - KV_NEW - 8))
            for kv, backend in backends.items():
                tps, ms = sorted(rates[kv])[len(rates[kv]) // 2]
                name = f"{prec} {kv} @{KV_CONTEXT // 1024}k"
                results["kv8"][name] = {"tok_s": tps, "ms_step": ms, "cache_bytes": backend.cache_bytes,
                                        "weight_bytes": backend.weight_bytes, "batch": KV_BATCH,
                                        "context": KV_CONTEXT - KV_NEW // 2 - 8,
                                        "runs_tok_s": [r[0] for r in rates[kv]]}
                print(f"{name}: batch {KV_BATCH}: {tps:.1f} tok/s (median of {KV_REPEAT}: "
                      f"{', '.join(f'{r[0]:.0f}' for r in rates[kv])}), {ms:.3f} ms/step, cache "
                      f"{backend.cache_bytes / 2**30:.2f} GiB", flush=True)
        except Exception as e:  # noqa: BLE001 - reported; the peers still run
            results.setdefault("errors", {})[f"{prec} kv"] = f"{type(e).__name__}: {e}"[-1500:]
            print(f"{prec} kv rows: {results['errors'][f'{prec} kv'][:400]}", flush=True)
        backends.clear()
        gc.collect()
        torch.cuda.empty_cache()
        save()
    if args.peers:
        run_peers(args, results, save)
    save()
    report(results, args.out)
    return 0


def in_turn(backends: dict, rate) -> dict[str, list]:
    """rate(backend) of every backend, KV_REPEAT rounds taken in turn (drift between runs hits them all alike)."""
    runs: dict[str, list] = {name: [] for name in backends}
    for _ in range(KV_REPEAT):
        for name, backend in backends.items():
            runs[name].append(rate(backend))
    return runs


def use_table(path: Path | None) -> None:
    """GEMV configs from `path` (None: the shipped table) for the engines made and the graphs captured from now on."""
    from glmc.kernels import quantized_linear
    os.environ["GLMC_GEMV_TUNED"] = str(path or quantized_linear.TUNED_FILE)
    quantized_linear._TUNED = None


def versus(args, prec: str) -> dict:
    """One precision's decode rows on the run's table and on args.versus: both engines made and their graphs
    captured each under its own table, then timed in turn KV_REPEAT times (median)."""
    tables = {"tuned": args.tuned, "versus": args.versus}
    backends = {}
    for name, path in tables.items():
        use_table(path)
        backends[name] = engine(args.layers, prec, args.cache_slots, max(args.batches))
        for b in args.batches:
            decode_rate(backends[name], b, 8)  # captures this batch's graph with this table's configs
    use_table(args.tuned)
    out: dict = {"tables": {k: str(v or "shipped") for k, v in tables.items()}}
    for b in args.batches:
        rates = in_turn(backends, lambda be, b=b: decode_rate(be, b, NEW)[0])
        med = {name: sorted(rates[name])[KV_REPEAT // 2] for name in tables}
        out[f"b{b}"] = {name: {"tok_s": med[name], "runs_tok_s": rates[name]} for name in tables}
        print(f"{prec} batch {b}: {med['tuned']:.1f} tok/s ({tables['tuned'] or 'shipped'}) vs {med['versus']:.1f} "
              f"({tables['versus']}), {100 * (med['versus'] / med['tuned'] - 1):+.1f}% (median of {KV_REPEAT} in "
              f"turn: {', '.join(f'{r:.0f}' for r in rates['tuned'])} vs "
              f"{', '.join(f'{r:.0f}' for r in rates['versus'])})", flush=True)
    return out


def report(results: dict, out: Path) -> None:
    """The run's tables (stdout) and plot (OUT/cuda_decode.png: batch-1 tok/s per build against the bound and the
    torch.compile peer; skipped without matplotlib), from a cuda_results.json's contents."""
    bw = results["copy_bw"]
    print(f"\n{results['gpu']}, {results['date']}, {results['layers']} layers, copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"prompt {PROMPT} + {NEW} new tokens")
    print("| build | decode b1 tok/s | bound b1 | % of bound | ms/step b1 | decode b16 tok/s | torch.compile peer b1 "
          "tok/s | x peer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for prec, r in results["runs"].items():
        b1, b16 = r.get("b1", {}), r.get("b16", {})
        tps = b1.get("tok_s", 0.0)
        peer = results["peers"].get(prec, {}).get("tok_s")
        vs = (f"{peer:.1f} | {tps / peer:.2f}x") if peer else "- | -"
        print(f"| {prec} | {tps:.1f} | {r['bound_b1']:.1f} | {100 * tps / r['bound_b1']:.0f}% | "
              f"{b1.get('ms_step', 0):.3f} | {b16.get('tok_s', 0):.0f} | {vs} |")
    for prec, r in results.get("versus", {}).items():
        t = r["tables"]
        print(f"\n| {prec}: batch | tok/s, {t['tuned']} | tok/s, {t['versus']} | change | runs in turn |")
        print("| --- | --- | --- | --- | --- |")
        for b, v in ((k, v) for k, v in r.items() if k != "tables"):
            a, z = v["tuned"]["tok_s"], v["versus"]["tok_s"]
            print(f"| {b[1:]} | {a:.1f} | {z:.1f} | {100 * (z / a - 1):+.1f}% | "
                  f"{' '.join(f'{x:.0f}' for x in v['tuned']['runs_tok_s'])} vs "
                  f"{' '.join(f'{x:.0f}' for x in v['versus']['runs_tok_s'])} |")
    if results["kv8"]:
        print(f"\n| KV cache (batch {KV_BATCH}, context ~{KV_CONTEXT}) | decode tok/s | ms/step | cache GiB |")
        print("| --- | --- | --- | --- |")
        for name, r in results["kv8"].items():
            print(f"| {name} | {r['tok_s']:.0f} | {r['ms_step']:.3f} | {r['cache_bytes'] / 2**30:.2f} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [p for p, r in results["runs"].items() if "b1" in r]
    if not names:  # a --versus run: no decode table to plot
        return
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = [("glmc cuda engine", [results["runs"][n]["b1"]["tok_s"] for n in names]),
            ("torch.compile peer", [results["peers"].get(n, {}).get("tok_s", 0) for n in names]),
            ("bandwidth bound", [results["runs"][n]["bound_b1"] for n in names])]
    for i, (label, vals) in enumerate(bars):
        ax.bar([j + (i - 1) * 0.27 for j in x], vals, 0.27, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title(f"ChatGLM3-6B shape, {results['layers']} layers, {results['gpu']}, {results['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cuda_decode.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
