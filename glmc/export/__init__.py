"""torch -> ONNX deployment graph; simplification; lowerings per backend."""
