"""GPU benchmark (issue 8): ONNX Runtime CUDA builds of a ChatGLM3-6B-shaped model against the bandwidth bound and
transformers' eager GlmForCausalLM, plus CPU-vs-CUDA correctness on the shipped model.

Runs in pieces so that each fits one device call (10 minutes), all sharing --work (results accumulate in
WORK/results.json; each call rewrites the JSON, the markdown table and the plot under --out):

    python benchmarks/bench_gpu.py run --precisions fp16,int8           # compile + time + delete, per precision
    python benchmarks/bench_gpu.py run --precisions int4,kv8,int8-kv8,transformers
    python benchmarks/bench_gpu.py check                                # shipped model: CPU vs CUDA greedy tokens
    python benchmarks/bench_gpu.py run --shape tiny --device cpu ...    # a dry run on a CPU

The bound at batch 1: each decoded token reads every weight byte once (all linears, the output layer included, plus
their scales) and the whole KV cache written so far; tokens/s <= copy bandwidth / those bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRECISIONS = ["fp16", "int8", "int4", "kv8", "int8-kv8"]
SHAPES = {
    "chatglm3-6b": dict(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, num_heads=32, head_dim=128,
                        vocab_size=65024, seq_length=8192),
    # 4 layers of the real ChatGLM3-6B widths: the same GEMV shapes and per-layer bytes, a seventh of the layers
    "l4": dict(num_layers=4, hidden_size=4096, ffn_hidden_size=13696, num_heads=32, head_dim=128,
               vocab_size=65024, seq_length=8192),
    "tiny": dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_heads=4, head_dim=64, vocab_size=65024,
                 seq_length=8192),
}
PROMPT, NEW, BIG_BATCH, PREFILL = 128, 256, 16, 2048


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def gpu_used_bytes() -> int | None:
    try:
        import pynvml
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # noqa: BLE001 - no NVML (CPU dry run)
        return None


# ---------------------------------------------------------------------------------------------- build

def checkpoint(work: Path, shape: str, tokenizer: Path | None = None) -> Path:
    from glmc.assets import SHIPPED_MODEL
    from glmc.modeling_patches import variant
    from glmc.modeling_patches.checkpoint import write_random_checkpoint

    ckpt = work / f"ckpt-{shape}"
    if not (ckpt / "model.safetensors.index.json").is_file():
        log("writing random fp16 checkpoint", ckpt)
        write_random_checkpoint(variant("chatglm3-6b", **SHAPES[shape]), ckpt, dtype=torch.float16,
                                shard_bytes=4 << 30)
    for f in ("tokenizer.model", "tokenizer_config.json"):  # a real ChatGLM3-format tokenizer (ids < vocab)
        shutil.copy((tokenizer or SHIPPED_MODEL) / f, ckpt / f)
    return ckpt


def compile_one(args, prec: str, ckpt: Path) -> Path:
    """`glmc compile` of one precision with the onnxruntime target (the library call behind the command)."""
    from rich.console import Console

    from glmc.compiler import pipeline, schema

    out = args.work / f"build-{args.shape}-{prec}"
    if (out / "manifest.json").is_file():
        return out
    cfg = schema.load([ROOT / "compile_configs/models/chatglm3-6b.yaml", ROOT / f"compile_configs/precisions/{prec}.yaml"],
                      overrides=[f"model.checkpoint={ckpt}", "targets=[onnxruntime]", f"output={out}",
                                 f"limits.max_batch={BIG_BATCH}", f"limits.max_input_length={PREFILL}",
                                 f"limits.max_sequence_length={PREFILL + NEW}", "verify.enabled=false",
                                 "calibration.samples=4", "calibration.max_length=128",
                                 f"cache_dir={args.work / 'cache'}"])
    pipeline.compile_config(cfg, console=Console(width=120))
    return out


def load_results(args) -> dict:
    path = args.work / "results.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"date": time.strftime("%Y-%m-%d"), "shape": args.shape, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "runs": {}}


def save_results(args, results: dict) -> None:
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results, args.out)


def run(args) -> None:
    """Per precision: compile, benchmark in a fresh process, then delete the build (a 6B fp16 build and its stage
    cache take ~36 GB of the machine's 64)."""
    results = load_results(args)
    results.setdefault("copy_bandwidth_Bps", copy_bandwidth(args.device))
    ckpt = checkpoint(args.work, args.shape, args.tokenizer)
    for prec in args.precisions:
        if prec in results["runs"] and "error" not in results["runs"][prec]:
            continue
        t = time.perf_counter()
        try:
            if prec != "transformers":
                build = compile_one(args, prec, ckpt)
                results.setdefault("compile_seconds", {})[prec] = time.perf_counter() - t
                results.setdefault("build_bytes", {})[prec] = sum(
                    f.stat().st_size for f in (build / "onnx").rglob("*") if f.is_file())
            results["runs"][prec] = bench_subprocess(args, prec)
        except Exception as e:  # noqa: BLE001 - record and go on with the next precision
            results["runs"][prec] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        log(prec, f"{time.perf_counter() - t:.0f}s", results["runs"][prec])
        shutil.rmtree(args.work / f"build-{args.shape}-{prec}", ignore_errors=True)
        shutil.rmtree(args.work / "cache", ignore_errors=True)
        save_results(args, results)


# ---------------------------------------------------------------------------------------------- bench

def time_generate(backend, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    """Time to first token and decode tokens/s through the shared generation loop (greedy)."""
    from glmc.runtime.generate import SamplingConfig, stream

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(100, 60000, (batch, prompt_len), generator=g).tolist()
    cfg = SamplingConfig(max_new_tokens=new_tokens)
    timed = ForwardTimer(backend)
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for _ in stream(timed, prompts, cfg):
        last = time.perf_counter()
        if first is None:
            first, timed.seconds = last, 0.0
        n += 1
    return {"ttft_s": first - t0, "decode_tps": batch * (n - 1) / (last - first), "steps": n,
            "forward_share": timed.seconds / (last - first)}


class ForwardTimer:
    """A backend wrapper that adds up the time spent inside forward (the rest is the loop's own overhead)."""

    def __init__(self, backend):
        self.backend, self.max_length, self.seconds = backend, backend.max_length, 0.0

    def new_cache(self, batch):
        return self.backend.new_cache(batch)

    def forward(self, *args):
        t = time.perf_counter()
        out = self.backend.forward(*args)
        self.seconds += time.perf_counter() - t
        return out


def time_prefill(backend, length: int) -> float:
    ids = torch.randint(100, 60000, (1, length))
    mask = torch.ones_like(ids)
    pos = torch.arange(length)[None]
    backend.forward(ids, pos, mask, backend.new_cache(1))  # warm-up
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        backend.forward(ids, pos, mask, backend.new_cache(1))
        best = min(best, time.perf_counter() - t)
    return length / best


def measure(backend) -> dict:
    time_generate(backend, 1, 16, 8)  # warm-up: session init, CUDA graphs, allocator
    r = {"b1": time_generate(backend, 1, PROMPT, NEW), f"b{BIG_BATCH}": time_generate(backend, BIG_BATCH, PROMPT, NEW)}
    r["prefill_tps"] = time_prefill(backend, PREFILL)
    r["gpu_used_bytes"] = gpu_used_bytes()
    return r


def bench_one(args) -> None:
    """One precision (or transformers) in its own process, so GPU memory is measured and freed per run."""
    if args.precision == "transformers":
        from glmc.modeling_patches import load_model
        from glmc.modeling_patches.hf_glm import TransformersBackend, to_transformers
        model = load_model(checkpoint(args.work, args.shape), dtype="float16")
        hf = to_transformers(model).to(args.device)
        del model
        backend = TransformersBackend(hf, PREFILL + NEW)
    else:
        from glmc.runtime.loader import make_backend, open_build
        backend = make_backend(open_build(args.work / f"build-{args.shape}-{args.precision}"), "onnxruntime",
                               args.device)
    r = measure(backend)
    print("RESULT " + json.dumps(r), flush=True)
    if os.environ.get("GLMC_PROFILE"):  # where a decode step's time goes (CPU side and device side)
        from torch.profiler import ProfilerActivity, profile
        ids = torch.randint(100, 60000, (1, PROMPT))
        mask, pos = torch.ones_like(ids), torch.arange(PROMPT)[None]
        _, cache = backend.forward(ids, pos, mask, backend.new_cache(1))
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            for i in range(8):
                mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], 1)
                _, cache = backend.forward(ids[:, :1], pos[:, -1:] + 1 + i, mask, cache)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)


