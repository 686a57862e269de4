"""The compile pipeline: load -> quantize/calibrate -> export -> simplify -> lower per target -> engines -> verify
-> package.

Engines: `engine:tensorrt` builds from the tensorrt lowering; `engine:cuda` writes the quantized weights as glmc's
CUDA kernels read them (glmc.runtime.backend_cuda.save_cuda_build; no GPU needed to build it).

Each stage is handed a frozen dataclass of the typed config (all it reads) and writes its outputs into a cache
folder named by a hash of those inputs, the hashes of the stages it reads from, the checkpoint's fingerprint and
the glmc code, so a change reruns only the stages downstream of it; `force=True` reruns all. The model is loaded
only when a stage that needs it has to run. The build directory is assembled from the cached outputs (copies,
never links into the cache) and appears atomically. This is the one orchestrator: `glmc verify`, `quantize` and
`eval` run it too (`run_stages`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import glmc
from glmc.artifact import BUILD_FORMAT, CUDA_DIR, ENGINE_TARGETS, MODEL_DIR, TARGETS, TOKENIZER_FILES, Limits
from glmc.compiler.builddir import BuildDir, file_table, place, remove_dead_temps
from glmc.compiler.schema import Calibration, CompileConfig, ModelSource, OrtLowering, TensorRTBuild, VerifyOptions
from glmc.errors import GlmcError
from glmc.quantization.scheme import Scheme

STAGE_FILE = "stage.json"  # in every cached stage folder: what the stage reported
# Names of the exported and simplified graphs. Large models keep their weights in `<export name>.data`, which the
# simplified graph and every lowered model.onnx keep pointing at (linked or copied beside them); each lowering
# writes its new tensors to model.onnx.data, so the export must not be called model.onnx (one name for both
# files overwrites the shared weights).
EXPORTED = "exported.onnx"
SIMPLIFIED = "simplified.onnx"
PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript", "onnxsim", "numpy", "transformers", "safetensors",
            "tensorrt", "tensorrt-rtx-cu13-bindings", "tensorrt-rtx-cu13-libs", "pyyaml", "rich")


class StageError(GlmcError):
    """A pipeline stage failed; the message names the stage."""


class VerificationFailed(StageError):
    """The verify stage ran and a lowering missed its bound; `report` holds the numbers."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class Stage:
    """One step: the typed slice of the config it reads (its cache key is derived from that slice alone, so a key
    it does not read cannot rerun it), the upstream stages it reads from, and the function that runs it."""

    name: str
    inputs: Any  # a frozen dataclass (or None): all of the config this stage's `run` is handed
    deps: tuple[str, ...]
    run: Callable[[Context, Any, Path], dict]
    hash: str = ""
    status: str = "pending"  # pending | cached | ran
    seconds: float = 0.0
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def dir_name(self) -> str:
        return f"{self.name.replace(':', '-')}-{self.hash[:16]}"

    @property
    def reads(self) -> list[str]:
        """What the stage reads, for `glmc compile --plan`."""
        return [f.name for f in dataclasses.fields(self.inputs)] if self.inputs is not None else []


# The inputs of each stage: frozen dataclasses built from the typed config.
@dataclasses.dataclass(frozen=True)
class QuantizeInputs:
    model: ModelSource
    scheme: Scheme
    calibration: Calibration | None  # only with an int8 KV cache


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """What rebuilding the quantized torch model needs (export; verify's reference)."""

    model: ModelSource
    scheme: Scheme
    max_sequence_length: int


@dataclasses.dataclass(frozen=True)
class LowerInputs:
    target: str
    onnxruntime: OrtLowering | None  # only the onnxruntime target reads its options


@dataclasses.dataclass(frozen=True)
class EngineInputs:
    limits: Limits
    tensorrt: TensorRTBuild


@dataclasses.dataclass(frozen=True)
class CudaEngineInputs:
    source: ModelInputs  # the quantized model whose weights the cuda engine holds
    limits: Limits


