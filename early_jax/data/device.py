"""On-device batching and augmentation: pure jnp functions used inside the compiled train step.

The whole training split lives on the device as uint8; each step gathers its batch from a per-seed
permutation of the epoch, so no host input pipeline sits in the hot loop.
"""
from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TrainArrays:
    """What the train step reads: images and the labels of the current task."""

    images: jax.Array            # uint8 [N, H, W, C]
    labels: jax.Array            # int32 [N]: true labels, fixed random labels, or rotation classes
    mean: jax.Array              # float32 [C], pixel units in [0, 1]
    std: jax.Array               # float32 [C]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Static settings of the input transforms (part of the compiled program, not traced)."""

    augment: bool = True         # pad-4 random crop and horizontal flip
    crop_padding: int = 4
    blur_factor: int = 1         # >1: downsample by this factor and upsample back (antialiased)
    rotation: str = ""           # rotation prediction: "label" turns each example by its label
                                 # (fixed quarter turns), "redraw" by a fresh random turn each visit
                                 # that becomes its label; "" none
    rotate_first: bool = False   # rotate before crop and flip (the paper's code) rather than after


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """ceil(N / B), as PyTorch's loader with drop_last=False (391 for CIFAR-10 at batch 128)."""
    return math.ceil(num_examples / batch_size)


def epoch_permutation(order_key: jax.Array, epoch, num_examples: int) -> jax.Array:
    """The data order of one epoch: a function of (key, epoch) only, so any step can be replayed."""
    return jax.random.permutation(jax.random.fold_in(order_key, epoch), num_examples)


def batch_indices(permutation: jax.Array, position, batch_size: int) -> jax.Array:
    """Indices of batch `position` of an epoch.

    The last batch of an epoch is topped up from the start of the same permutation, so every batch
    has the static shape the compiled step needs and every example is still seen each epoch.
    """
    n = permutation.shape[0]
    padded = jnp.concatenate([permutation, permutation[: steps_per_epoch(n, batch_size) * batch_size - n]])
    return jax.lax.dynamic_slice_in_dim(padded, position * batch_size, batch_size)


def padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> dict:
    """Host arrays as [num_batches, B, ...] with zero-weight padding, for one scan over a split:
    {x, y, w (1 real, 0 padding), count}."""
    n = len(x)
    batch_size = max(1, min(batch_size, n))
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    shape = lambda a: a.reshape(num_batches, batch_size, *a.shape[1:])
    return {"x": shape(x), "y": shape(y), "w": shape(w), "count": np.float32(n)}


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """uint8 or [0, 1] float pixels -> zero-mean, unit-std channels."""
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    return (images - mean) / std


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Zero-pad each side by `padding` and cut a random window of the original size per example."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirror each example left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def blur(images: jax.Array, factor: int) -> jax.Array:
    """Downsample by `factor` and back, bilinear with antialiasing (the paper's blurred inputs)."""
    if factor <= 1:
        return images
    n, h, w, c = images.shape
    small = jax.image.resize(images, (n, h // factor, w // factor, c), "bilinear", antialias=True)
    return jax.image.resize(small, images.shape, "bilinear", antialias=True)


def rotate_quarter_turns(images: jax.Array, turns: jax.Array) -> jax.Array:
    """Rotate example i counter-clockwise by 90 * turns[i] degrees, exactly (square images)."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"rotation needs square images, got {images.shape[1:3]}")
    rotations = jnp.stack([jnp.rot90(images, k, axes=(1, 2)) for k in range(4)])
    return rotations[turns % 4, jnp.arange(images.shape[0])]


def train_batch(arrays: TrainArrays, prep: Preprocess, permutation: jax.Array, position,
                batch_size: int, augment_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One training batch: gather, crop and flip, rotate (if the task does), blur, normalise.

    Rotating after the flip keeps the four rotation classes apart: flipping a 90-degree turn gives
    a 270-degree turn of the flipped image, so with the paper's code order (`rotate_first`: rotate,
    then flip) the 90 and 270 classes see the same distribution of inputs.
    """
    idx = batch_indices(permutation, position, batch_size)
    images, labels = arrays.images[idx], arrays.labels[idx]
    if prep.rotation == "redraw":
        labels = jax.random.randint(jax.random.fold_in(augment_key, 2), (batch_size,), 0, 4)
    rotate = (lambda im: rotate_quarter_turns(im, labels)) if prep.rotation else (lambda im: im)
    if prep.rotate_first:
        images = rotate(images)
    if prep.augment:
        crop_key, flip_key = jax.random.split(augment_key)
        images = random_flip(flip_key, random_crop(crop_key, images, prep.crop_padding))
    if not prep.rotate_first:
        images = rotate(images)
    if prep.blur_factor > 1:
        images = blur(images.astype(jnp.float32) / 255.0, prep.blur_factor)
    return normalize(images, arrays.mean, arrays.std), labels


def fixed_random_labels(labels: np.ndarray, num_classes: int, fraction: float,
                        rng: np.random.Generator) -> np.ndarray:
    """Replace a random `fraction` of the labels with uniform random classes, fixed for the run."""
    chosen = rng.permutation(len(labels))[: round(fraction * len(labels))]
    out = np.array(labels, np.int32)
    out[chosen] = rng.integers(0, num_classes, len(chosen))
    return out


def fixed_quarter_turns(num_examples: int, rng: np.random.Generator) -> np.ndarray:
    """One rotation class in {0,1,2,3} per example, drawn once (not redrawn per epoch)."""
    return rng.integers(0, 4, num_examples).astype(np.int32)


def rotate_host(images: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Host-side exact rotation of each example by its own quarter turns (fixed-rotation tasks)."""
    out = np.empty_like(images)
    for k in range(4):
        chosen = turns % 4 == k
        out[chosen] = np.rot90(images[chosen], k, axes=(1, 2))
    return out
