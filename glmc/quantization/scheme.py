"""Quantization schemes: parse precision names ("int4-g128+kv8"), the quantization.json dict, save quantized models.

A precision name is '+'-joined parts, each one of:
  fp32 | fp16 | bf16                      the floating-point dtype (default: fp16 once anything is quantized, else fp32)
  int8 | int4 | int8-gG | int4-gG         weight-only, per output channel or per group of G (32, 64, 128) along K
  int4-g128-awq / int8-awq ...            ... with AWQ's activation-aware scale search instead of round-to-nearest
  int8-out... / int4-g128-out             ... also quantize the output layer
  sq8 | sq8-a0.75                         SmoothQuant W8A8: int8 weights per channel, int8 activations per token,
                                          migration strength alpha (default 0.5)
  fp8                                     FP8 (e4m3) weights and activations
  kv8 | kv8-tensor | kv8-head | kv8-channel   int8 KV cache, scale per tensor / per KV head / per KV head and channel
  kvfp8 | kvfp8-tensor | ...              FP8 (e4m3) KV cache (default granularity: tensor)
e.g. "fp16", "int8", "int4-g128", "kv8", "int8+kv8", "fp32+int4-g64+kv8-head", "int4-g128-awq", "sq8", "fp8+kvfp8".

quantization.json (written next to the weights by checkpoint.save_checkpoint, read back by checkpoint.load_model):
  {"weights": {"bits": 4, "group_size": 128, "include_output": false, "method": "awq"},
   "kv_cache": {"granularity": "channel", "dtype": "int8"}}
"method" is rtn | awq (weight-only; the same stored format either way) | sq8 (+ "alpha") | fp8; absent means rtn.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from glmc.errors import GlmcError
from glmc.modeling_patches.config import torch_dtype

BITS = (8, 4)  # integer weight widths
GROUP_SIZES = (0, 32, 64, 128)  # 0 = one scale per output channel
FLOAT_DTYPES = ("fp32", "fp16", "bf16")  # the float names of the precision grammar (config.DTYPE_NAMES maps them)
KV_GRANULARITIES = ("tensor", "head", "channel")
# int8: K after rotary has outlier channels (docs/quantization.md); fp8 keeps them by its exponent
DEFAULT_KV_GRANULARITY = {"int8": "channel", "fp8": "tensor"}
KV_DTYPES = ("int8", "fp8")
KV_TORCH_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # the quantized cache's element type
# How weights are quantized -> the function that turns a float32 model into the scheme ("module:function", imported
# when used). rtn/awq are weight-only int8/int4 in one stored format; sq8 and fp8 also quantize activations.
METHODS = {
    "rtn": "glmc.quantization.weight_only:apply_rtn",
    "awq": "glmc.quantization.awq:apply_awq",
    "sq8": "glmc.quantization.smoothquant:apply_sq8",
    "fp8": "glmc.quantization.fp8:apply_fp8",
}
WEIGHT_ONLY_METHODS = ("rtn", "awq")
DEFAULT_ALPHA = 0.5  # SmoothQuant's migration strength (the paper's and TensorRT-LLM's default)


def check_scheme(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise GlmcError(f"quantization: weight bits {bits} is not one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise GlmcError(f"quantization: group_size {group_size} is not one of "
                        f"{', '.join(map(str, GROUP_SIZES))} (0 = per output channel)")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What a precision name asks for."""

    dtype: str = "fp32"  # fp32 | fp16 | bf16: activations, scales, unquantized weights
    weight_bits: int = 0  # 0 = float weights
    group_size: int = 0
    include_output: bool = False
    kv_granularity: str | None = None  # None = float KV cache
    method: str = "rtn"  # a METHODS key; sq8 and fp8 have weight_bits 8, group_size 0
    alpha: float = DEFAULT_ALPHA  # sq8 only
    kv_dtype: str = "int8"  # the quantized KV cache's type (when kv_granularity is set): int8 | fp8

    @property
    def activations(self) -> str:
        """float | int8 (sq8: per token) | fp8: what the linears' inputs are quantized to."""
        return {"sq8": "int8", "fp8": "fp8"}.get(self.method, "float")

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs calibration text (KV scales, AWQ's search, SmoothQuant's and FP8's ranges)."""
        return bool(self.kv_granularity) or self.method != "rtn"

    @property
    def _weights_part(self) -> str:
        if self.method == "sq8":
            return "sq8" + (f"-a{self.alpha:g}" if self.alpha != DEFAULT_ALPHA else "")
        if self.method == "fp8":
            return "fp8"
        return (f"int{self.weight_bits}" + (f"-g{self.group_size}" if self.group_size else "")
                + ("-awq" if self.method == "awq" else "") + ("-out" if self.include_output else ""))

    @property
    def _kv_part(self) -> str:
        return "kv8" if self.kv_dtype == "int8" else "kvfp8"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def name(self) -> str:
        parts = [self.dtype]
        if self.weight_bits:
            parts.append(self._weights_part)
        if self.kv_granularity:
            parts.append(f"{self._kv_part}-{self.kv_granularity}")
        return "+".join(parts)

    @property
    def tag(self) -> str:
        """The short name builds go by (`{precision}` in a compile config's output): fp16 | int8 | int4-g128 |
        int4-g128-awq | sq8 | fp8 | int8-fp32 (weights quantized, activations not fp16) | fp16-kv8 | int8-kv8 |
        fp8-kvfp8 ..."""
        tag = self._weights_part.replace("-out", "") if self.weight_bits else self.dtype
        if self.weight_bits and self.dtype != "fp16":
            tag += f"-{self.dtype}"
        return tag + (f"-{self._kv_part}" if self.kv_granularity else "")

    def to_json(self) -> dict:
        """The quantization.json dict ({} for a float scheme)."""
        out: dict = {}
        if self.weight_bits:
            out["weights"] = {"bits": self.weight_bits, "group_size": self.group_size,
                              "include_output": self.include_output}
            if self.method != "rtn":
                out["weights"]["method"] = self.method
            if self.method == "sq8":
                out["weights"]["alpha"] = self.alpha
        if self.kv_granularity:
            out["kv_cache"] = {"granularity": self.kv_granularity, "dtype": self.kv_dtype}
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
        method = w.get("method", "rtn") if bits else "rtn"
        if method not in METHODS:
            raise GlmcError(f"{where}: weights.method '{method}' is not one of {', '.join(METHODS)}")
        try:
            alpha = float(w.get("alpha", DEFAULT_ALPHA))
        except (TypeError, ValueError):
            raise GlmcError(f"{where}: weights.alpha must be a number") from None
        gran = kv.get("granularity") if kv else None
        if kv and gran not in KV_GRANULARITIES:
            raise GlmcError(f"{where}: kv_cache.granularity '{gran}' is not one of {', '.join(KV_GRANULARITIES)}")
        kv_dtype = kv.get("dtype", "int8") if kv else "int8"
        if kv_dtype not in KV_DTYPES:
            raise GlmcError(f"{where}: kv_cache.dtype '{kv_dtype}' is not one of {', '.join(KV_DTYPES)}")
        return check(cls(dtype, bits, group, bool(w.get("include_output", False)), gran, method, alpha, kv_dtype),
                     where)


def check(scheme: Scheme, where: str) -> Scheme:
    """The combinations a Scheme may not hold, refused naming `where`; returns the scheme."""
    if scheme.method not in WEIGHT_ONLY_METHODS and (scheme.weight_bits != 8 or scheme.group_size):
        raise GlmcError(f"{where}: {scheme.method} weights are 8-bit with one scale per output channel")
    if scheme.method not in WEIGHT_ONLY_METHODS and scheme.include_output:
        raise GlmcError(f"{where}: {scheme.method} keeps the output layer in floating point (drop -out)")
    if not 0.0 <= scheme.alpha <= 1.0:
        raise GlmcError(f"{where}: SmoothQuant alpha {scheme.alpha} is outside [0, 1]")
    return scheme


_WEIGHTS = re.compile(r"int(8|4)(?:-g(\d+))?(-awq)?(-out)?")
_SQ8 = re.compile(r"sq8(?:-a([0-9.]+))?")
_KV = re.compile(r"kv(8|fp8)(?:-(\w+))?")


def parse_precision(name: str) -> Scheme:
    """'int4-g128+kv8' -> Scheme (see the module docstring for the grammar)."""
    dtype, bits, group, out, kv, method, alpha, kv_dtype = None, 0, 0, False, None, "rtn", DEFAULT_ALPHA, "int8"
    for part in name.strip().lower().split("+"):
        if part in FLOAT_DTYPES:
            dtype = part
        elif m := _WEIGHTS.fullmatch(part):
            bits, group, out = int(m.group(1)), int(m.group(2) or 0), bool(m.group(4))
            method = "awq" if m.group(3) else "rtn"
            check_scheme(bits, group)
        elif m := _SQ8.fullmatch(part):
            bits, method = 8, "sq8"
            try:
                alpha = float(m.group(1)) if m.group(1) else DEFAULT_ALPHA
            except ValueError:
                raise GlmcError(f"precision '{name}': '{part}': alpha '{m.group(1)}' is not a number") from None
        elif part == "fp8":
            bits, method = 8, "fp8"
        elif m := _KV.fullmatch(part):
            kv_dtype = "int8" if m.group(1) == "8" else "fp8"
            kv = m.group(2) or DEFAULT_KV_GRANULARITY[kv_dtype]
            if kv not in KV_GRANULARITIES:
                raise GlmcError(f"precision '{name}': KV cache granularity '{kv}' is not one of "
                                f"{', '.join(KV_GRANULARITIES)}")
        else:
            raise GlmcError(f"precision '{name}': '{part}' is not fp32, fp16, bf16, int8, int4, int8-g128, "
                            "int4-g128 (32/64/128), int4-g128-awq, sq8, sq8-a0.75, fp8, kv8, kv8-tensor, kv8-head, "
                            "kv8-channel or kvfp8")
    if dtype is None:
        dtype = "fp16" if (bits or kv) else "fp32"
    return check(Scheme(dtype, bits, group, out, kv, method, alpha, kv_dtype), f"precision '{name}'")


def apply_scheme(model, scheme: Scheme, calibration_ids: list[torch.Tensor] | None = None):
    """Turn a float32 model into `scheme` in place: KV scales calibrated on the float model first, then the
    scheme's method (METHODS: it casts to the scheme's dtype and quantizes the weights, calibrating on the float
    model first where it needs to), then the KV cache switched to its quantized form. Returns the model."""
    import importlib

    from glmc.modeling_patches.modeling_chatglm import enable_kv_int8
    from glmc.quantization.kv_calibration import calibrate_kv

    if scheme.needs_calibration and not calibration_ids:
        raise GlmcError(f"precision {scheme.name}: needs calibration text (the KV cache's scales or the weight "
                        "method's activation statistics)")
    scales = None
    if scheme.kv_granularity and calibration_ids:
        scales = calibrate_kv(model, calibration_ids, scheme.kv_granularity, dtype=scheme.torch_dtype,
                              kv_dtype=scheme.kv_dtype)
    module, function = METHODS[scheme.method].split(":")
    getattr(importlib.import_module(module), function)(model, scheme, calibration_ids)
    if scales is not None:
        enable_kv_int8(model, *scales, dtype=KV_TORCH_DTYPES[scheme.kv_dtype])
    return model


def save_quantized(model, out_dir: str | Path, scheme: Scheme, layout: str = "safetensors") -> Path:
    """Save a model converted by apply_scheme: ChatGLM-layout weights + quantization.json describing `scheme`."""
    from glmc.modeling_patches.checkpoint import save_checkpoint

    return save_checkpoint(model, out_dir, layout=layout, quantization=scheme.to_json() or None)