@dataclasses.dataclass(frozen=True)
class VerifyInputs:
    source: ModelInputs
    verify: VerifyOptions
    limits: Limits
    onnxruntime: OrtLowering
    targets: tuple[str, ...]  # the lowerings compared (those ONNX Runtime runs)
    # the cuda engine: None (not a target), "here" (this machine runs it: compared too), else why it cannot run
    # here (recorded in the report; part of the key, so a GPU machine reruns what a CPU machine could not check)
    cuda: str | None = None


# The code whose changes change what the stages write (runtime backends and CLIs do not).
CODE = ("artifact.py", "modeling_patches", "quantization", "export", "compiler", "runtime/generate.py",
        "runtime/verify.py", "runtime/backend_onnxruntime.py", "runtime/backend_torch.py", "runtime/backend_cuda.py",
        "kernels", "errors.py", "__init__.py")


def code_fingerprint() -> str:
    """glmc's version and a hash of the code (and data files, e.g. the builtin calibration text) behind the
    stages: a cached stage is reused only with the code that made it."""
    h = hashlib.sha256(glmc.__version__.encode())
    root = Path(glmc.__file__).parent
    for part in CODE:
        files = [root / part] if (root / part).is_file() else sorted((root / part).rglob("*"))
        for p in files:
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return f"{glmc.__version__}+{h.hexdigest()[:16]}"


def checkpoint_fingerprint(ckpt: Path) -> dict:
    """Names, sizes and mtimes of the checkpoint's files, and config.json's content hash (cheap even at 20 GB)."""
    files = {}
    for p in sorted(ckpt.iterdir()):
        if p.is_file():
            st = p.stat()
            files[p.name] = [st.st_size, st.st_mtime_ns]
    cfg = ckpt / "config.json"
    return {"files": files, "config_sha256": hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else ""}


# ---------------------------------------------------------------------------------------------- context

class Context:
    """What stages share: the finished stages' folders and the lazily loaded models (not the config: each stage
    is handed its own inputs)."""

    def __init__(self, console: Console):
        self.console = console
        self.outputs: dict[str, Path] = {}
        self.stages: dict[str, Stage] = {}
        self._model: tuple[ModelInputs, Any] | None = None

    def load_float(self, source: ModelSource):
        """The floating-point checkpoint quantization and calibration start from (the `load` stage): float32 when
        it takes under a third of this machine's memory (CPU calibration is fastest and exact there), else the
        checkpoint's own fp16/bf16, so that a 6B model needs ~12 GB instead of 24."""
        from glmc.modeling_patches.checkpoint import load_model
        from glmc.modeling_patches.config import load_config
        t0 = time.perf_counter()
        arch = load_config(source.checkpoint, family=source.family)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        dtype = "float32" if 4 * arch.num_parameters < ram / 3 else arch.torch_dtype
        model = load_model(source.checkpoint, dtype, family=source.family)
        self.stages["load"].status, self.stages["load"].seconds = "ran", time.perf_counter() - t0
        self.stages["load"].info = {"dtype": dtype}
        self.console.print(f"  [green]✓[/] {'load':18s} {time.perf_counter() - t0:6.2f}s  {source.checkpoint} "
                           f"({dtype})")
        return model

    def model(self, inputs: ModelInputs):
        """The model to export and verify against: the quantize stage's weights (or the checkpoint's, for a float
        scheme) in the scheme's dtype."""
        from glmc.modeling_patches.checkpoint import load_model
        if self._model is not None and self._model[0] == inputs:
            return self._model[1]
        weights = self.outputs["quantize"] / "model"
        src = weights if (weights / "config.json").is_file() and inputs.scheme.to_json() else inputs.model.checkpoint
        model = load_model(src, inputs.scheme.dtype, family=inputs.model.family,
                           max_positions=inputs.max_sequence_length)
        self._model = (inputs, model)
        return model


