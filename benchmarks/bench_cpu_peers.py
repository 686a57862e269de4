"""glmc against llama.cpp on a CPU, on the same weights: decode and prefill tokens/s at 1 and 2 threads, peak RSS.

    pip install -e ".[peers]"               # llama-cpp-python, an optional benchmark dependency (builds llama.cpp)
    python benchmarks/bench_cpu_peers.py --llama-cpp-src DIR/vendor/llama.cpp --json docs/data/bench_cpu_peers.json

DIR is the unpacked llama-cpp-python sdist (`pip download --no-binary :all: --no-deps llama-cpp-python`): the
converter `convert_hf_to_gguf.py` (with its own `gguf-py`) ships there, not in the wheel. It registers ChatGLM
checkpoints (`ChatGLMModel`, arch CHATGLM); for a tokenizer it wants THUDM's remote-code ChatGLM tokenizer (or a
GPT-2 BPE one), so this script hands it the checkpoint's SentencePiece `tokenizer.model` through the converter's
own SentencePiece reader (token ids are fed directly below, so only the vocabulary size has to agree).

What runs, in one process tree:
1. a ChatGLM3-shaped random checkpoint of ~291M parameters (5 layers, hidden 2048, ffn 6848, 16 heads / 2 KV
   groups, vocab 8192; float32; glmc.modeling_patches.checkpoint.write_random_checkpoint) with the shipped
   model's tokenizer files;
2. glmc builds of it (`glmc compile` defaults, target onnxruntime): fp32, int8 (per channel), int4 (group 32,
   like q4_0), each also with `precision.quantize_output_layer` (llama.cpp's quantizations quantize the output
   layer too); llama.cpp GGUFs: f32 and q8_0 from the converter, q4_0 by llama_model_quantize from the f32 file;
3. `--rounds` rounds; in each, every (engine, threads) pair in turn, each in a fresh subprocess (peak RSS is
   per process): open the model, prefill a `--prefill`-token prompt (tokens/s), then decode `--new-tokens`
   greedy tokens after a `--prompt`-token prompt (tokens/s after the first token); peak RSS above the
   subprocess's own baseline (interpreter + imports, measured before the model is opened). Medians over rounds;
4. the greedy tokens of llama.cpp f32 on the shipped model (converted the same way) against glmc's torch
   reference (the model every build is verified against), 3 prompts x 16 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(num_layers=5, hidden_size=2048, ffn_hidden_size=6848, num_heads=16, head_dim=128, num_kv_heads=2,
             vocab_size=8192, seq_length=2048)
# glmc precision -> (compile settings, llama.cpp peer)
GLMC = {"fp32": (["precision.dtype=fp32", "precision.weights=float"], "f32"),
        "int8": (["precision.dtype=fp32", "precision.weights=int8", "precision.group_size=0"], "q8_0"),
        "int8+qout": (["precision.dtype=fp32", "precision.weights=int8", "precision.group_size=0",
                       "precision.quantize_output_layer=true"], "q8_0"),
        "int4": (["precision.dtype=fp32", "precision.weights=int4", "precision.group_size=32"], "q4_0"),
        "int4+qout": (["precision.dtype=fp32", "precision.weights=int4", "precision.group_size=32",
                       "precision.quantize_output_layer=true"], "q4_0")}
LLAMA = ("f32", "q8_0", "q4_0")


# ---------------------------------------------------------------------------------------------- preparation

def write_checkpoint(out: Path) -> Path:
    import torch

    from glmc.compiler.schema import shipped_model
    from glmc.modeling_patches import variant
    from glmc.modeling_patches.checkpoint import write_random_checkpoint
    if (out / "config.json").is_file():
        return out
    write_random_checkpoint(variant("chatglm3-6b", **SHAPE), out, dtype=torch.float32)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(shipped_model() / name, out / name)
    return out


def glmc_build(ckpt: Path, name: str, work: Path) -> dict:
    """`glmc compile` of the checkpoint at one precision (onnxruntime target, the compile defaults otherwise)."""
    from glmc.compiler import pipeline, schema
    out = work / "glmc" / name
    sets = GLMC[name][0] + [f"model.checkpoint={ckpt}", "model.name=glm291m", f"output={out}",
                            f"cache_dir={work / 'glmc-cache'}", "targets=[onnxruntime]", "limits.max_batch=1",
                            "limits.max_input_length=512", "limits.max_sequence_length=1024"]
    info: dict = {"settings": GLMC[name][0]}
    if not (out / "manifest.json").is_file():
        cfg = schema.load([], sets)
        t = time.perf_counter()
        try:
            pipeline.compile_config(cfg)
        except pipeline.StageError as e:  # recorded; the build is still measured (verify off)
            info["verify_error"] = str(e)
            pipeline.compile_config(schema.load([], sets + ["verify.enabled=false"]))
        info["compile_s"] = round(time.perf_counter() - t, 1)
    m = json.loads((out / "manifest.json").read_text())
    v = m.get("verification") or {}
    info["verification"] = {"passed": v.get("passed"), "summary": v.get("summary")}
    info["int8_activations"] = m["config"]["precision"]["int8_activations"]
    d = out / "onnx" / "onnxruntime"
    info["path"] = str(d / "model.onnx")
    info["weight_bytes"] = sum(p.stat().st_size for p in d.iterdir() if p.suffix in (".onnx", ".data"))
    return info


def _converter(src: Path):
    """The llama.cpp converter's ChatGLM class, with a SentencePiece vocabulary (see the module docstring)."""
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    import conversion  # type: ignore[import-not-found]  # noqa: F401  (registers the model classes)
    from conversion.chatglm import ChatGLMModel  # type: ignore[import-not-found]

    def set_vocab(self):
        self.hparams.setdefault("vocab_size", self.hparams["padded_vocab_size"])
        self._set_vocab_sentencepiece()
    ChatGLMModel.set_vocab = set_vocab
    return ChatGLMModel


