"""The TensorRT engine builder: `tensorrt` lowering ONNX -> strongly typed network -> serialized engine + layer record.

Uses `tensorrt` when installed, else TensorRT for RTX (`tensorrt_rtx_bindings`, same API), whose builds run on
a machine without a GPU for the compute capabilities named in the config. Precision comes from the graph's
types and its Q/DQ nodes (strongly typed network): weight-only int8/int4 arrive as DequantizeLinear + MatMul,
the int8 KV cache as Q/DQ on the cache tensors, attention as RotaryEmbedding + Attention (opset 23).

Optimization profiles come from the build limits; each dynamic input dimension has a role:

| input | dim 0 | other dynamic dim |
| --- | --- | --- |
| input_ids, position_ids | batch | seq (new tokens) |
| attention_mask | batch | total (past + seq) |
| past_key_values.{i}.key/value | batch | past |

An engine cannot be deserialised without a GPU, so the layer record comes from the builder's own
detailed log (the "Layers:" block it prints with ProfilingVerbosity.DETAILED), next to the parsed network's
layers before optimization; where the engine does load, the engine inspector's JSON is written as well.
Two TensorRT for RTX 1.7 workarounds are applied to the parsed graph (see docs/compiler.md): attention layers
are marked decomposable, and graph outputs that other nodes also read get their own Identity.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glmc.errors import GlmcError

PROFILE_KINDS = ("full", "prefill", "decode")  # one optimization profile each; role_ranges() says their shapes
STANDARD_DOMAINS = ("", "ai.onnx")


class TensorRTError(GlmcError):
    """The TensorRT build failed (parser or builder); the message carries TensorRT's own errors."""


def import_tensorrt() -> tuple[Any, str]:
    """(module, name): `tensorrt` if importable, else `tensorrt_rtx_bindings`; GlmcError when neither is."""
    errors = []
    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            return importlib.import_module(name), name
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise GlmcError("the tensorrt target needs TensorRT, and neither `tensorrt` nor TensorRT for RTX "
                    "(`tensorrt_rtx_bindings`) is importable (" + "; ".join(errors) + "); install one "
                    "(pip install 'glmc[full]') or drop the target")


def _roles(name: str, rank: int) -> Sequence[str | None]:
    """The role of each dimension of an engine input (None: a fixed dimension)."""
    if name in ("input_ids", "position_ids"):
        return ["batch", "seq"][:rank]
    if name == "attention_mask":
        return ["batch", "total"][:rank]
    if name.startswith("past_key_values."):
        return ["batch", None, "past", None][:rank] if rank == 4 else ["batch"] + [None] * (rank - 1)
    return [None] * rank


