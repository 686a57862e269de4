"""The compile YAML schema: load (with `extends:` and `--set`), validate with file:line errors, resolve defaults.

A config is a small tree of sections (model, precision, calibration, limits, targets, onnxruntime, tensorrt, verify,
output). FIELDS below is the whole schema, one row per key: its type, default, allowed values and help.
Every error names the file and line (or the `--set` option) and the dotted key path at fault.

Paths: `model.checkpoint` and `calibration.source` written in a YAML file are relative to that file;
given with `--set` they are relative to the current directory. `output` is relative to the current
directory and may use {model} and {precision}.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from glmc.artifact import Limits
from glmc.errors import ConfigError
from glmc.quantization.scheme import DEFAULT_KV_GRANULARITY, WEIGHT_ONLY_METHODS, Scheme

TARGETS = ("onnx", "reference", "onnxruntime", "tensorrt", "cuda")  # the lowerings (artifact.TARGETS) + engines
COMPUTE_CAPABILITIES = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
TRT_PROFILES = ("full", "prefill", "decode")
FAMILIES = ("chatglm2", "chatglm3", "glm4")
MISSING = "???"  # a value the user must give (with --set), as in model.checkpoint of the 6B/9B configs


@dataclasses.dataclass(frozen=True)
class Field:
    """One key of the schema."""

    kind: str  # str | int | float | bool | path | list[str] | list[choice]
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    nullable: bool = False


FIELDS: dict[str, Field] = {
    "model.checkpoint": Field("path", None, "checkpoint directory (Hugging Face ChatGLM layout); "
                                            "default: the shipped glmc-tiny", nullable=True),
    "model.family": Field("str", None, "chatglm2 | chatglm3 | glm4; inferred from the checkpoint when omitted",
                          choices=FAMILIES, nullable=True),
    "model.name": Field("str", None, "short name used in {model} of `output`; default: the checkpoint folder "
                                     "name", nullable=True),
    "precision.dtype": Field("str", "fp16", "floating-point type of activations, float weights and a float KV "
                                            "cache", choices=("fp32", "fp16", "bf16")),
    "precision.weights": Field("str", "float", "float (kept in `dtype`) | int8 | int4 (weight-only, symmetric) | "
                                               "sq8 (SmoothQuant: int8 weights and per-token int8 activations) | "
                                               "fp8 (e4m3 weights and activations)",
                               choices=("float", "int8", "int4", "sq8", "fp8")),
    "precision.method": Field("str", "rtn", "how int8/int4 weight-only scales are chosen: rtn (round to nearest) | "
                                            "awq (activation-aware search on the calibration text; same stored "
                                            "format)", choices=("rtn", "awq")),
    "precision.smoothquant_alpha": Field("float", 0.5, "sq8: migration strength (0 = all quantization difficulty "
                                                       "left on activations, 1 = all moved to weights)",
                                         min=0.0, max=1.0),
    "precision.group_size": Field("int", 0, "int8/int4 scale granularity: 0 = one scale per output channel, "
                                            "else a group of this many along K", choices=(0, 32, 64, 128)),
    "precision.quantize_output_layer": Field("bool", False, "also quantize the output layer (ChatGLM's official "
                                                             "quantized checkpoints keep it in fp16)"),
    "precision.int8_activations": Field("bool", None, "onnxruntime target: MatMulNBits quantizes activations to "
                                                      "int8 per block (accuracy_level 4), ORT's fast CPU kernels: "
                                                      "30-70x faster int8, ~2x faster int4 decode on CPU, verified "
                                                      "to its own bound (docs/runtime.md). Default: true for int8/int4 "
                                                      "weights; false = the exact float path", nullable=True),
    "precision.kv_cache": Field("str", "float", "float (kept in `dtype`) | int8 | fp8 (e4m3; calibrated scales)",
                                choices=("float", "int8", "fp8")),
    "precision.kv_granularity": Field("str", None, "quantized KV cache scale granularity (channel: per KV head "
                                                   "and channel); default: channel for int8, tensor for fp8",
                                      choices=("tensor", "head", "channel"), nullable=True),
    "calibration.source": Field("str", "builtin", "KV-cache calibration text: builtin (shipped with glmc) or a "
                                                  ".txt / .jsonl file"),
    "calibration.samples": Field("int", 16, "number of calibration samples", min=1, max=100000),
    "calibration.max_length": Field("int", 256, "tokens per calibration sample", min=8, max=1 << 20),
    "limits.max_batch": Field("int", 1, "largest batch the engines accept", min=1, max=4096),
    "limits.max_input_length": Field("int", 512, "longest prompt (prefill) in tokens", min=1, max=1 << 21),
    "limits.max_sequence_length": Field("int", 2048, "longest prompt + generation (KV cache length)",
                                        min=2, max=1 << 21),
    "targets": Field("list[choice]", ["onnx", "onnxruntime"], "lowerings to produce: onnx (glmc:: custom ops "
                                                               "kept), reference (standard ONNX), onnxruntime "
                                                               "(com.microsoft fast ops), tensorrt (+ engine), "
                                                               "cuda (glmc's own CUDA kernels: fp16/bf16, "
                                                               "int8/int4/fp8 weights, float or int8 KV cache; "
                                                               "needs .[cuda] to run)",
                     choices=TARGETS),
    "onnxruntime.padded_batches": Field("bool", None, "onnxruntime target: rows of one batch may differ in length "
                                                      "(left padding, an attention bias in every GroupQueryAttention)."
                                                      " false: equal-length rows only, for GQA's fast path on CUDA "
                                                      "(flash/XQA decode, int8 cache inside GQA, CUDA graphs). "
                                                      "Default: limits.max_batch > 1", nullable=True),
    "onnxruntime.fold_kv8": Field("bool", False, "onnxruntime target, int8 KV cache: GroupQueryAttention reads and "
                                                 "writes the int8 cache itself (needs padded_batches false on CUDA; "
                                                 "attends to quantized new tokens, so it is verified to a looser "
                                                 "bound; docs/onnx.md)"),
    "tensorrt.compute_capabilities": Field("list[choice]", ["sm80", "sm86", "sm89", "sm120"],
                                           "GPU architectures the engine is built for (TensorRT for RTX; "
                                           "TensorRT proper builds for the GPU it runs on)",
                                           choices=COMPUTE_CAPABILITIES),
    "tensorrt.workspace_mb": Field("int", 4096, "builder workspace memory pool limit, MiB", min=16, max=1 << 20),
    "tensorrt.optimization_level": Field("int", 3, "builder optimization level (0 fastest build .. 5)",
                                         min=0, max=5),
    "tensorrt.profiles": Field("list[choice]", ["full"], "optimization profiles: full (any prompt, any past), "
                                                        "prefill (past 0), decode (1 new token)",
                               choices=TRT_PROFILES),
    "tensorrt.opt_batch": Field("int", None, "batch the kernels are tuned for (default: max_batch)",
                                min=1, nullable=True),
    "tensorrt.opt_input_length": Field("int", None, "prompt length tuned for (default: min(128, max_input_length))",
                                       min=1, nullable=True),
    "tensorrt.opt_past_length": Field("int", None, "past length tuned for (default: max_sequence_length / 2)",
                                      min=0, nullable=True),
    "verify.enabled": Field("bool", True, "compare every ONNX Runtime-runnable lowering with the torch model"),
    "verify.prompts": Field("list[prompt]", ["The", "def main():", "import numpy as np"],
                            "prompts fed to torch and each lowering: text, or a list of token ids"),
    "verify.steps": Field("int", 8, "greedy decode steps compared after the prefill", min=0, max=4096),
    "verify.max_rel_error": Field("float", None, "largest allowed relative logits error (default: chosen per "
                                                 "precision by the verifier)", min=0.0, nullable=True),
    "verify.min_top1": Field("float", None, "fraction of positions whose top-1 token must agree (default: per "
                                            "precision)", min=0.0, max=1.0, nullable=True),
    "verify.min_greedy_agreement": Field("float", None, "fraction of greedy steps that must agree with torch in "
                                                        "every row (default: per precision)", min=0.0, max=1.0,
                                         nullable=True),
    "parallel.tensor": Field("int", 1, "tensor-parallel ranks (one process per GPU, NCCL; gloo on CPU) that `glmc "
                                       "run/bench/chat/serve` start for this build: the torch backend, weights "
                                       "sharded at load (docs/parallel.md); must divide the attention heads",
                             min=1, max=64),
    "output": Field("str", "build/{model}-{precision}", "build directory (relative to the current directory); "
                                                        "{model} and {precision} are filled in"),
    "cache_dir": Field("str", None, "stage cache (default: .glmc-cache beside the build directory)",
                       nullable=True),
}
SECTIONS = sorted({k.split(".")[0] for k in FIELDS if "." in k})
TOP_KEYS = sorted({k.split(".")[0] for k in FIELDS} | {"extends"})


# ---------------------------------------------------------------------------------------------- loading

@dataclasses.dataclass(frozen=True)
class ModelSource:
    """The checkpoint a build starts from (model.checkpoint, model.family)."""

    checkpoint: str
    family: str | None


@dataclasses.dataclass(frozen=True)
class Calibration:
    """KV-cache calibration text (the calibration section)."""

    source: str
    samples: int
    max_length: int


@dataclasses.dataclass(frozen=True)
class OrtLowering:
    """Options of the onnxruntime lowering (the onnxruntime section, and precision.int8_activations)."""

    padded_batches: bool
    fold_kv8: bool
    int8_activations: bool


@dataclasses.dataclass(frozen=True)
class TensorRTBuild:
    """The TensorRT engine build (the tensorrt section, defaults resolved from the limits)."""

    compute_capabilities: tuple[str, ...]
    workspace_mb: int
    optimization_level: int
    profiles: tuple[str, ...]
    opt_batch: int
    opt_input_length: int
    opt_past_length: int


@dataclasses.dataclass(frozen=True)
class VerifyOptions:
    """What verification compares and the bounds it may override (the verify section)."""

    enabled: bool
    prompts: tuple[str | tuple[int, ...], ...]
    steps: int
    max_rel_error: float | None
    min_top1: float | None
    min_greedy_agreement: float | None


def scheme_of(p: dict) -> Scheme:
    """The precision section, parsed once: the quantization Scheme every stage and the manifest use."""
    bits = {"float": 0, "int8": 8, "int4": 4, "sq8": 8, "fp8": 8}[p["weights"]]
    method = p["weights"] if p["weights"] in ("sq8", "fp8") else p["method"] if bits else "rtn"
    kv = p["kv_cache"] != "float"
    return Scheme(p["dtype"], bits, p["group_size"] if bits else 0, bool(p["quantize_output_layer"]) and bits > 0,
                  (p["kv_granularity"] or DEFAULT_KV_GRANULARITY[p["kv_cache"]]) if kv else None, method,
                  p["smoothquant_alpha"], p["kv_cache"] if kv else "int8")


def precision_section(scheme: Scheme) -> dict:
    """The precision section that `scheme_of` parses back into `scheme` (for configs built from a precision name)."""
    weights = (scheme.method if scheme.method in ("sq8", "fp8") else f"int{scheme.weight_bits}") \
        if scheme.weight_bits else "float"
    out = {"dtype": scheme.dtype, "weights": weights, "group_size": scheme.group_size,
           "quantize_output_layer": scheme.include_output,
           "kv_cache": scheme.kv_dtype if scheme.kv_granularity else "float", "kv_granularity": scheme.kv_granularity}
    if scheme.method in WEIGHT_ONLY_METHODS and scheme.weight_bits:
        out["method"] = scheme.method
    if scheme.method == "sq8":
        out["smoothquant_alpha"] = scheme.alpha
    return out


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """A validated, fully resolved compile config: typed sections (what the stages read), the resolved tree as
    written to the manifest, and where each value came from."""

    data: dict  # every field present, defaults filled in, paths absolute
    where: dict  # dotted key -> "file:line" or "--set key=value"
    files: list  # the YAML files read, extends included
    name: str
    model: ModelSource
    scheme: Scheme
    calibration: Calibration
    limits: Limits
    targets: tuple[str, ...]
    onnxruntime: OrtLowering
    tensorrt: TensorRTBuild
    verify: VerifyOptions
    output: Path
    cache_dir: Path
    tensor_parallel: int = 1  # parallel.tensor

    @classmethod
    def from_tree(cls, data: dict, where: dict, files: list) -> CompileConfig:
        d = data
        v = d["verify"]
        trt: dict[str, Any] = {k: tuple(x) if isinstance(x, list) else x for k, x in d["tensorrt"].items()}
        return cls(
            data, where, files, name=d["model"]["name"],
            model=ModelSource(d["model"]["checkpoint"], d["model"]["family"]), scheme=scheme_of(d["precision"]),
            calibration=Calibration(**d["calibration"]), limits=Limits(**d["limits"]), targets=tuple(d["targets"]),
            onnxruntime=OrtLowering(d["onnxruntime"]["padded_batches"], d["onnxruntime"]["fold_kv8"],
                                    d["precision"]["int8_activations"]),
            tensorrt=TensorRTBuild(**trt),
            verify=VerifyOptions(v["enabled"], tuple(tuple(p) if isinstance(p, list) else p for p in v["prompts"]),
                                 v["steps"], v["max_rel_error"], v["min_top1"], v["min_greedy_agreement"]),
            output=Path(d["output"]), cache_dir=Path(d["cache_dir"]), tensor_parallel=d["parallel"]["tensor"])

    @property
    def precision_tag(self) -> str:
        """fp16 | int8 | int4-g128 | fp16-kv8 | int8-kv8 ... (used in {precision} and reports)."""
        return self.scheme.tag

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=True)


def _where(path: Path | str, node: yaml.Node) -> str:
    """file:line of a node, or the `--set` option it came from."""
    return f"{path}:{node.start_mark.line + 1}" if isinstance(path, Path) else str(path)


# Safe YAML: plain values only. Every node must carry one of these tags (what YAML resolves untagged values to);
# `!!python/...`, `!!binary`, `!!set`, `!custom` ... are refused. Aliases are expanded with a budget (a compile
# config has about a hundred values; a "billion laughs" alias bomb would expand to 10^9), nesting is bounded, and
# the file's size too.
_YAML_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")}
MAX_YAML_VALUES = 10_000
MAX_YAML_DEPTH = 32
MAX_YAML_BYTES = 1 << 20


def _to_tree(node: yaml.Node, path: Path | str, prefix: str, where: dict, budget: list[int] | None = None,
             depth: int = 0) -> Any:
    """A composed YAML node -> plain values, recording the file:line of every key in `where` (`path`: the file,
    or a `--set` option as a string). Refuses tags, and aliases that expand past MAX_YAML_VALUES values."""
    budget = [MAX_YAML_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{_where(path, node)}: the YAML under '{prefix.split('[')[0] or '(top)'}' expands to more "
                          f"than {MAX_YAML_VALUES:,} values through aliases (*name): an alias bomb? write the values "
                          "out")
    if depth > MAX_YAML_DEPTH:
        raise ConfigError(f"{_where(path, node)}: YAML nested more than {MAX_YAML_DEPTH} levels deep (or an alias "
                          "that contains itself)")
    if node.tag not in _YAML_TAGS:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise ConfigError(f"{_where(path, node)}: YAML tag '{tag}' refused: compile configs hold plain values "
                          "(no !tags)" + (f" at '{prefix}'" if prefix else ""))
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode) or knode.tag not in _YAML_TAGS:
                raise ConfigError(f"{_where(path, knode)}: keys must be plain names")
            key = str(knode.value)
            dotted = f"{prefix}.{key}" if prefix else key
            if key in out:
                raise ConfigError(f"{_where(path, knode)}: key '{dotted}' appears twice")
            where[dotted] = _where(path, knode)
            out[key] = _to_tree(vnode, path, dotted, where, budget, depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_tree(v, path, f"{prefix}[{i}]", where, budget, depth + 1) for i, v in enumerate(node.value)]
    try:
        return yaml.SafeLoader("").construct_object(node)
    except (yaml.YAMLError, ValueError) as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{_where(path, node)}: {prefix or 'value'}: cannot read {node.value[:40]!r} ({e})") \
            from None


def _compose(text: str, origin: str) -> yaml.Node | None:
    """Parse YAML into nodes (no values built, no tags acted on); one-line ConfigErrors naming `origin`."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{origin}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise ConfigError(f"{origin}: YAML nested too deeply") from None


