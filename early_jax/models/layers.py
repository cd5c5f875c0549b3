"""Layers with the paper's initialisation (open_lth defaults) shared by every model."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from early_jax.models.cpu_conv import flax_conv_fn, flax_conv_fn_with_barrier

def he_normal_untruncated(key, shape, dtype=jnp.float32):
    """He/Kaiming normal N(0, 2 / fan_in), fan_in = prod(shape[:-1]) (HWIO conv or (in, out) dense
    kernels), *untruncated* (`nn.initializers.he_normal` would truncate).

    The same numbers as `variance_scaling(2.0, "fan_in", "normal")`, but drawn flat and reshaped:
    XLA:CPU compiles a threefry draw of a 4-D shape several times slower (partitionable threefry
    numbers the draws by flat index, so the values do not change).
    """
    std = jnp.sqrt(jnp.asarray(2.0 / math.prod(shape[:-1]), dtype))
    return (jax.random.normal(key, (math.prod(shape),), dtype) * std).reshape(shape)


def symmetric_uniform(limit: float):
    """U(-limit, limit): PyTorch's default bias init with limit = 1/sqrt(fan_in)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    return init


def uniform_01(key, shape, dtype=jnp.float32):
    """BatchNorm scale ~ U[0, 1], the pre-1.2 PyTorch default that the paper's code keeps."""
    return jax.random.uniform(key, shape, dtype)


BN_SCALE_INITS = {"uniform": uniform_01, "ones": nn.initializers.ones}


def batch_norm(train: bool, scale_init: str, dtype, name: str) -> nn.BatchNorm:
    """PyTorch's BatchNorm defaults in Flax terms: running-average momentum 0.9, eps 1e-5."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        scale_init=BN_SCALE_INITS[scale_init], name=name)


def conv_barrier_enabled() -> bool:
    """The CPU fusion barrier before conv inputs (see cpu_conv); `EARLY_JAX_CONV_BARRIER=0` turns it
    off (for speed comparisons; numbers are the same either way)."""
    return os.environ.get("EARLY_JAX_CONV_BARRIER", "1").lower() not in ("0", "false", "no", "off")


_target = contextvars.ContextVar("early_jax_target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace models for `platform` ('cpu', 'gpu', 'tpu'): the platform the program will run on,
    which an ahead-of-time compile for a TPU topology does not share with the host tracing it."""
    token = _target.set(platform)
    try:
        yield
    finally:
        _target.reset(token)


def target_platform() -> str:
    return _target.get() or jax.default_backend()


def conv_impl():
    """On CPU, convolutions with canonical-form gradients and a fusion barrier on their inputs
    (see cpu_conv); elsewhere XLA's own. Chosen for the platform being compiled for."""
    if target_platform() != "cpu":
        return None
    return flax_conv_fn_with_barrier if conv_barrier_enabled() else flax_conv_fn


def conv(features: int, kernel: int, stride: int = 1, *, use_bias: bool = False, fan_in: int = 0,
         dtype=jnp.float32, name: str) -> nn.Conv:
    """An NHWC conv padded by kernel//2 on every side, as PyTorch's padding=k//2: XLA's 'SAME'
    pads a stride-2 conv on one side only, which centres a 3x3/2 conv on odd pixels while its 1x1/2
    shortcut samples even ones. With a bias, the bias is U(+-1/sqrt(fan_in)) as in PyTorch."""
    bias_init = symmetric_uniform(1 / math.sqrt(fan_in)) if use_bias else nn.initializers.zeros
    pad = (kernel // 2, kernel // 2)
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=(pad, pad), use_bias=use_bias,
                   kernel_init=he_normal_untruncated, bias_init=bias_init, dtype=dtype, conv_general_dilated=conv_impl(),
                   name=name)


def head(x: jax.Array, num_classes: int, dtype) -> jax.Array:
    """The output layer, always named 'head' so that an ignore list can name it."""
    dense = nn.Dense(num_classes, kernel_init=he_normal_untruncated,
                     bias_init=symmetric_uniform(1 / math.sqrt(x.shape[-1])), dtype=dtype, name="head")
    return dense(x).astype(jnp.float32)


global_average_pool = functools.partial(jnp.mean, axis=(1, 2))


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int] | None = None,
             padding: str = "VALID") -> jax.Array:
    """`nn.max_pool` with a fast gradient for non-overlapping windows (window == strides, VALID).

    XLA differentiates `reduce_window` max through select-and-gather/scatter, which on XLA:CPU
    cost about half of the CPU preset's training step. For the 2x2/2 pools of the small convnets
    and VGG the windows tile the input, so forward and gradient are plain reshapes, reductions
    and elementwise selects (~40% off the CPU preset's step, measured). The gradient goes to the
    first maximum of each window in row-major order, as XLA's select-and-scatter (and PyTorch)
    do, so the numbers are the same, bit for bit (tests/test_speed_options.py).
    """
    strides = tuple(strides or window)
    if tuple(window) != strides or padding != "VALID" or x.ndim != 4:
        return nn.max_pool(x, tuple(window), strides, padding=padding)
    return _tiled_max_pool(x, tuple(window))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max_pool(x, window):
    return _tiled_max(x, window)[0]


def _tiled_max(x, window):
    (kh, kw), (n, h, w, c) = window, x.shape
    ho, wo = h // kh, w // kw
    tiles = x[:, :ho * kh, :wo * kw].reshape(n, ho, kh, wo, kw, c)
    return tiles.max(axis=(2, 4)), tiles


def _tiled_max_pool_fwd(x, window):
    return _tiled_max(x, window)[0], x


def _tiled_max_pool_bwd(window, x, g):
    (kh, kw), (n, h, w, c) = window, x.shape
    ho, wo = g.shape[1:3]
    tiles = x[:, :ho * kh, :wo * kw].reshape(n, ho, kh, wo, kw, c)
    elems = [tiles[:, :, i, :, j, :] for i in range(kh) for j in range(kw)]  # row-major window order
    # Element k takes the gradient iff it beats every earlier element and ties or beats every later
    # one: the first maximum, as select-and-scatter picks it. Comparing window elements with each
    # other (not with the saved maximum) stays exact even where XLA recomputes x in the backward
    # pass with a different rounding than the forward pass had.
    picked = []
    for k, e in enumerate(elems):
        take = None
        for j, other in enumerate(elems):
            if j != k:
                beats = e > other if j < k else e >= other
                take = beats if take is None else take & beats
        picked.append(g if take is None else jnp.where(take, g, jnp.zeros((), g.dtype)))
    dx = jnp.stack(picked, axis=3).reshape(n, ho, wo, kh, kw, c).transpose(0, 1, 3, 2, 4, 5)
    dx = dx.reshape(n, ho * kh, wo * kw, c)
    if dx.shape != x.shape:  # VALID dropped the last rows/columns: they get no gradient
        dx = jnp.pad(dx, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0)))
    return (dx,)


_tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)
