"""Lower the deployment graph for one target: replace each glmc:: node as TARGETS says, write a runtime config.

Targets: `onnx` keeps the glmc:: ops (vendor compilers); `reference` uses standard ONNX only; `onnxruntime` uses
com.microsoft MatMulNBits / GroupQueryAttention; `tensorrt` uses what TensorRT parses (Q/DQ, Attention-23).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from glmc.artifact import target as target_spec
from glmc.artifact import write_runtime_config
from glmc.errors import GlmcError
from glmc.export.external import inline_sparse, locations, share
from glmc.modeling_patches.ops.onnx_defs import DOMAIN, Builder, GraphView

attention, kv_cache, quantized_linear = (importlib.import_module(f"glmc.modeling_patches.ops.{m}")
                                         for m in ("attention", "kv_cache", "quantized_linear"))
fp8_linear = importlib.import_module("glmc.modeling_patches.ops.fp8_linear")
w8a8_linear = importlib.import_module("glmc.modeling_patches.ops.w8a8_linear")

# target -> glmc op -> lowering (each lowering's docstring says what it emits)
TARGETS = {
    "onnx": {},
    "reference": {
        "QuantizedLinear": quantized_linear.lower_dequantize_matmul,  # DequantizeLinear (int8/INT4) + MatMul
        "Fp8Linear": fp8_linear.lower_qdq_matmul,  # QuantizeLinear/DequantizeLinear FLOAT8E4M3FN + MatMul
        "W8A8Linear": w8a8_linear.lower_matmul_integer,  # per-token QuantizeLinear (uint8) + MatMulInteger
        "KVCacheQuantize": kv_cache.lower_quantize_plain,  # Div, Round, Clip, Cast
        "KVCacheDequantize": kv_cache.lower_dequantize_plain,  # Cast, Mul
        "GroupQueryAttention": attention.lower_attention23,  # RotaryEmbedding + Concat + Attention-23
    },
    "onnxruntime": {
        "QuantizedLinear": quantized_linear.lower_matmul_nbits,  # com.microsoft.MatMulNBits
        "Fp8Linear": fp8_linear.lower_qdq_dequantized_weight,  # float8 Q/DQ of X + MatMul by the dequantized W
        "W8A8Linear": w8a8_linear.lower_matmul_integer_to_float,  # com.microsoft.MatMulIntegerToFloat
        "KVCacheQuantize": kv_cache.lower_quantize_plain,
        "KVCacheDequantize": kv_cache.lower_dequantize_plain,
        "GroupQueryAttention": attention.lower_ort_gqa,  # RotaryEmbedding + com.microsoft.GroupQueryAttention
    },
    "tensorrt": {
        "QuantizedLinear": quantized_linear.lower_dequantize_matmul_symmetric,  # zero points as a MatMul term
        "Fp8Linear": fp8_linear.lower_qdq_matmul,  # FP8 Q/DQ + MatMul: an FP8 GEMM on sm89/sm120
        "W8A8Linear": w8a8_linear.lower_qdq,  # X/sx through unit-scale int8 Q/DQ: an int8 GEMM, then * sx
        "KVCacheQuantize": kv_cache.lower_quantize_qdq,  # QuantizeLinear
        "KVCacheDequantize": kv_cache.lower_dequantize_qdq,  # DequantizeLinear
        "GroupQueryAttention": attention.lower_attention23,
    },
}

# What a runtime must know about each target's graph (imitating onnxruntime-genai's genai_config.json).
LIMITS = {
    "onnx": {},
    "reference": {},
    "onnxruntime": {"chunked_prefill_batch": "batch must be 1 when sequence > 1 and past_sequence > 0 "
                                              "(com.microsoft.GroupQueryAttention on ORT 1.31)"},
    "tensorrt": {},
}


def _edges(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """The graph as it is now: each value's producing node, and the nodes that read it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return {o: n for n in graph.node for o in n.output}, consumers