# ---------------------------------------------------------------------------------------------- stages

def run_quantize(ctx: Context, inp: QuantizeInputs, out: Path) -> dict:
    """Quantize weights / calibrate the KV cache; save a loadable checkpoint (model/) when anything is quantized."""
    from glmc.quantization.scheme import apply_scheme, save_quantized
    scheme, ckpt = inp.scheme, Path(inp.model.checkpoint)
    model_dir = out / "model"
    model_dir.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, model_dir / name)
    if not scheme.to_json():
        return {"scheme": scheme.name, "quantization": {}, "weights": "in the ONNX files (float)"}
    model = ctx.load_float(inp.model)
    calib = None
    info: dict[str, Any] = {"scheme": scheme.name, "quantization": scheme.to_json()}
    if inp.calibration is not None:
        from glmc.modeling_patches.tokenizer import load_tokenizer
        from glmc.quantization.kv_calibration import calibration_samples
        c = inp.calibration
        tok = load_tokenizer(ckpt, inp.model.family)
        src = None if c.source == "builtin" else c.source
        calib = calibration_samples(tok.encode, src, c.samples, c.max_length)
        info["calibration"] = {"source": c.source, "samples": len(calib), "tokens": int(sum(x.numel() for x in calib))}
    apply_scheme(model, scheme, calib)
    save_quantized(model, model_dir, scheme)
    return info


def run_export(ctx: Context, inp: ModelInputs, out: Path) -> dict:
    """torch -> one ONNX graph (prefill and decode; dynamic batch, sequence and past), glmc:: ops kept."""
    from glmc.export.onnx_export import export
    result = export(ctx.model(inp), out / EXPORTED)
    return {"onnx": EXPORTED, "external_data": result["external_data"], "weight_bytes": result["weight_bytes"]}


def run_simplify(ctx: Context, inp: None, out: Path) -> dict:
    """onnxsim the exported graph (the glmc:: nodes survive; the export module checks that)."""
    from glmc.export.simplify import simplify_file
    result = simplify_file(ctx.outputs["export"] / EXPORTED, out / SIMPLIFIED)
    return {"onnx": SIMPLIFIED, "nodes_before": result["nodes_before"], "nodes_after": result["nodes_after"],
            "glmc_nodes": result["glmc_nodes"], "seconds": round(result["seconds"], 3)}


def run_lower(ctx: Context, inp: LowerInputs, out: Path) -> dict:
    from glmc.export.lower import lower_file
    o = inp.onnxruntime
    runtime = lower_file(ctx.outputs["simplify"] / SIMPLIFIED, inp.target, out / "model.onnx",
                         accuracy_level=4 if o and o.int8_activations else 0, fold_kv8=bool(o and o.fold_kv8),
                         padded_batches=not o or o.padded_batches)
    return {"onnx": "model.onnx", "runtime_config": "model.json", "target": inp.target,
            "limits": runtime.get("limits", {}), "kv_cache": runtime.get("kv_cache", {})}


def run_engine(ctx: Context, inp: EngineInputs, out: Path) -> dict:
    """Build the TensorRT engine from the `tensorrt` lowering (TensorRT, else TensorRT for RTX)."""
    from glmc.compiler.tensorrt import build_engine_isolated, write_layers
    t = inp.tensorrt
    info = build_engine_isolated(
        ctx.outputs["lower:tensorrt"] / "model.onnx", out / "model.engine", dataclasses.asdict(inp.limits),
        profiles=list(t.profiles), compute_capabilities=list(t.compute_capabilities), workspace_mb=t.workspace_mb,
        optimization_level=t.optimization_level, log_path=out / "build.log",
        opt={"batch": t.opt_batch, "input_length": t.opt_input_length, "past_length": t.opt_past_length})
    write_layers(info, out / "layers.json")
    info = {k: v for k, v in info.items() if k not in ("engine_layers", "network_layers")} | {
        "engine_layer_count": len(info["engine_layers"]), "network_layer_count": len(info["network_layers"]),
        "layers": "layers.json", "build_log": "build.log"}
    return info


