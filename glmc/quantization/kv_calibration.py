"""KV-cache int8 / fp8 calibration: run text through the float model and turn per-layer K/V absolute maxima into scales.

What is measured is exactly what goes into the cache: the `presents` of a prefill, i.e. K after rotary and V.
Granularity: "tensor" (scale [1]), "head" (one per KV head, [Hkv]) or "channel" (per KV head and head
channel, [Hkv, D]). scale = absmax / QMAX (127 for int8, 448 for fp8 e4m3), floored at the dtype's smallest
normal number and rounded *up* to the dtype the model runs in, so that QMAX * scale bounds every calibration value.

Calibration text: `calibration.txt` next to this module (module docstrings of the Python standard library,
about 4.5 KB) by default, or a user's `.txt` (one text: tokenized whole and cut into windows of max_length) or
`.jsonl` (one {"text": ...} per line: one sample each, truncated to max_length) file; num_samples caps the count.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from glmc.errors import GlmcError
from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")
QMAX = 127
QMAX_OF = {"int8": QMAX, "fp8": 448.0}  # a KV cache dtype's largest code: int8, and float8 e4m3's largest finite
# Dims of a present [B, Hkv, T, D] reduced away per granularity; the rest is the scale's shape.
REDUCE_DIMS = {"tensor": (0, 1, 2, 3), "head": (0, 2, 3), "channel": (0, 2)}


def read_texts(path: str | Path | None = None) -> tuple[list[str], bool]:
    """The calibration texts of a .txt or .jsonl file (default: the shipped one) and whether they are one stream."""
    p = Path(path) if path else DEFAULT_CALIBRATION
    if not p.is_file():
        raise GlmcError(f"{p}: calibration file does not exist")
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GlmcError(f"{p}:{i}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise GlmcError(f"{p}:{i}: expected an object with a string 'text'")
            texts.append(record["text"])
        return texts, False
    if p.suffix not in (".txt", ".md", ".rst", ""):
        raise GlmcError(f"{p}: calibration text must be a .txt or .jsonl file")
    return [p.read_text(encoding="utf-8")], True


def calibration_samples(encode: Callable[[str], Sequence[int]], path: str | Path | None = None,
                        num_samples: int = 32, max_length: int = 256) -> list[torch.Tensor]:
    """Token id tensors [1, <= max_length] for calibration, at most num_samples of them."""
    if num_samples < 1 or max_length < 2:
        raise GlmcError(f"calibration: num_samples ({num_samples}) must be >= 1 and max_length ({max_length}) >= 2")
    texts, stream = read_texts(path)
    samples: list[list[int]] = []
    if stream:
        ids = list(encode(texts[0]))
        samples = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    else:
        samples = [list(encode(t))[:max_length] for t in texts]
    samples = [s for s in samples if len(s) >= 2][:num_samples]
    if not samples:
        raise GlmcError(f"{path or DEFAULT_CALIBRATION}: no calibration sample of at least 2 tokens")
    return [torch.tensor([s], dtype=torch.int64) for s in samples]


def prefill(model: GLMForCausalLM, samples: Sequence[torch.Tensor]) -> Iterator[list]:
    """One prefill of each calibration sample (unpadded, from an empty cache): yields each forward's presents
    [(k, v)] per layer. The one calibration pass that the KV scales and the activation statistics of sq8 / fp8
    (forward hooks on the model while it runs) share."""
    device = model.cos_cache.device
    for ids in samples:
        ids = ids.to(device)
        b, s = ids.shape
        positions = torch.arange(s, device=device).expand(b, s)
        mask = torch.ones(b, s, dtype=torch.int64, device=device)
        yield model(ids, positions, mask, model.empty_cache(b, device))[1]


def prefill_with_hooks(model: GLMForCausalLM, samples: Sequence[torch.Tensor], hooks: list) -> None:
    """`prefill` over every sample with forward hooks already registered (`hooks`: their handles), which are removed
    afterwards, also on error: how sq8 and fp8 gather their activation statistics."""
    try:
        for _ in prefill(model, samples):
            pass
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def collect_absmax(model: GLMForCausalLM, samples: Sequence[torch.Tensor], granularity: str
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the float32 abs-max of the present K and V over all samples, reduced to `granularity`."""
    if granularity not in REDUCE_DIMS:
        raise GlmcError(f"calibration: granularity '{granularity}' is not one of {', '.join(REDUCE_DIMS)}")
    if model.kv_dtype == torch.int8:
        raise GlmcError("calibration: the model already has an int8 KV cache; calibrate the float model")
    if model.kv_dtype == torch.float8_e4m3fn:
        raise GlmcError("calibration: the model already has an fp8 KV cache; calibrate the float model")
    dims = REDUCE_DIMS[granularity]
    k_max: list[torch.Tensor] = []
    v_max: list[torch.Tensor] = []
    for presents in prefill(model, samples):
        for i, (k, v) in enumerate(presents):
            km = torch.atleast_1d(k.float().abs().amax(dim=dims))
            vm = torch.atleast_1d(v.float().abs().amax(dim=dims))
            if i == len(k_max):
                k_max.append(km)
                v_max.append(vm)
            else:
                k_max[i] = torch.maximum(k_max[i], km)
                v_max[i] = torch.maximum(v_max[i], vm)
    return k_max, v_max


def scales_from_absmax(absmax: torch.Tensor, dtype: torch.dtype, qmax: float = QMAX) -> torch.Tensor:
    """absmax / qmax in `dtype`, floored at the dtype's smallest normal and rounded up so qmax * scale >= absmax."""
    info = torch.finfo(dtype)
    scale = (absmax.float() / qmax).clamp(min=info.tiny) * (1 + info.eps)  # casting rounds by <= eps / 2
    return scale.to(dtype)


def calibrate_kv(model: GLMForCausalLM, samples: Sequence[torch.Tensor], granularity: str,
                 dtype: torch.dtype | None = None, kv_dtype: str = "int8"
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V scales for a `kv_dtype` (int8 | fp8) cache of `granularity`, for a model running in `dtype`.

    Apply them with modeling_chatglm.enable_kv_int8(model, k_scales, v_scales, dtype=the cache's torch dtype).
    """
    dtype = dtype or model.dtype
    if kv_dtype not in QMAX_OF:
        raise GlmcError(f"calibration: KV cache dtype '{kv_dtype}' is not one of {', '.join(QMAX_OF)}")
    qmax = QMAX_OF[kv_dtype]
    k_max, v_max = collect_absmax(model, samples, granularity)
    return [scales_from_absmax(m, dtype, qmax) for m in k_max], [scales_from_absmax(m, dtype, qmax) for m in v_max]