def fold_kv_cache_quantization(view: GraphView) -> int:
    """KVCacheDequantize -> GroupQueryAttention -> KVCacheQuantize (same scale) becomes one GroupQueryAttention
    with the int8 past/present and the two scales appended as inputs 9 and 10 (an intermediate form that only
    attention.lower_ort_gqa consumes). Returns the number of folded attentions."""
    graph = view.graph
    producer, consumers = _edges(graph)
    outputs = {o.name for o in graph.output}
    removed, folded = set(), 0
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type != "GroupQueryAttention":
            continue
        pairs = []
        for past, present in ((node.input[3], node.output[1]), (node.input[4], node.output[2])):
            dq, users = producer.get(past), consumers.get(present, [])
            if (dq is None or dq.op_type != "KVCacheDequantize" or present in outputs or len(users) != 1
                    or users[0].op_type != "KVCacheQuantize" or users[0].input[1] != dq.input[1]
                    or len(consumers.get(past, [])) != 1):
                break
            pairs.append((dq, users[0]))
        if len(pairs) != 2:
            continue
        (dqk, qk), (dqv, qv) = pairs
        node.input[3], node.input[4] = dqk.input[0], dqv.input[0]
        node.input.extend([dqk.input[1], dqv.input[1]])
        removed |= {n.output[0] for n in (dqk, qk, dqv, qv)}  # outputs are unique: they name the nodes
        node.output[1], node.output[2] = qk.output[0], qv.output[0]
        folded += 1
    # (the attentions now produce the quantized presents themselves, so they stay)
    keep = [n for n in graph.node if n.op_type == "GroupQueryAttention" or n.output[0] not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def fold_norm_casts(view: GraphView) -> int:
    """Cast(x fp16 -> float) -> RMSNormalization(float scale) -> Cast(-> fp16) becomes one RMSNormalization on the
    fp16 input with an fp16 scale (stash_type 1 still normalises in float32; the scale must be exact in fp16, as it
    is for an fp16 checkpoint, else the node is left alone). Four kernels fewer per layer on CUDA. Returns the
    count. (bf16 graphs keep their casts: numpy has no bf16 to check the scale with.)"""
    graph = view.graph
    producer, consumers = _edges(graph)
    half = onnx.TensorProto.FLOAT16
    dropped, folded = set(), 0
    for norm in graph.node:
        if norm.op_type != "RMSNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        up, down = producer.get(norm.input[0]), consumers.get(norm.output[0], [])
        if (up is None or up.op_type != "Cast" or len(consumers.get(up.output[0], [])) != 1 or len(down) != 1
                or down[0].op_type != "Cast" or norm.input[1] not in view.initializers
                or {a.name: a.i for a in down[0].attribute}.get("to") != half
                or view.elem_type(up.input[0]) not in (half, None)):
            continue
        scale = view.array(norm.input[1])
        if scale is None:
            continue
        narrow = scale.astype(np.float16)
        if not np.array_equal(narrow.astype(scale.dtype), scale):
            continue
        tensor = graph.initializer.add()
        tensor.CopyFrom(numpy_helper.from_array(narrow, view.fresh(norm.input[1] + "_half")))
        view.initializers[tensor.name] = tensor
        norm.input[0], norm.input[1], norm.output[0] = up.input[0], tensor.name, down[0].output[0]
        dropped |= {id(up), id(down[0])}
        folded += 1
    keep = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def fuse_residual_norms(view: GraphView) -> int:
    """Add(x, y) -> RMSNormalization becomes com.microsoft.SkipSimplifiedLayerNormalization(x, y, scale), whose
    output 3 is the sum the next residual Add reads: one kernel for two, twice per layer. Returns the count."""
    graph = view.graph
    producer = {o: n for n in graph.node for o in n.output}
    fused = set()
    for i, norm in enumerate(graph.node):
        add = producer.get(norm.input[0]) if norm.op_type == "RMSNormalization" and norm.domain in ("", "ai.onnx") \
            else None
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or id(add) in fused:
            continue
        types = {view.elem_type(x) for x in add.input} | {view.elem_type(norm.input[1])}
        if len(types - {None}) > 1 or any(x in view.initializers for x in add.input):
            continue  # (one type for all three; a constant operand is a bias, not a residual)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in norm.attribute}
        if attrs.get("axis", -1) != -1:
            continue
        graph.node[i].CopyFrom(helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]], name=norm.name, domain="com.microsoft",
            epsilon=attrs.get("epsilon", 1e-5)))
        fused.add(id(add))
    if fused:
        keep = [n for n in graph.node if id(n) not in fused]
        del graph.node[:]
        graph.node.extend(keep)
        view.opsets["com.microsoft"] = 1
    return len(fused)


# target -> graph passes run before the op table: (pass, the lowering option that turns it on; None: always)
PASSES = {"onnxruntime": [(fold_kv_cache_quantization, "fold_kv8"), (fold_norm_casts, None),
                          (fuse_residual_norms, None)]}


