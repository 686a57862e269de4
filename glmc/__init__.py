"""glmc: compile ChatGLM2/ChatGLM3/GLM-4 checkpoints into verified ONNX Runtime and TensorRT engines, and run them."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy exports: `glmc.load` imports torch and the runtime only when first used."""
    if name == "load":
        from glmc.api import load
        return load
    raise AttributeError(f"module 'glmc' has no attribute {name!r}")
