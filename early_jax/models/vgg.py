"""CIFAR VGG (open_lth's cifar_vgg plans): conv3x3 with bias + BN + ReLU, 2x2 max-pools, fc head."""
from __future__ import annotations

from typing import Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from early_jax.models.layers import batch_norm, conv, global_average_pool, head, max_pool

M = "M"  # 2x2 max-pool
VGG_PLANS = {
    11: (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512),
    13: (64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512),
    16: (64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512),
    19: (64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512, 512),
}


class VGG(nn.Module):
    """The head averages whatever spatial extent is left (2x2 on CIFAR), so 28x28 inputs work too."""

    plan: Sequence[Union[int, str]]
    num_classes: int = 10
    bn_scale_init: str = "uniform"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        for i, item in enumerate(self.plan):
            if item == M:
                x = max_pool(x, (2, 2))
                continue
            fan_in = 9 * x.shape[-1]
            x = conv(item, 3, use_bias=True, fan_in=fan_in, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(batch_norm(train, self.bn_scale_init, self.dtype, f"bn{i}")(x))
        return head(global_average_pool(x), self.num_classes, self.dtype)
