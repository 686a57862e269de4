"""GPU benchmark (issue 8): ONNX Runtime CUDA builds of a ChatGLM3-6B-shaped model against the bandwidth bound and
transformers' eager GlmForCausalLM, plus CPU-vs-CUDA correctness on the shipped model.

One driver does the whole visit to the GPU machine, so that it can start in the first device call and run on while
later calls bring the rest of onnxruntime-gpu over (it waits for `--ort-ready`, the installer's marker, before any
ONNX Runtime CUDA work, and runs that work in subprocesses that put `--ort-site` first on the path):

    setsid python3 benchmarks/bench_gpu.py run --ort-ready /root/gpu-site/.installed --ort-site /root/gpu-site &

It writes WORK/log and WORK/results.json as it goes, and rewrites the JSON, the markdown table and the plot under
--out after every step. Steps: the device copy bandwidth; a random fp16 checkpoint of the shape; then per precision
the compile (`glmc compile`'s library call, onnxruntime target, unpadded GroupQueryAttention, int8 caches folded
into it) overlapped with the benchmark of the previous precision (a fresh process each: decode at batch 1 with and
without CUDA graphs, batch 16, decode at a 2048-token context, prefill 2048, time to first token, GPU memory, and
a kernel profile of decode steps); the shipped-model check (`check`, below) and the GPU tests; transformers last.

    python3 benchmarks/bench_gpu.py check --device cuda   # shipped model: CUDA vs CPU builds, greedy + logits
    python3 benchmarks/bench_gpu.py run --shape tiny --device cpu --precisions fp16   # a dry run on a CPU

The bound at batch 1: each decoded token reads every weight byte once (all linears, the output layer included, plus
their scales) and the KV cache written so far; tokens/s <= copy bandwidth / those bytes.
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
LONG_PROMPT, LONG_NEW = 1984, 64  # decode at a context of ~2048 (kv8 vs fp16 cache)
MAX_SEQ = PREFILL + NEW
# compile options of every ORT build here: GQA's fast path (no padding), int8 caches inside GQA
ORT_OPTIONS = ["onnxruntime.padded_batches=false"]
KV8_OPTIONS = ["onnxruntime.fold_kv8=true"]


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

def checkpoint(work: Path, shape: str) -> Path:
    from glmc.assets import SHIPPED_MODEL
    from glmc.modeling_patches import variant
    from glmc.modeling_patches.checkpoint import write_random_checkpoint

    ckpt = work / f"ckpt-{shape}"
    if not (ckpt / "model.safetensors.index.json").is_file():
        log("writing random fp16 checkpoint", ckpt)
        write_random_checkpoint(variant("chatglm3-6b", **SHAPES[shape]), ckpt, dtype=torch.float16,
                                shard_bytes=4 << 30)
    for f in ("tokenizer.model", "tokenizer_config.json"):  # a real ChatGLM3-format tokenizer (ids < vocab)
        shutil.copy(SHIPPED_MODEL / f, ckpt / f)
    return ckpt


def compile_one(args, prec: str, ckpt: Path) -> Path:
    """`glmc compile` of one precision with the onnxruntime target (the library call behind the command); the stage
    cache is deleted after (the build's weight files are hard links, so they stay)."""
    from rich.console import Console

    from glmc.compiler import pipeline, schema

    out = args.work / f"build-{args.shape}-{prec}"
    if (out / "manifest.json").is_file():
        return out
    cfg = schema.load([ROOT / "compile_configs/models/chatglm3-6b.yaml",
                       ROOT / f"compile_configs/precisions/{prec}.yaml"],
                      overrides=[f"model.checkpoint={ckpt}", "targets=[onnxruntime]", f"output={out}",
                                 f"limits.max_batch={BIG_BATCH}", f"limits.max_input_length={PREFILL}",
                                 f"limits.max_sequence_length={MAX_SEQ}", "verify.enabled=false",
                                 "calibration.samples=4", "calibration.max_length=128",
                                 f"cache_dir={args.work / 'cache'}"] + ORT_OPTIONS
                      + (KV8_OPTIONS if "kv8" in prec else []))
    pipeline.compile_config(cfg, console=Console(width=120))
    shutil.rmtree(args.work / "cache", ignore_errors=True)
    return out


def load_results(args) -> dict:
    path = args.work / "results.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"date": time.strftime("%Y-%m-%d"), "shape": args.shape, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "command": " ".join(sys.argv), "runs": {}}


def save_results(args, results: dict) -> None:
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results, args.out)


