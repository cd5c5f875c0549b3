"""Small networks: LeNet-300-100 (the lottery-ticket classic) and a convnet that trains fast on CPU."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from early_jax.models.layers import batch_norm, conv, head, he_normal_untruncated, max_pool


class LeNet300100(nn.Module):
    """Fully connected 300-100 with ReLU; no BatchNorm."""

    num_classes: int = 10
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, width in enumerate((300, 100)):
            x = nn.relu(nn.Dense(width, kernel_init=he_normal_untruncated, dtype=self.dtype,
                                 name=f"fc{i}")(x))
        return head(x, self.num_classes, self.dtype)


class SmallConvNet(nn.Module):
    """conv3x3-BN-ReLU + 2x2 max-pool stages, then flatten, a hidden dense layer and the head.

    Flattening (rather than global pooling) keeps the spatial layout that small images need; the
    dense layers are cheap on CPU, where the convolutions dominate the cost.
    """

    widths: Sequence[int] = (16, 32)
    hidden: int = 128
    num_classes: int = 10
    bn_scale_init: str = "uniform"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = conv(width, 3, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(batch_norm(train, self.bn_scale_init, self.dtype, f"bn{i}")(x))
            x = max_pool(x, (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, kernel_init=he_normal_untruncated, dtype=self.dtype,
                             name="fc")(x))
        return head(x, self.num_classes, self.dtype)
