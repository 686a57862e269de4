"""CPU decode race: ONNX Runtime fast lowering (fp32/int8/int4) vs transformers GlmForCausalLM vs our torch backend.

    python benchmarks/bench_runtime_cpu.py                       # ~300M-param GLM-shaped model, batch 1 and 8
    python benchmarks/bench_runtime_cpu.py --quick               # tiny shapes, a smoke run
    python benchmarks/bench_runtime_cpu.py --json docs/bench_runtime_cpu.json

One run measures, on this machine: the memory bandwidth (a large tensor copy, read + write bytes, and a large
sum, read bytes), then decode tokens/s of every engine on the same random weights, and for each ONNX Runtime
precision the bound the read bandwidth implies: tokens/s <= batch * bandwidth / bytes read per step, where the
bytes per step are the lowered model's weight bytes (the embedding table excluded: decode gathers one row of it)
plus the KV cache read at the mean context.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
from rich.console import Console
from rich.table import Table

from glmc.export.lower import lower_file
from glmc.export.onnx_export import export
from glmc.modeling_patches import variant
from glmc.modeling_patches.checkpoint import random_model
from glmc.modeling_patches.hf_glm import TransformersBackend, to_transformers
from glmc.quantization.scheme import apply_scheme, parse_precision
from glmc.runtime.backend_onnxruntime import OnnxRuntimeBackend
from glmc.runtime.backend_torch import TorchBackend
from glmc.runtime.cli_bench import measure
from glmc.runtime.generate import Backend, SamplingConfig, stream

# ~300M parameters with ChatGLM's proportions: head_dim 128, 2 KV groups, ffn ~3.34 x hidden, GLM-4-like vocab split
SHAPE = dict(num_layers=5, hidden_size=2048, ffn_hidden_size=6848, num_heads=16, head_dim=128, num_kv_heads=2,
             vocab_size=8192, seq_length=1024)
QUICK = dict(num_layers=2, hidden_size=256, ffn_hidden_size=768, num_heads=2, head_dim=128, num_kv_heads=2,
             vocab_size=1024, seq_length=256)
PRECISIONS = {"fp32": "fp32", "int8": "fp32+int8", "int4": "fp32+int4-g128",  # ORT builds (fp32 activations)
              "sq8": "fp32+sq8"}  # sq8: calibrated on 4 random 128-token samples (random weights: no outliers)


def bandwidth(mib: int = 1024, repeats: int = 5) -> dict:
    """Best-of-n GB/s of a torch copy (read + write bytes), a torch sum and a torch GEMV (matrix bytes read: what
    decode does), all threads. `read_gbps`, the bound's bandwidth, is the best read rate of the last two."""
    n = mib * (1 << 20) // 4
    a, b = torch.rand(n), torch.empty(n)
    x = torch.rand(4096)
    copy_s, sum_s, mv_s = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        copy_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        a.sum()
        sum_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.mv(a.view(-1, 4096), x)
        mv_s.append(time.perf_counter() - t)
    nbytes = n * 4
    out = {"copy_gbps": 2 * nbytes / min(copy_s) / 1e9, "sum_gbps": nbytes / min(sum_s) / 1e9,
           "gemv_gbps": nbytes / min(mv_s) / 1e9, "mib": mib}
    out["read_gbps"] = max(out["sum_gbps"], out["gemv_gbps"])
    return out


def set_accuracy_level(path: Path, level: int) -> None:
    """Experiment: MatMulNBits accuracy_level (4 = int8 activations per block, ORT's fast CPU kernels)."""
    m = onnx.load(str(path), load_external_data=False)
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(attrs + [onnx.helper.make_attribute("accuracy_level", level)])
    onnx.save(m, str(path))


