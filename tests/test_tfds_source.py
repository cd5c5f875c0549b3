"""The TFDS adapter: reading through data sources, the `.npz` cache, and failing fast when unprepared."""
from __future__ import annotations

import importlib.resources
import importlib.util
import io
import json
import os
import socket
import sys
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from tensorflow_datasets.testing import mocking  # noqa: E402

from early_jax.data import tfds_source  # noqa: E402
from early_jax.data.tfds_source import TFDS_NAMES, cache_path, load_tfds  # noqa: E402
from early_jax.errors import UserError  # noqa: E402

EXPECTED = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100), "mnist": ((28, 28, 1), 10),
            "fashion_mnist": ((28, 28, 1), 10), "svhn_cropped": ((32, 32, 3), 10)}


@pytest.fixture
def mocked_tfds(monkeypatch):
    """TFDS's mock data, made usable for bulk reads, with the prepare step allowed (it is a no-op).

    `mock_data` installs `__getitems__` on a MagicMock instance as a plain attribute, so it is called
    without `self` and fails with a TypeError (TFDS 4.9.10); this replaces the helper it wraps with one
    of the signature it is actually called with. The mocked builder is never "prepared", so
    `load_tfds` takes its prepare path, where the prerequisite check is patched away and
    `download_and_prepare` is the mock's no-op.
    """
    monkeypatch.setattr(mocking, "_getitems",
                        lambda keys, generator, serialized=False: [generator[k] for k in keys])
    checked = []
    monkeypatch.setattr(tfds_source, "missing_prerequisites", lambda name: checked.append(name) or [])
    return checked


def _forbid_tfds(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("TFDS must not be used")
    monkeypatch.setattr(tfds, "builder", fail)


def _assert_same(a, b):
    assert (a.name, a.num_classes) == (b.name, b.num_classes)
    for key in ("x_train", "y_train", "x_test", "y_test", "mean", "std"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
        assert getattr(a, key).dtype == getattr(b, key).dtype


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_mock_data_gives_record_and_cache(name, tmp_path, monkeypatch, mocked_tfds):
    shape, num_classes = EXPECTED[name]
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        first = load_tfds(name, data_dir=str(tmp_path))
    assert mocked_tfds == [name]  # went through the prepare path
    assert first.name == name and first.num_classes == num_classes
    assert first.x_train.shape == (12, *shape) and first.x_test.shape == (12, *shape)
    assert first.x_train.dtype == np.uint8 and first.y_train.dtype == np.int32
    assert first.y_train.shape == (12,) and first.y_test.shape == (12,)
    assert 0 <= first.y_train.min() and max(first.y_train.max(), first.y_test.max()) < num_classes
    assert first.x_train.std() > 0  # random pixels, not a zero-filled buffer

    path = tmp_path / "early_jax_cache" / f"{name}.npz"
    assert path.is_file() and cache_path(name, str(tmp_path)) == str(path)
    _forbid_tfds(monkeypatch)
    _assert_same(load_tfds(name, data_dir=str(tmp_path)), first)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _fake_cifar10_source(monkeypatch, num_train=40, num_test=16):
    """Make a real `download_and_prepare` of cifar10 write array_record shards of known PNGs.

    Only the download is replaced: TFDS's writer, `as_data_source`, the example parser and the PNG
    decoding all run for real, without TensorFlow (encoded bytes need no `tf.image`).
    """
    from tensorflow_datasets.image_classification import cifar
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))
              for split, n in (("train", num_train), ("test", num_test))}

    def examples(split):
        images, labels = splits[split]
        for i, (image, label) in enumerate(zip(images, labels)):
            yield f"{split}_{i}", {"id": f"{split}_{i}", "image": io.BytesIO(_png(image)),
                                   "label": int(label)}

    monkeypatch.setattr(cifar.Cifar10, "_split_generators",
                        lambda self, dl_manager: {s: examples(s) for s in splits})
    monkeypatch.setattr(tfds_source, "missing_prerequisites", lambda name: [])
    if importlib.util.find_spec("importlib_resources") is None:  # see PREPARE_MODULES
        monkeypatch.setitem(sys.modules, "importlib_resources", importlib.resources)
    return splits


def _assert_matches(images, labels, expected_images, expected_labels):
    """Same examples up to order: TFDS shuffles examples by key when writing shards."""
    expected = {image.tobytes(): int(label) for image, label in zip(expected_images, expected_labels)}
    assert len(images) == len(expected)
    assert {image.tobytes(): int(label) for image, label in zip(images, labels)} == expected