def lower_model(model: onnx.ModelProto, target: str, base_dir: str | None = None,
                fold_kv8: bool = False, accuracy_level: int = 0, padded_batches: bool = True) -> onnx.ModelProto:
    """`model` with every glmc:: node replaced for `target` (in place; also returned). onnxruntime options (see
    docs/onnx.md for what they change): fold_kv8 lets GroupQueryAttention read and write the int8 cache itself;
    accuracy_level is MatMulNBits' (0 float compute; 4 int8 activations, fast on CPU); padded_batches=False
    drops left-padding support for GQA's fast path (attention.lower_ort_gqa)."""
    if target not in TARGETS:
        raise GlmcError(f"unknown lowering target '{target}'; known: {', '.join(TARGETS)}")
    table = TARGETS[target]
    graph = model.graph
    view = GraphView(graph, base_dir, {"accuracy_level": accuracy_level, "padded_batches": padded_batches,
                                       "fold_kv8": fold_kv8})
    for graph_pass, option in PASSES.get(target, []):
        if option is None or view.options[option]:
            graph_pass(view)
    nodes = []
    for node in graph.node:
        lower = table.get(node.op_type) if node.domain == DOMAIN else None
        if lower is None:
            nodes.append(node)
            continue
        b = Builder(node, view)
        try:
            lower(node, b)
        except ValueError as e:
            raise GlmcError(f"lowering for {target}: {e}") from None
        nodes.extend(b.nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {n.op_type for n in nodes if n.domain == DOMAIN}
    _drop_dead_nodes(graph)
    _drop_unused_initializers(graph)
    opsets = {o.domain: o.version for o in model.opset_import}
    opsets.update(view.opsets)
    if not used:
        opsets.pop(DOMAIN, None)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    return model


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Nodes none of whose outputs anything reads (e.g. a Split whose parts GQA now takes packed)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """In place, from the end (re-adding the kept ones would copy every weight)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in used:
            del graph.initializer[i]


def runtime_config(model: onnx.ModelProto, target: str, model_file: str, padded_batches: bool = True) -> dict:
    """The JSON a runtime reads next to a lowered model: file, I/O names and types, KV-cache convention, limits.
    `kv_cache.padding` is "left" (rows of a batch may differ in length, padded on the left) or "none" (every row
    of a batch must be the same length: the onnxruntime lowering with padded_batches=False)."""
    elem = {v: k for k, v in onnx.TensorProto.DataType.items()}
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    past = inputs.get("past_key_values.0.key")
    dims = [d.dim_param or d.dim_value for d in past.type.tensor_type.shape.dim] if past else []
    return {
        "model": {"file": model_file, "target": target, "num_layers": layers,
                  "vocab_size": [d.dim_value for d in outputs["logits"].type.tensor_type.shape.dim][-1]},
        "inputs": {"input_ids": "input_ids", "position_ids": "position_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "kv_cache": {"dtype": elem[past.type.tensor_type.elem_type].lower() if past else None,
                     "shape": dims, "layout": "BNSH", "past_present_share_buffer": False,
                     "padding": "left" if padded_batches else "none",
                     "position_ids": "0 at the first real token of each row"},
        "logits_dtype": elem[outputs["logits"].type.tensor_type.elem_type].lower(),
        "limits": LIMITS[target],
    }


def lower_file(src: str | Path, target: str, dst: str | Path, fold_kv8: bool = False,
               accuracy_level: int = 0, padded_batches: bool = True) -> dict:
    """Lower `src` (.onnx) into `dst` (.onnx) and write `dst`'s runtime config (`<stem>.json`). External weights
    that the lowering leaves alone stay in the source's data file, shared in place or hard-linked into `dst`'s
    directory (external.share), unless the lowered graph uses less than 90% of that file (external.inline_sparse:
    then the used ones are copied); new tensors go to `<dst>.data`."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=False)
    external = locations(model)
    lower_model(model, target, str(src.parent), fold_kv8=fold_kv8, accuracy_level=accuracy_level,
                padded_batches=padded_batches)
    share(src.parent, dst.parent, inline_sparse(model, src.parent))
    # Weights go to a data file whenever ONNX Runtime runs the lowering (not only past protobuf's 2 GB): ORT maps an
    # external data file and reads each tensor in place, where weights embedded in model.onnx are parsed into the
    # model proto and then copied into tensors, briefly three copies (measured on a 291M-parameter int8 graph,
    # peak RSS above the interpreter's: 1239 MiB embedded, 502 MiB external; docs/runtime.md "Memory").
    large = (sum(len(t.raw_data) for t in model.graph.initializer) > (1 << 30) or bool(external)
             or target_spec(target).onnxruntime)
    data_name = dst.name + ".data"
    if data_name in external:  # e.g. build/onnxruntime/model.onnx next to a link of the export's model.onnx.data
        data_name = dst.name + f".{target}.data"
    if large:
        if (dst.parent / data_name).exists():
            (dst.parent / data_name).unlink()
        # only tensors held in memory (new ones) go to the new data file; linked ones keep their location
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                  size_threshold=1024)
    else:
        onnx.save(model, str(dst))
    config = runtime_config(model, target, dst.name, padded_batches=padded_batches or target != "onnxruntime")
    write_runtime_config(dst, config)
    return config

