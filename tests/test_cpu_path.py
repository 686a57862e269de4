"""The CPU path by default (issue 16): int8 activations for int8/int4 builds' onnxruntime lowering, held to their own
bound with the error-explained tie rule; lowered weights in a data file ONNX Runtime maps instead of copying."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import tiny_model

from glmc.cli import main as glmc_main
from glmc.compiler import pipeline, schema
from glmc.export.lower import lower_file
from glmc.export.onnx_export import export
from glmc.quantization.scheme import apply_scheme, parse_precision
from glmc.runtime.verify import Tolerance, Trace, compare, verify

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "compile_configs"
SHIPPED = schema.shipped_model()
PROMPTS = [[5, 17, 42, 8], [99, 3]]


def test_int8_activations_default_follows_the_weights():
    """On for int8/int4 weights, off for float ones; an explicit value wins (the exact path is one key away)."""
    def resolved(*sets: str) -> bool:
        return schema.load([], list(sets), check_files=False).onnxruntime.int8_activations

    assert resolved("precision.weights=int8") is True
    assert resolved("precision.weights=int4", "precision.group_size=32") is True
    assert resolved("precision.weights=float") is False
    assert resolved("precision.weights=int8", "precision.int8_activations=false") is False
    assert resolved("precision.weights=float", "precision.int8_activations=true") is True
    cfg = schema.load([CONFIGS / "glmc-tiny-int8.yaml"], [], check_files=False)
    assert cfg.onnxruntime.int8_activations is True and cfg.data["precision"]["int8_activations"] is True


def _lowered(tmp_path: Path, precision: str) -> tuple[torch.nn.Module, Path]:
    model = apply_scheme(tiny_model(), parse_precision(precision))
    export(model, tmp_path / "e" / "exported.onnx")
    out = tmp_path / "ort" / "model.onnx"
    lower_file(tmp_path / "e" / "exported.onnx", "onnxruntime", out, accuracy_level=4)
    return model, out


def test_onnxruntime_lowering_keeps_weights_in_a_data_file(tmp_path):
    """Even a small model's onnxruntime lowering writes its weights to model.onnx.data (ORT maps the file instead
    of parsing and copying embedded tensors); the graph file itself is a few KB and the build still matches torch
    within int8 activations' bound."""
    model, path = _lowered(tmp_path, "fp32+int8")
    data = path.parent / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > 10 * path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    external = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert sum(int(dict((e.key, e.value) for e in t.external_data)["length"]) for t in external) > 0.9 * \
        data.stat().st_size
    report = verify(model, {"onnxruntime": path}, PROMPTS, steps=4,
                    tolerance=Tolerance(pipeline.OPTION_BOUNDS["int8_activations"], 0.9, 0.5, True))
    assert report["passed"], report
    assert 1e-5 < report["targets"]["onnxruntime"]["prefill_rel"] < pipeline.OPTION_BOUNDS["int8_activations"]


