"""Datasets and the deterministic, rank-sharded loader."""

from advcl_dist.data.datasets import DATASETS, DatasetNotFoundError, get_dataset, num_classes
from advcl_dist.data.loader import IndexedDataset, ShardedSampler, build_loader, ordered_batches

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "IndexedDataset",
    "ShardedSampler",
    "build_loader",
    "get_dataset",
    "num_classes",
    "ordered_batches",
]
