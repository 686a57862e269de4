"""The runtime on lowered models: ONNX Runtime backend == torch, batching, streaming, device-resident cache, limits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from glmc.artifact import open_build
from glmc.errors import GlmcError
from glmc.export.lower import lower_file
from glmc.export.onnx_export import export
from glmc.runtime.backend_onnxruntime import OnnxRuntimeBackend
from glmc.runtime.backend_torch import TorchBackend
from glmc.runtime.generate import SamplingConfig, generate, stream
from glmc.runtime.loader import make_backend, pick

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # different lengths: left padding in a batch
GREEDY = SamplingConfig(max_new_tokens=24)


def _lowered(model, root, targets):
    export(model, root / "export" / "model.onnx")
    return {t: lower_file(root / "export" / "model.onnx", t, root / t / "model.onnx") and root / t / "model.onnx"
            for t in targets}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """A tiny fp32 ChatGLM3-shaped model and its reference and onnxruntime lowerings."""
    model = tiny_model("chatglm3-6b").eval()
    return model, _lowered(model, tmp_path_factory.mktemp("fp32"), ("reference", "onnxruntime"))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The same model with int8 weights and an int8 KV cache (fp32 activations), onnxruntime lowering."""
    from glmc.quantization.scheme import apply_scheme, parse_precision
    model = tiny_model("chatglm3-6b").eval()
    calib = [torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    apply_scheme(model, parse_precision("fp32+int8+kv8"), calib)
    return model, _lowered(model, tmp_path_factory.mktemp("q"), ("onnxruntime",))


def test_greedy_tokens_equal_torch_for_every_ort_lowering(fp32):
    model, paths = fp32
    expected = generate(TorchBackend(model, 64), PROMPTS, GREEDY)
    assert all(len(row) == GREEDY.max_new_tokens for row in expected)
    for target, path in paths.items():
        backend = OnnxRuntimeBackend(path, max_length=64, max_batch=4)
        assert generate(backend, PROMPTS, GREEDY) == expected, target


def test_logits_match_torch(fp32):
    model, paths = fp32
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    mask, pos = torch.ones_like(ids), torch.arange(8)[None]
    ref, _ = TorchBackend(model, 64).forward(ids, pos, mask, model.empty_cache(1))
    for target, path in paths.items():
        backend = OnnxRuntimeBackend(path, max_length=64)
        got, _ = backend.forward(ids, pos, mask, backend.new_cache(1))
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), target


def test_batched_equals_one_by_one(fp32, quantized):
    for _, paths in (fp32, quantized):
        backend = OnnxRuntimeBackend(paths["onnxruntime"], max_length=64, max_batch=4)
        batched = generate(backend, PROMPTS, GREEDY)
        assert batched == [generate(backend, [p], GREEDY)[0] for p in PROMPTS]


def test_streaming_equals_generate(fp32):
    backend = OnnxRuntimeBackend(fp32[1]["onnxruntime"], max_length=64, max_batch=4)
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3, stop_token_ids=[7])
    steps = list(stream(backend, PROMPTS, cfg))
    streamed = [[s[i] for s in steps if s[i] is not None and s[i] != 7] for i in range(len(PROMPTS))]
    assert streamed == generate(backend, PROMPTS, cfg)


def test_int8_weights_and_kv_cache(quantized):
    model, paths = quantized
    backend = OnnxRuntimeBackend(paths["onnxruntime"], max_length=64, max_batch=4)
    assert backend.kv_type == np.int8
    expected = generate(TorchBackend(model, 64), PROMPTS, GREEDY)
    got = generate(backend, PROMPTS, GREEDY)
    agree = np.mean([a == b for e, g in zip(expected, got, strict=False) for a, b in zip(e, g, strict=False)])
    assert agree >= 0.95, agree


def test_kv8_folded_into_gqa_shares_its_buffer(quantized, tmp_path):
    """lower_file(fold_kv8=True): ORT's GroupQueryAttention reads and writes the int8 cache itself, so the backend
    binds one int8 buffer as past and present; the tokens equal the two-buffer mode's."""
    src = quantized[1]["onnxruntime"].parent.parent / "export" / "model.onnx"
    path = tmp_path / "folded" / "model.onnx"
    lower_file(src, "onnxruntime", path, fold_kv8=True)
    shared = OnnxRuntimeBackend(path, max_length=64, max_batch=4)
    separate = OnnxRuntimeBackend(path, max_length=64, max_batch=4, share_buffer=False)
    assert shared.shared and shared.kv_type == np.int8 and not separate.shared
    assert generate(shared, PROMPTS, GREEDY) == generate(separate, PROMPTS, GREEDY)


