"""ONNX export, graph checks and TensorRT engine builds (imported as mindhier_rt.export)."""
