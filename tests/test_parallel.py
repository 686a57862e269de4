"""Tensor parallelism on the CPU: real rank processes over gloo, against the one-process torch backend.

Every test that starts ranks starts real `python -m glmc.parallel` processes; GLMC_TEST_TAG (a fresh value per test,
inherited by every process the test starts) finds any that outlive their launcher.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from torch import nn

from glmc.artifact import Build, Limits
from glmc.assets import model_dir
from glmc.compiler import schema
from glmc.errors import ConfigError, GlmcError
from glmc.modeling_patches.checkpoint import load_model
from glmc.parallel import TensorParallelBackend, start
from glmc.parallel.backend import manifest_tensor_parallel, start_build
from glmc.parallel.ranks import FAULT_ENV
from glmc.parallel.shard import _columns, _rows, balanced_split, plan
from glmc.quantization.scheme import apply_scheme, parse_precision, save_quantized
from glmc.quantization.weight_only import quantize_linear, quantize_model
from glmc.runtime.backend_torch import TorchBackend
from glmc.runtime.generate import SamplingConfig, generate

SHIPPED = model_dir(None)
PROMPTS = [[5, 300, 301, 302, 17, 2000, 45, 9], [8, 900, 33]]  # two lengths: left padding
STEPS = 6
FP32_BOUND = 1e-4  # the verifier's fp32 bound: max |error| / max |torch logits|


def tagged(tag: str) -> list[int]:
    """Live processes that carry GLMC_TEST_TAG=tag in their environment (ours: readable)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                env = (d / "environ").read_bytes()
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if f"GLMC_TEST_TAG={tag}".encode() in env.split(b"\0") and state != "Z":
                found.append(int(d.name))
    return found


@pytest.fixture
def tag(monkeypatch):
    value = uuid.uuid4().hex
    monkeypatch.setenv("GLMC_TEST_TAG", value)
    yield value
    deadline = time.monotonic() + 10  # a killed process may take a moment to go
    while tagged(value) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tagged(value) == [], "a rank process outlived its launcher"


def trace(backend, prompts=PROMPTS, steps=STEPS) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Greedy decode by hand: the last-position logits of the prefill and of each step, and the tokens."""
    from glmc.modeling_patches.tokenizer import left_pad
    ids, mask, pos = left_pad(prompts, 0)
    cache = backend.new_cache(len(prompts))
    logits, cache = backend.forward(ids, pos, mask, cache)
    out, tokens = [logits], []
    pos = pos[:, -1:]
    for _ in range(steps):
        tok = logits.argmax(-1)
        tokens.append(tok.tolist())
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.int64)], 1)
        pos = pos + 1
        logits, cache = backend.forward(tok[:, None], pos, mask, cache)
        out.append(logits)
    return out, tokens


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The shipped model in fp32, and with int8 weights (per channel, float32 activations) and an int8 KV cache
    (scales per KV head and channel: each rank keeps its groups' rows)."""
    out = {"fp32": SHIPPED}
    calibration = [torch.arange(5, 69)[None], torch.arange(300, 400)[None]]
    for name in ("fp32+int8+kv8",):
        d = tmp_path_factory.mktemp(name.replace("+", "-"))
        scheme = parse_precision(name)
        save_quantized(apply_scheme(load_model(SHIPPED, dtype="fp32"), scheme, calibration), d, scheme)
        out[name] = d
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp32+int8+kv8"])
def test_tp2_same_tokens_and_logits_as_tp1(precision, checkpoints, tag):
    """Two gloo ranks: the same greedy tokens as one process, logits within the fp32 verify bound (1e-3 with an int8
    KV cache, as the verifier: a code at a rounding boundary may flip with the summation order)."""
    ckpt = checkpoints[precision]
    ref_logits, ref_tokens = trace(TorchBackend(load_model(ckpt, dtype="fp32")))
    with start(ckpt, 2) as tp:
        assert tp.vocab_size == 4160 and tp.name == "torch-tp2"
        logits, tokens = trace(tp)
        # and through the generation loop, twice (caches freed and made again on every rank)
        cfg = SamplingConfig(max_new_tokens=10)
        assert generate(tp, PROMPTS, cfg) == generate(tp, PROMPTS, cfg)
        assert generate(tp, PROMPTS[1:], cfg) == generate(TorchBackend(load_model(ckpt, dtype="fp32")),
                                                          PROMPTS[1:], cfg)
        procs = list(tp.procs)
    assert tokens == ref_tokens
    err = rel(logits, ref_logits)
    assert err < (1e-3 if "kv8" in precision else FP32_BOUND), err
    assert [p.returncode for p in procs] == [0]  # STOP: a clean exit


def test_tp4_holds_one_kv_group_per_rank(tag):
    """N = 4 > 2 KV groups: each rank holds the group its two query heads read (a copy on two ranks)."""
    model = load_model(SHIPPED, dtype="fp32")
    plans = [plan(model, 4, r) for r in range(4)]
    assert [p.heads for p in plans] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [p.kv_groups for p in plans] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    ref_logits, ref_tokens = trace(TorchBackend(model), steps=3)
    with start(SHIPPED, 4) as tp:
        logits, tokens = trace(tp, steps=3)
    assert tokens == ref_tokens and rel(logits, ref_logits) < FP32_BOUND


