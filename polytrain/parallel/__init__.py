"""Model parallelism: a model's layers split over the ranks of a mesh axis (tensor.py: the tp axis)."""
