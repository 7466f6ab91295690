"""The dataset: MNIST's IDX files fetched, verified, read, and decoded a batch at a time, with the
augmentation drawn from a seed (mnist.py)."""
