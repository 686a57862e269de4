"""The generation loop: batching with left padding, sampling, stop ids, streaming, limits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from glmc.errors import GlmcError
from glmc.runtime.backend_torch import TorchBackend
from glmc.runtime.generate import SamplingConfig, generate, sample, stream

PROMPTS = [[5, 17, 42, 9, 100, 7, 3, 250, 11], [8, 9, 10], [77, 1, 2, 3, 4, 5]]


@pytest.fixture(scope="module")
def backend():
    return TorchBackend(tiny_model("chatglm3-6b"))


def test_batched_equals_one_by_one(backend):
    cfg = SamplingConfig(max_new_tokens=16)
    batched = generate(backend, PROMPTS, cfg)
    assert batched == [generate(backend, [p], cfg)[0] for p in PROMPTS]


def test_stream_equals_generate(backend):
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    steps = list(stream(backend, PROMPTS, cfg))
    streamed = [[s[i] for s in steps if s[i] is not None] for i in range(len(PROMPTS))]
    assert streamed == generate(backend, PROMPTS, cfg)


def test_seeded_sampling_is_reproducible_and_varies(backend):
    cfg = lambda seed: SamplingConfig(max_new_tokens=16, temperature=1.0, seed=seed)  # noqa: E731
    assert generate(backend, PROMPTS, cfg(1)) == generate(backend, PROMPTS, cfg(1))
    assert generate(backend, PROMPTS, cfg(1)) != generate(backend, PROMPTS, cfg(2))


def test_top_k_1_and_tiny_top_p_are_greedy(backend):
    greedy = generate(backend, PROMPTS, SamplingConfig(max_new_tokens=10))
    assert generate(backend, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=1, seed=0)) == greedy
    assert generate(backend, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=0)) == greedy


def test_stop_token_ends_each_row(backend):
    greedy = generate(backend, PROMPTS, SamplingConfig(max_new_tokens=16))
    stop = greedy[0][3]
    out = generate(backend, PROMPTS, SamplingConfig(max_new_tokens=16, stop_token_ids=[stop]), include_stop=True)
    for row, ref in zip(out, greedy, strict=False):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    none = torch.full((2000, 1), -1)
    g = torch.Generator().manual_seed(0)
    top2 = sample(logits, SamplingConfig(temperature=1.0, top_k=2), none, g)
    assert set(top2.tolist()) == {0, 1}
    # top_p=0.7: p = softmax = [.64, .24, .09, ...]; the smallest prefix reaching 0.7 is {0, 1}.
    topp = sample(logits, SamplingConfig(temperature=1.0, top_p=0.7), none, g)
    assert set(topp.tolist()) == {0, 1}
    assert abs((topp == 0).float().mean().item() - 0.64 / 0.88) < 0.04
    # repetition penalty 100 on token 0 hands greedy to token 1; negative logits are multiplied (more negative).
    seen = torch.zeros((2000, 1), dtype=torch.int64)
    assert sample(logits, SamplingConfig(repetition_penalty=100.0), seen, g).unique().tolist() == [1]
    neg = torch.tensor([[-1.0, -1.5]])
    assert sample(neg, SamplingConfig(repetition_penalty=2.0), torch.tensor([[0]]), g).item() == 1


def test_context_limit_is_enforced(backend):
    with pytest.raises(GlmcError, match="exceeds the model's context of 512 tokens"):
        generate(backend, [[1] * 500], SamplingConfig(max_new_tokens=20))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(repetition_penalty=0)])
def test_bad_sampling_settings(bad):
    with pytest.raises(GlmcError, match=next(iter(bad))):
        SamplingConfig(**bad)