def weight_and_kv_bytes(shape: str, prec: str, tokens: int) -> tuple[float, float]:
    from glmc.modeling_patches import variant
    c = variant("chatglm3-6b", **SHAPES[shape])
    h, f = c.hidden_size, c.ffn_hidden_size
    block = h * (c.q_size + 2 * c.kv_size) + c.q_size * h + 2 * f * h + f * h  # quantizable per layer
    wbits = {"int8": 8, "int4": 4}.get(prec.split("-")[0], 16)
    scales = 0 if wbits == 16 else (c.q_size + 2 * c.kv_size + h + 2 * f + h) * 2
    weights = c.num_layers * (block * wbits / 8 + scales) + c.vocab_size * h * 2  # output layer stays fp16
    kv_bytes = 1 if "kv8" in prec else 2
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * tokens * kv_bytes
    return weights, kv


def copy_bandwidth(device: str) -> float:
    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(20):
            start.record()
            b.copy_(a)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n / times[len(times) // 2]  # bytes read + written, median


def bench_subprocess(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "bench-one", "--precision", name, "--work", str(args.work), "--shape",
           args.shape, "--device", args.device]
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout[-3000:], flush=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(line[7:])


def report(results: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    for name, r in results["runs"].items():
        if "error" not in r:
            w, kv = weight_and_kv_bytes(results["shape"], "fp16" if name == "transformers" else name, PROMPT + NEW // 2)
            r["bytes_per_token_b1"] = w + kv
            r["bound_tps_b1"] = results["copy_bandwidth_Bps"] / (w + kv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2) + "\n")
    hf = results["runs"].get("transformers", {}).get("b1", {}).get("decode_tps")
    t = Table(title=f"{results['gpu']} {results['date']}, ChatGLM3-6B shape ({results['shape']}), copy bandwidth "
                    f"{results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s")
    for col in ("run", "decode b1 tok/s", "bound b1", "% of bound", "x HF eager", f"decode b{BIG_BATCH} tok/s",
                "TTFT b1 ms", f"prefill {PREFILL} tok/s", "GPU mem GiB"):
        t.add_column(col)
    lines = []
    for name, r in results["runs"].items():
        if "error" in r:
            t.add_row(name, "error", *[""] * 7)
            continue
        b1 = r["b1"]["decode_tps"]
        row = [name, f"{b1:.1f}", f"{r['bound_tps_b1']:.1f}", f"{100 * b1 / r['bound_tps_b1']:.0f}%",
               f"{b1 / hf:.2f}x" if hf else "", f"{r[f'b{BIG_BATCH}']['decode_tps']:.0f}",
               f"{1e3 * r['b1']['ttft_s']:.1f}", f"{r['prefill_tps']:.0f}",
               f"{r['gpu_used_bytes'] / 2**30:.1f}" if r.get("gpu_used_bytes") else ""]
        t.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    Console(width=200).print(t)
    header = ("| run | decode b1 tok/s | bound b1 | % of bound | x HF eager | decode b16 tok/s | TTFT b1 ms | "
              f"prefill {PREFILL} tok/s | GPU mem GiB |\n|" + " --- |" * 9)
    (out / "gpu_table.md").write_text(header + "\n" + "\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = [n for n, r in results["runs"].items() if "error" not in r]
        fig, ax = plt.subplots(figsize=(8, 4))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [results["runs"][n]["b1"]["decode_tps"] for n in names], 0.4, label="measured")
        ax.bar([i + 0.2 for i in x], [results["runs"][n]["bound_tps_b1"] for n in names], 0.4, label="bandwidth bound")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("decode tokens/s, batch 1")
        ax.set_title(f"glmc ONNX Runtime CUDA vs bound, {results['gpu']}, {results['date']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gpu_decode.png", dpi=120)
    except ImportError:
        pass


# ---------------------------------------------------------------------------------------------- check

def check(args) -> None:
    """Shipped model: greedy tokens of CUDA builds equal CPU builds (fp32/fp16) over 32 steps; quantized: agreement."""
    from rich.console import Console

    from glmc.compiler import pipeline, schema
    from glmc.runtime.generate import SamplingConfig, generate
    from glmc.runtime.loader import make_backend, open_build

    prompts = [[64790, 64792, 30, 31, 32, 33], [64790, 64792, 40, 41]]
    out = {}
    for prec in args.precisions:
        bdir = args.work / f"tiny-{prec}"
        if not (bdir / "manifest.json").is_file():
            cfg = schema.load([ROOT / f"compile_configs/glmc-tiny-{prec}.yaml"] if
                              (ROOT / f"compile_configs/glmc-tiny-{prec}.yaml").is_file() else
                              [ROOT / "compile_configs/models/glmc-tiny.yaml", ROOT / f"compile_configs/precisions/{prec}.yaml"],
                              overrides=["targets=[onnxruntime]", f"output={bdir}", "verify.enabled=false",
                                         f"cache_dir={args.work / 'cache'}"])
            pipeline.compile_config(cfg, console=Console())
        build_ = open_build(bdir)
        vocab = json.loads((build_.tokenizer_dir / "config.json").read_text())["padded_vocab_size"]
        ps = [[t % vocab for t in p] for p in prompts]
        cfg = SamplingConfig(max_new_tokens=32)
        cpu = generate(make_backend(build_, "onnxruntime", "cpu"), ps, cfg)
        gpu = generate(make_backend(build_, "onnxruntime", args.device), ps, cfg)
        agree = sum(a == b for ra, rb in zip(cpu, gpu) for a, b in zip(ra, rb)) / sum(len(r) for r in cpu)
        out[prec] = {"identical": cpu == gpu, "token_agreement": agree, "cpu": cpu, "cuda": gpu}
        log(prec, "identical" if cpu == gpu else f"agreement {agree:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["run", "bench-one", "check", "report"])
    ap.add_argument("--work", type=Path, default=Path("/root/glmc-gpu"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-results")))
    ap.add_argument("--shape", choices=list(SHAPES), default="chatglm3-6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=PRECISIONS + ["transformers"])
    ap.add_argument("--tokenizer", type=Path, help="tokenizer dir for the random checkpoint (default: shipped model)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    if args.phase == "run":
        run(args)
    if args.phase == "bench-one":
        bench_one(args)
    if args.phase == "check":
        check(args)
    if args.phase == "report":
        report(load_results(args), args.out)


if __name__ == "__main__":
    main()
