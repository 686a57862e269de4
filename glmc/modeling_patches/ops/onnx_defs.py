"""What the op modules share on the ONNX side: schema registration, shape-inference helpers, the lowering builder.

A lowering is a function `lower(node, b: Builder) -> None` that emits, through `b`, standard (or vendor) nodes
computing `node`'s outputs under the same output names. `glmc.export.lower` runs them as graph passes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.defs import OpSchema

DOMAIN = "glmc"
OPSET_VERSION = 1
MS_DOMAIN = "com.microsoft"
FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
MASK_VALUE = -32768.0  # additive mask for disallowed keys: exact in fp16/bf16, exp() of it underflows to 0, and a
#                        fully masked (padding) row stays finite instead of NaN (NaN would leak through 0 * NaN).


def register(name: str, doc: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]],
             types: list[tuple[str, list[str]]], attributes: list[tuple[str, OpSchema.AttrType, object]],
             infer: Callable) -> OpSchema:
    """Register `glmc::name` v1 with onnx (once). inputs: (name, type param, optional); attributes: (name, type,
    default or None = required)."""
    if onnx.defs.has(name, DOMAIN):
        return onnx.defs.get_schema(name, OPSET_VERSION, DOMAIN)
    opt = OpSchema.FormalParameterOption
    schema = OpSchema(
        name, DOMAIN, OPSET_VERSION, doc,
        inputs=[OpSchema.FormalParameter(n, t, param_option=opt.Optional if o else opt.Single)
                for n, t, o in inputs],
        outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in types],
        attributes=[OpSchema.Attribute(n, a, "", required=True) if d is None
                    else OpSchema.Attribute(n, helper.make_attribute(n, d)) for n, a, d in attributes])
    schema.set_type_and_shape_inference_function(infer)
    onnx.defs.register_schema(schema)
    return schema


# ---------------------------------------------------------------------------------------------- shape inference

def input_dims(ctx, i: int) -> list | None:
    """Input i's dims as ints / str (symbolic) / None (unknown), or None when its shape is unknown."""
    if i >= ctx.get_num_inputs() or not ctx.has_input(i):
        return None
    t = ctx.get_input_type(i)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]


def input_elem_type(ctx, i: int) -> int:
    return ctx.get_input_type(i).tensor_type.elem_type


def set_output(ctx, i: int, elem_type: int, dims: list | None) -> None:
    """Output i's type, with dims ints / str / None (unknown) or no shape at all when dims is None."""
    ctx.set_output_type(i, helper.make_tensor_type_proto(elem_type, dims))


def infer_linear(ctx) -> None:
    """Shape inference of the linear ops (X [..., K], QWeight [N, ...] -> Y [..., N] in X's type)."""
    x, w = input_dims(ctx, 0), input_dims(ctx, 1)
    set_output(ctx, 0, input_elem_type(ctx, 0), None if x is None or w is None else x[:-1] + [w[0]])


def attribute(ctx, name: str, default=None):
    a = ctx.get_attribute(name)
    return default if a is None else helper.get_attribute_value(a)


# ---------------------------------------------------------------------------------------------- lowering