def test_invalid_sizes_are_refused_by_name(tmp_path):
    base = [f"output={tmp_path}/b", "limits.max_sequence_length=1024"]
    with pytest.raises(GlmcError, match=r"tensor_parallel: tensor-parallel size 3 does not divide the model's 8 "
                                        r"attention heads.*1, 2, 4, 8"):
        start(SHIPPED, 3)
    with pytest.raises(ConfigError, match=r"--set parallel.tensor=3: parallel.tensor: 3 does not divide the "
                                          r"model's 8 attention heads"):
        schema.load([], ["parallel.tensor=3", *base])
    with pytest.raises(ConfigError, match=r"parallel.tensor: 0 is below the minimum 1"):
        schema.load([], ["parallel.tensor=0", *base])
    with pytest.raises(ConfigError, match=r"parallel.tensor: 8 gives each rank 64 attention columns, which cut the "
                                          r"groups of precision.group_size 128"):
        schema.load([], ["parallel.tensor=8", "precision.weights=int4", "precision.group_size=128",
                         *base])
    cfg = schema.load([], ["parallel.tensor=2", *base])
    assert cfg.tensor_parallel == 2 and cfg.data["parallel"] == {"tensor": 2}
    assert schema.load([], [*base]).tensor_parallel == 1


@pytest.mark.parametrize(("bits", "group"), [(8, 0), (8, 64), (4, 0), (4, 32)])
def test_quantized_shards_add_up_to_the_whole_layer(bits, group):
    """What each rank computes, in one process: row-parallel partial sums add up to the whole layer (the all-reduce's
    job) with the bias added once; column-parallel rows concatenate to it. Packed int4 bytes and grouped scales
    are sliced, never re-quantized, so the only difference is summation order."""
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(256, 96, bias=True), bits, group)
    x = torch.randn(3, 5, 256)
    whole = layer(x)
    bounds = balanced_split(256, 3, group or (2 if bits == 4 else 1))  # 3 ranks: uneven when the units are
    partial = [_columns(layer, a, b, "test") for a, b in itertools.pairwise(bounds)]
    assert all(bias is not None for _, bias in partial)
    summed = sum(inner(x[..., a:b]) for (inner, _), (a, b) in zip(partial, itertools.pairwise(bounds), strict=True))
    torch.testing.assert_close(summed + partial[0][1], whole, rtol=1e-5, atol=1e-5)
    rows = [_rows(layer, torch.arange(a, b)) for a, b in ((0, 40), (40, 96))]
    torch.testing.assert_close(torch.cat([r(x) for r in rows], -1), whole, rtol=0, atol=0)
    if group or bits == 4:  # a split inside a group (or a packed byte) is refused; int8 per channel splits anywhere
        with pytest.raises(GlmcError, match=r"test: columns \[1, 256\) of 256 cut a"):
            _columns(layer, 1, 256, "test")


def test_quantized_splits_fall_on_group_boundaries():
    """Row-parallel int4/int8 layers split on whole groups: the FFN unevenly when the groups do not share out
    evenly (ChatGLM3's 13696 = 107 groups of 128 -> 54 + 53), the attention refused when a rank's heads cut one."""
    assert balanced_split(13696, 2, 128) == [0, 6912, 13696]
    assert balanced_split(13696, 4, 128) == [0, 3456, 6912, 10368, 13696]  # 27 + 27 + 27 + 26 groups
    assert balanced_split(512, 2, 1) == [0, 256, 512]
    model = tiny_model(ffn_hidden_size=384, head_dim=64)  # 4 heads of 64 (2 per rank: 128 columns), 2 KV groups
    quantize_model(model, 4, 128)
    assert [plan(model, 2, r).ffn for r in range(2)] == [(0, 256), (256, 384)]
    model = tiny_model()  # 4 heads of 32: 2 per rank = 64 columns, half a group of 128
    quantize_model(model, 4, 128)
    with pytest.raises(GlmcError, match=r"parallel.tensor: tensor-parallel size 2 gives each rank 2 heads = 64 input "
                                        r"columns of self_attention.dense, which holds int4 weights in groups of 128"):
        plan(model, 2, 0)
    model = tiny_model()
    quantize_model(model, 4, 32)
    assert [plan(model, 4, r).kv_groups for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]


@pytest.mark.parametrize(("precision", "kind"), [("fp32+sq8", "W8A8Linear"), ("fp32+fp8", "Fp8Linear")])
def test_precisions_that_do_not_split_are_refused_by_name(precision, kind):
    """sq8's per-token activation scale and fp8's per-tensor one belong to a whole row of the input: refused."""
    model = tiny_model(head_dim=64)
    calibration = [torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))]
    apply_scheme(model, parse_precision(precision), calibration)
    with pytest.raises(GlmcError, match=rf"parallel.tensor: tensor parallelism splits float and symmetric weight-only "
                                        rf"int8/int4 linears; transformer.encoder.layers.0.self_attention."
                                        rf"query_key_value is a {kind} layer"):
        plan(model, 2, 0)


