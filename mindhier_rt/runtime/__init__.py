"""Backends that implement the decode contract (torch here; onnxruntime and tensorrt later)."""