def test_real_array_record_round_trip(tmp_path, monkeypatch):
    splits = _fake_cifar10_source(monkeypatch)
    first = load_tfds("cifar10", data_dir=str(tmp_path))
    assert (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").is_file()
    assert first.x_train.shape == (40, 32, 32, 3) and first.x_test.shape == (16, 32, 32, 3)
    assert first.num_classes == 10 and first.y_train.dtype == np.int32
    _assert_matches(first.x_train, first.y_train, *splits["train"])
    _assert_matches(first.x_test, first.y_test, *splits["test"])

    os.remove(cache_path("cifar10", str(tmp_path)))  # prepared data alone is read again, same result
    _assert_same(load_tfds("cifar10", data_dir=str(tmp_path)), first)
    _forbid_tfds(monkeypatch)
    _assert_same(load_tfds("cifar10", data_dir=str(tmp_path)), first)


def test_tfrecord_only_dataset_says_how_to_convert(tmp_path, monkeypatch):
    _fake_cifar10_source(monkeypatch, num_train=4, num_test=4)
    load_tfds("cifar10", data_dir=str(tmp_path))
    os.remove(cache_path("cifar10", str(tmp_path)))
    info_path = tmp_path / "cifar10" / "3.0.2" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"  # what `tfds.load` and `tfds.data_source(data_dir=...)` prepare
    info_path.write_text(json.dumps(info))
    with pytest.raises(UserError, match="array_record") as error:
        load_tfds("cifar10", data_dir=str(tmp_path))
    assert "convert_format" in str(error.value) and "--data_dir" in str(error.value)


def _forbid_prepare(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("download_and_prepare must not be called")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)


def _assert_names_fixes(message):
    assert "--data_dir" in message and "pip install -e .[prepare]" in message
    assert "cifar-10-batches-py" in message and ".npz" in message and "fashion_mnist_idx" in message


def test_offline_fails_fast_with_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, "missing_modules", lambda: [])  # as if TensorFlow were installed
    monkeypatch.setattr(tfds_source, "reachable", lambda host, port: False)
    _forbid_prepare(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(UserError, match="no network") as error:
        load_tfds("cifar10", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    _assert_names_fixes(str(error.value))
    assert "download_and_prepare()" in str(error.value)
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_missing_tensorflow_fails_even_online(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else real_find_spec(name, *a))
    monkeypatch.setattr(tfds_source, "reachable", lambda host, port: True)
    _forbid_prepare(monkeypatch)
    with pytest.raises(UserError, match="tensorflow") as error:
        load_tfds("mnist", data_dir=str(tmp_path))
    assert "no network" not in str(error.value)
    _assert_names_fixes(str(error.value))


def test_unpatched_unprepared_load_fails_fast(tmp_path):
    if not tfds_source.missing_prerequisites("cifar10"):
        pytest.skip("TensorFlow and network present: an unprepared load would really download")
    start = time.perf_counter()
    with pytest.raises(UserError, match="--data_dir"):
        load_tfds("cifar10", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10


def test_unknown_name_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cifar10"):
        load_tfds("imagenet2012", data_dir=str(tmp_path))


def test_cache_defaults_to_tfds_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert cache_path("mnist") == str(tmp_path / "early_jax_cache" / "mnist.npz")
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert cache_path("mnist") == os.path.expanduser("~/tensorflow_datasets/early_jax_cache/mnist.npz")


@pytest.fixture
def no_proxy_env(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


def test_probe_address_direct_and_through_proxy(monkeypatch, no_proxy_env):
    assert tfds_source.probe_address("https://www.cs.toronto.edu/~kriz/") == ("www.cs.toronto.edu", 443)
    assert tfds_source.probe_address("http://ufldl.stanford.edu/x/") == ("ufldl.stanford.edu", 80)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert tfds_source.probe_address("https://www.cs.toronto.edu/~kriz/") == ("proxy.example", 3128)


def test_reachable_on_local_sockets():
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert tfds_source.reachable("127.0.0.1", server.getsockname()[1], timeout=2)
        port = server.getsockname()[1]
    start = time.perf_counter()
    assert not tfds_source.reachable("127.0.0.1", port, timeout=2)  # closed: refused at once
    assert time.perf_counter() - start < 2