def _read_yaml(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is not a compile config (at most {MAX_YAML_BYTES:,} bytes)")
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "save the config as UTF-8") from None
    node = _compose(text, str(path))
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(path, node)}: a compile config is a mapping of sections (model, precision, ...)")
    where: dict = {}
    tree = _to_tree(node, path, "", where)
    # paths inside a file are relative to that file
    for key in ("model.checkpoint", "calibration.source"):
        sec, name = key.split(".")
        value = tree.get(sec, {}).get(name) if isinstance(tree.get(sec), dict) else None
        if isinstance(value, str) and value not in ("", "builtin", MISSING):
            tree[sec][name] = str((path.parent / Path(value).expanduser()).resolve())  # absolute paths stay
    return tree, where


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_file(path: Path, chain: tuple = ()) -> tuple[dict, dict, list]:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: `extends` loop: {' -> '.join(str(p) for p in chain + (path,))}")
    tree, where = _read_yaml(path)
    parents = tree.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{where.get('extends', path)}: extends: expected a file name or a list of file names")
    merged: dict = {}
    merged_where: dict = {}
    files: list = []
    for p in parents:
        ptree, pwhere, pfiles = _load_file(path.parent / p, chain + (path,))
        merged, files = _merge(merged, ptree), files + pfiles
        merged_where.update(pwhere)
    merged_where.update(where)
    return _merge(merged, tree), merged_where, files + [path]


