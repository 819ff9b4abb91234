"""Serving through NVIDIA Triton Inference Server: a model repository whose Python-backend models run the decode
loop (``repository``, ``triton_model``), the server that runs it (``server``), request handling (``service``) and
the ``tritonclient`` side (``client``). See docs/serving.md."""