def test_unpadded_lowering_runs_equal_rows_and_refuses_padded_ones(fp32, tmp_path):
    """An onnxruntime graph lowered without padding support: equal-length rows give torch's tokens through the
    shared buffer; a batch that needs padding is refused with a message naming the file and the fix."""
    model, paths = fp32
    path = tmp_path / "unpadded" / "model.onnx"
    lower_file(paths["onnxruntime"].parent.parent / "export" / "model.onnx", "onnxruntime", path, padded_batches=False)
    backend = OnnxRuntimeBackend(path, max_length=64, max_batch=4)
    assert backend.shared and not backend.padded and not backend.cuda_graph  # CUDA graphs: CUDA only
    rows = [[5, 6, 7, 8], [9, 10, 11, 12]]
    assert generate(backend, rows, GREEDY) == generate(TorchBackend(model, 64), rows, GREEDY)
    with pytest.raises(GlmcError, match=r"unpadded.*model.onnx.*same\s+length; got lengths \[7, 2, 4\]"):
        generate(backend, PROMPTS, GREEDY)
    with pytest.raises(GlmcError, match="CUDA graphs need the CUDA device"):
        OnnxRuntimeBackend(path, max_length=64, cuda_graph=True)


def _ort_cuda() -> bool:
    import onnxruntime as ort
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _ort_cuda(), reason="needs a CUDA GPU and onnxruntime-gpu (CUDAExecutionProvider)")
@pytest.mark.parametrize("precision", ["fp16", "kv8"])
def test_cuda_graph_decode_equals_plain_decode(precision, tmp_path):  # pragma: no cover - GPU machine only
    """On CUDA, an unpadded fp16 graph (kv8: folded into GQA) decodes through captured CUDA graphs, one per batch
    size: the same greedy tokens as the same session without graphs, for batch 2 and then batch 1."""
    from glmc.quantization.scheme import apply_scheme, parse_precision
    model = apply_scheme(tiny_model("chatglm3-6b"), parse_precision(precision),
                         [torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)])
    export(model, tmp_path / "export" / "model.onnx")
    path = tmp_path / "unpadded" / "model.onnx"
    lower_file(tmp_path / "export" / "model.onnx", "onnxruntime", path, padded_batches=False,
               fold_kv8=precision == "kv8")
    graphs = OnnxRuntimeBackend(path, max_length=64, max_batch=2, device="cuda")
    plain = OnnxRuntimeBackend(path, max_length=64, max_batch=2, device="cuda", cuda_graph=False)
    assert graphs.cuda_graph and graphs.shared and not plain.cuda_graph
    for rows in ([[5, 6, 7, 8], [9, 10, 11, 12]], [[5, 6, 7]], [[9, 10, 11, 12]]):
        assert generate(graphs, rows, GREEDY) == generate(plain, rows, GREEDY), rows
    assert sorted(graphs._graph_inputs) == [1, 2]


@pytest.mark.parametrize("target", ["reference", "onnxruntime"])
def test_cache_stays_in_the_same_buffers_and_matches_torch(fp32, target, tmp_path):
    """The KV cache is never copied through the host: every step binds the buffers allocated by new_cache (one per
    cache tensor where ORT's GroupQueryAttention updates it in place, else two used in turn), ORT's profile has no
    copy nodes, and after the last step the buffers hold exactly the cache torch computes for the whole sequence
    (so ORT wrote each present straight into them)."""
    model, paths = fp32
    backend = OnnxRuntimeBackend(paths[target], max_length=64, max_batch=4, profile=str(tmp_path / "ort"))
    assert backend.shared == (target == "onnxruntime")  # its past inputs feed com.microsoft.GroupQueryAttention
    steps = 12
    out = generate(backend, PROMPTS[:2], SamplingConfig(max_new_tokens=steps))
    allocated = {v.data_ptr() for bufs in backend._buffers for v in bufs}
    assert len(allocated) == (1 if backend.shared else 2) * 2 * model.config.num_layers
    assert backend.bound_pointers == allocated  # 12 runs, the same buffers
    profile_file = backend.end_profiling()
    assert profile_file is not None  # profiling was on
    profile = json.loads(Path(profile_file).read_text())
    runs = [e for e in profile if e.get("name") == "model_run"]
    nodes = {e["args"]["op_name"] for e in profile if e.get("cat") == "Node"}
    assert len(runs) == steps  # prefill + steps - 1 decode runs
    assert not any("Memcpy" in n for n in nodes), nodes

    # The cache after the loop vs torch's cache of the full rows.
    from glmc.runtime.generate import left_pad
    rows = [p + o[:-1] for p, o in zip(PROMPTS[:2], out, strict=False)]  # the last token was sampled, never fed
    ids, mask, pos = left_pad(rows)
    _, cache = TorchBackend(model, 64).forward(ids, pos, mask, model.empty_cache(2))
    total = ids.shape[1]
    which = 0 if backend.shared else steps % 2  # separate buffers: the first run wrote buffer 1, then alternate
    for (k, v), kb, vb in zip(cache, backend._buffers[0::2], backend._buffers[1::2], strict=False):
        for ref, buf in ((k, kb), (v, vb)):
            flat = buf[which].numpy().reshape(-1)
            if backend.shared:  # bound as [2, Hkv, max_length, D]
                got = flat[:2 * ref.shape[1] * 64 * ref.shape[3]].reshape(2, ref.shape[1], 64, -1)[:, :, :total]
            else:  # bound as [2, Hkv, T, D]
                got = flat[:ref.numel()].reshape(ref.shape)
            real = mask.bool()[:, None, :, None].expand_as(ref).numpy()
            np.testing.assert_allclose(got[real], ref.numpy()[real], rtol=1e-4, atol=1e-5)


