"""The supervised segmentation engine every method shares: preprocessing, slice/patch sampling,
the training loop (single or multi-process), self-describing checkpoints and inference."""
