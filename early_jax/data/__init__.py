"""Datasets as records of arrays, from TFDS, local files or synthetic generators."""
from __future__ import annotations

import os
import re

import numpy as np

from early_jax.data.local import (DEBIAN_FASHION_MNIST, load_cifar_folder, load_idx_folder, load_npz,
                                  save_npz, synthetic)
from early_jax.data.record import Dataset, make_dataset
from early_jax.data.tfds_source import TFDS_NAMES  # tensorflow_datasets is imported lazily there
from early_jax.errors import UserError

_SYNTHETIC = re.compile(r"synthetic(?::(\d+)x(\d+)x(\d+))?$")

__all__ = ["Dataset", "make_dataset", "load", "from_config", "pooled", "synthetic", "save_npz", "TFDS_NAMES"]


def from_config(data_config) -> Dataset:
    """The dataset a config names (`name`, `data_dir`), average-pooled by `pool`."""
    return pooled(load(data_config.name, data_config.data_dir), data_config.pool)


def pooled(dataset: Dataset, factor: int) -> Dataset:
    """Images average-pooled over factor x factor blocks (rounded to uint8): smaller inputs, a
    cheaper step, the same examples and labels."""
    if factor == 1:
        return dataset
    height, width = dataset.image_shape[:2]
    if factor > min(height, width):
        raise UserError(f"--pool={factor} is larger than the {height}x{width} images")

    def pool(x):
        n, h, w, c = x.shape
        blocks = x[:, :h // factor * factor, :w // factor * factor].reshape(
            n, h // factor, factor, w // factor, factor, c)
        return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)

    return make_dataset(f"{dataset.name}_pool{factor}", pool(dataset.x_train), dataset.y_train,
                        pool(dataset.x_test), dataset.y_test, dataset.num_classes)


def load(name_or_path: str, data_dir: str | None = None) -> Dataset:
    """Resolve a dataset name or path to its record.

    Names: a TFDS name (cifar10, cifar100, mnist, fashion_mnist, svhn_cropped; read from `data_dir`),
    `fashion_mnist_idx` (IDX files in `data_dir`, default Debian's dataset-fashion-mnist folder),
    `synthetic` or `synthetic:HxWxC`. Paths: an `.npz`, an IDX folder, or a CIFAR python-batches folder.
    """
    match = _SYNTHETIC.match(name_or_path)
    if match:
        shape = tuple(int(g) for g in match.groups()) if match.group(1) else (8, 8, 3)
        return synthetic(shape=shape)
    if name_or_path == "fashion_mnist_idx":
        return _load_fashion_mnist_idx(data_dir or DEBIAN_FASHION_MNIST)
    if name_or_path in TFDS_NAMES:
        from early_jax.data.tfds_source import load_tfds
        return load_tfds(name_or_path, data_dir)
    if os.path.isfile(name_or_path) and name_or_path.endswith(".npz"):
        return load_npz(name_or_path)
    if os.path.isdir(name_or_path):
        entries = os.listdir(name_or_path)
        if any("idx3-ubyte" in e for e in entries):
            return load_idx_folder(name_or_path)
        if {"data_batch_1", "test_batch"} <= set(entries) or {"train", "test", "meta"} <= set(entries):
            return load_cifar_folder(name_or_path)
        raise UserError(f"{name_or_path} holds neither IDX files nor CIFAR python batches")
    if os.sep in name_or_path or name_or_path.endswith(".npz"):
        raise UserError(f"no dataset file or folder at {name_or_path}: check the path")
    raise UserError(f"unknown dataset {name_or_path!r}: use one of {', '.join(TFDS_NAMES)} (TFDS), "
                    "fashion_mnist_idx, synthetic[:HxWxC], or a path to an .npz file, an IDX folder "
                    "or a CIFAR python-batches folder")


def _load_fashion_mnist_idx(folder: str) -> Dataset:
    if not os.path.isdir(folder):
        raise UserError(f"Fashion-MNIST IDX files not found in {folder}: install Debian's package "
                        "(sudo apt-get install dataset-fashion-mnist) or pass --data_dir=<folder with "
                        "train-images-idx3-ubyte.gz ...>")
    return load_idx_folder(folder, name="fashion_mnist")
