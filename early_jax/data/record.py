"""The dataset record every source produces and every consumer reads."""
from __future__ import annotations

import dataclasses

import numpy as np

from early_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Whole train and test splits as host arrays; moved to the device once per run.

    Images are uint8 NHWC so that the whole training set fits on the device cheaply;
    normalisation uses the per-channel `mean`/`std` (in [0, 1] pixel units) of the training split.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def make_dataset(name, x_train, y_train, x_test, y_test, num_classes=None) -> Dataset:
    """Validate raw arrays and compute the training split's channel statistics."""
    x_train, x_test = (_as_nhwc_uint8(x, name) for x in (x_train, x_test))
    y_train, y_test = (np.asarray(y, np.int32).reshape(-1) for y in (y_train, y_test))
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise UserError(f"dataset {name!r}: image and label counts differ "
                         f"(train {len(x_train)} vs {len(y_train)}, test {len(x_test)} vs {len(y_test)})")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(f"dataset {name!r}: train images {x_train.shape[1:]} and test images "
                         f"{x_test.shape[1:]} have different shapes")
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    if min(y_train.min(initial=0), y_test.min(initial=0)) < 0 or max(y_train.max(initial=0), y_test.max(initial=0)) >= num_classes:
        raise UserError(f"dataset {name!r}: labels must lie in [0, {num_classes})")
    mean, std = _channel_stats(x_train)
    return Dataset(name, x_train, y_train, x_test, y_test, int(num_classes),
                   mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32))


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in [0, 1] units from a 256-bin histogram (exact for uint8, and ~10x
    faster than float64 reductions over 50k images)."""
    flat = images.reshape(-1, images.shape[-1])
    values = np.arange(256, dtype=np.float64) / 255.0
    counts = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(flat.shape[1])])
    mean = counts @ values / len(flat)
    var = counts @ values ** 2 / len(flat) - mean ** 2
    return mean, np.sqrt(np.maximum(var, 0.0))


def _as_nhwc_uint8(x, name) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:  # grayscale without a channel axis
        x = x[..., None]
    if x.ndim != 4:
        raise UserError(f"dataset {name!r}: images must be [N,H,W] or [N,H,W,C], got shape {x.shape}")
    if x.dtype != np.uint8:
        raise UserError(f"dataset {name!r}: images must be uint8, got {x.dtype}")
    if x.shape[1] in (1, 3) and x.shape[-1] > 4:
        raise UserError(f"dataset {name!r}: images of shape {x.shape} look channels-first (NCHW); "
                         "store them as [N,H,W,C], e.g. x.transpose(0, 2, 3, 1)")
    return x
