"""The artifact contract between the compiler (writer) and the runtime (reader): build layout, manifest, runtime config.

A build directory (written by glmc.compiler.builddir, read by glmc.runtime.loader and `glmc inspect`):

    manifest.json                what was built, from what, with which limits; every file's size and sha256
    REPORT.md                    the same for people
    model/                       tokenizer files, config.json, and the quantized weights when any
    onnx/<target>/model.onnx     one lowering per target, with its runtime config beside it:
    onnx/<target>/model.json     (RUNTIME CONFIG) I/O names, KV-cache convention, limits, and the ONNX Runtime
                                 session it must run in (TARGETS below: whether ORT runs it, optimizers to disable)
    tensorrt/model.engine        the TensorRT engine, when the tensorrt target was built
    cuda/                        the cuda engine, when the cuda target was built (CUDA_DIR; written by
                                 glmc.runtime.backend_cuda.save_cuda_build, read by load_cuda_build): cuda.json
                                 (format, dtype, limits), config.json, quantization.json, model.safetensors (the
                                 weights as glmc's kernels read them); manifest["engines"]["cuda"] says what it needs
    verify.json                  the verification report
    .glmc-verified.json          (VERIFIED) not in the manifest: the sha256 of each file with the size, mtime,
                                 ctime and inode it was computed at, so that opening a build rehashes only the
                                 files that changed since (`check_files`); rewritten when stale (kept in the
                                 user's cache instead when the build directory is read-only)

One writer and one reader per file: glmc.export.lower writes the runtime config (`write_runtime_config`), the ONNX
Runtime backend and the verifier read it (`read_runtime_config`, `session_of`); the pipeline writes the manifest,
`open_build` reads it. This module imports nothing of glmc's but errors, so both sides can import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from glmc.errors import GlmcError

MANIFEST = "manifest.json"
REPORT = "REPORT.md"
BUILD_FORMAT = "glmc-build/1"
MODEL_DIR = "model"
VERIFIED = ".glmc-verified.json"  # the per-file digest memo beside the manifest (not itself in the manifest)
# Set to 1 to open builds without checking their files against the manifest (experts: a build on a read-only,
# trusted medium, opened often; a tampered or damaged file then runs and answers garbage).
TRUST_ENV = "GLMC_TRUST_BUILD_FILES"
CUDA_DIR = "cuda"  # the cuda target's engine folder in a build
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


# ---------------------------------------------------------------------------------------------- targets

@dataclasses.dataclass(frozen=True)
class Target:
    """What a runtime must know about one lowering target's graphs."""

    name: str
    onnxruntime: bool  # ONNX Runtime runs the graph (and verification checks it there)
    disabled_optimizers: tuple[str, ...] = ()  # ORT graph transformers the session must run without
    note: str = ""  # why ORT cannot run it, when it cannot


# ONNX Runtime 1.31 fuses DequantizeLinear + MatMul into MatMulNBits and gets signed int8/int4 weights wrong
# (measured: docs/onnx.md): graphs that carry DequantizeLinear weights run without that fusion, in the compiler's
# verification and in every user's session alike (the runtime config says so).
_NO_QDQ_FUSION = ("QDQSelectorActionTransformer",)
TARGETS: dict[str, Target] = {
    "onnx": Target("onnx", False, note="it keeps the glmc:: custom ops for vendor toolchains and ONNX Runtime has "
                                       "no kernels for them; run the onnxruntime or reference lowering instead"),
    "reference": Target("reference", True, _NO_QDQ_FUSION),
    "onnxruntime": Target("onnxruntime", True),
    "tensorrt": Target("tensorrt", True, _NO_QDQ_FUSION),
}
ORT_PREFERENCE = ("onnxruntime", "reference", "tensorrt")  # what `auto` runs on ONNX Runtime, fastest first
# Build targets that are engines only (no ONNX lowering of their own): the compile YAML's `targets` accepts them
# beside TARGETS; the pipeline builds them from the quantized weights.
ENGINE_TARGETS = ("cuda",)


def target(name: str, where: object = "target") -> Target:
    if name not in TARGETS:
        raise GlmcError(f"{where}: unknown lowering target '{name}' (known: {', '.join(TARGETS)})")
    return TARGETS[name]


# ---------------------------------------------------------------------------------------------- runtime config