def parse_set(option: str) -> tuple[str, Any]:
    """`key.path=value` -> (key, the value read as safe YAML: no tags, bounded aliases; text that is not YAML
    stays text)."""
    if "=" not in option:
        raise ConfigError(f"--set {option}: expected key.path=value")
    key, text = option.split("=", 1)
    if not text.strip():
        return key.strip(), None
    try:
        node = _compose(text, f"--set {option}")
    except ConfigError:
        return key.strip(), text
    value = None if node is None else _to_tree(node, f"--set {option}", key.strip(), {})
    return key.strip(), value


def _apply_set(tree: dict, where: dict, option: str) -> None:
    key, value = parse_set(option)
    where_key = f"--set {option}"
    if key == "extends":
        raise ConfigError(f"{where_key}: extends works inside YAML files; on the command line, name the file as "
                          "another CONFIG.yaml argument (later files overlay earlier ones)")
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where_key}: '{'.'.join(parts[:i + 1])}' is not a section")
        node = child
    if key in ("model.checkpoint", "calibration.source") and isinstance(value, str) and value != "builtin":
        value = str(Path(value).expanduser().resolve())
    if isinstance(value, (int, float)) and key in ("model.checkpoint", "calibration.source", "output", "cache_dir"):
        value = str(value)
    node[parts[-1]] = value
    where[key] = where_key


