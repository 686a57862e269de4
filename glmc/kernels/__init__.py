"""GPU kernels behind the glmc custom ops on CUDA, used by the `cuda` backend (glmc/runtime/backend_cuda.py): Triton,
and one CUDA C++ source (quantized_linear_mma.cu) that torch compiles with NVRTC at first use (`_cuda`).

One module per op, each kernel's docstring naming the op and the torch reference it must match:

- `quantized_linear`: weight-only int8/int4 (per channel or grouped) and fp16 GEMV with split-K float32 partials
  (Triton variants and the tensor-core `mma` one, which can also finish dense_h_to_4h with SwiGLU), dequantize for
  prefill. Op: `glmc::quantized_linear` (ops/quantized_linear.py); `F.linear` for fp16.
- `norm`: residual add (summing a linear's partials) + RMSNorm; SwiGLU over the gate/up partials. Reference:
  `RMSNorm`, `GLMBlock`, `MLP` of modeling_chatglm.py.
- `rotary`: QKV bias + ChatGLM rotary + KV-cache append into a static cache. Op: the rotary and concat of
  `glmc::group_query_attention` (`gqa_reference`).
- `attention`: decode attention over the static cache, split-K (flash-decoding) with GQA, then the combine. Op:
  `gqa_reference` for one new token.
- `sampling`: logits from the output layer's partials, greedy argmax on the device. Reference: `generate.sample`
  with temperature 0.
- `partials`: how those kernels read a linear's split-K partials (`sum_partials`: a tile of splits per load).

Importing any of them needs neither triton nor CUDA (`_jit`); launching does. `available()` says whether they can run.
On sm90+ every decode kernel runs with programmatic dependent launch (`_cuda`; GLMC_PDL=0 turns it off).
"""

from __future__ import annotations


def available() -> str | None:
    """None when the kernels can run here, else why not (no triton, no CUDA device)."""
    from glmc.kernels._jit import HAVE_TRITON
    if not HAVE_TRITON:
        return "triton is not installed (pip install -e '.[cuda]')"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None