def load_external(tensor: onnx.TensorProto, base_dir: str | Path) -> None:
    """Read an external initializer's bytes into it, in place: it becomes an ordinary in-memory tensor."""
    info = {e.key: e.value for e in tensor.external_data}
    with open(Path(base_dir) / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        tensor.raw_data = f.read(int(info["length"])) if "length" in info else f.read()
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def read_tensor(tensor: onnx.TensorProto, base_dir: str | Path) -> np.ndarray:
    """An initializer's value, reading external data directly (never mutating `tensor`)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    ref = onnx.TensorProto()
    ref.CopyFrom(tensor)
    load_external(ref, base_dir)
    return numpy_helper.to_array(ref)



class GraphView:
    """Read access to the graph being lowered: initializers (external data loaded on demand), fresh names,
    sub-graphs built once per graph (e.g. the attention bias every layer shares), and the lowering's options."""

    def __init__(self, graph: onnx.GraphProto, base_dir: str | None, options: dict | None = None):
        self.graph = graph
        self.base_dir = base_dir
        self.options = options or {}
        self.initializers = {t.name: t for t in graph.initializer}
        self.opsets: dict[str, int] = {}
        self._names = {n for node in graph.node for n in list(node.output) + [node.name]}
        self._names |= set(self.initializers) | {i.name for i in graph.input}
        self._counter = itertools.count()
        self._shared: dict[str, object] = {}
        self._producers: dict[str, onnx.NodeProto] | None = None

    def fresh(self, hint: str) -> str:
        while True:
            name = f"{hint}_{next(self._counter)}"
            if name not in self._names:
                self._names.add(name)
                return name

    def dims(self, name: str) -> list | None:
        """Static dims (int, or str for a symbolic one) of a graph input / value_info / initializer, if known."""
        for v in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            if v.name == name and v.type.tensor_type.HasField("shape"):
                return [d.dim_value if d.HasField("dim_value") else d.dim_param
                        for d in v.type.tensor_type.shape.dim]
        t = self.initializers.get(name)
        return list(t.dims) if t is not None else None

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The node of the graph being lowered that outputs `name` (None for inputs and initializers)."""
        if self._producers is None:
            self._producers = {o: n for n in self.graph.node for o in n.output}
        return self._producers.get(name)

    def elem_type(self, name: str) -> int | None:
        """ONNX element type of a graph input / value_info / output / initializer, if known."""
        for v in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            if v.name == name:
                return v.type.tensor_type.elem_type
        t = self.initializers.get(name)
        return t.data_type if t is not None else None

    def array(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name)
        if t is None:
            return None
        return read_tensor(t, self.base_dir or "")


class Builder:
    """Emits the replacement of one node; `op` returns the new output name(s)."""

    def __init__(self, node: onnx.NodeProto, view: GraphView):
        self.node, self.view = node, view
        self.nodes: list[onnx.NodeProto] = []

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def input(self, i: int) -> str:
        return self.node.input[i] if i < len(self.node.input) else ""

    def array(self, name: str) -> np.ndarray:
        value = self.view.array(name)
        if value is None:
            raise ValueError(f"node '{self.node.name}' ({self.node.op_type}): input '{name}' must be an initializer "
                             "(a constant weight or scale) for this lowering")
        return value

    def op(self, op_type: str, *inputs: str, domain: str = "", outputs: list[str] | None = None, n_out: int = 1,
           **attrs):
        outs = outputs or [self.view.fresh(f"{self.node.name or op_type}/{op_type}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.view.fresh(
            f"{self.node.name or self.node.op_type}/{op_type}"), domain=domain, **attrs))
        if domain:
            self.view.opsets[domain] = 1
        return outs[0] if len(outs) == 1 else outs

    def const(self, value: np.ndarray | TensorProto, hint: str = "const") -> str:
        """A new initializer, added to the graph at once (protobuf copies on insertion: one copy alive, not two)."""
        tensor = self.view.graph.initializer.add()
        tensor.CopyFrom(value if isinstance(value, TensorProto) else numpy_helper.from_array(np.asarray(value)))
        tensor.name = self.view.fresh(f"{self.node.name or self.node.op_type}/{hint}")
        self.view.initializers[tensor.name] = tensor
        return tensor.name

    def shared(self, key: str, build: Callable[[Builder], object]):
        """Build a sub-graph once per graph (its nodes go with the first node that asks for it)."""
        if key not in self.view._shared:
            self.view._shared[key] = build(self)
        return self.view._shared[key]


def int4_tensor(values: np.ndarray, name: str = "") -> TensorProto:
    """An ONNX INT4 tensor from int values in [-8, 7]: flattened row-major, element 2j in the LOW nibble."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    u = flat.view(np.uint8) & 0x0F
    packed = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
    t = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(values.shape))
    t.raw_data = packed.tobytes()
    return t


def onnxscript_opset():
    """onnxscript's view of the glmc domain (ops resolve against the schemas registered above)."""
    import onnxscript
    return onnxscript.values.Opset(DOMAIN, OPSET_VERSION)
