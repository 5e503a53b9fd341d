"""Data: sources (CelebA or procedural faces), partitions, datasets. No Ray."""