def test_limits_are_enforced(fp32):
    backend = OnnxRuntimeBackend(fp32[1]["onnxruntime"], max_length=32, max_batch=2, max_input_length=8)
    with pytest.raises(GlmcError, match="exceeds the model's context of 32"):
        generate(backend, [[1] * 8], SamplingConfig(max_new_tokens=25))
    with pytest.raises(GlmcError, match="max_input_length of 8"):
        generate(backend, [[1] * 9], SamplingConfig(max_new_tokens=1))
    with pytest.raises(GlmcError, match="max_batch of 2"):
        generate(backend, [[1]] * 3, SamplingConfig(max_new_tokens=1))
    old = backend.new_cache(1)
    backend.new_cache(1)
    with pytest.raises(GlmcError, match="earlier generation"):
        backend.forward(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[1]]), old)


def test_loader_on_a_lowered_model_dir(fp32):
    path = fp32[1]["onnxruntime"]
    build = open_build(path.parent)
    assert build.onnx == {"onnxruntime": path}
    assert pick(build, "auto", "cpu", None) == ("onnxruntime", "cpu", "onnxruntime")
    # the path names one lowering: that graph runs, nothing else is substituted for it
    with pytest.raises(GlmcError, match=r"names the 'onnxruntime' lowering.*target 'reference' was asked"):
        pick(build, "onnxruntime", "cpu", "reference")
    with pytest.raises(GlmcError, match=r"names the 'onnxruntime' lowering.*the torch backend was asked"):
        pick(build, "torch", "cpu", None)
    backend = make_backend(build, max_length=48)
    assert backend.max_length == 48 and backend.name == "onnxruntime"


def test_cuda_request_without_cuda_provider_is_a_clear_error(fp32):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(GlmcError, match="no CUDAExecutionProvider"):
        OnnxRuntimeBackend(fp32[1]["onnxruntime"], max_length=16, device="cuda")


def _tensorrt_gpu() -> str | None:
    if not torch.cuda.is_available():
        return None
    major, _ = torch.cuda.get_device_capability()
    return None if major == 9 else torch.cuda.get_device_name()  # TensorRT for RTX engines do not run on SM90


@pytest.mark.skipif(_tensorrt_gpu() is None, reason="no GPU that can run TensorRT engines")
def test_tensorrt_backend_matches_onnxruntime(tmp_path):  # pragma: no cover - runs only where an engine can run
    from glmc.compiler.tensorrt import build_engine
    from glmc.runtime.backend_tensorrt import TensorRTBackend
    model = tiny_model("chatglm3-6b").eval()
    paths = _lowered(model, tmp_path, ("tensorrt",))
    limits = {"max_batch": 4, "max_input_length": 16, "max_sequence_length": 64}
    major, minor = torch.cuda.get_device_capability()
    info = build_engine(paths["tensorrt"], tmp_path / "model.engine", limits,
                        compute_capabilities=[f"sm{major}{minor}"])
    backend = TensorRTBackend(tmp_path / "model.engine", info, max_length=64, max_batch=4, max_input_length=16)
    assert generate(backend, PROMPTS, GREEDY) == generate(TorchBackend(model, 64), PROMPTS, GREEDY)


# ---------------------------------------------------------------------------------------------- shipped model, builds

@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """The shipped model compiled at fp32 for the two ONNX Runtime lowerings (limits: batch 2, prompt 64, 256)."""
    from glmc.assets import SHIPPED_MODEL
    from glmc.cli import main
    if not (SHIPPED_MODEL / "config.json").is_file():
        pytest.fail(f"the shipped model is missing: {SHIPPED_MODEL}")
    tmp = tmp_path_factory.mktemp("build")
    rc = main(["compile", "compile_configs/glmc-tiny-fp32.yaml", "--set", f"output={tmp / 'fp32'}",
               "--set", f"cache_dir={tmp / 'cache'}", "--set", "targets=[reference, onnxruntime]"])
    assert rc == 0
    return tmp / "fp32"