def subprocess_env(args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.ort_site:
        env["PYTHONPATH"] = os.pathsep.join([str(args.ort_site)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def wait_for_ort(args) -> None:
    if args.ort_ready:
        log("waiting for", args.ort_ready)
        while not Path(args.ort_ready).is_file():
            time.sleep(5)


class Bench:
    """One precision's benchmark in its own process (GPU memory measured and freed per run)."""

    def __init__(self, args, name: str):
        self.name, self.t = name, time.perf_counter()
        cmd = [sys.executable, __file__, "bench-one", "--precision", name, "--work", str(args.work), "--shape",
               args.shape, "--device", args.device]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=subprocess_env(args))

    def result(self) -> dict:
        out, _ = self.proc.communicate()
        log(f"bench {self.name} ({time.perf_counter() - self.t:.0f}s):\n" + out[-4000:])
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        if self.proc.returncode or line is None:
            return {"error": out[-2000:]}
        return json.loads(line[7:])


def run(args) -> None:
    """The whole visit: bandwidth, checkpoint, then compile precision N while precision N-1 is benchmarked, the
    shipped-model check once ONNX Runtime CUDA is there, transformers last."""
    results = load_results(args)
    results.setdefault("copy_bandwidth_Bps", copy_bandwidth(args.device))
    save_results(args, results)
    ckpt = checkpoint(args.work, args.shape)
    todo = [p for p in args.precisions if p != "transformers" and "error" in results["runs"].get(p, {"error": 1})]
    pending: Bench | None = None
    checked = not args.check

    def finish(b: Bench) -> None:
        results["runs"][b.name] = b.result()
        shutil.rmtree(args.work / f"build-{args.shape}-{b.name}", ignore_errors=True)
        save_results(args, results)

    for prec in todo:
        t = time.perf_counter()
        try:
            build = compile_one(args, prec, ckpt)
        except Exception as e:  # noqa: BLE001 - record and go on with the next precision
            results["runs"][prec] = {"error": f"compile: {type(e).__name__}: {e}"[-2000:]}
            continue
        results.setdefault("compile_seconds", {})[prec] = time.perf_counter() - t
        results.setdefault("build_bytes", {})[prec] = sum(
            f.stat().st_size for f in (build / "onnx").rglob("*") if f.is_file())
        log(f"compiled {prec} in {time.perf_counter() - t:.0f}s")
        if pending is not None:
            finish(pending)
        wait_for_ort(args)
        if not checked:  # correctness first, while nothing else uses the GPU
            results["check"] = check_subprocess(args)
            save_results(args, results)
            checked = True
            if "error" in results["check"].get("builds", {}).get("fp16-unpadded", {}):
                log("the unpadded graph fails on this device: the padded form for everything from here")
                ORT_OPTIONS[:], KV8_OPTIONS[:] = [], []
                results["padded_fallback"] = True
                shutil.rmtree(build, ignore_errors=True)
                build = compile_one(args, prec, ckpt)
        pending = Bench(args, prec)
    if pending is not None:
        finish(pending)
    if not checked:
        wait_for_ort(args)
        results["check"] = check_subprocess(args)
    if "transformers" in args.precisions:
        finish(Bench(args, "transformers"))
    save_results(args, results)
    log("done")


def check_subprocess(args) -> dict:
    """`check` and the GPU tests, in a subprocess that sees onnxruntime-gpu."""
    env = subprocess_env(args)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "check", "--work", str(args.work), "--out", str(args.out),
                        "--device", args.device], capture_output=True, text=True, env=env)
    log(f"check ({time.perf_counter() - t:.0f}s):\n" + (p.stdout + p.stderr)[-3000:])
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_runtime.py",
                            "-k", "cuda"], capture_output=True, text=True, env=env, cwd=ROOT)
    log("GPU tests:\n" + tests.stdout[-2000:])
    builds = json.loads((args.out / "gpu_check.json").read_text()) if (args.out / "gpu_check.json").is_file() else {}
    return {"returncode": p.returncode, "builds": builds, "tests_returncode": tests.returncode,
            "tests": tests.stdout[-600:]}


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
    assert first is not None and last is not None, "the generation loop produced no token"
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


