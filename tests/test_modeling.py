"""Our torch model against transformers' GlmForCausalLM (independent implementation), and across dtypes."""

from __future__ import annotations

import pytest
import torch

from conftest import VARIANTS, tiny_model
from glmc.modeling_patches.hf_glm import TransformersBackend, to_transformers
from glmc.runtime.backend_torch import TorchBackend
from glmc.runtime.generate import SamplingConfig, generate, left_pad

PROMPTS = [[5, 17, 42, 9, 100, 7, 3, 250, 11], [8, 9, 10], [77, 1, 2, 3, 4, 5]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("name", VARIANTS)
def test_prefill_and_decode_match_transformers(name):
    model = tiny_model(name)
    hf = to_transformers(model)
    ids, mask, pos = left_pad(PROMPTS)
    real = mask.bool()
    with torch.no_grad():
        ours, cache = model(ids, pos, mask, model.empty_cache(len(PROMPTS)))
        out = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        theirs, hf_cache = out.logits, out.past_key_values
        assert rel_err(ours[real], theirs[real]) < 1e-5
        token, positions = ours[:, -1].argmax(-1, keepdim=True), pos[:, -1:]
        for _ in range(8):  # cached decode steps on the same tokens
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions + 1
            ours, cache = model(token, positions, mask, cache)
            out = hf(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=hf_cache,
                     use_cache=True)
            theirs, hf_cache = out.logits, out.past_key_values
            assert rel_err(ours, theirs) < 1e-5
            token = ours[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_tokens_match_transformers(name):
    model = tiny_model(name)
    cfg = SamplingConfig(max_new_tokens=32)
    ours = generate(TorchBackend(model), PROMPTS, cfg)
    theirs = generate(TransformersBackend(to_transformers(model), 512), PROMPTS, cfg)
    assert ours == theirs
    assert all(len(row) == 32 for row in ours)


# Half precision vs our fp32 run. fp16 keeps 10 mantissa bits (rel. rounding 5e-4 per op): through 2 layers and a
# 300-way output the logits move ~1e-3 of their range; bf16 has 7 bits (4e-3 per op) -> ~1e-2. Bounds leave 3-5x margin.
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("name", ["chatglm3-6b", "glm-4-9b-chat-1m"])
def test_half_precision_close_to_fp32(name, dtype, bound):
    model = tiny_model(name)
    half = tiny_model(name).to(dtype)
    ids, mask, pos = left_pad(PROMPTS)
    real = mask.bool()
    with torch.no_grad():
        ref, _ = model(ids, pos, mask, model.empty_cache(3))
        got, cache = half(ids, pos, mask, half.empty_cache(3))
    assert got.dtype == dtype and cache[0][0].dtype == dtype
    err = rel_err(got.float()[real], ref[real])
    assert err < bound, err
    agree = (got.float()[real].argmax(-1) == ref[real].argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


def test_left_padding_does_not_change_a_row():
    """A prompt's logits are the same alone and inside a left-padded batch (mask + positions are right)."""
    model = tiny_model("chatglm3-6b")
    ids, mask, pos = left_pad(PROMPTS)
    with torch.no_grad():
        batch, _ = model(ids, pos, mask, model.empty_cache(3))
        for i, p in enumerate(PROMPTS):
            a, m, q = left_pad([p])
            alone, _ = model(a, q, m, model.empty_cache(1))
            assert rel_err(batch[i, -len(p):], alone[0]) < 1e-5


def test_prefill_then_decode_equals_one_prefill():
    model = tiny_model("glm-4-9b-chat")
    ids, mask, pos = left_pad(PROMPTS)
    with torch.no_grad():
        full, _ = model(ids, pos, mask, model.empty_cache(3))
        head, cache = model(ids[:, :5], pos[:, :5], mask[:, :5], model.empty_cache(3))
        tail, _ = model(ids[:, 5:], pos[:, 5:], mask, cache)
    real = mask.bool()
    assert rel_err(torch.cat([head, tail], 1)[real], full[real]) < 1e-5
