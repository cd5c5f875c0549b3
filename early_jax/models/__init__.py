"""Models by name, their initial variables, and which of their parameters are prunable."""
from __future__ import annotations

import fnmatch
import re

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from early_jax.errors import UserError
from early_jax.models.resnet import ResNet, cifar_resnet_blocks
from early_jax.models.small import LeNet300100, SmallConvNet
from early_jax.models.vgg import VGG, VGG_PLANS

_CIFAR_RESNET = re.compile(r"resnet(8|14|20|32|44|56|110)(?:_w(\d+))?$")
_VGG = re.compile(r"vgg(11|13|16|19)$")
FIXED_MODELS = ("resnet18", "lenet300_100", "convnet_small", "convnet_tiny")
MODEL_NAMES = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet20_w<W>",
               "vgg11", "vgg13", "vgg16", "vgg19") + FIXED_MODELS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create(name: str, num_classes: int = 10, *, bn_scale_init: str = "uniform",
           dtype: str = "float32") -> nn.Module:
    """A Linen module by name; `dtype` is the compute dtype (parameters stay float32).

    Names: resnet{8,14,20,32,44,56,110} with optional `_w<W>` first-stage width (default 16),
    vgg{11,13,16,19}, resnet18 (ImageNet-style), lenet300_100, convnet_small, convnet_tiny.
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown compute dtype {dtype!r}: use one of {list(DTYPES)}")
    if bn_scale_init not in ("uniform", "ones"):
        raise UserError(f"unknown BatchNorm scale init {bn_scale_init!r}: use 'uniform' or 'ones'")
    common = dict(num_classes=num_classes, dtype=DTYPES[dtype])
    norm = dict(common, bn_scale_init=bn_scale_init)
    if match := _CIFAR_RESNET.match(name):
        return ResNet((cifar_resnet_blocks(int(match.group(1))),) * 3, "cifar",
                      width=int(match.group(2) or 16), **norm)
    if match := _VGG.match(name):
        return VGG(VGG_PLANS[int(match.group(1))], **norm)
    if name == "resnet18":
        return ResNet((2, 2, 2, 2), "imagenet", width=64, **norm)
    if name == "lenet300_100":
        return LeNet300100(**common)
    if name == "convnet_small":
        return SmallConvNet((16, 32), 128, **norm)
    if name == "convnet_tiny":
        return SmallConvNet((4, 8), 16, **norm)
    raise UserError(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)}")


def init_variables(model: nn.Module, key: jax.Array, input_shape) -> dict:
    """{'params': ..., 'batch_stats': ...} for one example shape (H, W, C); batch_stats may be empty."""
    variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def is_ignored(path: str, ignore) -> bool:
    """An ignore pattern matches the path itself or any module above it ('head' ignores head/kernel)."""
    return any(fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.rstrip("/") + "/*")
               for pat in ignore)


def prunable_paths(params, ignore=()) -> tuple[str, ...]:
    """Paths ('stage1_block0/conv1/kernel') of the conv and dense kernels, minus ignored ones.

    Biases and BatchNorm parameters are never prunable. Sorted, so every consumer agrees on order.
    """
    flat = flax.traverse_util.flatten_dict(params)
    paths = sorted(path_str(p) for p in flat if p[-1] == "kernel")
    return tuple(p for p in paths if not is_ignored(p, ignore))