# ---------------------------------------------------------------------------------------------- validation

def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(tree: dict, where: dict) -> None:
    for top, value in tree.items():
        here = where.get(top, "config")
        if top not in TOP_KEYS:
            raise ConfigError(f"{here}: unknown key '{top}'{_suggest(top, TOP_KEYS)}; "
                              f"known: {', '.join(TOP_KEYS)}")
        if top in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{here}: '{top}' is a section (a mapping of keys), found {_show(value)}")
            known = [k.split(".", 1)[1] for k in FIELDS if k.startswith(top + ".")]
            for key in value:
                if key not in known:
                    dotted = f"{top}.{key}"
                    all_keys = [k for k in FIELDS if "." in k]
                    hint = _suggest(key, known) or _suggest(dotted, all_keys)
                    raise ConfigError(f"{where.get(dotted, here)}: unknown key '{dotted}'{hint}; "
                                      f"{top} keys: {', '.join(known)}")


def _show(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "nothing"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, (dict, list)) else kind


def _check_value(key: str, f: Field, value: Any, here: str) -> Any:
    def fail(msg: str) -> None:
        raise ConfigError(f"{here}: {key}: {msg}")

    if value == MISSING:
        fail(f"must be set (this config leaves it to you): add --set {key}={'DIR' if f.kind == 'path' else 'VALUE'}")
    if value is None:
        if f.nullable:
            return None
        fail("a value is required")
    if f.kind in ("str", "path"):
        if not isinstance(value, str):
            fail(f"expected a string, found {_show(value)}")
    elif f.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"expected an integer, found {_show(value)}")
    elif f.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"expected a number, found {_show(value)}")
        value = float(value)
    elif f.kind == "bool":
        if not isinstance(value, bool):
            fail(f"expected true or false, found {_show(value)}")
    elif f.kind.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            fail(f"expected a list, found {_show(value)}")
        if not value:
            fail("the list is empty")
        for item in value:
            if f.kind == "list[prompt]" and isinstance(item, list) and item and all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item):
                continue
            if f.kind == "list[prompt]" and not (isinstance(item, str) and item):
                fail(f"a prompt is a non-empty string or a list of token ids, found {_show(item)}")
            if not isinstance(item, str):
                fail(f"expected a list of strings, found {_show(item)} in it")
            if f.choices and item not in f.choices:
                fail(f"'{item}' is not one of {', '.join(f.choices)}{_suggest(item, list(f.choices))}")
        if f.kind != "list[prompt]" and len(set(value)) != len(value):
            fail(f"{value} names an entry twice")
        return list(value)
    if f.choices and not f.kind.startswith("list") and value not in f.choices:
        shown = ", ".join(str(c) for c in f.choices)
        fail(f"{value!r} is not one of {shown}" + (_suggest(value, list(f.choices)) if isinstance(value, str) else ""))
    if f.min is not None and value < f.min:
        fail(f"{value} is below the minimum {f.min:g}")
    if f.max is not None and value > f.max:
        fail(f"{value} is above the maximum {f.max:g}")
    return value


