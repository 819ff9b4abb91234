"""Training: VQ-VAE, stage 1 (encoder), stage 2 (generator), losses, teachers. Imported as mindhier_rt.train."""
