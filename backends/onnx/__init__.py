"""The `onnx` Triton backend: embedding models in ONNX, run by ONNX Runtime (see README.md)."""