def role_ranges(limits: dict, kind: str, opt: dict) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of batch / seq / past / total for one profile kind."""
    mb, mi, ms = limits["max_batch"], limits["max_input_length"], limits["max_sequence_length"]
    ob, oi, op = min(opt["batch"], mb), min(opt["input_length"], mi), min(opt["past_length"], ms - 1)
    batch = (1, ob, mb)
    if kind == "full":
        return {"batch": batch, "seq": (1, oi, mi), "past": (0, op, ms - 1), "total": (1, min(op + oi, ms), ms)}
    if kind == "prefill":
        return {"batch": batch, "seq": (1, oi, mi), "past": (0, 0, 0), "total": (1, oi, mi)}
    if kind == "decode":
        return {"batch": batch, "seq": (1, 1, 1), "past": (0, op, ms - 1), "total": (1, min(op + 1, ms), ms)}
    raise GlmcError(f"tensorrt.profiles: unknown profile '{kind}' (one of {', '.join(PROFILE_KINDS)})")


def graph_inputs(onnx_path: Path) -> list[tuple[str, list]]:
    """(name, dims) of each graph input; a dim is an int or the symbolic name."""
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in
                vi.type.tensor_type.shape.dim]
        out.append((vi.name, dims))
    return out


def check_graph(onnx_path: Path, model: Any) -> None:
    """Refuse custom-domain nodes before TensorRT sees them (a plugin node aborts a GPU-less build process)."""
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise TensorRTError(f"{onnx_path}: node '{node.name}' is {node.domain}::{node.op_type}, not standard "
                                "ONNX; the tensorrt lowering must replace it (TensorRT would need a plugin)")


def split_consumed_outputs(model: Any) -> int:
    """Give every graph output that other nodes also read (present.{i}.key/value feeding Attention) its own
    Identity. TensorRT for RTX 1.7's Myelin compiler fails ("ssa.cpp CHECK(false) ... shape_call") on a model whose
    cache outputs are also attention inputs; an Identity in between builds. Returns how many outputs it split."""
    from onnx import helper
    outputs = {o.name for o in model.graph.output}
    consumed = {i for n in model.graph.node for i in n.input}
    split = sorted(outputs & consumed)
    if not split:
        return 0
    rename = {name: f"{name}__glmc_internal" for name in split}
    for node in model.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
    model.graph.node.extend(helper.make_node("Identity", [rename[n]], [n], name=f"{n}__glmc_copy") for n in split)
    return len(split)


def profile_shapes(inputs: list[tuple[str, list]], limits: dict, kind: str, opt: dict) -> dict[str, tuple]:
    """Input name -> (min, opt, max) shapes for one optimization profile."""
    ranges = role_ranges(limits, kind, opt)
    shapes = {}
    for name, dims in inputs:
        roles = _roles(name, len(dims))
        lo: list[int] = []
        mid: list[int] = []
        hi: list[int] = []
        for i, (d, role) in enumerate(zip(dims, roles, strict=False)):
            if isinstance(d, int) and d > 0:
                lo.append(d)
                mid.append(d)
                hi.append(d)
            elif role is None:
                raise TensorRTError(f"input '{name}' dimension {i} ('{d}') is dynamic, and glmc does not know "
                                    "which limit bounds it (expected the I/O contract of docs/onnx.md)")
            else:
                r = ranges[role]
                lo.append(r[0])
                mid.append(r[1])
                hi.append(r[2])
        shapes[name] = (tuple(lo), tuple(mid), tuple(hi))
    return shapes


def parse_layers(log_text: str) -> list[dict[str, Any]]:
    """The builder's detailed "Layers:" block -> [{name, type, inputs, outputs, onnx_nodes, tactic}]."""
    if "Layers:" not in log_text:
        return []
    block = log_text.split("Layers:", 1)[1]
    block = re.split(r"\n\s*\n", block.strip("\n"), maxsplit=1)[0]
    layers = []
    for line in block.splitlines():
        m = re.match(r"Name: (.*?), LayerType: (.*?), Inputs: (.*), Constants: (.*), Outputs: (.*), "
                     r"TacticName: (.*?), StreamId: (\d+), Metadata: ?(.*)$", line.strip())
        if not m:
            continue

        def tensors(text: str) -> list[dict[str, str]]:
            return [{"name": n, "dims": d, "dtype": t} for n, d, t in
                    re.findall(r"Name: ([^,]*), Dimensions: (\[[^\]]*\]),.*?Datatype: (\w+)", text)]

        layers.append({"name": m[1], "type": m[2], "inputs": tensors(m[3]), "constants": tensors(m[4]),
                       "outputs": tensors(m[5]), "tactic": m[6],
                       "onnx_nodes": re.findall(r"\[ONNX Layer: ([^\]]*)\]", m[8])})
    return layers


def _logger(trt: Any) -> Any:
    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.lines.append((str(severity).split(".")[-1], msg))

    return Logger()


def _network_layers(trt: Any, network: Any) -> list[dict[str, Any]]:
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        out.append({"name": layer.name, "type": str(layer.type).split(".")[-1],
                    "outputs": [{"name": t.name, "dtype": str(t.dtype).split(".")[-1]} for t in outs if t]})
    return out


def _allow_decomposed_attention(trt: Any, network: Any) -> int:
    """Mark every attention layer decomposable: where no fused kernel fits (fp32, a fixed query length of 1),
    the builder then lowers it to MatMul/Softmax instead of failing. Returns how many layers it marked."""
    count = 0
    if not hasattr(trt, "IAttentionBoundaryLayer"):
        return 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if str(layer.type).endswith("ATTENTION_INPUT"):
            layer.__class__ = trt.IAttentionInputLayer
            if not layer.attention.decomposable:
                layer.attention.decomposable = True
                count += 1
    return count


def _inspect(trt: Any, serialized: Any, path: Path) -> str:
    """The engine inspector's JSON (needs a GPU the engine runs on): written to `path` when available; returns
    its file name, or why it is unavailable (the build log's layer record is kept either way)."""
    quiet = _logger(trt)
    try:
        engine = trt.Runtime(quiet).deserialize_cuda_engine(serialized)
        if engine is None:
            errors = [m for sev, m in quiet.lines if sev in ("ERROR", "INTERNAL_ERROR")]
            return "unavailable: the engine does not load here (" + (errors[-1][:200] if errors else "no GPU") + ")"
        info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    except Exception as e:  # noqa: BLE001 - no CUDA driver and the like
        return f"unavailable: {type(e).__name__}: {str(e)[:200]}"
    path.write_text(info)
    return path.name


