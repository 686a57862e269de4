"""AutoAWQ checkpoints: recognise their quantization config and convert their GEMM-layout tensors, one at a time as
checkpoint.load_model streams them, into glmc's QuantLinear layout (int4 codes, scales and zero points).

The format (AutoAWQ `awq/modules/linear/gemm.py` WQLinear_GEMM, also what vLLM's and transformers' AWQ loaders
read), for a linear of K inputs and N outputs, group size G, 4 bits:
  qweight  int32 [K, N/8]    eight unsigned 4-bit codes u per word; nibble i (bits 4i..4i+3) holds output column
                             8c + ORDER[i] of word column c, ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
  qzeros   int32 [K/G, N/8]  the unsigned zero points u_z per group, packed the same way
  scales   fp16  [K/G, N]
  w[n, k] = (u[k, n] - u_z[k // G, n]) * scales[k // G, n]          (asymmetric uint4, zero_point: true)
Its quantization config is config.json's `quantization_config` (transformers' AwqConfig: {"quant_method": "awq",
"bits": 4, "group_size": 128, "zero_point": true, "version": "gemm"}) or AutoAWQ's own quant_config.json
({"w_bit": 4, "q_group_size": 128, "zero_point": true, "version": "GEMM"}). Tensor names are the model's own with
`.weight` replaced by `.qweight` / `.qzeros` / `.scales` (transformer.encoder.layers.N.self_attention.
query_key_value.qweight ...); the output layer and the norms stay float.

glmc stores q = u - 8 (signed nibbles, the op's order: [N, K/2], element 2j in the low nibble), z = u_z - 8 (int8
[N, K/G]) and the scales transposed [N, K/G], so that q - z = u - u_z exactly (ops/quantized_linear.py). Only the
GEMM layout with zero points, 4 bits and a group size glmc has (32, 64, 128, or -1 = one group per row) is read;
anything else is refused by name (GEMV / GEMV-fast / Marlin layouts pack differently, GPTQ's desc_act reorders K).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmc.errors import CheckpointError
from glmc.modeling_patches.ops.quantized_linear import pack_int4

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's order_map: nibble i of a word holds column 8c + ORDER[i]
GROUP_SIZES = (32, 64, 128)  # weight_only.GROUP_SIZES without 0 (AutoAWQ's -1 maps to it)
BLOCK_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
FORMAT = "autoawq"  # quantization["weights"]["format"] of a checkpoint this module converts
SUFFIXES = {".qweight": ".weight", ".qzeros": ".weight_zero", ".scales": ".weight_scale"}


def quantization(raw: dict, checkpoint_dir: Path) -> dict | None:
    """The glmc quantization dict of an AutoAWQ checkpoint (None when the checkpoint has no quantization config):
    {"weights": {"bits": 4, "group_size": G, "include_output": False, "method": "awq", "zero_point": True,
    "format": "autoawq"}}. Unsupported variants raise CheckpointError naming the file and key."""
    qc, where = raw.get("quantization_config"), checkpoint_dir / "config.json"
    if qc is None and (checkpoint_dir / "quant_config.json").is_file():
        where = checkpoint_dir / "quant_config.json"
        try:
            qc = json.loads(where.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}: not valid JSON ({e})") from None
        qc.setdefault("quant_method", "awq")  # AutoAWQ's own file names no method: it is AWQ by being there
    if qc is None:
        return None
    key = "quantization_config." if where.name == "config.json" else ""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: {key or 'the file'} must be an object")
    method = str(qc.get("quant_method", "")).lower()
    if method != "awq":
        raise CheckpointError(f"{where}: {key}quant_method '{qc.get('quant_method')}' is not supported: glmc loads "
                              "float checkpoints, its own quantized ones and AutoAWQ (quant_method awq, version "
                              "gemm) ones")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise CheckpointError(f"{where}: {key}bits {bits}: AWQ checkpoints are read with 4-bit weights only")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"{where}: {key}version '{qc.get('version')}': only the GEMM layout is read (GEMV, "
                              "GEMV-fast, Marlin and exllama checkpoints pack their codes differently); convert it "
                              "with AutoAWQ to version GEMM")
    if qc.get("zero_point", True) is not True:
        raise CheckpointError(f"{where}: {key}zero_point {qc.get('zero_point')}: only AWQ's asymmetric codes "
                              "(zero_point: true, what AutoAWQ's GEMM layout stores) are read")
    if qc.get("desc_act"):
        raise CheckpointError(f"{where}: {key}desc_act true reorders the input channels (GPTQ's act-order); glmc "
                              "does not read it")
    group = qc.get("group_size", qc.get("q_group_size"))
    if group == -1:
        group = 0
    elif group not in GROUP_SIZES:
        raise CheckpointError(f"{where}: {key}group_size {group} is not one of 32, 64, 128 or -1 (one group per "
                              "row)")
    for name in qc.get("modules_to_not_convert") or []:
        if str(name).rsplit(".", 1)[-1] in BLOCK_LINEARS:
            raise CheckpointError(f"{where}: {key}modules_to_not_convert keeps '{name}' in floating point; glmc "
                                  "quantizes every block linear or none")
    return {"weights": {"bits": 4, "group_size": group, "include_output": False, "method": "awq",
                        "zero_point": True, "format": FORMAT}}


def unpack_gemm(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] in AutoAWQ's GEMM order -> the unsigned 4-bit codes int8 [R, C] (0..15)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed[..., None] >> shifts) & 0xF  # [R, C/8, 8]: nibble i = column ORDER[i] of the word's 8
    out = torch.empty_like(nibbles, dtype=torch.int8)
    out[..., list(ORDER)] = nibbles.to(torch.int8)
    return out.reshape(packed.shape[0], -1)


def convert(path: Path, name: str, tensor: torch.Tensor, weights: dict) -> tuple[str, torch.Tensor]:
    """One source tensor -> (glmc name, glmc tensor): qweight -> weight (packed signed int4 [N, K/2]), qzeros ->
    weight_zero (int8 [N, K/G]), scales -> weight_scale ([N, K/G], or [N] for one group per row); other tensors
    pass unchanged. Shapes are checked by load_model against the model afterwards."""
    suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        if name.endswith(".weight") and name[:-len(".weight")].rsplit(".", 1)[-1] in BLOCK_LINEARS:
            raise CheckpointError(f"{path}: tensor '{name}' is a float weight, but the checkpoint's quantization "
                                  "config says AWQ: its block linears must be qweight / qzeros / scales")
        return name, tensor
    new = name[:-len(suffix)] + SUFFIXES[suffix]
    if suffix == ".scales":
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise CheckpointError(f"{path}: tensor '{name}' is {str(tensor.dtype).replace('torch.', '')} "
                                  f"{tuple(tensor.shape)}; AWQ scales are float [K/G, N]")
        t = tensor.t().contiguous()
        return new, (t[:, 0].contiguous() if weights["group_size"] == 0 else t)
    if tensor.dtype != torch.int32 or tensor.dim() != 2:
        raise CheckpointError(f"{path}: tensor '{name}' is {str(tensor.dtype).replace('torch.', '')} "
                              f"{tuple(tensor.shape)}; AWQ GEMM {suffix[1:]} is int32 [rows, N/8]")
    codes = unpack_gemm(tensor).t()  # [N, rows], 0..15
    signed = (codes - 8).contiguous()  # q = u - 8, z = u_z - 8 (ops/quantized_linear.py)
    if suffix == ".qzeros":
        return new, (signed[:, 0].contiguous() if weights["group_size"] == 0 else signed)
    return new, torch.cat([pack_int4(signed[r:r + 4096]) for r in range(0, len(signed), 4096)])
