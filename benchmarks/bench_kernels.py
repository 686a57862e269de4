"""Micro-benchmarks of glmc.kernels against the memory-bandwidth bound (bytes moved / measured copy bandwidth), and
the GEMV config sweep whose winners become glmc/kernels/tuned_h200.json.

    python3 benchmarks/bench_kernels.py --out OUTDIR            # on a CUDA machine with triton
    python3 benchmarks/bench_kernels.py --out OUTDIR --precisions int8 int4-g128   # sweep those; keep the rest of
                                                                 # the shipped table (--base-tuned)

Prints one table (kernel, shape, us, GB/s, % of copy bandwidth) and writes OUTDIR/kernels.json and
OUTDIR/tuned_h200.json. Shapes: ChatGLM3-6B's (hidden 4096, ffn 13696, 32 heads / 2 KV groups, head dim 128,
vocab 65024). Weights are rotated among copies totalling > 4x the L2 so that no timing reads from the cache. The
sweep picks each GEMV config by the time of the GEMV together with the kernel that reads its partials (`--alone`:
the GEMV by itself, as the tables up to 2026-12-02 were picked); the table's row is the winner's GEMV alone.
"""

# ruff: noqa: B023 - every lambda here is timed (called) before its loop variables change
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

H, FFN, HQ, HKV, D, V = 4096, 13696, 32, 2, 128, 65024
LINEARS = {"qkv": ((HQ + 2 * HKV) * D, H), "dense": (H, HQ * D), "h_to_4h": (2 * FFN, H), "4h_to_h": (H, FFN),
           "output": (V, H)}