def config_path(model_path: str | Path) -> Path:
    """Where the runtime config of a lowered model lives: `<dir>/<stem>.json` (model.onnx -> model.json)."""
    return Path(model_path).with_suffix(".json")


def write_runtime_config(model_path: str | Path, config: dict) -> Path:
    """Write the runtime config beside a lowered model, with the session its target needs."""
    t = target(config["model"]["target"], model_path)
    config = dict(config, session={"onnxruntime": t.onnxruntime, "disabled_optimizers": list(t.disabled_optimizers)})
    path = config_path(model_path)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_runtime_config(model_path: str | Path) -> dict:
    """The runtime config written beside a lowered model, or {} when absent."""
    path = config_path(model_path)
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GlmcError(f"{path}: runtime config is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise GlmcError(f"{path}: runtime config is not a JSON object")
    return config


def session_of(model_path: str | Path, config: dict | None = None) -> Target:
    """How ONNX Runtime must open this model: its runtime config's `session` (the target's defaults for configs
    written before it had one; a model without a runtime config runs with ORT's defaults)."""
    config = read_runtime_config(model_path) if config is None else config
    name = config.get("model", {}).get("target")
    if name is None:
        return Target("unknown", True)
    base = target(name, config_path(model_path))
    s = config.get("session")
    if not isinstance(s, dict):
        return base
    return dataclasses.replace(base, onnxruntime=bool(s.get("onnxruntime", base.onnxruntime)),
                               disabled_optimizers=tuple(s.get("disabled_optimizers", ())))


# ---------------------------------------------------------------------------------------------- builds

def read_manifest(build: str | Path) -> dict:
    path = Path(build) / MANIFEST
    if not path.is_file():
        raise GlmcError(f"{build}: not a glmc build directory (no {MANIFEST})")
    try:
        text = path.read_bytes().decode()
    except OSError as e:
        raise GlmcError(f"{path}: cannot read the build manifest ({e.strerror})") from None
    except UnicodeDecodeError:
        raise GlmcError(f"{path}: the build manifest is not UTF-8 text (damaged); recompile the build") from None
    if not text.strip():
        raise GlmcError(f"{path}: the build manifest is empty (damaged); recompile the build")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise GlmcError(f"{path}: not valid JSON ({e}); recompile the build") from None
    if not isinstance(manifest, dict):
        raise GlmcError(f"{path}: not a glmc build manifest (not a JSON object); recompile the build")
    return manifest


# ---------------------------------------------------------------------------------------------- file checks

def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    """What must be unchanged for a digest to still hold: size, mtime, ctime (which no user call can set back),
    inode and device (a copied or replaced file is a new inode)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_table_of(manifest: dict, where: object = MANIFEST) -> dict[str, dict]:
    """The manifest's `files` (relative path -> bytes, sha256), checked for shape; a GlmcError naming the manifest
    when it is missing or damaged."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise GlmcError(f"{where}: no file table ('files' is missing or empty): the manifest is damaged or was "
                        "not written by glmc compile; recompile the build")
    for name, f in files.items():
        if not (isinstance(f, dict) and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str)
                and len(f["sha256"]) == 64) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise GlmcError(f"{where}: file table entry '{name}' is damaged ({f!r}); recompile the build")
    return files


def _memo_paths(root: Path) -> list[Path]:
    """Where a build's digest memo may be: beside its manifest, else (a read-only build) in the user's cache,
    named by the build's real path (the stamps' inode and device make a stale entry harmless)."""
    paths = [root / VERIFIED]
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory
        return paths
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return paths + [base / "glmc" / "verified" / f"{key}.json"]


def write_verified(root: Path, digests: dict[str, str]) -> None:
    """Record `digests` (relative path -> sha256) with each file's current stamp in VERIFIED (atomically), or where
    the build is read-only in the user's cache (`_memo_paths`); quietly nothing where neither can be written."""
    table = {}
    for name, digest in digests.items():
        try:
            table[name] = {"sha256": digest, "stamp": _stamp((root / name).stat())}
        except OSError:
            continue
    for path in _memo_paths(root):
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"files": table}))
            os.replace(tmp, path)
            return
        except OSError:
            with contextlib.suppress(OSError):  # (a read-only filesystem refuses even this)
                tmp.unlink(missing_ok=True)