def shipped_model() -> Path:
    """The model that ships inside the package (the default checkpoint)."""
    try:
        from glmc.assets import SHIPPED_MODEL
        return Path(SHIPPED_MODEL)
    except ImportError:
        return Path(__file__).resolve().parent.parent / "assets" / "glmc-tiny"


def tensorrt_available() -> str | None:
    """The importable TensorRT module name (tensorrt, else tensorrt_rtx_bindings), or None."""
    import importlib.util
    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _cross_checks(data: dict, where: dict) -> None:
    lim, prec, trt = data["limits"], data["precision"], data["tensorrt"]

    def at(key: str) -> str:
        return where.get(key, "config")

    if lim["max_input_length"] > lim["max_sequence_length"]:
        raise ConfigError(f"{at('limits.max_input_length')}: limits.max_input_length ({lim['max_input_length']}) "
                          f"is longer than limits.max_sequence_length ({lim['max_sequence_length']}): a prompt "
                          "must fit in the KV cache")
    if prec["weights"] not in ("int8", "int4") and prec["group_size"]:
        raise ConfigError(f"{at('precision.group_size')}: precision.group_size {prec['group_size']} only applies "
                          f"to int8/int4 weights (precision.weights is {prec['weights']})")
    if prec["weights"] not in ("int8", "int4") and prec["method"] != "rtn":
        raise ConfigError(f"{at('precision.method')}: precision.method {prec['method']} only applies to int8/int4 "
                          f"weights (precision.weights is {prec['weights']})")
    if prec["weights"] != "sq8" and "precision.smoothquant_alpha" in where:
        raise ConfigError(f"{at('precision.smoothquant_alpha')}: precision.smoothquant_alpha only applies to "
                          f"precision.weights: sq8 (it is {prec['weights']})")
    if prec["weights"] in ("sq8", "fp8") and prec["quantize_output_layer"]:
        raise ConfigError(f"{at('precision.quantize_output_layer')}: {prec['weights']} keeps the output layer in "
                          "floating point")
    for key, limit in (("opt_batch", "max_batch"), ("opt_input_length", "max_input_length"),
                       ("opt_past_length", "max_sequence_length")):
        if trt[key] is not None and trt[key] > lim[limit] - (key == "opt_past_length"):
            raise ConfigError(f"{at('tensorrt.' + key)}: tensorrt.{key} ({trt[key]}) is outside the limits "
                              f"(limits.{limit} = {lim[limit]})")
    if data["onnxruntime"]["fold_kv8"] and prec["kv_cache"] != "int8":
        raise ConfigError(f"{at('onnxruntime.fold_kv8')}: onnxruntime.fold_kv8 folds an int8 KV cache into "
                          f"GroupQueryAttention, but precision.kv_cache is {prec['kv_cache']}")
    old = [cc for cc in trt["compute_capabilities"] if cc in ("sm75", "sm80", "sm86")]
    if "tensorrt" in data["targets"] and "fp8" in (prec["weights"], prec["kv_cache"]) and old:
        raise ConfigError(f"{at('tensorrt.compute_capabilities')}: tensorrt.compute_capabilities: {', '.join(old)} "
                          "cannot run FP8 (e4m3 needs Ada sm89 or newer; TensorRT refuses to build it): use [sm89, "
                          "sm120], or drop 'tensorrt' from targets")
    if "tensorrt" in data["targets"] and tensorrt_available() is None:
        raise ConfigError(f"{at('targets')}: targets: 'tensorrt' needs TensorRT, and neither `tensorrt` nor "
                          "TensorRT for RTX (`tensorrt_rtx_bindings`) is importable; install one "
                          "(pip install 'glmc[full]') or drop the target")
    if "cuda" in data["targets"]:
        _check_cuda(data, where, None)
    if scheme_of(prec).needs_calibration and data["calibration"]["source"] != "builtin":
        src = Path(data["calibration"]["source"])
        if not src.is_file():
            raise ConfigError(f"{at('calibration.source')}: calibration.source: {src} does not exist")
        if src.suffix not in (".txt", ".jsonl"):
            raise ConfigError(f"{at('calibration.source')}: calibration.source: {src} is not a .txt or .jsonl file")


