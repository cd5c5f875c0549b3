import gzip
import os
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import data
from early_jax.data import device as dev
from early_jax.data.local import read_idx
from early_jax.errors import UserError


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_folder(tmp_path, rng):
    images = {"train": rng.integers(0, 256, (20, 28, 28)), "t10k": rng.integers(0, 256, (10, 28, 28))}
    for split, imgs in images.items():
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, len(imgs)))
    return tmp_path, images


def test_idx_reader_round_trips_the_file_it_wrote(idx_folder):
    folder, images = idx_folder
    np.testing.assert_array_equal(read_idx(str(folder / "train-images-idx3-ubyte.gz")), images["train"])
    ds = data.load(str(folder))
    assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], images["train"])


def test_fashion_mnist_idx_reads_data_dir_and_names_the_fix_when_missing(idx_folder, tmp_path):
    folder, _ = idx_folder
    assert data.load("fashion_mnist_idx", data_dir=str(folder)).name == "fashion_mnist"
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion_mnist_idx", data_dir=str(tmp_path / "nowhere"))


def test_idx_reader_rejects_a_truncated_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, 1) + struct.pack(">i", 10) + b"\x00" * 3)
    with pytest.raises(UserError, match="promises 10 bytes"):
        read_idx(str(path))


def test_cifar_batches_folder(tmp_path, rng):
    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                b"labels": list(rng.integers(0, 10, n))}
    for i in range(1, 6):
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(4), f)
    test = batch(3)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(test, f)
    ds = data.load(str(tmp_path))
    assert ds.name == "cifar10" and ds.x_train.shape == (20, 32, 32, 3) and ds.num_classes == 10
    # channel-major rows become NHWC pixels
    np.testing.assert_array_equal(ds.x_test[1, 0, 0], test[b"data"][1][[0, 1024, 2048]])


def test_every_source_yields_the_same_record(tmp_path, idx_folder):
    folder, _ = idx_folder
    synthetic = data.synthetic(num_train=12, num_test=6, shape=(28, 28, 1))
    data.save_npz(synthetic, str(tmp_path / "s.npz"))
    for ds in (data.load(str(folder)), data.load(str(tmp_path / "s.npz")), synthetic):
        assert ds.x_train.dtype == np.uint8 and ds.x_train.ndim == 4
        assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
        assert ds.mean.shape == ds.std.shape == (ds.x_train.shape[-1],)
        assert ds.num_classes == 10
    npz = data.load(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(npz.x_train, synthetic.x_train)


def test_channel_statistics_are_exact(rng):
    ds = data.make_dataset("t", rng.integers(0, 256, (50, 4, 4, 3)).astype(np.uint8), np.zeros(50),
                           np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2), num_classes=2)
    pixels = ds.x_train.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(ds.mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.std, pixels.std(0), rtol=1e-5)


@pytest.mark.parametrize("x,y_test,match", [
    (np.zeros((4, 3, 8, 8), np.uint8), [0], "channels-first"),
    (np.zeros((4, 8, 8, 3), np.uint8), [-1], "labels must lie"),
    (np.zeros((4, 8, 8, 3), np.float32), [0], "uint8")])
def test_malformed_arrays_are_refused(x, y_test, match):
    with pytest.raises(UserError, match=match):
        data.make_dataset("t", x, np.zeros(4), x[:1], y_test)


@pytest.mark.parametrize("bad,match", [("/no/such/path", "no dataset file or folder"),
                                       ("missing.npz", "no dataset file or folder"),
                                       ("imagenet", "unknown dataset")])
def test_bad_dataset_names_are_one_clear_error(bad, match):
    with pytest.raises(UserError, match=match):
        data.load(bad)


def test_damaged_data_files_are_named_in_one_clear_error(tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="cannot read .*broken.npz"):
        data.load(str(broken))
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        (cifar / name).write_bytes(b"")  # an interrupted download
    with pytest.raises(UserError, match="cannot read .*data_batch_1"):
        data.load(str(cifar))


def test_batches_cover_a_permutation_each_epoch_and_differ_across_seeds():
    n, batch = 10, 4  # 3 batches per epoch, the last topped up from the epoch's start
    spe = dev.steps_per_epoch(n, batch)
    assert spe == 3
    orders = []
    for seed in (0, 1):
        key = jax.random.key(seed)
        epochs = []
        for epoch in range(2):
            perm = dev.epoch_permutation(key, epoch, n)
            seen = np.concatenate([dev.batch_indices(perm, p, batch) for p in range(spe)])
            assert sorted(seen[:n]) == list(range(n))  # every example exactly once...
            np.testing.assert_array_equal(seen[n:], seen[: spe * batch - n])  # ...plus the top-up
            epochs.append(seen[:n])
        assert not np.array_equal(epochs[0], epochs[1])
        orders.append(epochs[0])
    assert not np.array_equal(orders[0], orders[1])


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    images = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.uint8).reshape(2, 6, 6, 1) + 1
    crops = dev.random_crop(jax.random.key(0), images, 2)
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for img, crop in zip(padded, np.asarray(crops)):
        assert any(np.array_equal(img[i:i + 6, j:j + 6], crop) for i in range(5) for j in range(5))


