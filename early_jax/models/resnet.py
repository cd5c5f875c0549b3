"""ResNets: CIFAR ResNet-20/32/44/56/110 (He et al. 2015, projection shortcuts as in open_lth)
and the ImageNet-style ResNet-18."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from early_jax.models.layers import batch_norm, conv, global_average_pool, head


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU; 1x1 conv + BN shortcut when the shape changes."""

    features: int
    stride: int
    bn_scale_init: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda name: batch_norm(train, self.bn_scale_init, self.dtype, name)
        y = nn.relu(bn("bn1")(conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)))
        y = bn("bn2")(conv(self.features, 3, dtype=self.dtype, name="conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = bn("shortcut_bn")(conv(self.features, 1, self.stride, dtype=self.dtype,
                                       name="shortcut_conv")(x))
        return nn.relu(y + x)


class ResNet(nn.Module):
    """Stem, stages of basic blocks (widths w, 2w, 4w, ...; stride 2 entering each later stage),
    global average pool, head. stem="cifar": conv3x3 (He et al.'s CIFAR ResNets);
    stem="imagenet": conv7x7/2 then 3x3/2 max-pool (torchvision's ResNet-18)."""

    stage_sizes: Sequence[int]
    stem: str = "cifar"
    num_classes: int = 10
    width: int = 16
    bn_scale_init: str = "uniform"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kernel, stride = (3, 1) if self.stem == "cifar" else (7, 2)
        x = conv(self.width, kernel, stride, dtype=self.dtype, name="stem_conv")(x.astype(self.dtype))
        x = nn.relu(batch_norm(train, self.bn_scale_init, self.dtype, "stem_bn")(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # torchvision's padding=1
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2 ** stage, stride, self.bn_scale_init, self.dtype,
                               name=f"stage{stage + 1}_block{block}")(x, train)
        return head(global_average_pool(x), self.num_classes, self.dtype)


def cifar_resnet_blocks(depth: int) -> int:
    """depth = 6n + 2 for n blocks per stage (8, 14, 20, 32, 44, 56, 110)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return (depth - 2) // 6

