"""Offline sources: IDX files, the CIFAR python batches, `.npz` archives and synthetic data."""
from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import zipfile

import numpy as np

from early_jax import files
from early_jax.data.record import Dataset, make_dataset
from early_jax.errors import UserError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32,
               0x0E: np.float64}


@contextlib.contextmanager
def _reading(path: str):
    """A damaged or truncated data file becomes one error that names it."""
    try:
        yield
    except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err}): the file is damaged or not "
                        "in the expected format; replace it (a TFDS cache .npz is rebuilt when deleted)"
                        ) from err


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzip or plain): magic 0,0,dtype,ndim then big-endian int32 dims."""
    opener = gzip.open if path.endswith(".gz") else open
    with _reading(path), opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    dtype = np.dtype(_IDX_DTYPES[raw[2]]).newbyteorder(">")
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise UserError(f"{path}: IDX header promises {expected} bytes of data, file holds {len(body)}")
    return np.frombuffer(body, dtype).astype(dtype.newbyteorder("=")).reshape(dims)


def _find(folder: str, stem: str) -> str:
    for suffix in ("-ubyte.gz", "-ubyte"):
        path = os.path.join(folder, stem + suffix)
        if os.path.exists(path):
            return path
    raise UserError(f"{folder} has no {stem}-ubyte[.gz]; an IDX folder needs train-images-idx3, "
                    "train-labels-idx1, t10k-images-idx3 and t10k-labels-idx1 files")


IDX_STEMS = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")


def load_idx_folder(folder: str, name: str | None = None) -> Dataset:
    """MNIST-layout folder (e.g. Debian's dataset-fashion-mnist package)."""
    paths = [_find(folder, stem) for stem in IDX_STEMS]
    arrays = [read_idx(path) for path in paths]
    return make_dataset(name or os.path.basename(os.path.normpath(folder)), *arrays, num_classes=10,
                        sources=paths)


def load_cifar_folder(folder: str) -> Dataset:
    """The python-pickle release of CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test)."""
    def unpickle(fname):
        path = os.path.join(folder, fname)
        with _reading(path), open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
            images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = np.asarray(batch.get(b"labels", batch.get(b"fine_labels")))
        return images, labels

    if os.path.exists(os.path.join(folder, "data_batch_1")):
        parts = [unpickle(f"data_batch_{i}") for i in range(1, 6)]
        x_train, y_train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        x_test, y_test = unpickle("test_batch")
        sources = [os.path.join(folder, f) for f in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")]
        return make_dataset("cifar10", x_train, y_train, x_test, y_test, num_classes=10, sources=sources)
    (x_train, y_train), (x_test, y_test) = unpickle("train"), unpickle("test")
    return make_dataset("cifar100", x_train, y_train, x_test, y_test, num_classes=100,
                        sources=[os.path.join(folder, f) for f in ("train", "test")])


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str) -> Dataset:
    """An archive with x_train, y_train, x_test, y_test (and optionally num_classes, name)."""
    with _reading(path), np.load(path) as archive:
        missing = [k for k in NPZ_KEYS if k not in archive]
        if missing:
            raise UserError(f"{path} lacks arrays {missing}; an .npz dataset needs {list(NPZ_KEYS)}")
        num_classes = int(archive["num_classes"]) if "num_classes" in archive else None
        name = str(archive["name"]) if "name" in archive else os.path.splitext(os.path.basename(path))[0]
        arrays = [archive[k] for k in NPZ_KEYS]
    return make_dataset(name, *arrays, num_classes=num_classes, sources=[path])


def save_npz(dataset: Dataset, path: str) -> None:
    """Write atomically so that a killed process never leaves a truncated cache behind."""
    with files.atomic(path, "wb") as f:
        np.savez(f, x_train=dataset.x_train, y_train=dataset.y_train, x_test=dataset.x_test,
                 y_test=dataset.y_test, num_classes=dataset.num_classes, name=dataset.name)


def synthetic(num_train=256, num_test=128, shape=(8, 8, 3), num_classes=10, seed=0) -> Dataset:
    """Learnable random data: each class has its own mean image, plus per-example noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(num_classes, *shape))

    def draw(n):
        labels = rng.integers(0, num_classes, n)
        noise = rng.normal(0, 40, size=(n, *shape))
        return np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8), labels

    x_train, y_train = draw(num_train)
    x_test, y_test = draw(num_test)
    return make_dataset("synthetic", x_train, y_train, x_test, y_test, num_classes)