def run_cuda_engine(ctx: Context, inp: CudaEngineInputs, out: Path) -> dict:
    """The cuda engine: the quantized model's weights as glmc's CUDA kernels read them, with the build's limits
    (save_cuda_build; runs on any machine, CUDA and triton are needed only to run it)."""
    from glmc.runtime.backend_cuda import BUILD_FILE, save_cuda_build
    lim = inp.limits
    save_cuda_build(ctx.model(inp.source), out, max_batch=lim.max_batch, max_length=lim.max_sequence_length,
                    max_input_length=lim.max_input_length)
    meta = json.loads((out / BUILD_FILE).read_text())
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    return {"format": meta["format"], "dtype": meta["dtype"], "quantization": meta["quantization"],
            "needs": meta["needs"], "files": files, "bytes": sum((out / f).stat().st_size for f in files)}


def encode_prompts(source: ModelSource, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Verification prompts as token ids: text through the checkpoint's tokenizer, id lists as they are."""
    id_lists = [p for p in prompts if not isinstance(p, str)]
    if len(id_lists) == len(prompts):
        return [list(p) for p in id_lists]
    from glmc.modeling_patches.tokenizer import load_tokenizer
    tok = load_tokenizer(source.checkpoint, source.family)
    ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for text, i in zip(prompts, ids, strict=True):
        if not i:
            raise StageError(f"verify.prompts: '{text}' encodes to no tokens")
    return ids


# Options that change the math on purpose are held to their own bounds. int8 activations (MatMulNBits
# accuracy_level 4, the CPU default for int8/int4 weights): max relative logits error measured 6.1-6.8e-3 on the
# shipped model, 3.4-3.9e-2 on a 291M-parameter random-weight model and up to 6.4e-2 on the tiny random test
# models (docs/onnx.md, docs/runtime.md), so 1e-1; a lowering bug (wrong codes, nibble order or scales) is off by
# O(1). Its top-1 and greedy disagreements count as ties only where its own measured error explains them
# (Tolerance.ties_within_error). An int8 cache folded into GQA attends to the quantized new tokens (measured
# 3-9% on tiny random models with 4 calibration samples: docs/onnx.md).
OPTION_BOUNDS = {"int8_activations": 1e-1, "fold_kv8": 0.2}


def run_verify(ctx: Context, inp: VerifyInputs, out: Path) -> dict:
    """Compare the torch model with every lowering ONNX Runtime runs, on the config's prompts, through the runtime's
    own backends (glmc.runtime.verify)."""
    import torch

    from glmc.runtime import verify as verify_mod
    v, lim = inp.verify, inp.limits
    model = ctx.model(inp.source)
    lowered = {t: ctx.outputs[f"lower:{t}"] / "model.onnx" for t in inp.targets}
    fp8 = inp.source.scheme.activations == "fp8" or model.kv_dtype == torch.float8_e4m3fn  # e4m3 at run time
    w8a8 = inp.source.scheme.activations == "int8"  # sq8: int8 per token at run time
    tol = verify_mod.tolerance_for(model.dtype, inp.source.scheme.weight_bits, model.kv_dtype == torch.int8, fp8,
                                   w8a8)

    def configured(t: verify_mod.Tolerance) -> verify_mod.Tolerance:  # the config's bounds where it gives them
        return dataclasses.replace(
            t, rel=t.rel if v.max_rel_error is None else v.max_rel_error,
            top1=t.top1 if v.min_top1 is None else v.min_top1,
            greedy_fraction=t.greedy_fraction if v.min_greedy_agreement is None else v.min_greedy_agreement)

    tol = configured(tol)
    prompts = encode_prompts(inp.source.model, v.prompts)
    longest = max(len(p) for p in prompts) + v.steps
    if longest > lim.max_sequence_length or max(len(p) for p in prompts) > lim.max_input_length:
        raise StageError(f"verify.prompts: the longest prompt plus verify.steps ({longest} tokens) does not fit the "
                         "limits (limits.max_input_length / max_sequence_length)")
    backends: dict[str, Callable[[int], Any]] = {}
    tolerances: dict[str, verify_mod.Tolerance] = {}
    if inp.cuda == "here":  # the cuda engine as a user runs it (load_cuda_build), held to its precision's bounds
        from glmc.runtime.backend_cuda import load_cuda_build
        engine = ctx.outputs["engine:cuda"]
        backends["cuda"] = lambda length: load_cuda_build(engine, max_batch=lim.max_batch, max_length=length)
        tolerances["cuda"] = configured(verify_mod.tolerance_for(model.dtype, inp.source.scheme.weight_bits,
                                                                 model.kv_dtype == torch.int8, fp8, w8a8))
    report = verify_mod.verify(model, lowered, prompts, steps=v.steps, tolerance=tol, max_batch=lim.max_batch,
                               backends=backends, tolerances=tolerances)
    if inp.cuda not in (None, "here"):
        report["not_run"] = {"cuda": f"not run here: {inp.cuda}"}
    loose = max([tol.rel] + [b for key, b in OPTION_BOUNDS.items() if getattr(inp.onnxruntime, key)])
    if loose > tol.rel and "onnxruntime" in lowered:
        fast = verify_mod.verify(model, {"onnxruntime": lowered["onnxruntime"]}, prompts, steps=v.steps,
                                 max_batch=lim.max_batch,
                                 tolerance=dataclasses.replace(tol, rel=loose, top1=min(tol.top1, 0.9),
                                                               greedy_fraction=min(tol.greedy_fraction, 0.5),
                                                               ties_within_error=inp.onnxruntime.int8_activations))
        report["targets"]["onnxruntime"] = {**fast["targets"]["onnxruntime"], "tolerance": fast["tolerance"]}
        report["passed"] = all(m["passed"] for m in report["targets"].values())
    report["prompts"] = prompts
    (out / "verify.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = ", ".join(f"{t}: rel {max(m['prefill_rel'], m['decode_rel']):.2g}, top-1 {m['top1']:.0%}, greedy "
                        f"{m['greedy_agree']}/{m['steps']}{' (tie)' if m.get('greedy_diverged_at_tie') else ''}"
                        f"{'' if m['passed'] else ' FAIL'}"
                        for t, m in report["targets"].items())
    summary += "".join(f", {t}: {why}" for t, why in report.get("not_run", {}).items())
    report["summary"] = summary
    if not report["passed"]:
        failed = {t: m.get("tolerance", report["tolerance"]) for t, m in report["targets"].items() if not m["passed"]}
        raise VerificationFailed(f"verification failed against torch ({summary}; bounds of the failing targets: "
                                 f"{failed})", report)
    return report


def lowered_targets(cfg: CompileConfig) -> list[str]:
    """The config's targets, plus `reference` when verification needs something ONNX Runtime can run."""
    lowered = [t for t in cfg.targets if t not in ENGINE_TARGETS]
    if cfg.verify.enabled and not any(TARGETS[t].onnxruntime for t in lowered):
        lowered.append("reference")
    return lowered


def plan(cfg: CompileConfig, until: str | None = None) -> list[Stage]:
    """The stages this config needs, in order, each with the slice of the config it reads and its cache key
    (`until`: stop after that stage, e.g. "quantize" for `glmc quantize`)."""
    scheme, lowered = cfg.scheme, lowered_targets(cfg)
    source = ModelInputs(cfg.model, scheme, cfg.limits.max_sequence_length)
    stages = [
        Stage("load", cfg.model, (), lambda ctx, inp, out: {}),
        Stage("quantize", QuantizeInputs(cfg.model, scheme, cfg.calibration if scheme.needs_calibration else None),
              ("load",), run_quantize),
        Stage("export", source, ("quantize",), run_export),
        Stage("simplify", None, ("export",), run_simplify),
    ]
    stages += [Stage(f"lower:{t}", LowerInputs(t, cfg.onnxruntime if t == "onnxruntime" else None), ("simplify",),
                     run_lower) for t in lowered]
    if "tensorrt" in cfg.targets:
        stages.append(Stage("engine:tensorrt", EngineInputs(cfg.limits, cfg.tensorrt), ("lower:tensorrt",),
                            run_engine))
    cuda = None
    if "cuda" in cfg.targets:
        stages.append(Stage("engine:cuda", CudaEngineInputs(source, cfg.limits), ("quantize",), run_cuda_engine))
        from glmc.runtime.backend_cuda import runnable
        cuda = runnable() or "here"
    if cfg.verify.enabled:
        verified = tuple(t for t in lowered if TARGETS[t].onnxruntime)
        stages.append(Stage("verify", VerifyInputs(source, cfg.verify, cfg.limits, cfg.onnxruntime, verified, cuda),
                            ("quantize", *(f"lower:{t}" for t in verified), *(("engine:cuda",) if cuda else ())),
                            run_verify))
    if until is not None:
        stages = stages[:[s.name for s in stages].index(until) + 1]
    by_name = {s.name: s for s in stages}
    code = code_fingerprint()
    for s in stages:
        key: dict[str, Any] = {"stage": s.name, "inputs": dataclasses.asdict(s.inputs) if s.inputs else None,
                               "deps": {d: by_name[d].hash for d in s.deps}, "glmc": code}
        if s.name == "load":
            key["checkpoint"] = checkpoint_fingerprint(Path(cfg.model.checkpoint))
        if s.name == "quantize" and scheme.needs_calibration and cfg.calibration.source != "builtin":
            key["calibration_sha256"] = hashlib.sha256(Path(cfg.calibration.source).read_bytes()).hexdigest()
        s.hash = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return stages


# ---------------------------------------------------------------------------------------------- running

def _run_stage(ctx: Context, stage: Stage, cache: Path, force: bool) -> None:
    final = cache / stage.dir_name
    replace = force
    if final.is_dir() and (final / STAGE_FILE).is_file() and not force:
        try:
            info = json.loads((final / STAGE_FILE).read_text())["info"]
            if not isinstance(info, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):  # damaged (cut short, edited): rebuilt, not trusted
            ctx.console.print(f"  ! {stage.name:18s}  {final / STAGE_FILE} is damaged: running the stage again",
                              markup=False, style="yellow")
            replace = True
        else:
            stage.status = "cached"
            stage.info = info
            ctx.outputs[stage.name] = final
            ctx.console.print(f"  [dim]• {stage.name:18s}  cached[/]")
            return
    tmp = cache / f".{stage.dir_name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        with ctx.console.status(f"{stage.name} ..."):
            stage.info = stage.run(ctx, stage.inputs, tmp) or {}
        stage.seconds = time.perf_counter() - t0
        (tmp / STAGE_FILE).write_text(json.dumps({"stage": stage.name, "hash": stage.hash, "seconds": stage.seconds,
                                                  "info": stage.info}, indent=2) + "\n")
        if replace and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:  # another compile cached the same stage meanwhile: theirs is as good as ours
            if not (final / STAGE_FILE).is_file():
                raise
    except GlmcError as e:
        if str(e).startswith("stage '"):
            raise
        raise StageError(f"stage '{stage.name}' failed: {e}") from e
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # any failure inside a stage is reported with the stage's name
        raise StageError(f"stage '{stage.name}' failed: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stage.status = "ran"
    ctx.outputs[stage.name] = final
    ctx.console.print(f"  [green]✓[/] {stage.name:18s} {stage.seconds:6.2f}s")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "glmc": glmc.__version__}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def onnx_io(path: Path) -> dict[str, list]:
    """Graph inputs and outputs of an ONNX file: name, element type, shape (symbolic dims by name)."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def describe(vi: Any) -> dict:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return {"name": vi.name, "dtype": onnx.TensorProto.DataType.Name(tt.elem_type).lower(), "shape": dims}

    return {"inputs": [describe(v) for v in m.graph.input if v.name not in inits],
            "outputs": [describe(v) for v in m.graph.output]}


def _report(manifest: dict) -> str:
    c = manifest["config"]
    lines = [f"# glmc build: {c['model']['name']} {manifest['precision']['tag']}", "",
             f"- checkpoint: `{c['model']['checkpoint']}` ({manifest['model']['family']}, "
             f"{manifest['model']['num_layers']} layers, hidden {manifest['model']['hidden_size']})",
             f"- precision: {manifest['precision']['tag']} (scheme {manifest['precision']['scheme']})",
             f"- limits: batch <= {c['limits']['max_batch']}, prompt <= {c['limits']['max_input_length']}, "
             f"sequence <= {c['limits']['max_sequence_length']}",
             f"- built {manifest['created']} with glmc {manifest['packages']['glmc']}", "", "## Targets", ""]
    for t, d in manifest["targets"].items():
        lines.append(f"- `{t}`: `{d['onnx']}`")
    for t, e in manifest["engines"].items():
        if t == "cuda":
            lines.append(f"- `cuda` engine: `{e['path']}` ({len(e['files'])} files, {e['bytes']} bytes; needs "
                         f"{e['needs']['compute_capability']}, {', '.join(e['needs']['python'])})")
            continue
        lines.append(f"- `{t}` engine: `{e['path']}` ({e['library']} {e['version']}, {e['engine_bytes']} bytes, "
                     f"{', '.join(e['compute_capabilities']) or 'this GPU'}, {e['engine_layer_count']} layers, "
                     f"built in {e['build_seconds']:.1f}s)")
    lines += ["", "## Verification", "",
              "Torch model vs each lowering in ONNX Runtime (`tensorrt`: the graph the engine was "
              "built from; the engine itself runs only on a GPU it was built for).", ""]
    v = manifest.get("verification")
    if not v:
        lines.append("- not run (verify.enabled: false)")
    else:
        lines.append(f"- {'passed' if v.get('passed') else 'FAILED'}: {v.get('summary', '')}")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "| --- | --- | --- |"]
    for s in manifest["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def _assemble(ctx: Context, cfg: CompileConfig, stages: list[Stage], root: Path) -> dict:
    """Lay the cached stage outputs out in the build directory; return the manifest (files filled in later)."""
    from glmc.modeling_patches.checkpoint import checkpoint_quantization
    from glmc.modeling_patches.config import load_config
    place(ctx.outputs["quantize"] / "model", root / MODEL_DIR)
    targets: dict[str, dict] = {}
    for t in (t for t in cfg.targets if t not in ENGINE_TARGETS):
        src = ctx.outputs[f"lower:{t}"]
        for p in src.iterdir():
            if p.name != STAGE_FILE:
                place(p, root / "onnx" / t / p.name)
        targets[t] = {"onnx": f"onnx/{t}/model.onnx", **onnx_io(src / "model.onnx"),
                      "lowering": ctx.stages[f"lower:{t}"].info}
    engines = {}
    if "engine:tensorrt" in ctx.outputs:
        src = ctx.outputs["engine:tensorrt"]
        for p in src.iterdir():
            if p.name != STAGE_FILE:
                place(p, root / "tensorrt" / p.name)
        info = ctx.stages["engine:tensorrt"].info
        engines["tensorrt"] = {**info, "path": "tensorrt/model.engine", "layers": "tensorrt/layers.json",
                               "build_log": "tensorrt/build.log"}
    if "engine:cuda" in ctx.outputs:
        src = ctx.outputs["engine:cuda"]
        for p in src.iterdir():
            if p.name != STAGE_FILE:
                place(p, root / CUDA_DIR / p.name)
        engines["cuda"] = {**ctx.stages["engine:cuda"].info, "path": f"{CUDA_DIR}/"}
    verification = None
    if "verify" in ctx.outputs:
        place(ctx.outputs["verify"] / "verify.json", root / "verify.json")
        verification = ctx.stages["verify"].info
    arch = load_config(cfg.model.checkpoint, family=cfg.model.family)
    tok = [n for n in TOKENIZER_FILES if (root / MODEL_DIR / n).is_file()]
    scheme = cfg.scheme
    return {
        "format": BUILD_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": cfg.data, "config_files": cfg.files,
        "packages": package_versions(),
        "model": {"checkpoint": cfg.model.checkpoint, **arch.to_dict(),  # + what its weights already are ({}: float)
                  "checkpoint_quantization": checkpoint_quantization(cfg.model.checkpoint, arch)},
        "precision": {"tag": scheme.tag, "scheme": scheme.name, **cfg.data["precision"],
                      "quantization": scheme.to_json(),
                      "weights_location": f"{MODEL_DIR}/" if scheme.to_json() else "the ONNX files"},
        "tokenizer": {"dir": f"{MODEL_DIR}/", "files": tok, "family": arch.family},
        "targets": targets, "engines": engines, "verification": verification,
        "stages": [{"name": s.name, "hash": s.hash, "status": s.status, "seconds": round(s.seconds, 3)}
                   for s in stages],
    }


def run_stages(cfg: CompileConfig, until: str | None = None, force: bool = False,
               console: Console | None = None) -> tuple[Context, list[Stage]]:
    """Run (or find cached) the stages of `cfg` up to `until`, outside any build directory: how `glmc quantize` and
    `glmc eval` get the quantize stage's output, with the compile command's code and defaults."""
    console = console or Console(stderr=True)
    stages = plan(cfg, until)
    ctx = Context(console)
    ctx.stages = {s.name: s for s in stages}
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(cfg.cache_dir)
    ctx.outputs["load"] = cfg.cache_dir
    stages[0].status = "not needed"  # load runs lazily, only inside a stage that needs the float model
    for stage in stages[1:]:
        _run_stage(ctx, stage, cfg.cache_dir, force)
    return ctx, stages


def compile_config(cfg: CompileConfig, force: bool = False, console: Console | None = None) -> Path:
    """Run the pipeline for a validated config; returns the build directory."""
    console = console or Console(stderr=True)
    out = cfg.output
    t0 = time.perf_counter()
    console.print(f"[bold]glmc compile[/] {cfg.name} {cfg.precision_tag} -> {out}")
    with BuildDir(out) as build:
        ctx, stages = run_stages(cfg, force=force, console=console)
        with console.status("package ..."):
            t1 = time.perf_counter()
            manifest = _assemble(ctx, cfg, stages, build.tmp)
            manifest["files"] = file_table(build.tmp, cfg.cache_dir / "sha256-memo.json")
            manifest["stages"].append({"name": "package", "hash": "", "status": "ran",
                                       "seconds": round(time.perf_counter() - t1, 3)})
            build.commit(manifest, _report(manifest))
    console.print(f"  [green]✓[/] {'package':18s} {time.perf_counter() - t1:6.2f}s")
    table = Table(title=f"built {out} in {time.perf_counter() - t0:.1f}s", show_edge=False)
    for col in ("stage", "status", "seconds"):
        table.add_column(col)
    for s in manifest["stages"]:
        table.add_row(s["name"], s["status"], f"{s['seconds']:.2f}")
    console.print(table)
    v = manifest["verification"]
    console.print(f"verified: {v['summary']}" if v else "verification: off (verify.enabled: false)", markup=False)
    console.print(f"next: glmc inspect {out}   |   glmc run {out} \"your prompt\"", markup=False)
    return out
