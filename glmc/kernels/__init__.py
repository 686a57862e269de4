"""GPU kernels (Triton) implementing the custom ops on CUDA."""
