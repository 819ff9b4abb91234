"""Triton kernels for scale-masked attention and their pure-PyTorch references (imported as mindhier_rt.kernels)."""
