"""Serving a finished run: ONNX export with parity check and model card (export), onnxruntime sessions,
model discovery and top-k (inference)."""