def shipped_build(tensor: object, **limits: int) -> Build:
    """The shipped model as a build whose manifest says parallel.tensor = `tensor` (what open_build returns)."""
    lim = Limits(**{"max_batch": 4, "max_input_length": 16, "max_sequence_length": 64, **limits})
    return Build(SHIPPED, {}, None, {}, SHIPPED, SHIPPED, "chatglm3", lim,
                 {"config": {"parallel": {"tensor": tensor}}, "precision": {"dtype": "fp32"}})


def test_the_manifest_decides_unless_told_otherwise():
    assert manifest_tensor_parallel(shipped_build(2)) == 2
    assert manifest_tensor_parallel(dataclasses.replace(shipped_build(1), manifest={})) == 1
    with pytest.raises(GlmcError, match=r"manifest config.parallel.tensor is damaged \('2'\)"):
        manifest_tensor_parallel(shipped_build("2"))
    assert start_build(shipped_build(2), 1) is None  # --tensor-parallel 1 wins
    assert start_build(shipped_build(2), None, backend="onnxruntime") is None  # an engine asked for by name
    with pytest.raises(GlmcError, match=r"--tensor-parallel 2: tensor parallelism runs on the torch backend"):
        start_build(shipped_build(1), 2, backend="onnxruntime")
    with pytest.raises(GlmcError, match=r"max_sequence_length 128 exceeds the build's limit of 64"):
        start_build(shipped_build(2), None, max_length=128)


def test_a_killed_rank_is_reported_and_nothing_is_left(tag):
    tp = start_build(shipped_build(2), None, device="cpu")  # the manifest's parallel.tensor: 2, the build's limits
    assert isinstance(tp, TensorParallelBackend)
    with tp:
        assert (tp.world, tp.max_length, tp.max_input_length, tp.max_batch) == (2, 64, 16, 4)
        with pytest.raises(GlmcError, match="prompt of 20 tokens exceeds the build's max_input_length of 16"):
            trace(tp, prompts=[list(range(5, 25))], steps=1)
        trace(tp, steps=1)
        tp.procs[0].send_signal(signal.SIGKILL)
        tp.procs[0].wait()
        t0 = time.monotonic()
        with pytest.raises(GlmcError, match=r"tensor parallel \(2 ranks\): a step failed \(.*(closed|reset) by "
                                            r"peer.*\): rank 1 \(killed by SIGKILL\)$"):
            trace(tp, steps=1)
        assert time.monotonic() - t0 < 30  # a dead peer fails the collective; nobody waits for the timeout
        with pytest.raises(GlmcError, match="the ranks have stopped"):
            trace(tp, steps=1)


def test_a_rank_that_fails_to_load_is_reported(tag, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1:load")
    with pytest.raises(GlmcError, match=r"rank 1 exited before joining: rank 1 \(exit code 1\): RuntimeError: "
                                        r"injected fault"):
        start(SHIPPED, 2)


def _glmc(*args: str, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from glmc.cli import cli; cli()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_rank_failure_mid_run_exits_with_the_error(tag):
    env = dict(os.environ, **{FAULT_ENV: "1:step:3"})
    p = _glmc("run", "--tensor-parallel", "2", "--raw", "--max-new-tokens", "20", str(SHIPPED), "def main(", env=env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, (out, err)
    assert "glmc run: error: tensor parallel (2 ranks): a step failed (" in err  # gloo: closed / reset by peer
    assert "rank 1 (exit code 1): RuntimeError: injected fault (GLMC_TP_FAULT=1:step:3)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("how", ["ctrl-c", "kill -9 rank 0"])
def test_cli_stopped_from_outside_leaves_no_rank(how, tag):
    """Ctrl-C in a terminal signals the whole foreground process group (rank 0 and the workers): exit 130. A SIGKILL
    of rank 0 alone gives it no chance to clean up: its worker must notice (its stdin closes) and exit."""
    # sampled (seeded): greedy decoding of the shipped model stops at its end token within ~6 s of the start, so a
    # signal 3 s after both ranks are up could land after the run; this one writes ~900 tokens (~19 s on 2 cores)
    p = _glmc("run", "--tensor-parallel", "2", "--raw", "--max-new-tokens", "900", "--max-length", "1000",
              "--temperature", "1.0", "--seed", "1", str(SHIPPED), "def main(", env=dict(os.environ),
              start_new_session=True)
    deadline = time.monotonic() + 240
    while len(tagged(tag)) < 2 and time.monotonic() < deadline:  # rank 0 and its worker are up
        time.sleep(0.2)
    time.sleep(3)  # loading or generating: either way both must stop
    assert p.poll() is None, p.communicate()
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)
    else:
        p.kill()
    _, err = p.communicate(timeout=60)
    if how == "ctrl-c":
        assert p.returncode == 130, err
        assert "interrupted" in err
    else:
        assert p.returncode == -signal.SIGKILL  # and the tag fixture checks that the worker went too
