"""Shared test fixtures: tiny random models of every supported ChatGLM variant."""

from __future__ import annotations

import pytest
import torch

from glmc.modeling_patches import variant
from glmc.modeling_patches.checkpoint import random_model

torch.set_num_threads(2)

VARIANTS = ["chatglm2-6b", "chatglm2-6b-32k", "chatglm3-6b", "chatglm3-6b-32k", "glm-4-9b-chat", "glm-4-9b-chat-1m"]


def tiny_config(name: str = "chatglm3-6b", **overrides):
    """A 2-layer model of the variant's family, rope and eps; glm-4-9b-chat-1m keeps its 4 KV groups."""
    shape = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_heads=4, head_dim=32, vocab_size=300,
                 seq_length=512)
    if name == "glm-4-9b-chat-1m":
        shape.update(hidden_size=256, num_heads=8)
    else:
        shape.update(num_kv_heads=2)
    shape.update(overrides)
    return variant(name, **shape)


def tiny_model(name: str = "chatglm3-6b", seed: int = 0, std: float = 0.15, **overrides):
    """Random weights large enough (std 0.15) that logits are peaked and greedy decoding is not a coin toss."""
    return random_model(tiny_config(name, **overrides), seed=seed, std=std)


@pytest.fixture
def tiny():
    return tiny_model
