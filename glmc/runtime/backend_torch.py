"""The torch backend: runs GLMForCausalLM eagerly (CPU or CUDA) for the generation loop."""

from __future__ import annotations

import torch

from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM, KVCache


class TorchBackend:
    """Adapts GLMForCausalLM to the generation loop: last-position float32 logits, concat-style KV cache."""

    name = "torch"

    def __init__(self, model: GLMForCausalLM, max_length: int | None = None):
        self.model = model
        self.device = model.cos_cache.device
        self.max_length = min(max_length or model.max_positions, model.max_positions)

    def new_cache(self, batch: int) -> KVCache:
        return self.model.empty_cache(batch, self.device)

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, attention_mask, cache):
        d = self.device
        logits, cache = self.model(input_ids.to(d), position_ids.to(d), attention_mask.to(d), cache)
        return logits[:, -1].float().cpu(), cache
