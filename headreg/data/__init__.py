"""Datasets, batch transforms, loaders and embedding files.

Named datasets live under one root (``--data-dir`` / ``HEADREG_DATA_DIR`` / ``~/.cache/headreg/data``) and are
never downloaded unless asked. MNIST-sized datasets are held in memory as uint8 tensors and served a batch per
index operation; :class:`BatchTransform` converts and normalises those batches on the device.
"""

from headreg.data._datasets import (
    DATA_DIR_ENV,
    ImageFilesDataset,
    ImageFolderDataset,
    ImageListDataset,
    TensorImageDataset,
    create_dataset,
    is_pairs_dataset,
    list_datasets,
    resolve_data_dir,
)
from headreg.data.embeddings import load_embeddings, save_embeddings
from headreg.data.loader import BatchLoader, ShardSampler, create_loader
from headreg.data.transforms import BatchTransform, resolve_transform

__all__ = [
    "DATA_DIR_ENV",
    "BatchLoader",
    "BatchTransform",
    "ImageFilesDataset",
    "ImageFolderDataset",
    "ImageListDataset",
    "ShardSampler",
    "TensorImageDataset",
    "create_dataset",
    "create_loader",
    "is_pairs_dataset",
    "list_datasets",
    "load_embeddings",
    "resolve_data_dir",
    "resolve_transform",
    "save_embeddings",
]