def llama_convert(src: Path, ckpt: Path, out_dir: Path) -> dict[str, Path]:
    """f32 and q8_0 GGUFs with the converter, q4_0 by llama.cpp's own quantizer from the f32 one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"model-{k}.gguf" for k in LLAMA}
    for kind in ("f32", "q8_0"):
        if not paths[kind].is_file():
            code = (f"import sys, torch; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); "
                    f"import bench_cpu_peers as b; M = b._converter(__import__('pathlib').Path({str(src)!r})); "
                    f"import gguf; ft = gguf.LlamaFileType.{'ALL_F32' if kind == 'f32' else 'MOSTLY_Q8_0'}; "
                    f"m = M(__import__('pathlib').Path({str(ckpt)!r}), ft, __import__('pathlib').Path("
                    f"{str(paths[kind])!r}), eager=True)\nwith torch.inference_mode(): m.write()")
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    if not paths["q4_0"].is_file():
        import llama_cpp
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(paths["f32"]).encode(), str(paths["q4_0"]).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return paths


# ---------------------------------------------------------------------------------------------- one measurement

def _status(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


def _last_logits(llm):
    """The last evaluated position's logits (llama-cpp-python 0.3.36's `Llama.scores` stays zero without
    logits_all; the context's own buffer holds them)."""
    import llama_cpp
    import numpy as np
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))