def streamed_bytes(onnx_path: Path) -> int:
    """Bytes of initializers a decode step reads: all of them except tables only gathered from (embeddings)."""
    m = onnx.load(str(onnx_path), load_external_data=False)
    gathered = {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
    total = 0
    for t in m.graph.initializer:
        if t.name in gathered:
            continue
        size = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        total += size if size is not None else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


def op_profile(path: Path, threads: int, steps: int = 8) -> dict:
    """ONNX Runtime's per-node profile of `steps` batch-1 decode steps: ms per step of the five costliest ops."""
    import collections
    with tempfile.TemporaryDirectory() as tmp:
        backend = OnnxRuntimeBackend(path, max_length=64, threads=threads, profile=str(Path(tmp) / "ort"))
        list(stream(backend, [[1, 2, 3, 4]], SamplingConfig(max_new_tokens=steps + 1)))
        profile = backend.end_profiling()
        assert profile is not None  # profiling was on
        events = json.loads(Path(profile).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    prefill_end = runs[0]["ts"] + runs[0]["dur"]
    ops: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > prefill_end:
            ops[e["args"]["op_name"]] += e["dur"]
    n = len(runs) - 1
    return {"decode_ms_per_step": sum(e["dur"] for e in runs[1:]) / n / 1e3,
            "ops_ms_per_step": {k: round(v / n / 1e3, 2) for k, v in ops.most_common(5)}}


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def rss_peak_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--engines", nargs="+", default=["transformers", "torch", *[f"ort-{p}" for p in PRECISIONS]],
                    help="transformers, torch, ort-PRECISION (fp32, int8, int4), ort-PRECISION-accN (the same with "
                         "MatMulNBits accuracy_level N)")
    ap.add_argument("--profile", action="store_true", help="also profile each ONNX Runtime engine's decode per op")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    config = variant("chatglm3-6b", **(QUICK if args.quick else SHAPE))
    max_length = args.prompt + args.new_tokens + 8
    result = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
              "threads": args.threads, "load_average_start": os.getloadavg(), "torch": torch.__version__,
              "onnxruntime": __import__("onnxruntime").__version__, "cpu": _cpu_name(),
              "parameters": config.num_parameters, "shape": QUICK if args.quick else SHAPE,
              "prompt": args.prompt, "new_tokens": args.new_tokens, "batches": args.batches}
    console.print(f"[bold]model[/] {config.num_parameters / 1e6:.0f}M parameters {result['shape']}")
    result["bandwidth"] = bandwidth(256 if args.quick else 1024)
    bw = result["bandwidth"]
    console.print(f"[bold]bandwidth[/] copy {bw['copy_gbps']:.1f} GB/s (read+write), sum {bw['sum_gbps']:.1f} GB/s, "
                  f"GEMV {bw['gemv_gbps']:.1f} GB/s (read)")
    base = random_model(config, seed=0, dtype=torch.float32).eval()
    rows = []
    kv_per_token = 2 * config.num_layers * config.kv_size * 4  # fp32 K and V of one position, all layers
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            entry = {"engine": engine}
            backend: Backend
            if engine == "transformers":
                backend = TransformersBackend(to_transformers(base), max_length)
            elif engine == "torch":
                backend = TorchBackend(base, max_length)
            else:
                prec, _, acc = engine.removeprefix("ort-").partition("-acc")
                scheme = parse_precision(PRECISIONS[prec])
                calib = [torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(i))
                         for i in range(4)] if scheme.needs_calibration else None
                model = base if prec == "fp32" else apply_scheme(copy.deepcopy(base), scheme, calib)
                t = time.perf_counter()
                # export.onnx, not model.onnx: lower_file deletes a same-named external data file it just copied
                export(model, Path(tmp) / prec / "export" / "export.onnx")
                path = Path(tmp) / prec / "onnxruntime" / "model.onnx"
                lower_file(Path(tmp) / prec / "export" / "export.onnx", "onnxruntime", path)
                if acc:
                    set_accuracy_level(path, int(acc))
                entry["build_s"] = round(time.perf_counter() - t, 1)
                if model is not base:
                    del model
                gc.collect()
                backend = OnnxRuntimeBackend(path, max_length=max_length, max_batch=max(args.batches),
                                             threads=args.threads)
                entry["weight_bytes_per_step"] = streamed_bytes(path)
            for b in args.batches:
                r = measure(backend, b, args.prompt, args.new_tokens, config.vocab_size, args.repeats)
                entry[f"b{b}"] = r
                if "weight_bytes_per_step" in entry:
                    ctx = args.prompt + args.new_tokens / 2
                    step_bytes = entry["weight_bytes_per_step"] + b * ctx * kv_per_token
                    bound = b * result["bandwidth"]["read_gbps"] * 1e9 / step_bytes
                    r["bound_tps"] = bound
                    r["of_bound"] = r["decode_tps"] / bound
                console.print(f"  {engine:16s} batch {b}: {r['decode_tps']:7.1f} tok/s"
                              + (f" ({100 * r['of_bound']:.0f}% of {r['bound_tps']:.1f})" if "of_bound" in r else ""))
            del backend
            gc.collect()
            if args.profile and engine.startswith("ort-"):
                entry["profile"] = op_profile(path, args.threads)
                console.print(f"  {engine:16s} profile: {entry['profile']}")
            rows.append(entry)
    result["engines"] = rows
    result["load_average_end"] = os.getloadavg()
    result["peak_rss_mib"] = rss_peak_mib()
    ref = {b: next((e[f"b{b}"]["decode_tps"] for e in rows if e["engine"] == "transformers"), None)
           for b in args.batches}
    table = Table(title=f"decode tokens/s, {config.num_parameters / 1e6:.0f}M-param GLM-shaped model, prompt "
                        f"{args.prompt}, {args.new_tokens} new tokens, {args.threads} threads")
    for col in ["engine", "weights MB/step"] + [f"b{b} tok/s" for b in args.batches] + \
               [f"b{b} x transformers" for b in args.batches] + [f"b{b} % of bound" for b in args.batches]:
        table.add_column(col, justify="right")
    for e in rows:
        cells = [e["engine"], f"{e['weight_bytes_per_step'] / 1e6:.0f}" if "weight_bytes_per_step" in e else "-"]
        cells += [f"{e[f'b{b}']['decode_tps']:.1f}" for b in args.batches]
        cells += [f"{e[f'b{b}']['decode_tps'] / ref[b]:.2f}" if ref[b] else "-" for b in args.batches]
        cells += [f"{100 * e[f'b{b}']['of_bound']:.0f}%" if "of_bound" in e[f"b{b}"] else "-" for b in args.batches]
        table.add_row(*cells)
    console.print(table)
    console.print(f"load average start {result['load_average_start']}, end {result['load_average_end']}; "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
