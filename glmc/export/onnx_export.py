"""Export the patched model to the deployment graph: one ONNX graph for prefill and decode, glmc:: ops kept.

I/O contract (docs/onnx.md): inputs `input_ids` [batch, sequence] int64, `position_ids` [batch, sequence] int64,
`attention_mask` [batch, total_sequence] int64 (1 real, 0 left pad), `past_key_values.{i}.key/value`
[batch, kv_heads, past_sequence, head_dim] (model dtype, or int8 for a kv8 model; past_sequence 0 at prefill);
outputs `logits` [batch, sequence, vocab] and `present.{i}.key/value` [batch, kv_heads, total_sequence, head_dim].
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from glmc.errors import GlmcError
from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM

# The op modules (the package re-exports functions of the same names, hence import_module).
attention, kv_cache, quantized_linear = (importlib.import_module(f"glmc.modeling_patches.ops.{m}")
                                         for m in ("attention", "kv_cache", "quantized_linear"))
fp8_linear = importlib.import_module("glmc.modeling_patches.ops.fp8_linear")
w8a8_linear = importlib.import_module("glmc.modeling_patches.ops.w8a8_linear")

OPSET = 23  # Attention, RotaryEmbedding and RMSNormalization are standard from opset 23
IR_VERSION = 11  # the IR version of opset 23; ONNX Runtime 1.31 rejects 14 (what onnx 1.23 writes by default)
EXTERNAL_DATA_BYTES = 1 << 30  # models with more weight bytes than this keep them in `<name>.data`

TRANSLATIONS: dict[Callable[..., Any], Callable[..., Any]] = {  # torch custom op -> its ONNX translation (glmc:: node)
    torch.ops.glmc.quantized_linear.default: quantized_linear.onnx_translation,
    torch.ops.glmc.fp8_linear.default: fp8_linear.onnx_translation,
    torch.ops.glmc.w8a8_linear.default: w8a8_linear.onnx_translation,
    torch.ops.glmc.kv_cache_quantize.default: kv_cache.quantize_translation,
    torch.ops.glmc.kv_cache_dequantize.default: kv_cache.dequantize_translation,
    torch.ops.glmc.group_query_attention.default: attention.onnx_translation,
}


class _MatMul(torch.nn.Module):
    """nn.Linear computed as x @ W^T with W^T stored contiguous: exports as MatMul on the weight itself, where a
    plain Linear exports as MatMul(x, Transpose(W)) and the exporter folds that into a transposed COPY of every
    weight (twice the model in memory: too much for a 6B model on a 24 GiB machine)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        y = torch.matmul(x, self.linear.weight)
        return y if self.linear.bias is None else y + self.linear.bias


@contextlib.contextmanager
def _transposed_linears(model: torch.nn.Module):
    """Within the block every nn.Linear of `model` holds W^T (transposed one weight at a time, in place of W)."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                child.weight.data = child.weight.data.t().contiguous()
                setattr(parent, name, _MatMul(child))
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            child.weight.data = child.weight.data.t().contiguous()
            setattr(parent, name, child)


class _Flat(torch.nn.Module):
    """The model with the cache as one flat list (the exporter names inputs after these arguments)."""

    def __init__(self, model: GLMForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, past_key_values):
        pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(len(past_key_values) // 2)]
        logits, presents = self.model(input_ids, position_ids, attention_mask, pairs)
        return (logits, *[t for kv in presents for t in kv])


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's fixed input and output names."""
    cache = [f"{{}}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    inputs = ["input_ids", "position_ids", "attention_mask"] + [c.format("past_key_values") for c in cache]
    return inputs, ["logits"] + [c.format("present") for c in cache]


def example_inputs(model: GLMForCausalLM, batch: int = 2, seq: int = 3, past: int = 2):
    """Inputs with every dynamic dim distinct and non-trivial (so the exporter specialises none of them)."""
    c = model.config
    ids = torch.randint(0, c.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = []
    for k, v in model.empty_cache(batch, "cpu"):
        shape = (batch, c.num_kv_heads, past, c.head_dim)
        cache += [torch.zeros(shape, dtype=k.dtype), torch.zeros(shape, dtype=v.dtype)]
    return ids, positions, mask, cache


def export(model: GLMForCausalLM, path: str | Path, external_data: bool | None = None) -> dict:
    """Export `model` to `path` (.onnx). Returns stats: seconds, weight bytes, external data or not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    ids, positions, mask, cache = example_inputs(model)
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past_sequence")
    total = torch.export.Dim("total_sequence")
    dynamic = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq},
               "attention_mask": {0: batch, 1: total},
               "past_key_values": [{0: batch, 2: past} for _ in cache]}
    start = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet("torch.onnx"), _transposed_linears(model):
            warnings.simplefilter("ignore")  # the exporter's FutureWarnings and dim-renaming notes say nothing to users
            program = torch.onnx.export(_Flat(model), (ids, positions, mask, cache), dynamo=True,
                                        opset_version=OPSET, dynamic_shapes=dynamic,
                                        custom_translation_table=TRANSLATIONS, optimize=True, verbose=False)
            stats = _save(program, model, path, external_data)  # while the initializers still alias W^T
    except GlmcError:
        raise
    except Exception as e:  # the exporter raises many types; say which model failed and why
        raise GlmcError(f"ONNX export of {model.config.family} ({model.dtype}) failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}") from e
    return {"seconds": time.perf_counter() - start, **stats}


def _save(program, model: GLMForCausalLM, path: Path, external_data: bool | None) -> dict:
    graph = program.model.graph
    inputs, outputs = io_names(model.config.num_layers)
    for value, name in zip(graph.inputs, inputs, strict=False):
        value.name = name
    for value, name in zip(graph.outputs, outputs, strict=False):
        value.name = name
    _name_dims(graph, model)
    # checkpoint names: model.transformer.X.linear.weight -> transformer.X.weight
    for value in list(graph.initializers.values()):
        value.name = value.name.removeprefix("model.").replace(".linear.", ".")
    program.model.ir_version = IR_VERSION
    program.model.producer_name = "glmc"
    weight_bytes = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_BYTES
    if path.exists():
        path.unlink()
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    program.save(path, external_data=external_data)
    return {"weight_bytes": weight_bytes, "external_data": external_data, "path": str(path)}


class _quiet:
    """Silence a logger (the exporter logs that torchvision is not installed) for a `with` block."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _name_dims(graph, model: GLMForCausalLM) -> None:
    """Readable symbolic dims on the graph I/O: batch, sequence, past_sequence, total_sequence."""
    import onnx_ir as ir
    c = model.config
    for value in list(graph.inputs) + list(graph.outputs):
        name = value.name
        dims: list[str | int]
        if name in ("input_ids", "position_ids"):
            dims = ["batch", "sequence"]
        elif name == "attention_mask":
            dims = ["batch", "total_sequence"]
        elif name == "logits":
            dims = ["batch", "sequence", c.vocab_size]
        elif name.startswith("past_key_values."):
            dims = ["batch", c.num_kv_heads, "past_sequence", c.head_dim]
        else:
            dims = ["batch", c.num_kv_heads, "total_sequence", c.head_dim]
        value.shape = ir.Shape(dims)

