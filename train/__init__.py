"""Training: VQ-VAE, stage 1 (hierarchical encoder) and stage 2 (generator); losses and teachers (imported as mindhier_rt.train)."""