def _read_memos(root: Path) -> list[dict]:
    memos = []
    for path in _memo_paths(root):
        try:
            memo = json.loads(path.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(memo, dict):
            memos.append(memo)
    return memos


def check_files(root: str | Path, manifest: dict, rehash: bool = False) -> tuple[list[str], dict]:
    """(the files that differ from the manifest, what was done): a file whose stamp matches the digest memo
    (VERIFIED) is taken as verified, any other is rehashed (all of them with `rehash`). Each bad entry reads
    `path: why`."""
    root = Path(root)
    files = file_table_of(manifest, root / MANIFEST)
    memos = [] if rehash else _read_memos(root)
    bad, fresh, hashed, hashed_bytes = [], {}, 0, 0
    for name, f in files.items():
        p = root / name
        try:
            st = p.stat()
        except OSError:
            bad.append(f"{name}: missing")
            continue
        if st.st_size != f["bytes"]:
            bad.append(f"{name}: {st.st_size:,} bytes, the manifest says {f['bytes']:,}")
            continue
        if any(isinstance(m := memo.get(name), dict) and m.get("sha256") == f["sha256"]
               and m.get("stamp") == _stamp(st) for memo in memos):
            fresh[name] = f["sha256"]
            continue
        try:
            digest = file_sha256(p)
        except OSError as e:
            bad.append(f"{name}: unreadable ({e.strerror})")
            continue
        hashed, hashed_bytes = hashed + 1, hashed_bytes + st.st_size
        if digest != f["sha256"]:
            bad.append(f"{name}: its sha256 differs from the manifest's (changed since the build was written)")
            continue
        fresh[name] = digest
    if hashed and not bad:
        write_verified(root, fresh)
    return bad, {"files": len(files), "hashed": hashed, "hashed_bytes": hashed_bytes}


def verify_files(root: str | Path, manifest: dict) -> None:
    """Refuse a build whose files differ from its manifest (unless TRUST_ENV is set): a GlmcError naming them."""
    if os.environ.get(TRUST_ENV, "") not in ("", "0"):
        return
    bad, _ = check_files(root, manifest)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise GlmcError(f"{Path(root) / bad[0]}{more}; the build was changed or damaged after it was written: "
                        f"recompile it (or, knowing the risk, set {TRUST_ENV}=1)")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What every backend of a build enforces."""

    max_batch: int
    max_input_length: int
    max_sequence_length: int


@dataclasses.dataclass
class Build:
    """What a path offers: ONNX models per target, a TensorRT engine, weights for torch, tokenizer, limits."""

    root: Path
    onnx: dict[str, Path]  # target -> model.onnx
    engine: Path | None
    engine_info: dict
    checkpoint: Path | None  # a directory load_model reads (the build's model/ or the original checkpoint)
    tokenizer_dir: Path
    family: str | None
    limits: Limits | None  # None outside a build (an ONNX model or a checkpoint on its own)
    manifest: dict
    named: str | None = None  # the target the path named (…/onnx/<target>/model.onnx): run that one or refuse
    cuda: Path | None = None  # the cuda engine's folder (CUDA_DIR), when the build has one
    cuda_info: dict = dataclasses.field(default_factory=dict)  # manifest["engines"]["cuda"]

    @property
    def dtype(self) -> str:
        """The build's float type name (fp32 | fp16 | bf16)."""
        return str(self.manifest.get("precision", {}).get("dtype", "fp32"))


def _limits(manifest: dict, where: object = MANIFEST) -> Limits:
    config = manifest.get("config")
    lim = config.get("limits", {}) if isinstance(config, dict) else None
    try:
        if not isinstance(lim, dict):
            raise TypeError
        return Limits(int(lim["max_batch"]), int(lim["max_input_length"]), int(lim["max_sequence_length"]))
    except (KeyError, TypeError, ValueError):
        raise GlmcError(f"{where}: config.limits is missing or damaged ({lim!r}); recompile the build") from None


def _has_weights(d: Path) -> bool:
    return (d / "config.json").is_file() and any(p.suffix in (".safetensors", ".bin") for p in d.iterdir())


def open_build(path: str | Path) -> Build:
    """Describe a build directory, a lowered ONNX model (file or directory) or a checkpoint directory. A build's
    files are checked against its manifest first (`verify_files`: only those changed since the last check are
    rehashed); a changed file is refused, named."""
    p = Path(path)
    if not p.exists():
        raise GlmcError(f"{p}: does not exist (expected a glmc build directory, an ONNX model or a checkpoint)")
    if p.is_file() and p.suffix == ".onnx":
        if p.name != "model.onnx":
            raise GlmcError(f"{p}: glmc runs lowered models named model.onnx with their runtime config model.json "
                            "beside them (a build's onnx/<target>/ folder)")
        p = p.parent
    if (p / MANIFEST).is_file():
        m = read_manifest(p)
        verify_files(p, m)
        onnx = {t: p / d["onnx"] for t, d in m.get("targets", {}).items() if (p / d["onnx"]).is_file()}
        eng = m.get("engines", {}).get("tensorrt")
        engine = p / eng["path"] if eng and (p / eng["path"]).is_file() else None
        tok = p / m.get("tokenizer", {}).get("dir", MODEL_DIR + "/")
        ckpt = tok if _has_weights(tok) else None
        original = m.get("model", {}).get("checkpoint")
        if ckpt is None and original and Path(original).is_dir() and _has_weights(Path(original)):
            ckpt = Path(original)
        cu = m.get("engines", {}).get("cuda")
        cuda = p / cu["path"] if cu and (p / cu["path"]).is_dir() else None
        return Build(p, onnx, engine, eng or {}, ckpt, tok, m.get("model", {}).get("family"),
                     _limits(m, p / MANIFEST), m,
                     cuda=cuda, cuda_info=cu or {})
    if (p / "model.onnx").is_file():  # one lowered model; inside a build when ../../manifest.json exists
        config = read_runtime_config(p / "model.onnx")
        name = config.get("model", {}).get("target") or p.name
        up = p.parent.parent
        if (up / MANIFEST).is_file():
            b = open_build(up)
            return dataclasses.replace(b, onnx={name: p / "model.onnx"}, engine=None, named=name, cuda=None)
        tok = p if (p / "tokenizer.model").is_file() else p.parent
        return Build(p, {name: p / "model.onnx"}, None, {}, None, tok, None, None, {}, named=name)
    if (p / "config.json").is_file():
        return Build(p, {}, None, {}, p, p, None, None, {})
    raise GlmcError(f"{p}: not a glmc build directory ({MANIFEST}), an ONNX model directory (model.onnx) or a "
                    "checkpoint directory (config.json)")


def describe_target(build: Build, name: str) -> tuple[Path, Target]:
    """(path, Target) of one lowering in a build, or a GlmcError that says why it cannot run on ONNX Runtime."""
    if name not in build.onnx:
        have = ", ".join(build.onnx) or "none"
        raise GlmcError(f"{build.root}: no '{name}' lowering (lowerings here: {have})")
    path = build.onnx[name]
    spec = session_of(path)
    if not spec.onnxruntime:
        why = spec.note or "its runtime config says so"
        raise GlmcError(f"{path}: ONNX Runtime cannot run the '{name}' lowering: {why}")
    return path, spec


def cuda_unsupported(config: Any, dtype: str, kv_cache: str = "float") -> tuple[str, str] | None:
    """What the cuda engine cannot hold, as (the compile-config key at fault, why), else None: the one list of
    refusals that the cuda backend, `save_cuda_build` and the compile config's cross-checks share. `config` (the
    model's architecture) may be None when only the precision is known; `kv_cache` is precision.kv_cache (float,
    int8 or another quantized cache's name)."""
    if dtype.replace("torch.", "") not in ("float16", "bfloat16", "fp16", "bf16"):
        return "precision.dtype", (f"it runs float16 or bfloat16 models, not {dtype.replace('torch.', '')} (use "
                                   "fp16 or bf16)")
    if kv_cache not in ("float", "int8"):
        return "precision.kv_cache", f"it holds a float or int8 KV cache, not {kv_cache} (use float or int8)"
    if config is None:
        return None
    if config.residual_post_layernorm:
        return "model.checkpoint", "apply_residual_connection_post_layernorm=true models are not supported"
    if config.num_heads % config.num_kv_heads:
        return "model.checkpoint", f"{config.num_heads} query heads do not split into {config.num_kv_heads} KV groups"
    if config.head_dim & (config.head_dim - 1) or config.head_dim < 16:
        return "model.checkpoint", f"head dim {config.head_dim} must be a power of two >= 16"
    return None