def build_engine(onnx_path: str | Path, engine_path: str | Path, limits: dict, *, profiles: Sequence[str] = ("full",),
                 opt: dict | None = None, compute_capabilities: Sequence[str] = ("sm86",), workspace_mb: int = 1024,
                 optimization_level: int = 3, log_path: str | Path | None = None,
                 decompose_attention: bool = True) -> dict[str, Any]:
    """Build one engine; write it to engine_path (and the build log to log_path); return its description."""
    trt, lib = import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    opt = opt or {"batch": limits["max_batch"], "input_length": min(128, limits["max_input_length"]),
                  "past_length": limits["max_sequence_length"] // 2}
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)  # external weights stay on disk
    check_graph(onnx_path, model)
    split = split_consumed_outputs(model)
    inputs = graph_inputs(onnx_path)
    log = _logger(trt)
    builder = trt.Builder(log)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8/9 need it; 10+ ignore it
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    t0 = time.perf_counter()
    if not parser.parse(model.SerializeToString(), str(onnx_path)):  # the path locates external weights
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise TensorRTError(f"{onnx_path}: the TensorRT ONNX parser ({lib}) refused the graph: "
                            + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.builder_optimization_level = optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    targets_used: list[str] = []
    if hasattr(config, "set_compute_capability"):  # TensorRT for RTX: ahead-of-time for named GPUs
        config.num_compute_capabilities = len(compute_capabilities)
        for i, cc in enumerate(compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, cc.upper()), i)
        targets_used = list(compute_capabilities)
    shapes_per_profile = {}
    for kind in profiles:
        profile = builder.create_optimization_profile()
        shapes = profile_shapes(inputs, limits, kind, opt)
        for name, (lo, mid, hi) in shapes.items():
            profile.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(profile)
        shapes_per_profile[kind] = {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
                                    for n, s in shapes.items()}
    decomposable = _allow_decomposed_attention(trt, network) if decompose_attention else 0
    network_layers = _network_layers(trt, network)
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    log_text = "\n".join(f"[{sev}] {msg}" for sev, msg in log.lines)
    if log_path is not None:
        Path(log_path).write_text(log_text + "\n")
    if serialized is None:
        errors = [msg for sev, msg in log.lines if sev in ("ERROR", "INTERNAL_ERROR")]
        first = [e.strip().splitlines()[0][:400] for e in errors[:3]] or ["no error logged"]
        raise TensorRTError(f"{onnx_path}: the TensorRT builder ({lib}) failed: " + "; ".join(first)
                            + (f" (full log: {log_path})" if log_path else ""))
    engine_path.write_bytes(bytes(serialized))
    io = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io.append({"name": t.name, "mode": "input", "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io.append({"name": t.name, "mode": "output", "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)})
    layers = parse_layers("\n".join(msg for _, msg in log.lines if msg.startswith("Layers:")))
    inspector = _inspect(trt, serialized, engine_path.with_suffix(".inspector.json"))
    return {
        "library": lib, "version": trt.__version__, "engine": engine_path.name,
        "engine_bytes": engine_path.stat().st_size, "build_seconds": round(seconds, 3),
        "compute_capabilities": targets_used, "workspace_mb": workspace_mb,
        "optimization_level": optimization_level, "strongly_typed": True, "io": io,
        "attention_layers_decomposable": decomposable, "outputs_given_an_identity": split,
        "profiles": shapes_per_profile, "engine_layers": layers, "network_layers": network_layers,
        "inspector": inspector,
    }


def _child_main(request_path: str) -> None:
    """Run build_engine as the request file says; write the outcome (info or error) next to it as JSON."""
    request = json.loads(Path(request_path).read_text())
    try:
        out = {"ok": True, "info": build_engine(**request["kwargs"])}
    except GlmcError as e:
        out = {"ok": False, "error": str(e), "glmc": True}
    except Exception as e:  # noqa: BLE001 - reported to the parent with its type
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "glmc": False}
    Path(request["result"]).write_text(json.dumps(out))


def build_engine_isolated(onnx_path: str | Path, engine_path: str | Path, limits: dict, **kwargs: Any) -> dict:
    """build_engine in a child Python process: a builder that aborts or runs out of memory takes only that
    process down (reported as a TensorRTError naming the signal), and its memory is returned when it ends."""
    import subprocess
    import sys
    engine_path = Path(engine_path)
    request = engine_path.with_suffix(".request.json")
    result = engine_path.with_suffix(".result.json")
    kwargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items()}
    request.write_text(json.dumps({"kwargs": dict(onnx_path=str(onnx_path), engine_path=str(engine_path),
                                                  limits=limits, **kwargs), "result": str(result)}))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from glmc.compiler.tensorrt import _child_main; "
                             "_child_main(sys.argv[1])", str(request)])
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM: stop the builder too
        proc.kill()
        proc.wait()
        raise
    finally:
        request.unlink(missing_ok=True)
    if not result.is_file():
        import signal
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise TensorRTError(f"{onnx_path}: the TensorRT builder process died ({how}) before finishing"
                            + (f"; its log: {kwargs['log_path']}" if kwargs.get("log_path") else ""))
    out = json.loads(result.read_text())
    result.unlink()
    if not out["ok"]:
        raise TensorRTError(out["error"] if out["glmc"] else f"{onnx_path}: {out['error']}")
    return out["info"]


def write_layers(info: dict, path: str | Path) -> None:
    """The layer record kept in the build directory (engine layers after fusion + parsed network layers)."""
    Path(path).write_text(json.dumps({"engine_layers": info["engine_layers"],
                                      "network_layers": info["network_layers"]}, indent=1) + "\n")
