"""Simplify the deployment graph with onnxsim (glmc:: nodes must survive) and check it with the registered schemas."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import onnx

from glmc.errors import GlmcError
from glmc.modeling_patches.ops.onnx_defs import DOMAIN
from glmc.export.onnx_export import IR_VERSION

LARGE_BYTES = 1 << 30  # above this the simplified model keeps its weights in `<name>.data`


def glmc_nodes(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN)


def check(path: str | Path) -> onnx.ModelProto:
    """onnx checker (full: type and shape inference through the glmc schemas) on a file; returns the inferred
    model (without external weights). Raises GlmcError naming the file and the problem."""
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False), strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GlmcError(f"{path}: ONNX check failed: {str(e).splitlines()[0][:400]}") from None


def simplify_file(src: str | Path, dst: str | Path) -> dict:
    """onnxsim `src` into `dst`, keep every glmc:: node, check the result. Returns stats."""
    import onnxsim
    src, dst = Path(src), Path(dst)
    start = time.perf_counter()
    model = onnx.load(str(src))
    before, nodes_before = glmc_nodes(model), len(model.graph.node)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    try:
        simplified, ok = onnxsim.simplify(model, check_n=0)
    except Exception as e:  # noqa: BLE001 - onnxsim raises from C++ with assorted types
        raise GlmcError(f"{src}: onnxsim failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    del model
    after = glmc_nodes(simplified)
    if not ok or after != before:
        raise GlmcError(f"{src}: onnxsim changed the glmc ops ({dict(before)} -> {dict(after)}) or failed its check")
    simplified.ir_version = IR_VERSION
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        data.unlink()
    large = weight_bytes > LARGE_BYTES
    onnx.save(simplified, str(dst), save_as_external_data=large, location=data.name, size_threshold=1024)
    nodes_after = len(simplified.graph.node)
    del simplified
    check(dst)
    return {"seconds": time.perf_counter() - start, "nodes_before": nodes_before, "nodes_after": nodes_after,
            "glmc_nodes": dict(after), "path": str(dst)}