def test_shipped_model_same_text_on_every_backend(tiny_build):
    import glmc
    from glmc.api import load
    prompts = ["The", "def main():"]
    runs = {"checkpoint (glmc.load)": glmc.load()}
    runs["torch"] = load(tiny_build, backend="torch")
    for target in ("reference", "onnxruntime"):
        runs[target] = load(tiny_build, backend="onnxruntime", target=target)
    assert runs["onnxruntime"].backend.name == "onnxruntime" and runs["torch"].backend.name == "torch"
    texts = {name: [m.generate(p, max_new_tokens=24) for p in prompts] for name, m in runs.items()}
    assert all(len(t) > 0 for t in texts["torch"])
    for name, t in texts.items():
        assert t == texts["checkpoint (glmc.load)"], name
    # a left-padded batch gives each row the text it gets alone
    assert runs["onnxruntime"].generate_batch(prompts, max_new_tokens=24) == texts["onnxruntime"]
    # streaming == the whole answer
    assert "".join(runs["onnxruntime"].stream(prompts[1], max_new_tokens=24)) == texts["onnxruntime"][1]


def test_auto_backend_and_limits_of_a_build(tiny_build):
    from glmc.api import load
    model = load(tiny_build)  # auto: no engine here, so ONNX Runtime on the fast lowering
    backend = model.backend
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.name == "onnxruntime" and backend.path.parent.name == "onnxruntime"
    assert (backend.max_length, backend.max_batch, backend.max_input_length) == (256, 2, 64)
    with pytest.raises(GlmcError, match=f"max_input_length of 64 .*{tiny_build.name}"):
        model.generate(" ".join(["word"] * 200), max_new_tokens=4)
    with pytest.raises(GlmcError, match="max_sequence_length 512 exceeds the build's limit of 256"):
        load(tiny_build, max_length=512)
    with pytest.raises(GlmcError, match="max_batch of 2"):
        model.generate_batch(["a", "b", "c"], max_new_tokens=2)


def test_glmc_run_chat_and_bench_commands(tiny_build, capsys, monkeypatch, tmp_path):
    import io

    from glmc.api import load
    from glmc.cli import main
    model = load(tiny_build)
    assert main(["run", str(tiny_build), "Hello", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == model.generate("Hello", chat=True, max_new_tokens=16) + "\n"
    assert main(["run", str(tiny_build), "Hello", "def f(", "--raw", "--max-new-tokens", "8"]) == 0
    expected = model.generate_batch(["Hello", "def f("], max_new_tokens=8)
    assert capsys.readouterr().out == "".join(f"[{i}] {t}\n" for i, t in enumerate(expected))

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd then?\n/exit\n"))
    assert main(["chat", str(tiny_build), "--max-new-tokens", "16"]) == 0
    history = [{"role": "user", "content": "Hello"}]
    first = model.chat(history, max_new_tokens=16)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = model.chat(history, max_new_tokens=16)  # the second answer sees the first exchange
    assert capsys.readouterr().out == f"{first}\n{second}\n"

    assert main(["run", str(tiny_build), "x " * 100]) == 2
    assert "max_input_length of 64" in capsys.readouterr().err

    out = tmp_path / "bench.json"
    assert main(["bench", str(tiny_build), "--prompt-length", "16", "--new-tokens", "8", "--repeats", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "onnxruntime" and [r["batch"] for r in result["results"]] == [1, 2]
    for r in result["results"]:
        assert r["prompt_tokens"] == 16 and r["new_tokens"] == 8
        assert r["ttft_s"] > 0 and r["prefill_tps"] > 0 and r["decode_tps"] > 0
    assert result["memory"]["host_peak_rss_mib"] > 0 and result["memory"]["kv_buffers_mib"] > 0


def test_tensorrt_engine_is_not_picked_where_it_cannot_run(fp32, tmp_path):
    """A build with an engine on a machine that cannot run it: auto falls back to ONNX Runtime, and asking for
    tensorrt says why (here: no GPU)."""
    import dataclasses
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not run here")
    build = dataclasses.replace(open_build(fp32[1]["onnxruntime"].parent), engine=engine,
                                engine_info={"library": "tensorrt_rtx_bindings", "compute_capabilities": ["sm86"]},
                                    named=None)
    assert pick(build, "auto", "cpu", None)[0] == "onnxruntime"
    if not torch.cuda.is_available():
        with pytest.raises(GlmcError, match="cannot run the TensorRT engine: no CUDA GPU here"):
            pick(build, "tensorrt", "cuda", None)
