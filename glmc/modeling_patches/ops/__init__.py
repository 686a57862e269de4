"""The glmc custom operators: each module holds one op's schema, torch reference, fake, ONNX translation and lowerings.

Importing this package registers every op with torch (`torch.ops.glmc.*`) and ONNX (`onnx.defs`, domain `glmc`).
"""

from glmc.modeling_patches.ops.attention import gqa_reference, group_query_attention, rotary_tables
from glmc.modeling_patches.ops.fp8_linear import fp8_linear
from glmc.modeling_patches.ops.kv_cache import kv_cache_dequantize, kv_cache_quantize
from glmc.modeling_patches.ops.onnx_defs import DOMAIN, OPSET_VERSION
from glmc.modeling_patches.ops.quantized_linear import pack_int4, quantized_linear, unpack_int4
from glmc.modeling_patches.ops.w8a8_linear import w8a8_linear

__all__ = [
           "DOMAIN",
           "OPSET_VERSION",
           "fp8_linear",
           "gqa_reference",
           "group_query_attention",
           "kv_cache_dequantize",
           "kv_cache_quantize",
           "pack_int4",
           "quantized_linear",
           "rotary_tables",
           "unpack_int4",
           "w8a8_linear",
]
