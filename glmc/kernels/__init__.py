"""GPU kernels (Triton) for the custom ops on CUDA: not written yet; on CUDA the ops run through ONNX Runtime."""
