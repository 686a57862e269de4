"""Weight-only int8/int4 quantization, KV-cache int8 calibration, accuracy evaluation."""
