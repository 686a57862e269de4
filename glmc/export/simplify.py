"""Simplify the deployment graph with onnxsim (glmc:: nodes must survive) and check it with the registered schemas."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import onnx

from glmc.errors import GlmcError
from glmc.export.external import locations, share
from glmc.export.onnx_export import IR_VERSION
from glmc.modeling_patches.ops.onnx_defs import DOMAIN

SKELETON_BYTES = 1024  # initializers this large are kept out of onnxsim


def glmc_nodes(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN)


def check(path: str | Path) -> onnx.ModelProto:
    """onnx checker (full: type and shape inference through the glmc schemas) on a file's graph, its external
    weights standing in as graph inputs (onnx refuses hard-linked data files); returns the inferred model. Raises
    GlmcError naming the file and the problem."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
        _weights_to_inputs(model.graph, [t for t in model.graph.initializer
                                         if t.data_location == onnx.TensorProto.EXTERNAL])
        onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GlmcError(f"{path}: ONNX check failed: {str(e).splitlines()[0][:400]}") from None


def simplify_file(src: str | Path, dst: str | Path) -> dict:
    """onnxsim `src` into `dst`, keep every glmc:: node, check. The weights stay in `src`'s data file (shared in
    place, or hard-linked into `dst`'s directory).

    onnxsim runs on the graph's skeleton: weights of 1 KiB and more become graph inputs for the duration, so it
    neither copies them (it needs about 3.3x the model in memory otherwise: measured 8.4 GiB for 2.5 GiB of
    weights) nor could fold anything useful from them (they feed MatMul, Gather and glmc ops only). The weights
    go back as initializers under the same names; external ones keep pointing at the source's data file."""
    import onnxsim
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=False)
    before, nodes_before = glmc_nodes(model), len(model.graph.node)
    weights = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
               or len(t.raw_data) >= SKELETON_BYTES]
    _weights_to_inputs(model.graph, weights)
    try:
        simplified, ok = onnxsim.simplify(model, check_n=0)
    except Exception as e:  # noqa: BLE001 - onnxsim raises from C++ with assorted types
        raise GlmcError(f"{src}: onnxsim failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    after = glmc_nodes(simplified)
    if not ok or after != before:
        raise GlmcError(f"{src}: onnxsim changed the glmc ops ({dict(before)} -> {dict(after)}) or failed its check")
    _inputs_to_weights(simplified.graph, weights)
    simplified.ir_version = IR_VERSION
    share(src.parent, dst.parent, locations(simplified))
    onnx.save(simplified, str(dst))
    check(dst)
    return {"seconds": time.perf_counter() - start, "nodes_before": nodes_before,
            "nodes_after": len(simplified.graph.node), "glmc_nodes": dict(after), "path": str(dst)}


def _weights_to_inputs(graph: onnx.GraphProto, weights: list[onnx.TensorProto]) -> None:
    names = {t.name for t in weights}
    keep = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights)


def _inputs_to_weights(graph: onnx.GraphProto, weights: list[onnx.TensorProto]) -> None:
    used = {i for n in graph.node for i in n.input}
    names = {t.name for t in weights}
    inputs = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(inputs)
    graph.initializer.extend(t for t in weights if t.name in used)
