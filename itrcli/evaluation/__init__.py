"""Recall@K on image-caption datasets: loaders, metrics, the eval run."""