def test_flip_mirrors_about_half_the_examples():
    images = jnp.broadcast_to(jnp.arange(4, dtype=jnp.uint8)[None, None, :, None], (400, 4, 4, 1))
    flipped = np.asarray(dev.random_flip(jax.random.key(0), images))
    mirrored = (flipped[:, 0, 0, 0] == 3)
    assert np.all(flipped[mirrored] == np.asarray(images)[0, :, ::-1])
    assert np.all(flipped[~mirrored] == np.asarray(images)[0])
    assert 150 < mirrored.sum() < 250


def test_normalize_uses_the_dataset_statistics():
    x = jnp.full((1, 2, 2, 1), 255, jnp.uint8)
    np.testing.assert_allclose(dev.normalize(x, jnp.array([0.5]), jnp.array([0.25])), 2.0)


def test_blur_keeps_constant_images_and_removes_high_frequencies():
    const = jnp.full((1, 16, 16, 3), 0.7)
    np.testing.assert_allclose(dev.blur(const, 4), 0.7, atol=1e-6)
    checker = (jnp.indices((16, 16)).sum(0) % 2).astype(jnp.float32)[None, :, :, None]
    blurred = dev.blur(checker, 4)
    assert float(jnp.std(checker)) > 0.45 and float(jnp.std(blurred)) < 0.05
    # white noise: an antialiased 4x downsample averages ~8x8 pixels (std / 8); plain bilinear
    # sampling averages 2x2 (std / 2, measured 0.33 of the input) and would fail here
    noise = jnp.asarray(np.random.default_rng(0).random((4, 32, 32, 1)), jnp.float32)
    assert float(jnp.std(dev.blur(noise, 4))) < 0.2 * float(jnp.std(noise))
    ramp = jnp.linspace(0, 1, 16)[None, :, None, None] * jnp.ones((1, 16, 16, 1))
    assert float(jnp.abs(dev.blur(ramp, 4) - ramp).mean()) < 0.05  # low frequencies survive


def test_rotation_is_an_exact_quarter_turn_per_example():
    images = jnp.arange(4 * 3 * 3 * 1).reshape(4, 3, 3, 1)
    turns = jnp.array([0, 1, 2, 3])
    rotated = np.asarray(dev.rotate_quarter_turns(images, turns))
    for i, k in enumerate(turns):
        np.testing.assert_array_equal(rotated[i], np.rot90(np.asarray(images[i]), int(k), axes=(0, 1)))
    labels = dev.fixed_quarter_turns(1000, np.random.default_rng(3))
    np.testing.assert_array_equal(labels, dev.fixed_quarter_turns(1000, np.random.default_rng(3)))
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_random_labels_are_fixed_and_hit_the_fraction():
    labels = np.arange(10000) % 10
    a = dev.fixed_random_labels(labels, 10, 0.3, np.random.default_rng(1))
    np.testing.assert_array_equal(a, dev.fixed_random_labels(labels, 10, 0.3, np.random.default_rng(1)))
    changed = a != labels
    # 30% are redrawn; a redrawn label keeps its old value 1 time in 10
    assert abs(changed.mean() - 0.3 * 0.9) < 0.02
    full = dev.fixed_random_labels(labels, 10, 1.0, np.random.default_rng(1))
    assert abs((full == labels).mean() - 0.1) < 0.02
    assert not np.array_equal(full, dev.fixed_random_labels(labels, 10, 1.0, np.random.default_rng(2)))


def test_train_batch_gathers_the_permuted_examples():
    arrays = dev.TrainArrays(jnp.arange(8, dtype=jnp.uint8).reshape(8, 1, 1, 1) * 10,
                             jnp.arange(8, dtype=jnp.int32), jnp.zeros(1), jnp.ones(1))
    perm = jnp.array([3, 1, 7, 0, 2, 6, 5, 4])
    x, y = dev.train_batch(arrays, dev.Preprocess(augment=False), perm, 1, 3, jax.random.key(0))
    np.testing.assert_array_equal(y, [0, 2, 6])
    np.testing.assert_allclose(np.asarray(x).ravel(), np.array([0, 20, 60]) / 255.0, rtol=1e-6)


def test_pooling_averages_blocks_and_keeps_examples_and_labels():
    from early_jax import data
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    ds = data.make_dataset("x", images, [0, 1], images, [1, 0])
    small = data.pooled(ds, 2)
    assert small.image_shape == (2, 2, 1) and small.name == "x_pool2"
    np.testing.assert_array_equal(small.x_train[0, :, :, 0], [[2, 4], [10, 12]])  # means 2.5 4.5 10.5 12.5 -> even
    np.testing.assert_array_equal(small.y_train, ds.y_train)
    assert data.pooled(ds, 1) is ds
    from early_jax.errors import UserError
    with pytest.raises(UserError, match="larger than the 4x4 images"):
        data.pooled(ds, 5)
