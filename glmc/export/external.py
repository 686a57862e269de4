"""External weight files: read one tensor without loading the model, and share a data file with a graph elsewhere.

A 6B model's weights (12 GB in fp16) are written once, by the export. The simplified and lowered graphs only
point at them. ONNX Runtime refuses a data file outside the model's directory and a symlink to one, but accepts
a hard link, so a graph written to another directory gets a hard link of the file (a copy where the file system
cannot link). onnx's own loader and checker refuse hard-linked files ("potential hardlink attack"), so glmc reads
external tensors itself and checks graphs without their weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

from glmc.modeling_patches.ops.onnx_defs import load_external


def locations(model: onnx.ModelProto) -> set[str]:
    """The external data files a model's initializers point at (relative to the model's directory)."""
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


# A data file a graph uses less than this fraction of is not shared: the used tensors are read in and written to the
# graph's own data file, so that a build directory, copied to where it runs, holds no weights it never reads (an
# int8 ChatGLM3-6B onnxruntime lowering reads the embeddings and output layer, 16% of the export's file: sharing it
# kept 5.7 GB of unused int8 codes in the build). Float lowerings read all of it and keep sharing it.
SHARE_MIN_FRACTION = 0.9


def inline_sparse(model: onnx.ModelProto, base_dir: str | Path) -> set[str]:
    """Read into `model` the external tensors of every data file it uses less than SHARE_MIN_FRACTION of (by bytes);
    return the data files it still points at."""
    by_file: dict[str, list] = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            by_file.setdefault(info["location"], []).append((t, int(info.get("length", 0))))
    kept = set()
    for name, tensors in by_file.items():
        if sum(n for _, n in tensors) >= SHARE_MIN_FRACTION * (Path(base_dir) / name).stat().st_size:
            kept.add(name)
            continue
        for t, _ in tensors:
            load_external(t, base_dir)
    return kept


def share(src_dir: Path, dst_dir: Path, names: set[str]) -> None:
    """Make each data file in `names` visible from `dst_dir` (hard link, else copy); nothing to do in place."""
    for name in names:
        src, dst = src_dir / name, dst_dir / name
        if dst.exists() and os.path.samefile(src, dst):
            continue
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
