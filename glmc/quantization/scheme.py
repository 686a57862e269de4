"""Quantization schemes: parse precision names ("int4-g128+kv8"), the quantization.json dict, save quantized models.

A precision name is '+'-joined parts, each one of:
  fp32 | fp16 | bf16                      the floating-point dtype (default: fp16 once anything is quantized, else fp32)
  int8 | int4 | int8-gG | int4-gG         weight-only, per output channel or per group of G (32, 64, 128) along K
  int8-out... / int4-g128-out             ... also quantize the output layer
  kv8 | kv8-tensor | kv8-head | kv8-channel   int8 KV cache, scale per tensor / per KV head / per KV head and channel
e.g. "fp16", "int8", "int4-g128", "kv8", "int8+kv8", "fp32+int4-g64+kv8-head".

quantization.json (written next to the weights by checkpoint.save_checkpoint, read back by checkpoint.load_model):
  {"weights": {"bits": 4, "group_size": 128, "include_output": false},
   "kv_cache": {"granularity": "channel", "dtype": "int8"}}
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from glmc.errors import GlmcError
from glmc.modeling_patches.config import torch_dtype
from glmc.quantization.weight_only import check_scheme

FLOAT_DTYPES = ("fp32", "fp16", "bf16")  # the float names of the precision grammar (config.DTYPE_NAMES maps them)
KV_GRANULARITIES = ("tensor", "head", "channel")
DEFAULT_KV_GRANULARITY = "channel"  # see docs/quantization.md: K after rotary has outlier channels


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What a precision name asks for."""

    dtype: str = "fp32"  # fp32 | fp16 | bf16: activations, scales, unquantized weights
    weight_bits: int = 0  # 0 = float weights
    group_size: int = 0
    include_output: bool = False
    kv_granularity: str | None = None  # None = float KV cache

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def name(self) -> str:
        parts = [self.dtype]
        if self.weight_bits:
            parts.append(f"int{self.weight_bits}" + (f"-g{self.group_size}" if self.group_size else "")
                         + ("-out" if self.include_output else ""))
        if self.kv_granularity:
            parts.append(f"kv8-{self.kv_granularity}")
        return "+".join(parts)

    @property
    def tag(self) -> str:
        """The short name builds go by (`{precision}` in a compile config's output): fp16 | int8 | int4-g128 |
        int8-fp32 (weights quantized, activations not fp16) | fp16-kv8 | int8-kv8 ..."""
        tag = f"int{self.weight_bits}" if self.weight_bits else self.dtype
        if self.weight_bits and self.group_size:
            tag += f"-g{self.group_size}"
        if self.weight_bits and self.dtype != "fp16":
            tag += f"-{self.dtype}"
        return tag + ("-kv8" if self.kv_granularity else "")

    def to_json(self) -> dict:
        """The quantization.json dict ({} for a float scheme)."""
        out: dict = {}
        if self.weight_bits:
            out["weights"] = {"bits": self.weight_bits, "group_size": self.group_size,
                              "include_output": self.include_output}
        if self.kv_granularity:
            out["kv_cache"] = {"granularity": self.kv_granularity, "dtype": "int8"}
        return out

    @classmethod
    def from_json(cls, d: dict, dtype: str = "fp16", where: str = "quantization.json") -> Scheme:
        w, kv = d.get("weights") or {}, d.get("kv_cache") or {}
        try:
            bits, group = int(w.get("bits", 0)), int(w.get("group_size", 0))
        except (TypeError, ValueError):
            raise GlmcError(f"{where}: weights.bits / weights.group_size must be integers") from None
        if bits:
            check_scheme(bits, group)
        gran = kv.get("granularity") if kv else None
        if kv and gran not in KV_GRANULARITIES:
            raise GlmcError(f"{where}: kv_cache.granularity '{gran}' is not one of {', '.join(KV_GRANULARITIES)}")
        if kv and kv.get("dtype", "int8") != "int8":
            raise GlmcError(f"{where}: kv_cache.dtype '{kv.get('dtype')}' is not int8")
        return cls(dtype, bits, group, bool(w.get("include_output", False)), gran)


_WEIGHTS = re.compile(r"int(8|4)(?:-g(\d+))?(-out)?")
_KV = re.compile(r"kv8(?:-(\w+))?")


def parse_precision(name: str) -> Scheme:
    """'int4-g128+kv8' -> Scheme (see the module docstring for the grammar)."""
    dtype, bits, group, out, kv = None, 0, 0, False, None
    for part in name.strip().lower().split("+"):
        if part in FLOAT_DTYPES:
            dtype = part
        elif m := _WEIGHTS.fullmatch(part):
            bits, group, out = int(m.group(1)), int(m.group(2) or 0), bool(m.group(3))
            check_scheme(bits, group)
        elif m := _KV.fullmatch(part):
            kv = m.group(1) or DEFAULT_KV_GRANULARITY
            if kv not in KV_GRANULARITIES:
                raise GlmcError(f"precision '{name}': kv8 granularity '{kv}' is not one of "
                                f"{', '.join(KV_GRANULARITIES)}")
        else:
            raise GlmcError(f"precision '{name}': '{part}' is not fp32, fp16, bf16, int8, int4, int8-g128, "
                            "int4-g128 (32/64/128), kv8, kv8-tensor, kv8-head or kv8-channel")
    if dtype is None:
        dtype = "fp16" if (bits or kv) else "fp32"
    return Scheme(dtype, bits, group, out, kv)


def apply_scheme(model, scheme: Scheme, calibration_ids: list[torch.Tensor] | None = None):
    """Turn a float32 model into `scheme` in place: KV scales calibrated on the float model first, then the cast
    and weight quantization. Returns the model."""
    from glmc.modeling_patches.modeling_chatglm import enable_kv_int8
    from glmc.quantization.kv_calibration import calibrate_kv
    from glmc.quantization.weight_only import quantize_model

    scales = None
    if scheme.kv_granularity:
        if not calibration_ids:
            raise GlmcError(f"precision {scheme.name}: an int8 KV cache needs calibration text")
        scales = calibrate_kv(model, calibration_ids, scheme.kv_granularity, dtype=scheme.torch_dtype)
    model.to(scheme.torch_dtype)
    if scheme.weight_bits:
        quantize_model(model, scheme.weight_bits, scheme.group_size, scheme.include_output)
    if scales is not None:
        enable_kv_int8(model, *scales)
    return model


def save_quantized(model, out_dir: str | Path, scheme: Scheme, layout: str = "safetensors") -> Path:
    """Save a model converted by apply_scheme: ChatGLM-layout weights + quantization.json describing `scheme`."""
    from glmc.modeling_patches.checkpoint import save_checkpoint

    return save_checkpoint(model, out_dir, layout=layout, quantization=scheme.to_json() or None)