def measure_child(spec: dict) -> dict:
    """Runs in a fresh subprocess: open the model, time a prefill and a greedy decode, report peak RSS above the
    baseline taken after the imports."""
    threads, vocab = spec["threads"], spec["vocab"]
    prefill_ids = [100 + (i * 37) % (vocab - 200) for i in range(spec["prefill"])]
    prompt_ids = prefill_ids[:spec["prompt"]]
    if spec["engine"] == "llama.cpp":
        import numpy as np
        from llama_cpp import Llama
        base = _status("VmRSS")
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        t = time.perf_counter()
        llm = Llama(spec["path"], n_ctx=spec["ctx"], n_threads=threads, n_threads_batch=threads, n_batch=512,
                    n_ubatch=512, verbose=False)
        open_s = time.perf_counter() - t

        def prefill(ids):
            llm.reset()
            llm.eval(ids)
            return int(np.argmax(_last_logits(llm)))

        def decode(first, n):
            tok = first
            for _ in range(n):
                llm.eval([tok])
                tok = int(np.argmax(_last_logits(llm)))
    else:
        import torch

        from glmc.runtime.backend_onnxruntime import OnnxRuntimeBackend
        from glmc.runtime.generate import SamplingConfig, stream
        base = _status("VmRSS")
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        t = time.perf_counter()
        backend = OnnxRuntimeBackend(spec["path"], max_length=spec["ctx"], max_batch=1, threads=threads)
        open_s = time.perf_counter() - t
        torch.set_num_threads(threads)
        state: dict = {}

        def prefill(ids):
            state["steps"] = stream(backend, [ids], SamplingConfig(max_new_tokens=spec["new_tokens"] + 1))
            return next(state["steps"])

        def decode(first, n):
            for _ in range(n):
                next(state["steps"])
    t = time.perf_counter()
    prefill(prefill_ids)
    prefill_s = time.perf_counter() - t
    first = prefill(prompt_ids)
    t = time.perf_counter()
    decode(first, spec["new_tokens"])
    decode_s = time.perf_counter() - t
    return {"open_s": open_s, "prefill_tps": len(prefill_ids) / prefill_s, "decode_tps": spec["new_tokens"] / decode_s,
            "peak_rss_mib": (_status("VmHWM") - base) / 2**20, "base_rss_mib": base / 2**20,
            "kv_mib": (backend.cache_bytes / 2**20) if spec["engine"] == "glmc" else None}


def measure(spec: dict) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import bench_cpu_peers as b; "
            f"print(json.dumps(b.measure_child(json.loads(sys.argv[1]))))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- greedy check

