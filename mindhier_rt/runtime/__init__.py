"""The decode contract (``base.DecodeBackend``), its backends (torch, torch-fast, onnxruntime, tensorrt) and
``open.open_backend``, the one factory that picks one."""