def _check_cuda(data: dict, where: dict, arch: Any) -> None:
    """The cuda target: what the engine cannot hold (glmc.artifact.cuda_unsupported), named by key."""
    from glmc.artifact import cuda_unsupported as unsupported
    prec = data["precision"]
    if prec["weights"] == "sq8":
        raise ConfigError(f"{where.get('precision.weights', 'config')}: precision.weights: the cuda target cannot "
                          f"run {prec['weights']} weights yet; or drop 'cuda' from targets "
                          f"({where.get('targets', 'config')})")
    why = unsupported(arch, prec["dtype"], prec["kv_cache"])
    if why is not None:
        key, reason = why
        raise ConfigError(f"{where.get(key, where.get('targets', 'config'))}: {key}: the cuda target cannot run "
                          f"this build: {reason}; or drop 'cuda' from targets ({where.get('targets', 'config')})")


def _check_parallel(data: dict, where: dict, arch: Any) -> None:
    """parallel.tensor against the model: it divides the heads, is a multiple or divisor of the KV groups, and the
    per-rank attention columns hold whole scale groups (glmc.parallel.shard checks the same at load)."""
    n = data["parallel"]["tensor"]
    if n == 1:
        return
    here, prec = where.get("parallel.tensor", "config"), data["precision"]
    if arch.num_heads % n:
        raise ConfigError(f"{here}: parallel.tensor: {n} does not divide the model's {arch.num_heads} attention heads")
    if n % arch.num_kv_heads and arch.num_kv_heads % n:
        raise ConfigError(f"{here}: parallel.tensor: {n} is neither a multiple nor a divisor of the model's "
                          f"{arch.num_kv_heads} KV groups")
    cols = arch.num_heads // n * arch.head_dim
    if prec["weights"] != "float" and prec["group_size"] and cols % prec["group_size"]:
        raise ConfigError(f"{here}: parallel.tensor: {n} gives each rank {cols} attention columns, which cut the "
                          f"groups of precision.group_size {prec['group_size']}")