def profile_decode(backend, device: str, steps: int = 16) -> dict:
    """Device kernels of `steps` batch-1 decode steps after a 128-token prompt: total per step, and the kernels that
    take the most time (name, calls per step, microseconds per step)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(100, 60000, (1, PROMPT))
    mask, pos = torch.ones_like(ids), torch.arange(PROMPT)[None]
    _, cache = backend.forward(ids, pos, mask, backend.new_cache(1))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for i in range(steps):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.int64)], 1)
            _, cache = backend.forward(ids[:, :1], pos[:, -1:] + 1 + i, mask, cache)
        wall = time.perf_counter() - t
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = getattr(e, "cuda_time_total", 0) if us is None else us
        if us and str(getattr(e, "device_type", "")).endswith("CUDA"):
            kernels.append((e.key, e.count / steps, us / steps))
    kernels.sort(key=lambda k: -k[2])
    return {"wall_us_per_step": 1e6 * wall / steps, "kernel_us_per_step": sum(k[2] for k in kernels),
            "kernels_per_step": sum(k[1] for k in kernels),
            "top": [{"kernel": k[0][:120], "calls": round(k[1], 2), "us": round(k[2], 1)} for k in kernels[:15]]}


def measure(backend, device: str) -> dict:
    graphs = getattr(backend, "cuda_graph", False)
    time_generate(backend, 1, PROMPT, 8)  # warm-up at the measured length: kernel choice, batch-1 graph, arena
    r = {"cuda_graph": graphs, "b1": time_generate(backend, 1, PROMPT, NEW)}
    if graphs:  # the same session without replaying graphs (each step launches every kernel from the host)
        backend.cuda_graph = False
        r["b1_no_graph"] = time_generate(backend, 1, PROMPT, 64)
        backend.cuda_graph = True
    time_generate(backend, BIG_BATCH, PROMPT, 4)  # warm-up of the batch-16 graph
    r[f"b{BIG_BATCH}"] = time_generate(backend, BIG_BATCH, PROMPT, NEW)
    r["long"] = time_generate(backend, 1, LONG_PROMPT, LONG_NEW)
    r["prefill_tps"] = time_prefill(backend, PREFILL)
    r["gpu_used_bytes"] = gpu_used_bytes()
    r["profile"] = profile_decode(backend, device)
    return r


def bench_one(args) -> None:
    from glmc.runtime.generate import Backend
    backend: Backend
    if args.precision == "transformers":  # eager attention, fp16, the same weights
        from glmc.modeling_patches import load_model
        from glmc.modeling_patches.hf_glm import TransformersBackend, to_transformers
        model = load_model(checkpoint(args.work, args.shape), dtype="float16")
        with torch.device(args.device):  # built on the device (a 6B random init on the CPU takes minutes)
            hf = to_transformers(model)
        hf.config._attn_implementation = "eager"
        del model
        backend = TransformersBackend(hf, MAX_SEQ)
    else:
        from glmc.artifact import open_build
        from glmc.runtime.loader import make_backend
        build = open_build(args.work / f"build-{args.shape}-{args.precision}")
        backend = make_backend(build, "onnxruntime", args.device)
    try:
        r = measure(backend, args.device)
    except Exception as e:
        if not getattr(backend, "cuda_graph", False):
            raise
        import traceback
        traceback.print_exc()
        from glmc.runtime.backend_onnxruntime import OnnxRuntimeBackend
        del backend
        backend = OnnxRuntimeBackend(build.onnx["onnxruntime"], MAX_SEQ, BIG_BATCH, args.device,
                                     max_input_length=PREFILL, cuda_graph=False)
        r = measure(backend, args.device) | {"cuda_graph_error": f"{type(e).__name__}: {e}"[-800:]}
    print("RESULT " + json.dumps(r), flush=True)


def weight_and_kv_bytes(shape: str, prec: str, tokens: int) -> tuple[float, float]:
    from glmc.modeling_patches import variant
    c = variant("chatglm3-6b", **SHAPES[shape])
    h, f = c.hidden_size, c.ffn_hidden_size
    block = h * (c.q_size + 2 * c.kv_size) + c.q_size * h + 2 * f * h + f * h  # quantizable per layer
    wbits = {"int8": 8, "int4": 4}.get(prec.split("-")[0], 16)
    # MatMulNBits keeps one fp16 scale per 128 weights: int4-g128's groups, and int8's row scale once per block
    scales = 0 if wbits == 16 else block // 128 * 2
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


COLUMNS = ("run", "decode b1 tok/s", "bound b1", "% of bound", "x HF eager", "b1 no CUDA graph", "decode b16 tok/s",
           "decode @2048 ctx", "TTFT b1 ms", f"prefill {PREFILL} tok/s", "GPU mem GiB")


def report(results: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    runs = {n: r for n, r in results["runs"].items() if "error" not in r}
    for name, r in runs.items():
        w, kv = weight_and_kv_bytes(results["shape"], "fp16" if name == "transformers" else name, PROMPT + NEW // 2)
        r["bytes_per_token_b1"] = w + kv
        r["bound_tps_b1"] = results["copy_bandwidth_Bps"] / (w + kv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2) + "\n")
    hf = runs.get("transformers", {}).get("b1", {}).get("decode_tps")
    t = Table(title=f"{results['gpu']} {results['date']}, ChatGLM3-6B shape ({results['shape']}), copy bandwidth "
                    f"{results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s")
    for col in COLUMNS:
        t.add_column(col)
    lines = []
    for name, r in results["runs"].items():
        if "error" in r:
            row = [name, "error: " + r["error"].strip().splitlines()[-1][:60]] + [""] * (len(COLUMNS) - 2)
        else:
            b1 = r["b1"]["decode_tps"]
            row = [name, f"{b1:.1f}", f"{r['bound_tps_b1']:.1f}", f"{100 * b1 / r['bound_tps_b1']:.0f}%",
                   f"{b1 / hf:.2f}x" if hf else "", f"{r['b1_no_graph']['decode_tps']:.1f}" if "b1_no_graph" in r
                   else "", f"{r[f'b{BIG_BATCH}']['decode_tps']:.0f}", f"{r['long']['decode_tps']:.1f}",
                   f"{1e3 * r['b1']['ttft_s']:.1f}", f"{r['prefill_tps']:.0f}",
                   f"{r['gpu_used_bytes'] / 2**30:.1f}" if r.get("gpu_used_bytes") else ""]
        t.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    Console(width=220).print(t)
    header = "| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS)
    (out / "gpu_table.md").write_text(header + "\n" + "\n".join(lines) + "\n")
    plot(results, runs, out)


def plot(results: dict, runs: dict, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(runs)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = range(len(names))
    ax.bar([i - 0.27 for i in x], [runs[n]["b1"]["decode_tps"] for n in names], 0.27, label="measured")
    ax.bar([i for i in x], [runs[n].get("b1_no_graph", {}).get("decode_tps", 0) for n in names], 0.27,
           label="measured, no CUDA graph")
    ax.bar([i + 0.27 for i in x], [runs[n]["bound_tps_b1"] for n in names], 0.27, label="bandwidth bound")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title(f"glmc ONNX Runtime CUDA vs bound, {results['shape']}, {results['gpu']}, {results['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gpu_decode.png", dpi=120)


# ---------------------------------------------------------------------------------------------- check

CHECKS = {  # name: compile config (+ overrides); padded builds get unequal prompts, unpadded ones equal ones
    "fp32": ("glmc-tiny-fp32.yaml", []),
    "fp16": ("glmc-tiny-fp32.yaml", ["precision.dtype=fp16"]),
    "fp16-unpadded": ("glmc-tiny-fp32.yaml", ["precision.dtype=fp16"] + ORT_OPTIONS),
    "int8": ("glmc-tiny-int8.yaml", []),
    "int8-fp16-unpadded": ("glmc-tiny-int8.yaml", ["precision.dtype=fp16"] + ORT_OPTIONS),
    "int4-fp16-unpadded": ("glmc-tiny-int4.yaml", ["precision.dtype=fp16"] + ORT_OPTIONS),
    "kv8": ("glmc-tiny-kv8.yaml", []),
    "kv8-fp16-unpadded-folded": ("glmc-tiny-kv8.yaml", ["precision.dtype=fp16"] + ORT_OPTIONS + KV8_OPTIONS),
}


def trace(backend, prompts, steps: int, forced: torch.Tensor | None = None):
    """Greedy (or `forced`) tokens [B, steps] and the logits of every step [B, steps + 1, V]."""
    from glmc.runtime.generate import left_pad
    ids, mask, pos = left_pad(prompts)
    logits, cache = backend.forward(ids, pos, mask, backend.new_cache(len(prompts)))
    all_logits, tokens, pos = [logits], [], pos[:, -1:]
    for i in range(steps):
        tok = forced[:, i] if forced is not None else logits.argmax(-1)
        tokens.append(tok)
        mask, pos = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1), pos + 1
        logits, cache = backend.forward(tok[:, None], pos, mask, cache)
        all_logits.append(logits)
    return torch.stack(tokens, 1), torch.stack(all_logits, 1)


def check(args) -> None:
    """Shipped model: CUDA builds vs CPU builds of the same graph, 32 greedy steps (tokens identical?) and the
    logits of CUDA fed CPU's tokens (relative error, against verify's bound for the precision)."""
    from rich.console import Console

    from glmc.artifact import open_build
    from glmc.compiler import pipeline, schema
    from glmc.runtime.loader import make_backend
    from glmc.runtime.verify import tolerance_for

    prompts = {True: [[64790, 64792, 30, 31, 32, 33], [64790, 64792, 40, 41]],
               False: [[64790, 64792, 30, 31, 32, 33], [64790, 64792, 40, 41, 42, 43]]}
    out = {}
    for name, (config, sets) in CHECKS.items():
        bdir = args.work / f"tiny-{name}"
        try:
            if not (bdir / "manifest.json").is_file():
                cfg = schema.load([ROOT / "compile_configs" / config], overrides=sets + [
                    "targets=[onnxruntime]", f"output={bdir}", "verify.enabled=false",
                    f"cache_dir={args.work / 'tiny-cache'}"])
                pipeline.compile_config(cfg, console=Console())
            build = open_build(bdir)
            cpu = make_backend(build, "onnxruntime", "cpu")
            gpu = make_backend(build, "onnxruntime", args.device)
            ps = [[t % cpu.vocab_size for t in p] for p in prompts[cpu.padded]]  # (the shipped vocab is small)
            cpu_tokens, cpu_logits = trace(cpu, ps, 32)
            gpu_tokens, _ = trace(gpu, ps, 32)
            _, forced_logits = trace(gpu, ps, 32, forced=cpu_tokens)
            rel = float((forced_logits - cpu_logits).abs().max() / cpu_logits.abs().max())
            c = build.manifest["config"]["precision"]
            bound = tolerance_for({"fp32": torch.float32, "fp16": torch.float16}[c["dtype"]],
                                  {"int8": 8, "int4": 4}.get(c["weights"], 0), c["kv_cache"] == "int8").rel
            out[name] = {"identical": bool((cpu_tokens == gpu_tokens).all()), "rel": rel, "bound": bound,
                         "token_agreement": float((cpu_tokens == gpu_tokens).float().mean()),
                         "cuda_graph": gpu.cuda_graph, "shared_buffer": gpu.shared}
        except Exception as e:  # noqa: BLE001 - record and go on
            out[name] = {"error": f"{type(e).__name__}: {e}"[-1500:]}
        log(name, out[name])
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
    ap.add_argument("--no-check", dest="check", action="store_false", help="run: skip the shipped-model check")
    ap.add_argument("--ort-ready", type=Path, help="run: a file whose existence says onnxruntime-gpu is installed")
    ap.add_argument("--ort-site", type=Path, help="run: the folder onnxruntime-gpu is installed in (subprocesses)")
    ap.add_argument("--threads", type=int, default=8, help="torch CPU threads of the compiles")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
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
