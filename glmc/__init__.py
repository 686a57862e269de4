"""glmc: compile ChatGLM2/ChatGLM3/GLM-4 checkpoints into verified ONNX Runtime and TensorRT engines, and run them."""

__version__ = "0.1.0"