def _check_checkpoint(data: dict, where: dict) -> None:
    here = where.get("model.checkpoint", "config")
    ckpt = Path(data["model"]["checkpoint"])
    if not ckpt.is_dir():
        raise ConfigError(f"{here}: model.checkpoint: {ckpt} does not exist (or is not a directory)")
    if not (ckpt / "config.json").is_file():
        raise ConfigError(f"{here}: model.checkpoint: {ckpt} has no config.json (not a Hugging Face checkpoint "
                          "directory)")
    from glmc.modeling_patches.config import load_config
    cfg = load_config(ckpt, family=data["model"]["family"])
    if data["model"]["family"] is None:
        data["model"]["family"] = cfg.family
    if "cuda" in data["targets"]:
        _check_cuda(data, where, cfg)
    _check_parallel(data, where, cfg)
    seq = data["limits"]["max_sequence_length"]
    if seq > cfg.seq_length:
        raise ConfigError(f"{where.get('limits.max_sequence_length', 'config')}: limits.max_sequence_length "
                          f"({seq}) is longer than the model's context ({cfg.seq_length}, seq_length in "
                          f"{ckpt / 'config.json'})")


def validate(tree: dict, where: dict, files: list | None = None, check_files: bool = True) -> CompileConfig:
    """Check a merged config tree against FIELDS and fill in defaults; raises ConfigError naming file:line."""
    _check_keys(tree, where)
    data: dict = {}
    for key, f in FIELDS.items():
        parts = key.split(".")
        node = tree
        present = True
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                present = False
                break
            node = node[part]
        value = _check_value(key, f, node, where.get(key, "config")) if present else copy.deepcopy(f.default)
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    if data["model"]["checkpoint"] is None:
        data["model"]["checkpoint"] = str(shipped_model())
    if data["model"]["name"] is None:
        data["model"]["name"] = Path(data["model"]["checkpoint"]).name
    lim, trt, prec = data["limits"], data["tensorrt"], data["precision"]
    _cross_checks(data, where)
    trt["opt_batch"] = trt["opt_batch"] or lim["max_batch"]
    trt["opt_input_length"] = trt["opt_input_length"] or min(128, lim["max_input_length"])
    if trt["opt_past_length"] is None:
        trt["opt_past_length"] = lim["max_sequence_length"] // 2
    if prec["kv_granularity"] is None and prec["kv_cache"] != "float":
        prec["kv_granularity"] = DEFAULT_KV_GRANULARITY[prec["kv_cache"]]
    if prec["int8_activations"] is None:  # the fast CPU path wherever there are integer weights to use it
        prec["int8_activations"] = prec["weights"] in ("int8", "int4")
    if data["onnxruntime"]["padded_batches"] is None:
        data["onnxruntime"]["padded_batches"] = lim["max_batch"] > 1
    if check_files:
        _check_checkpoint(data, where)
    try:
        data["output"] = str(Path(data["output"].format(model=data["model"]["name"],
                                                        precision=scheme_of(data["precision"]).tag))
                             .expanduser().resolve())
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{where.get('output', 'config')}: output: bad placeholder in '{data['output']}' ({e}); "
                          "use {model} and {precision}") from None
    if data["cache_dir"] is None:
        data["cache_dir"] = str(Path(data["output"]).parent / ".glmc-cache")
    else:
        data["cache_dir"] = str(Path(data["cache_dir"]).expanduser().resolve())
    return CompileConfig.from_tree(data, where, [str(f) for f in files or []])


