"""Where transformers' GlmForCausalLM decode step spends its time on a GPU (the bench_gpu.py baseline looked slow).

    python benchmarks/profile_hf_gpu.py [--layers 4]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from glmc.modeling_patches import variant
from glmc.modeling_patches.hf_glm import TransformersBackend, transformers_config
from glmc.runtime.generate import SamplingConfig, stream

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--no-cudnn-sdpa", action="store_true", help="keep torch from picking cuDNN attention")
args = ap.parse_args()
if args.no_cudnn_sdpa:
    torch.backends.cuda.enable_cudnn_sdp(False)
from transformers import GlmForCausalLM  # noqa: E402

cfg = variant("chatglm3-6b", num_layers=args.layers)
hf = GlmForCausalLM(transformers_config(cfg)).half().cuda().eval()
print("attn_implementation:", hf.config._attn_implementation)
backend = TransformersBackend(hf, 2304)
prompt = torch.randint(100, 60000, (1, 128)).tolist()
for _ in stream(backend, prompt, SamplingConfig(max_new_tokens=8)):
    pass
t, n = time.perf_counter(), 0
for _ in stream(backend, prompt, SamplingConfig(max_new_tokens=64)):
    n += 1
print(f"generate loop: {n / (time.perf_counter() - t):.1f} tok/s")
for batch in (1, 16):  # as bench_gpu.py times it: prompt 128, 256 new tokens
    p = torch.randint(100, 60000, (batch, 128)).tolist()
    t, n = time.perf_counter(), 0
    for _ in stream(backend, p, SamplingConfig(max_new_tokens=256)):
        n += 1
    print(f"batch {batch}: {batch * n / (time.perf_counter() - t):.1f} tok/s")
# the same forwards without the loop, each synchronised
ids = torch.tensor(prompt).cuda()
with torch.inference_mode():
    out = hf(input_ids=ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _i in range(32):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf(input_ids=tok, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
times.sort()
print(f"bare forward (no mask/positions passed): median {1e3 * times[16]:.2f} ms")
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in stream(backend, prompt, SamplingConfig(max_new_tokens=4)):
        pass
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))