def test_opening_an_external_build_holds_about_its_weights(tmp_path):
    """Peak RSS of opening the lowering and generating, above the interpreter with torch and onnxruntime imported,
    stays under 1.3x (lowered weights + KV buffers) plus a fixed 60 MiB of ORT session state (a tiny model's
    weights are a few MB, so the fixed part dominates; docs/runtime.md measures the 291M-parameter model)."""
    model = apply_scheme(tiny_model(hidden_size=512, ffn_hidden_size=1536, vocab_size=4096),
                         parse_precision("fp32+int8"))
    export(model, tmp_path / "e" / "exported.onnx")
    path = tmp_path / "ort" / "model.onnx"
    lower_file(tmp_path / "e" / "exported.onnx", "onnxruntime", path, accuracy_level=4)
    weights = (path.parent / "model.onnx.data").stat().st_size
    code = f"""
import resource, torch, onnxruntime, numpy
from glmc.runtime.backend_onnxruntime import OnnxRuntimeBackend
from glmc.runtime.generate import SamplingConfig, stream
import os
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
base = rss()
open(f"/proc/{{os.getpid()}}/clear_refs", "w").write("5")
b = OnnxRuntimeBackend({str(path)!r}, max_length=128, threads=1)
list(stream(b, [[5] * 64], SamplingConfig(max_new_tokens=16)))
print(hwm() - base, b.cache_bytes)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    peak, kv = int(out[0]), int(out[1])
    assert peak <= 1.3 * (weights + kv) + (60 << 20), (peak / 2**20, weights / 2**20, kv / 2**20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0  # (the parent's own peak is not the measure)


def _trace(rows: list[list[float]]) -> Trace:
    logits = torch.tensor(rows)[:, None]
    return Trace(logits, torch.ones(len(rows), 1, dtype=torch.int64), [], logits.argmax(-1))


def test_ties_within_the_measured_error_are_excused_and_no_others():
    """compare(tie_abs=g) counts a disagreement as a tie only where torch's top two logits are within g: a flip
    between logits 0.1 apart is explained by an error of 0.06 (g = 2 x 0.06 >= 0.1), one 0.5 apart is not."""
    ref = _trace([[1.0, 0.9, 0.0], [2.0, 1.5, 0.0]])
    near = _trace([[0.94, 0.96, 0.0], [2.0, 1.5, 0.0]])  # row 0 flips, error 0.06
    m = compare(ref, near, near)
    assert m["top1"] == 0.5 and m["top1_or_tie"] == 0.5 and m["prefill_max_abs"] == pytest.approx(0.06)
    m = compare(ref, near, near, tie_abs=2 * m["prefill_max_abs"])
    assert m["top1_or_tie"] == 1.0
    far = _trace([[1.0, 0.9, 0.0], [1.7, 1.8, 0.0]])  # row 1 flips a gap of 0.5: an error of 0.06 cannot
    assert compare(ref, far, far, tie_abs=0.12)["top1_or_tie"] == 0.5


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped model is not in the package")
def test_a_failing_option_bound_is_the_one_reported(tmp_path, monkeypatch):
    """When the int8-activation lowering misses its own bound, the error names that bound (here lowered to 2e-4
    so that the shipped model's ~8e-3 misses it), not the precision's base tolerance (1e-4)."""
    monkeypatch.setitem(pipeline.OPTION_BOUNDS, "int8_activations", 2e-4)
    with pytest.raises(pipeline.StageError) as e:
        schema_cfg = schema.load([CONFIGS / "glmc-tiny-int8.yaml"],
                                 [f"output={tmp_path}/b", f"cache_dir={tmp_path}/c", "targets=[onnxruntime]"])
        pipeline.compile_config(schema_cfg)
    assert "'onnxruntime': {'rel': 0.0002," in str(e.value) and "FAIL" in str(e.value)
    cause = e.value.__cause__
    assert isinstance(cause, pipeline.VerificationFailed) and cause.report["targets"]["onnxruntime"]["tolerance"][
        "rel"] == 2e-4


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped model is not in the package")
def test_readme_main_command_verifies_with_the_default_cpu_path(tmp_path):
    """The README's int8 config (onnxruntime target only, to keep it short) builds with accuracy_level 4 by
    default, verifies, and `precision.int8_activations=false` gives back the exact lowering (rel < 1e-4)."""
    import json
    for sets, level, bound in (([], 4, 3e-2), (["precision.int8_activations=false"], 0, 1e-4)):
        out = tmp_path / f"b{level}"
        args = ["compile", str(CONFIGS / "glmc-tiny-int8.yaml"), "--set", f"output={out}", "--set",
                f"cache_dir={tmp_path}/c", "--set", "targets=[onnxruntime]"]
        for s in sets:
            args += ["--set", s]
        assert glmc_main(args) == 0
        m = json.loads((out / "manifest.json").read_text())
        graph = onnx.load(str(out / "onnx" / "onnxruntime" / "model.onnx"), load_external_data=False).graph
        assert {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "accuracy_level"} == {level}
        v = m["verification"]["targets"]["onnxruntime"]
        # The int8-activation path may diverge from torch at a near-tie (the shipped model's greedy continuation
        # of the verify prompts meets one at step 5); the exact path agrees all the way.
        greedy_ok = v["greedy_agree"] == v["steps"] or (level == 4 and v["greedy_diverged_at_tie"])
        assert m["verification"]["passed"] and v["prefill_rel"] < bound and greedy_ok
        assert (out / "onnx" / "onnxruntime" / "model.onnx.data").is_file()