def from_options(tree: dict, command: str) -> CompileConfig:
    """A config built by a command from its flags (glmc verify / quantize / eval), validated like a YAML one, with
    the compile defaults for every key not given; errors name the command's option."""
    where: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            where[prefix + k] = command
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
    walk(tree, "")
    tree = copy.deepcopy(tree)
    limits = tree.setdefault("limits", {})
    if "max_sequence_length" not in limits:  # the default, within the model's own context
        from glmc.modeling_patches.config import load_config
        seq = load_config(tree["model"]["checkpoint"], family=tree["model"].get("family")).seq_length
        limits["max_sequence_length"] = min(FIELDS["limits.max_sequence_length"].default, seq)
        limits.setdefault("max_input_length", min(FIELDS["limits.max_input_length"].default, seq))
    return validate(tree, where, [])


def load(paths: list[str | Path] | str | Path, overrides: Sequence[str] = (),
         check_files: bool = True) -> CompileConfig:
    """Read one or more YAML files (later ones overlay earlier ones), apply `--set` overrides, validate."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    tree: dict = {}
    where: dict = {}
    files: list = []
    for p in paths:
        t, w, f = _load_file(Path(p))
        tree, files = _merge(tree, t), files + f
        where.update(w)
    for option in overrides:
        _apply_set(tree, where, option)
    return validate(tree, where, files, check_files=check_files)


def describe() -> str:
    """The schema as a table (for `glmc compile --help` and docs/compiler.md)."""
    lines = []
    for key, f in FIELDS.items():
        default = "(shipped model)" if key == "model.checkpoint" else json.dumps(f.default)
        choices = f"  [{' | '.join(str(c) for c in f.choices)}]" if f.choices else ""
        lines.append(f"  {key:32s} {default:24s} {f.help}{choices}")
    return "\n".join(lines)
