"""TFDS image-classification datasets, read without TensorFlow and cached as `.npz`.

TFDS is imported only inside `load_tfds`, so the package works where it is absent. Reading uses
`as_data_source` (random access into array_record shards, decoded with numpy/PIL), which needs no
TensorFlow; preparing a dataset does need TensorFlow and the network, so that step is checked up
front and refused quickly, with the ways out, rather than failing after minutes of retries.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request

import numpy as np

from early_jax.data.local import load_npz, save_npz
from early_jax.data.record import Dataset, make_dataset
from early_jax.errors import UserError

TFDS_NAMES = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn_cropped")
CACHE_FOLDER = "early_jax_cache"
# Where each builder downloads its raw files from (TFDS's GCS mirror is used only for tfrecord).
DOWNLOAD_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "svhn_cropped": "http://ufldl.stanford.edu/housenumbers/",
}
# Modules `download_and_prepare` imports: TF encodes the images; TFDS 4.9 also imports
# `importlib_resources` there, although it declares it only for Python < 3.9.
PREPARE_MODULES = ("tensorflow", "importlib_resources")
NETWORK_TIMEOUT_S = 3.0
READ_CHUNK = 4096  # records per `__getitems__` call: bulk reads, bounded peak of decoded dicts

_log = logging.getLogger(__name__)


def tfds_root(data_dir: str | None = None) -> str:
    """The TFDS data folder, in TFDS's order: `data_dir`, $TFDS_DATA_DIR, ~/tensorflow_datasets."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def cache_path(name: str, data_dir: str | None = None) -> str:
    """Where `load_tfds` keeps the decoded arrays, next to the TFDS data they came from."""
    return os.path.join(tfds_root(data_dir), CACHE_FOLDER, f"{name}.npz")


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """Train and test splits of a TFDS dataset; the cached `.npz` if present, else read and cache it.

    Decoding tens of thousands of PNGs takes seconds, loading the `.npz` well under one, so every run
    after the first reads only the cache and never imports TFDS.
    """
    if name not in TFDS_NAMES:
        raise UserError(f"{name!r} is not a supported TFDS dataset; use one of {', '.join(TFDS_NAMES)}")
    path = cache_path(name, data_dir)
    if os.path.exists(path):
        return load_npz(path)
    dataset = _read_from_tfds(name, data_dir)
    _write_cache(dataset, path)
    return dataset


def _read_from_tfds(name: str, data_dir: str | None) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(f"{name} needs tensorflow-datasets (pip install tensorflow-datasets), "
                        f"or use a local source: {_LOCAL_SOURCES}") from e
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        builder = _prepare(tfds, name, data_dir, str(builder.data_path))
    train, test = _open_splits(builder, name)
    num_classes = builder.info.features["label"].num_classes
    return make_dataset(name, *_read_split(train, name, "train"), *_read_split(test, name, "test"),
                        num_classes=num_classes)


def _prepare(tfds, name: str, data_dir: str | None, data_path: str):
    """Download and write the dataset as array_record, after checking that this can succeed."""
    problems = missing_prerequisites(name)
    if problems:
        raise UserError(f"{name} is not prepared at {data_path}, and cannot be prepared here: "
                        f"{'; '.join(problems)}.\n{_fixes(name, data_dir)}")
    _log.info("preparing %s in %s (array_record)", name, tfds_root(data_dir))
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    try:
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001 -- any failure here has the same fixes
        raise UserError(f"preparing {name} in {tfds_root(data_dir)} failed: {type(e).__name__}: {e}\n"
                        f"{_fixes(name, data_dir)}") from e
    return builder


def missing_prerequisites(name: str) -> list[str]:
    """What stops `download_and_prepare` here: missing modules and an unreachable download host."""
    problems = []
    if modules := missing_modules():
        problems.append(f"Python modules {', '.join(modules)} are not installed "
                        "(pip install -e .[prepare])")
    host, port = probe_address(DOWNLOAD_URLS[name])
    if not reachable(host, port):
        problems.append(f"no network: cannot connect to {host}:{port} "
                        f"(waited up to {NETWORK_TIMEOUT_S:g} s)")
    return problems


def missing_modules() -> list[str]:
    """Import check without importing: TensorFlow alone takes seconds to import."""
    return [m for m in PREPARE_MODULES if importlib.util.find_spec(m) is None]


def probe_address(url: str) -> tuple[str, int]:
    """The host:port a download of `url` connects to first: the configured proxy, if any."""
    parts = urllib.parse.urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        return proxy_parts.hostname, proxy_parts.port or 80
    return parts.hostname, parts.port or default_port


def reachable(host: str, port: int, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """TCP connect within `timeout` seconds in all, DNS lookup included (it ignores socket timeouts)."""
    answered = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _open_splits(builder, name: str):
    """Random-access sources for train and test; only array_record/parquet shards provide them."""
    try:
        return builder.as_data_source(split=["train", "test"])
    except (NotImplementedError, ValueError) as e:
        path = builder.data_path
        raise UserError(
            f"{name} is prepared at {path} but not in a random-access format (array_record), "
            f"probably as tfrecord, which cannot be read without TensorFlow. Fix it on a machine with "
            f"TensorFlow (pip install -e .[prepare]) by adding array_record shards in place:\n"
            f"  tfds convert_format --dataset_version_dir={path} --out_file_format=array_record\n"
            f"or prepare an array_record copy in another folder and pass that as --data_dir.\n"
            f"(TFDS said: {e})") from e


def _read_split(source, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of one split, fetched `READ_CHUNK` records per call."""
    count = len(source)
    if count == 0:
        raise UserError(f"the {split} split of {name} is empty; delete and prepare it again")
    images, labels = [], []
    for start in range(0, count, READ_CHUNK):
        examples = source.__getitems__(list(range(start, min(start + READ_CHUNK, count))))
        images.append(np.stack([np.asarray(ex["image"], np.uint8) for ex in examples]))
        labels.append(np.asarray([ex["label"] for ex in examples], np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _write_cache(dataset: Dataset, path: str) -> None:
    """Best effort: a read-only shared TFDS folder must not stop training, only make it re-decode."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_npz(dataset, path)
    except OSError as e:
        _log.warning("could not cache %s at %s (%s); it will be decoded again next time",
                     dataset.name, path, e)


_LOCAL_SOURCES = ("--dataset=/path/to/cifar-10-batches-py (the CIFAR python batches), "
                  "--dataset=/path/to/data.npz (x_train, y_train, x_test, y_test), "
                  "or --dataset=fashion_mnist_idx (Debian's dataset-fashion-mnist IDX files)")


def _fixes(name: str, data_dir: str | None) -> str:
    target = tfds_root(data_dir)
    return (
        "Fixes, any one of:\n"
        f"  1. on a machine with internet, prepare it into a folder DIR, then copy DIR/{name} to "
        f"{target}/{name}:\n"
        f"       pip install -e .[prepare]\n"
        f"       python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='DIR', file_format='array_record').download_and_prepare()\"\n"
        f"  2. pass --data_dir=<a TFDS folder holding {name} prepared as array_record>\n"
        f"  3. use a local source instead: {_LOCAL_SOURCES}")
