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

import numpy as np
import onnx
from onnx import numpy_helper


def locations(model: onnx.ModelProto) -> set[str]:
    """The external data files a model's initializers point at (relative to the model's directory)."""
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def read_tensor(tensor: onnx.TensorProto, base_dir: str | Path) -> np.ndarray:
    """An initializer's value, reading external data directly (never mutating `tensor`)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    ref = onnx.TensorProto()
    ref.CopyFrom(tensor)
    del ref.external_data[:]
    ref.data_location = onnx.TensorProto.DEFAULT
    with open(Path(base_dir) / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        ref.raw_data = f.read(int(info["length"])) if "length" in info else f.read()
    return numpy_helper.to_array(ref)


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