def greedy_check(src: Path, work: Path, steps: int = 16) -> dict:
    """llama.cpp f32 on the shipped model against glmc's torch reference: the same greedy tokens?"""
    import numpy as np
    from llama_cpp import Llama

    from glmc.compiler.schema import shipped_model
    from glmc.modeling_patches.checkpoint import load_model
    from glmc.modeling_patches.tokenizer import load_tokenizer
    from glmc.runtime.backend_torch import TorchBackend
    from glmc.runtime.verify import greedy_trace
    ship = shipped_model()
    gguf = work / "shipped-f32.gguf"
    if not gguf.is_file():
        code = (f"import sys, torch, pathlib; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); "
                f"import bench_cpu_peers as b; M = b._converter(pathlib.Path({str(src)!r})); import gguf; "
                f"m = M(pathlib.Path({str(ship)!r}), gguf.LlamaFileType.ALL_F32, pathlib.Path({str(gguf)!r}), "
                f"eager=True)\nwith torch.inference_mode(): m.write()")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    tok = load_tokenizer(ship)
    model = load_model(ship, "float32")
    llm = Llama(str(gguf), n_ctx=256, n_threads=2, verbose=False)
    rows = []
    for text in ("def main():", "The os module provides", "import numpy as np"):
        ids = tok.encode(text)
        ref = greedy_trace(TorchBackend(model), [ids], steps).tokens[0].tolist()
        llm.reset()
        llm.eval(ids)
        got = []
        for _ in range(steps):
            got.append(int(np.argmax(_last_logits(llm))))
            llm.eval([got[-1]])
        same = next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), steps)
        rows.append({"prompt": text, "torch": ref, "llama_cpp_f32": got, "agreeing_steps": same})
    return {"steps": steps, "rows": rows, "all_equal": all(r["agreeing_steps"] == steps for r in rows)}


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-src", type=Path, required=True, help="llama.cpp source (the sdist's vendor/llama.cpp)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/glmc-bench-cpu-peers"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill measurement")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the decode measurement")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--glmc", nargs="+", default=list(GLMC), choices=list(GLMC))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import llama_cpp
    import onnxruntime
    import torch

    import glmc
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                    time.gmtime()),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
                    "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                                 .splitlines() if line.startswith("model name")), platform.processor()),
                    "versions": {"glmc": glmc.__version__, "onnxruntime": onnxruntime.__version__,
                                 "llama-cpp-python": llama_cpp.__version__, "torch": torch.__version__,
                                 "python": platform.python_version()},
                    "shape": SHAPE, "prefill": args.prefill, "prompt": args.prompt, "new_tokens": args.new_tokens,
                    "load_average_start": os.getloadavg()}
    ckpt = write_checkpoint(args.work / "checkpoint")
    print("checkpoint", ckpt, flush=True)
    builds = {name: glmc_build(ckpt, name, args.work) for name in args.glmc}
    for name, b in builds.items():
        print("glmc", name, b["verification"], b.get("verify_error", ""), flush=True)
    ggufs = llama_convert(args.llama_cpp_src, ckpt, args.work / "gguf")
    result["glmc_builds"] = builds
    result["gguf"] = {k: {"path": str(p), "bytes": p.stat().st_size} for k, p in ggufs.items()}
    ctx = 1024  # both engines' KV cache (the glmc builds' limits.max_sequence_length)
    engines = [("llama.cpp", k, str(p)) for k, p in ggufs.items()] + [("glmc", k, b["path"])
                                                                        for k, b in builds.items()]
    samples: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            for engine, kind, path in engines:
                spec = {"engine": engine, "path": path, "threads": threads, "vocab": SHAPE["vocab_size"],
                        "prefill": args.prefill, "prompt": args.prompt, "new_tokens": args.new_tokens, "ctx": ctx}
                m = measure(spec)
                m["load_average"] = os.getloadavg()[0]
                samples.setdefault(f"{engine} {kind} t{threads}", []).append(m)
                print(f"round {r + 1} {engine:9s} {kind:10s} t{threads}: " + (
                    m["error"] if "error" in m else f"prefill {m['prefill_tps']:7.1f} decode {m['decode_tps']:6.1f} "
                                                    f"tok/s, peak {m['peak_rss_mib']:6.0f} MiB"), flush=True)
    medians = {}
    for key, ms in samples.items():
        ok = [m for m in ms if "error" not in m]
        medians[key] = {k: statistics.median(m[k] for m in ok) for k in ("prefill_tps", "decode_tps", "peak_rss_mib")
                        } if ok else {"error": ms[0]["error"]}
    result["samples"], result["medians"] = samples, medians
    result["load_average_end"] = os.getloadavg()
    result["greedy_check"] = greedy_check(args.llama_cpp_src, args.work)
    print(table(result, args.threads))
    print("greedy, llama.cpp f32 vs glmc torch on the shipped model:",
          [r["agreeing_steps"] for r in result["greedy_check"]["rows"]], "of", result["greedy_check"]["steps"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def table(result: dict, threads: list[int]) -> str:
    """Markdown: one row per glmc build against its llama.cpp peer, per thread count."""
    med, builds = result["medians"], result["glmc_builds"]
    lines = ["| threads | llama.cpp | prefill tok/s | decode tok/s | peak RSS MiB | glmc | prefill tok/s | "
             "decode tok/s | peak RSS MiB | weights+KV MiB | prefill x | decode x |", "|" + " --- |" * 12]
    for t in threads:
        for name, b in builds.items():
            peer = GLMC[name][1]
            lm, gm = med.get(f"llama.cpp {peer} t{t}", {}), med.get(f"glmc {name} t{t}", {})
            if "prefill_tps" not in lm or "prefill_tps" not in gm:
                continue
            kv = 2 * SHAPE["num_layers"] * SHAPE["num_kv_heads"] * SHAPE["head_dim"] * 4 * (
                1024)
            lines.append(f"| {t} | {peer} | {lm['prefill_tps']:.1f} | {lm['decode_tps']:.1f} | "
                         f"{lm['peak_rss_mib']:.0f} | {name} | {gm['prefill_tps']:.1f} | {gm['decode_tps']:.1f} | "
                         f"{gm['peak_rss_mib']:.0f} | {(b['weight_bytes'] + kv) / 2**20:.0f} | "
                         f"{gm['prefill_tps'] / lm['prefill_tps']:.2f} | {gm['decode_tps'] / lm['decode_tps']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
