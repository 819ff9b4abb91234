"""The three PyTorch models of MindHier: encoder, generator, VQ-VAE."""
