"""Our model <-> transformers' GlmForCausalLM (an independent implementation: the numerical oracle)."""

from __future__ import annotations

import torch

from glmc.modeling_patches.config import GLMConfig
from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM


def transformers_config(config: GLMConfig):
    """The GlmConfig of the same architecture: rope base (x rope_ratio) and linear scaling set by hand."""
    from transformers import GlmConfig

    rope = {"rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": 0.5}
    if config.rope_position_divisor != 1.0:
        rope = {**rope, "rope_type": "linear", "factor": config.rope_position_divisor}
    return GlmConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
                     num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                     head_dim=config.head_dim, max_position_embeddings=config.seq_length, rms_norm_eps=config.rms_eps,
                     rope_parameters=rope, attention_bias=config.qkv_bias, pad_token_id=0, eos_token_id=None,
                     tie_word_embeddings=False)


def to_transformers(model: GLMForCausalLM):
    """A GlmForCausalLM holding the same weights (fused QKV split into q/k/v, names mapped)."""
    from transformers import GlmForCausalLM

    c = model.config
    hf = GlmForCausalLM(transformers_config(c))
    # nn.Module.to: transformers' override (checks for quantized models only) is typed as an unbound wrapper
    torch.nn.Module.to(hf, model.dtype)
    src = model.state_dict()
    dst = {"model.embed_tokens.weight": src["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": src["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": src["transformer.output_layer.weight"]}
    for i in range(c.num_layers):
        p, q = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if c.qkv_bias else ("weight",):
            qw, kw, vw = src[p + f"self_attention.query_key_value.{kind}"].split([c.q_size, c.kv_size, c.kv_size])
            dst[q + f"self_attn.q_proj.{kind}"], dst[q + f"self_attn.k_proj.{kind}"] = qw, kw
            dst[q + f"self_attn.v_proj.{kind}"] = vw
        dst[q + "self_attn.o_proj.weight"] = src[p + "self_attention.dense.weight"]
        dst[q + "mlp.gate_up_proj.weight"] = src[p + "mlp.dense_h_to_4h.weight"]
        dst[q + "mlp.down_proj.weight"] = src[p + "mlp.dense_4h_to_h.weight"]
        dst[q + "input_layernorm.weight"] = src[p + "input_layernorm.weight"]
        dst[q + "post_attention_layernorm.weight"] = src[p + "post_attention_layernorm.weight"]
    missing, unexpected = hf.load_state_dict(dst, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


class TransformersBackend:
    """GlmForCausalLM behind the generation loop's backend interface (benchmarks and parity tests)."""

    name = "transformers"

    def __init__(self, hf_model, max_length: int):
        self.model, self.max_length = hf_model, max_length

    def new_cache(self, batch: int):
        from transformers import DynamicCache
        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, attention_mask, cache):
        d = self.model.device
        out = self.model(input_ids=input_ids.to(d), position_ids=position_ids.to(d),
                         attention_mask=attention_mask.to(d), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].float().cpu(), out.past_key_values
