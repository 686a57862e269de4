"""Config, checkpoint loading and the export-friendly ChatGLM model with its custom operators."""

from glmc.modeling_patches.checkpoint import load_model, random_model, save_checkpoint
from glmc.modeling_patches.config import GLMConfig, from_hf, load_config, variant
from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM

__all__ = ["GLMConfig", "GLMForCausalLM", "from_hf", "load_config", "load_model", "random_model", "save_checkpoint",
           "variant"]