PRECISIONS = {"fp16": (16, 0), "int8": (8, 0), "int4-g128": (4, 128)}
L2_BYTES = 60 << 20


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written, median of 20 (bytes/s)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(23):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() / sorted(times[3:])[len(times[3:]) // 2]


def bench(fn, rotate: int = 1) -> float:
    """Seconds per call of fn(i), inputs i rotating: calls captured back to back in a CUDA graph (as the backend
    runs them: no host launch time), median over 15 replays of the graph, after warm-up."""
    reps = max(rotate, 10)
    for i in range(2):
        fn(i % rotate)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(reps):
            fn(r % rotate)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def make_linear(n: int, k: int, bits: int, group: int):
    from glmc.kernels.quantized_linear import PackedLinear, int4_words, words_ok
    from glmc.modeling_patches.ops.quantized_linear import pack_int4
    from glmc.quantization.weight_only import quantize_weight

    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    if bits == 16:
        return PackedLinear(w, None, None, 16, 0, n, k)
    q, s = quantize_weight(w, bits, group, scale_dtype=torch.float16)
    lin = PackedLinear(q if bits == 8 else pack_int4(q), s, None, bits, group, n, k)
    if bits == 4 and words_ok(4, k):
        int4_words(lin)  # as pack_linear does: the interleaved words exist before any graph capture
    return lin


def word_candidates(m: int, bits: int, group: int, n: int, k: int) -> set:
    """The `wo` (M = 1) and `wodot` (int4, M = 16) configs tried: tile shapes x split-K chosen for 2 to 16 programs
    per SM (the word kernels are latency-bound: more warps in flight read faster) x prefetch of the next tile."""
    from glmc.kernels.quantized_linear import GemvConfig
    out = set()

    def splits(bn: int, bk: int) -> set[int]:
        tiles = -(-n // bn)
        return {max(1, min(k // bk, round(p * 132 / tiles))) for p in (2, 4, 8, 16)}
    if m == 1:
        bk = min(group or 256, 256 if bits == 8 else 128)
        for bn, warps in ((32, 4), (64, 4), (128, 4), (128, 8)):
            for split in splits(bn, bk):
                for prefetch in (False, True):
                    out.add(GemvConfig("wo", bn, bk, split, warps, 3, False, prefetch))
    elif bits == 4 and group in (0, 128):
        for bn in (64, 128):
            for split in splits(bn, 128):
                out.add(GemvConfig("wodot", bn, 128, split, 4, 3))
    return out


def mma_candidates(m: int, bits: int, group: int, n: int, k: int) -> set:
    """The `mma` configs tried: 8-row blocks per warp x spans per round x warps per program x split-K sized for 8 to
    64 warps per SM x the op's rows or 512-byte tiles, with 256-byte L2 lines (3% faster on the median config in the
    2026-12-02 PDL visit)."""
    from glmc.kernels.quantized_linear import MMA_SPAN, GemvConfig
    span = MMA_SPAN[bits]
    spans = k // span
    out = set()
    for rows in (1, 2, 4):
        warps_n = -(-n // (8 * rows))
        for stages in (2, 4):
            for warps in (4, 8):
                for p in (8, 16, 32, 64):
                    split = max(1, min(spans // stages, round(p * 132 / warps_n)))
                    for tiled in (False, True):
                        out.add(GemvConfig("mma", 8 * rows, span, split, warps, stages, False, True, tiled))
    return out


def layout_for(cfg, copies: list, tiled: dict) -> list:
    """The weight copies in the layout `cfg` was made for: the op's rows, or (a tiled mma config) the same copies
    as tile_layer makes them, made once per shape into `tiled`."""
    from glmc.kernels.quantized_linear import tile_layer
    if not (cfg.variant == "mma" and cfg.tiled):
        return copies
    if not tiled:
        tiled["copies"] = [tile_layer(c) for c in copies]
    return tiled["copies"]


def candidates(m: int, bits: int, group: int, n: int, k: int, words_only: bool = False,
               base_tuned: dict | None = None, mma_only: bool = False) -> list:
    """Configs to time: the old variants' grid (or, with words_only, only the base table's winner) plus the word
    variants for int8/int4; with mma_only, the base table's winner and the `mma` configs."""
    from glmc.kernels.quantized_linear import GemvConfig, config_key, default_config
    base = default_config(m, n, k, bits, group)
    out = {base}
    hit = (base_tuned or {}).get(config_key(m, n, k, bits, group))
    if hit:
        out.add(GemvConfig(*hit))
    if mma_only:  # plus the Triton default: a table even where no mma config is right
        out |= {default_config(m, n, k, bits, group, mma=False)} | mma_candidates(m, bits, group, n, k)
        return sorted(out,
                      key=lambda c: (c.variant, c.block_n, c.block_k, c.split, c.num_warps, c.num_stages))
    if bits != 16:
        out |= word_candidates(m, bits, group, n, k)
    if words_only:
        return sorted(out, key=lambda c: (c.variant, c.block_n, c.block_k, c.split))
    bks = [64, 128] if bits == 16 else ([128, 256] if not group else [min(128, group)])
    for bk in bks:
        for bn, variant in ([(16, "fma"), (32, "fma"), (64, "fma"), (32, "dot"), (64, "dot")] if m == 1
                            else [(32, "dot"), (64, "dot"), (128, "dot")]):
            if variant == "dot" and bk < (32 if bits == 4 else 16):
                continue
            tiles = -(-n // bn)
            for split in sorted({1, 2, max(1, min(8, 2 * 132 // tiles))}):
                if k // (bk * split) < 2:
                    continue
                for magic in ((False,) if bits == 16 else (False, True)):
                    out.add(GemvConfig(variant, bn, bk, split, 4, 2 if variant == "fma" else 3, magic))
    return sorted(out, key=lambda c: (c.variant, c.block_n, c.block_k, c.split))


def consumer_of(name: str, m: int):
    """The kernel that reads a linear's split-K partials in the decode step (qkv: rotary + append; dense and 4h_to_h:
    add + RMSNorm; h_to_4h: SwiGLU; output: logits + argmax), as a function of the partials. Those kernels read the
    splits a few at a time (partials.sum_partials), so a split that makes the GEMV faster can make the pair
    slower."""
    from glmc.kernels import norm, rotary, sampling
    from glmc.modeling_patches.ops.attention import rotary_tables
    dt = torch.float16
    if name in ("dense", "4h_to_h"):
        res = torch.zeros(m, H, device="cuda", dtype=dt)
        w = torch.ones(H, device="cuda", dtype=dt)
        out = torch.empty_like(res)
        return lambda part: norm.add_rmsnorm(part, res, w, 1e-5, out=out)
    if name == "h_to_4h":
        act = torch.empty(m, FFN, device="cuda", dtype=dt)
        return lambda part: norm.swiglu(part, dt, out=act)
    if name == "qkv":
        cos, sin = (t.to("cuda", dt) for t in rotary_tables(D // 2, 8192, 10000.0))
        kc = torch.zeros(m, HKV, 512, D, device="cuda", dtype=dt)
        vc = torch.zeros_like(kc)
        bias = torch.zeros((HQ + 2 * HKV) * D, device="cuda", dtype=dt)
        pos = torch.full((m,), 200, device="cuda", dtype=torch.int64)
        past = torch.tensor([200], device="cuda", dtype=torch.int32)
        q = torch.empty(m, HQ * D, device="cuda", dtype=dt)
        return lambda part: rotary.qkv_rotary_append(part, bias, pos, cos, sin, kc, vc, past, 1, HQ, HKV, q_out=q)
    return lambda part: sampling.logits_argmax(part, dt)


def sweep_gemv(bw: float, rows: list, tuned: dict, quick: bool, precisions: list[str], words_only: bool = False,
               base_tuned: dict | None = None, save=None, mma_only: bool = False, alone: bool = False) -> None:
    """Per linear, precision and M: every candidate config checked against the reference, then timed with the
    kernel that consumes its partials (`consumer_of`; GEMV alone with `alone`); the fastest goes into the table."""
    from glmc.kernels.quantized_linear import config_key, dequantize, gemv_partials
    for prec, (bits, group) in PRECISIONS.items():
        if prec not in precisions:
            continue
        for name, (n, k) in LINEARS.items():
            if name == "output" and bits != 16:
                continue
            lin0 = make_linear(n, k, bits, group)
            nbytes = lin0.nbytes
            copies = [lin0] + [make_linear(n, k, bits, group) for _ in range(max(0, 4 * L2_BYTES // nbytes))]
            tiled: dict = {}
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = x.float() @ dequantize(lin0).float().T
                use = (lambda part: part) if alone else consumer_of(name, m)
                best = None
                cands = candidates(m, bits, group, n, k, words_only, base_tuned, mma_only)
                if quick:
                    cands = cands[:1]
                for cfg in cands:
                    try:
                        pool = layout_for(cfg, copies, tiled)
                        got = gemv_partials(x, pool[0], cfg).sum(0)
                        err = float((got - ref).norm() / ref.norm())
                        if not err < 5e-3:  # a wrong kernel is never a winner
                            print("WRONG", name, prec, m, cfg, f"rel {err:.3g}", flush=True)
                            continue
                        t = bench(lambda i, cfg=cfg, pool=pool: use(gemv_partials(x, pool[i], cfg)), len(pool))
                    except Exception as e:  # noqa: BLE001 - a config that does not compile or run is skipped
                        print("skip", name, prec, m, cfg, type(e).__name__, str(e)[:100], flush=True)
                        continue
                    print(f"  {name} {prec} M={m} {cfg}: {t * 1e6:.1f} us", flush=True)
                    if best is None or t < best[0]:
                        best = (t, cfg)
                assert best is not None
                t_pair, cfg = best
                tuned[config_key(m, n, k, bits, group)] = list(dataclasses.astuple(cfg))
                if save is not None:
                    save()  # after every winner: a sweep cut short still leaves its table
                pool = layout_for(cfg, copies, tiled)
                t = t_pair if alone else bench(lambda i, cfg=cfg: gemv_partials(x, pool[i], cfg), len(pool))
                moved = nbytes + m * k * 2 + cfg.split * m * n * 4
                rows.append(dict(kernel=f"gemv {prec} M={m}", shape=f"{name} {n}x{k}", us=t * 1e6,
                                 gbs=moved / t / 1e9, pct=100 * moved / t / bw, config=str(cfg),
                                 tried=len(cands), with_consumer_us=None if alone else t_pair * 1e6))
                print(rows[-1], flush=True)
                if name == "h_to_4h" and mma_only:
                    sweep_swiglu(bw, rows, tuned, x, copies, t_pair if not alone else None, cfg)
                    if save is not None:
                        save()
            copies.clear()
            tiled.clear()


def sweep_swiglu(bw: float, rows: list, tuned: dict, x, copies: list, t_pair: float | None, cfg_gemv) -> None:
    """dense_h_to_4h with the SwiGLU epilogue (rows interleaved, split 1; mma configs on rows and tiles, and at M = 1
    the word GEMV's) against the best plain GEMV + the SwiGLU kernel (t_pair, timed together; None: timed here one
    after the other): the fused config goes into the table (key + "_swiglu") only when it wins."""
    from glmc.kernels.norm import swiglu
    from glmc.kernels.quantized_linear import (
        MMA_SPAN,
        GemvConfig,
        config_key,
        gate_up_swiglu,
        gemv_partials,
        interleave_gate_up,
        words_ok,
    )
    lin0 = copies[0]
    m, n, k = x.shape[0], lin0.n, lin0.k
    part = gemv_partials(x, lin0, cfg_gemv)
    t_act = bench(lambda i: swiglu(part, x.dtype))
    if t_pair is None:
        t_pair = bench(lambda i: gemv_partials(x, copies[i], cfg_gemv), len(copies)) + t_act
    ref = swiglu(part, x.dtype).float()
    inter = [interleave_gate_up(c) for c in copies]
    tiled: dict = {}
    best = None
    cands = [GemvConfig("mma", 8 * r, MMA_SPAN[lin0.bits], 1, warps, stages, False, True, tiles)
             for r, warps, stages, tiles in itertools.product((1, 2, 4), (4, 8), (2, 4), (False, True))]
    if m == 1 and words_ok(lin0.bits, k):  # the word GEMV's epilogue (split 1)
        bk = min(lin0.group_size or 256, 256 if lin0.bits == 8 else 128)
        cands += [GemvConfig("wo", bn, bk, 1, warps, 3, False, prefetch)
                  for bn, warps, prefetch in itertools.product((32, 64, 128), (4, 8), (False, True))]
    for cfg in cands:
        pool = layout_for(cfg, inter, tiled)
        got = gate_up_swiglu(x, pool[0], cfg).float()
        err = float((got - ref).norm() / ref.norm())
        if not err < 5e-3:
            print("WRONG swiglu", m, cfg, f"rel {err:.3g}", flush=True)
            continue
        t = bench(lambda i, cfg=cfg, pool=pool: gate_up_swiglu(x, pool[i], cfg), len(pool))
        print(f"  h_to_4h+swiglu M={m} {cfg}: {t * 1e6:.1f} us", flush=True)
        if best is None or t < best[0]:
            best = (t, cfg)
    inter.clear()
    tiled.clear()
    assert best is not None
    key = config_key(m, n, k, lin0.bits, lin0.group_size) + "_swiglu"
    t, cfg = best
    if t < t_pair:
        tuned[key] = list(dataclasses.astuple(cfg))
    else:
        tuned.pop(key, None)
    moved = lin0.nbytes + m * k * 2 + m * n
    rows.append(dict(kernel=f"gemv+swiglu {lin0.bits}-bit M={m}", shape=f"h_to_4h {n}x{k}", us=t * 1e6,
                     gbs=moved / t / 1e9, pct=100 * moved / t / bw, config=str(cfg),
                     unfused_us=t_pair * 1e6, swiglu_us=t_act * 1e6))
    print(rows[-1], flush=True)


def small_kernels(bw: float, rows: list) -> None:
    from glmc.kernels import attention, norm, rotary, sampling
    from glmc.modeling_patches.ops.attention import rotary_tables
    dt = torch.float16

    def add(kernel, shape, t, moved):
        rows.append(dict(kernel=kernel, shape=shape, us=t * 1e6, gbs=moved / t / 1e9, pct=100 * moved / t / bw))
        print(rows[-1], flush=True)

    for m in (1, 16):
        part = torch.randn(1, m, H, device="cuda")
        res = torch.randn(m, H, device="cuda", dtype=dt)
        w = torch.ones(H, device="cuda", dtype=dt)
        out = torch.empty_like(res)
        add("add_rmsnorm", f"M={m} H={H}", bench(lambda i: norm.add_rmsnorm(part, res, w, 1e-5, out=out)),
            m * H * (4 + 2 + 2 + 2) + H * 2)
        part2 = torch.randn(1, m, 2 * FFN, device="cuda")
        act = torch.empty(m, FFN, device="cuda", dtype=dt)
        add("swiglu", f"M={m} F={FFN}", bench(lambda i: norm.swiglu(part2, dt, out=act)), m * FFN * (8 + 2))
        cos, sin = (t.to("cuda", dt) for t in rotary_tables(D // 2, 8192, 10000.0))
        kc = torch.zeros(m, HKV, 2304, D, device="cuda", dtype=dt)
        vc = torch.zeros_like(kc)
        partq = torch.randn(1, m, (HQ + 2 * HKV) * D, device="cuda")
        bias = torch.zeros((HQ + 2 * HKV) * D, device="cuda", dtype=dt)
        pos = torch.full((m,), 200, device="cuda", dtype=torch.int64)
        past = torch.tensor([200], device="cuda", dtype=torch.int32)
        q = torch.empty(m, HQ * D, device="cuda", dtype=dt)
        add("qkv_rotary_append", f"M={m}", bench(lambda i: rotary.qkv_rotary_append(
            partq, bias, pos, cos, sin, kc, vc, past, 1, HQ, HKV, q_out=q)), m * (HQ + 2 * HKV) * D * (4 + 2))
        start = torch.zeros(m, dtype=torch.int32, device="cuda")
        for ctx in (256, 2048):
            pst = torch.tensor([ctx - 1], device="cuda", dtype=torch.int32)
            o = torch.empty_like(q)
            t = bench(lambda i, pst=pst, o=o: attention.decode_attention(q, kc, vc, start, pst, HQ, 1 / math.sqrt(D),
                                                                         out=o))
            add("decode_attention+combine", f"B={m} ctx={ctx}", t, 2 * m * HKV * ctx * D * 2 + 2 * m * HQ * D * 2)
        partv = torch.randn(1, m, V, device="cuda")
        add("logits_argmax", f"M={m} V={V}", bench(lambda i: sampling.logits_argmax(partv, dt)), m * V * 8)


def kv_kernels(bw: float, rows: list) -> None:
    """The KV-cache kernels with an fp16 and an int8 cache of 8192 slots (scales per KV head and channel): QKV bias
    + rotary + append, and decode attention + combine at batch 1 and 16, contexts 256 to 8192 (bytes: the cache
    read), with the default programs per (row, KV head) and others."""
    from glmc.kernels import attention, rotary
    from glmc.kernels._cuda import sm_count
    from glmc.modeling_patches.ops.attention import rotary_tables
    dt = torch.float16
    cos, sin = (t.to("cuda", dt) for t in rotary_tables(D // 2, 8192, 10000.0))
    for m in (1, 16):
        partq = torch.randn(1, m, (HQ + 2 * HKV) * D, device="cuda")
        bias = torch.zeros((HQ + 2 * HKV) * D, device="cuda", dtype=dt)
        q = torch.empty(m, HQ * D, device="cuda", dtype=dt)
        start = torch.zeros(m, dtype=torch.int32, device="cuda")
        for cache in ("fp16", "int8"):
            kc = torch.randn(m, HKV, 8192, D, device="cuda").to(dt)
            kv8 = None
            if cache == "int8":
                kc = torch.randint(-100, 100, kc.shape, device="cuda", dtype=torch.int8)
                sc = torch.full((HKV, D), 0.05 / 127, device="cuda")
                kv8 = rotary.KV8(sc, sc, torch.empty(m, HKV, 1, D, device="cuda", dtype=dt),
                                 torch.empty(m, HKV, 1, D, device="cuda", dtype=dt))
            vc = kc.clone()
            pos = torch.full((m,), 200, device="cuda", dtype=torch.int64)
            past = torch.tensor([200], device="cuda", dtype=torch.int32)
            t = bench(lambda i: rotary.qkv_rotary_append(partq, bias, pos, cos, sin, kc, vc, past, 1, HQ, HKV,
                                                         q_out=q, kv8=kv8))
            moved = m * (HQ + 2 * HKV) * D * (4 + 2)
            rows.append(dict(kernel=f"qkv_rotary_append {cache} cache", shape=f"M={m}", us=t * 1e6,
                             gbs=moved / t / 1e9, pct=100 * moved / t / bw))
            print(rows[-1], flush=True)
            default = attention.programs_per_row(kc.shape[2], m * HKV, 64, sm_count(kc.device), kv8 is not None)
            for ctx in (256, 2048, 8192):
                pst = torch.tensor([ctx - 1], device="cuda", dtype=torch.int32)
                o = torch.empty_like(q)
                for prog in (default, *(c for c in (4, 8, 16, 32, 64, 128) if c != default)):
                    t = bench(lambda i, pst=pst, o=o, prog=prog: attention.decode_attention(
                        q, kc, vc, start, pst, HQ, 1 / math.sqrt(D), programs=prog, out=o, kv8=kv8))
                    moved = 2 * m * HKV * ctx * D * kc.element_size() + 2 * m * HQ * D * 2
                    rows.append(dict(kernel=f"decode_attention+combine {cache} cache",
                                     shape=f"B={m} ctx={ctx} P={prog}{' (default)' if prog == default else ''}",
                                     us=t * 1e6, gbs=moved / t / 1e9, pct=100 * moved / t / bw))
                    print(rows[-1], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("kernels-out"))
    ap.add_argument("--quick", action="store_true", help="one config per GEMV (no sweep)")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                    help="GEMV precisions to sweep (the others keep --base-tuned's entries)")
    ap.add_argument("--words-only", action="store_true", help="time the word variants beside the base table's "
                                                               "winner instead of the whole grid of the old ones")
    ap.add_argument("--mma", action="store_true", help="time the mma variant's configs beside the base table's "
                                                        "winner (no grid of the Triton variants)")
    ap.add_argument("--alone", action="store_true", help="time each GEMV config alone, not with the kernel that "
                                                          "reads its partials (the default picks by the pair)")
    ap.add_argument("--base-tuned", type=Path, help="table to start from (default: the shipped tuned_h200.json)")
    ap.add_argument("--no-small", action="store_true", help="skip the small kernels' micro-benchmarks")
    ap.add_argument("--kv-only", action="store_true", help="only the KV-cache kernels, fp16 vs int8 cache (no "
                                                           "GEMV sweep, no other small kernels)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})", flush=True)
    rows: list = []
    from glmc.kernels.quantized_linear import TUNED_FILE
    base = json.loads((args.base_tuned or TUNED_FILE).read_text())
    tuned: dict = dict(base)
    def save() -> None:
        (args.out / "tuned_h200.json").write_text(json.dumps(tuned, indent=1) + "\n")
        (args.out / "kernels.json").write_text(json.dumps({"rows": rows, "partial": True}, indent=1) + "\n")
    if args.kv_only:
        kv_kernels(bw, rows)
    else:
        sweep_gemv(bw, rows, tuned, args.quick, args.precisions, args.words_only, base, save, args.mma, args.alone)
        save()
        if not args.no_small:
            small_kernels(bw, rows)
            kv_kernels(bw, rows)
    result = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "copy_bw": bw,
              "command": " ".join(sys.argv), "rows": rows, "seconds": time.time() - t0}
    (args.out / "kernels.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}; {time.strftime('%Y-%m-%d')}")
    print("| kernel | shape | us | GB/s | % of copy bw | config |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kernel']} | {r['shape']} | {r['us']:.1f} | {r['gbs']:.0f} | {r['pct']:.0f}% | "
              f"{r.get('config', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
