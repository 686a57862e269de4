"""CUDA check of the ONNX Runtime backend: greedy tokens on CUDA == on CPU (== torch in fp32), KV buffers reused,
host<->device bytes per step from ORT's profile.

    python benchmarks/check_runtime_cuda.py --json out.json      # on a GPU machine with onnxruntime-gpu

Exports tiny ChatGLM3-shaped models (fp32 reference + onnxruntime lowerings, fp16, fp16+kv8, fp16+int4-g32), runs
3 prompts of different lengths for 32 greedy steps on each provider, with both KV-cache modes where the graph
allows sharing past and present.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from glmc.export.lower import lower_file
from glmc.export.onnx_export import export
from glmc.modeling_patches import variant
from glmc.modeling_patches.checkpoint import random_model
from glmc.quantization.scheme import apply_scheme, parse_precision
from glmc.runtime.backend_onnxruntime import OnnxRuntimeBackend
from glmc.runtime.backend_torch import TorchBackend
from glmc.runtime.generate import SamplingConfig, generate

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
GREEDY = SamplingConfig(max_new_tokens=32)
SHAPE = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_heads=4, head_dim=32, num_kv_heads=2,
             vocab_size=300, seq_length=512)  # tests/conftest.py's tiny model
MODELS = {"fp32": (None, ("reference", "onnxruntime")), "fp16": ("fp16", ("onnxruntime",)),
          "fp16-kv8": ("fp16+kv8", ("onnxruntime",)), "fp16-int4": ("fp16+int4-g32", ("onnxruntime",))}


def run(path: Path, device: str, share: bool | None = None, profile: str | None = None) -> dict:
    be = OnnxRuntimeBackend(path, max_length=64, max_batch=4, device=device, share_buffer=share, profile=profile)
    tokens = generate(be, PROMPTS, GREEDY)
    allocated = {v.data_ptr() for bufs in be._buffers for v in bufs}
    r = {"tokens": tokens, "shared": be.shared, "kv_buffers": len(allocated),
         "only_allocated_buffers_bound": be.bound_pointers == allocated}
    if profile:
        profile_file = be.end_profiling()
        assert profile_file is not None  # profiling was on
        events = json.loads(Path(profile_file).read_text())
        runs = [e for e in events if e.get("name") == "model_run"]
        copies = [e for e in events if e.get("cat") == "Node" and "Memcpy" in e["args"].get("op_name", "")
                  and e["name"].endswith("_kernel_time")]
        r["runs"] = len(runs)
        r["memcpy_nodes_per_run"] = len(copies) / len(runs)
        r["memcpy_bytes_per_run"] = sum(int(e["args"].get("output_size", 0)) for e in copies) / len(runs)
        r["nodes_on_cpu"] = sorted({e["args"]["op_name"] for e in events if e.get("cat") == "Node"
                                    and e["args"].get("provider") == "CPUExecutionProvider"})
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort
    report = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "results": {}}
    base = random_model(variant("chatglm3-6b", **SHAPE), seed=0, std=0.15).eval()
    calib = [torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = generate(TorchBackend(base, 64), PROMPTS, GREEDY)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, (prec, targets) in MODELS.items():
            model = base if prec is None else apply_scheme(copy.deepcopy(base), parse_precision(prec),
                                                           calib if "kv8" in prec else None)
            export(model, Path(tmp) / name / "export.onnx")
            for target in targets:
                path = Path(tmp) / name / target / "model.onnx"
                lower_file(Path(tmp) / name / "export.onnx", target, path)
                res = {"cpu": run(path, "cpu"), "cuda": run(path, "cuda", profile=str(Path(tmp) / "prof"))}
                if res["cuda"]["shared"]:
                    res["cuda_two_buffers"] = run(path, "cuda", share=False)
                cpu = res["cpu"]["tokens"]
                for key, r in res.items():
                    if prec is None:
                        r["equal_torch"] = r["tokens"] == expected
                    if key != "cpu":
                        r["equal_cpu"] = r["tokens"] == cpu
                        r["agree_cpu"] = float(np.mean([a == b for x, y in zip(r["tokens"], cpu, strict=False)
                                                        for a, b in zip(x, y, strict=False)]))
                        ok &= r["equal_cpu"] and r["only_allocated_buffers_bound"]
                for r in res.values():
                    r.pop("tokens")
                report["results"][f"{name}/{target}"] = res
                print(f"{name}/{target}: {json.dumps(res)}", flush=True)
    report["passed"] = ok
    print("PASSED" if ok else "FAILED")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
