"""A 2-D convolution whose gradients XLA:CPU runs at full speed, also inside loops.

XLA:CPU hands a convolution to its fast Eigen kernel only in the canonical form (NHWC input, HWIO
kernel, NHWC output). Autodiff's kernel and input gradients come out in other dimension orders; the
compiler rewrites them into the canonical form only in the entry computation, so inside a
`lax.scan`/`cond` body they fall back to a naive loop nest (30-40x slower, measured). Here the
gradients are written as canonical convolutions with explicit transposes, which stay canonical
wherever they are compiled. Used on the CPU backend only; numerically it is the same convolution.

Fusion barrier (`barrier=True`): the kernel gradient reads the conv input transposed. XLA:CPU
fuses that transpose with the whole BatchNorm/ReLU/residual chain that produced the input and
recomputes the chain with a cache-hostile access pattern (300-550 ms of a ~1 s ResNet-20 step,
measured). `fusion_barrier` makes XLA write the input to memory once: a `lax.cond` on a run-time
predicate whose branches both return the input (`optimization_barrier` does not work here: XLA:CPU
strips it before fusion). Under vmap the predicate stays unbatched (a custom vmap rule), otherwise
vmap would turn the cond into a fusible select. It is an identity, so numbers do not change.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")
KERNEL_GRAD_CHUNK = 16  # examples per kernel-gradient convolution (see _kernel_grad)


def _cond_identity(v):
    pred = lax.reshape(lax.slice(v, (0,) * v.ndim, (1,) * v.ndim), ()) != 0
    return lax.cond(pred, lambda u: u, lambda u: u * jnp.ones((), u.dtype), v)


@jax.custom_batching.custom_vmap
def fusion_barrier(v):
    """Identity that XLA:CPU cannot fuse through (the value is materialised once)."""
    return _cond_identity(v)


@fusion_barrier.def_vmap
def _fusion_barrier_vmap(axis_size, in_batched, v):
    return _cond_identity(v), in_batched[0]


def _forward(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def canonical_conv(x, w, strides, pads, barrier=False):
    """NHWC x HWIO conv with explicit (lo, hi) padding pairs and no dilation.

    `barrier`: put a fusion barrier on the input when it is differentiated (see the module doc).
    """
    return _forward(x, w, strides, pads)


def _fwd(x, w, strides, pads, barrier):
    if barrier:
        x = fusion_barrier(x)
    return _forward(x, w, strides, pads), (x, w)


def _input_grad(g, w, x_shape, strides, pads):
    """d/dx: correlate the stride-dilated output gradient with the flipped, I/O-swapped kernel."""
    flipped = jnp.flip(w, (0, 1)).swapaxes(2, 3)
    grad_pads = []
    for axis, (lo, _) in enumerate(pads):
        k, s = w.shape[axis], strides[axis]
        dilated = (g.shape[1 + axis] - 1) * s + 1
        new_lo = k - 1 - lo
        grad_pads.append((new_lo, x_shape[1 + axis] - dilated - new_lo + k - 1))
    return lax.conv_general_dilated(g, flipped, (1, 1), grad_pads, lhs_dilation=strides,
                                    dimension_numbers=NHWC)


def _kernel_grad(g, x, w_shape, strides, pads):
    """d/dw, summed over chunks of KERNEL_GRAD_CHUNK examples where the input is 16x16 or larger.

    The kernel-gradient convolution has the batch as its feature axis; Eigen runs it 1.4-1.9x
    faster on 16 features than on 128 (ResNet-20's 32x32 and 16x16 stages, measured on AVX-512;
    no gain at 8x8, where one convolution is kept).
    """
    n, chunk = x.shape[0], KERNEL_GRAD_CHUNK
    if n <= chunk or n % chunk or min(x.shape[1:3]) < 16:
        return _kernel_grad_whole(g, x, w_shape, strides, pads)
    parts = [_kernel_grad_whole(g[i:i + chunk], x[i:i + chunk], w_shape, strides, pads).astype(jnp.float32)
             for i in range(0, n, chunk)]  # summed in float32 also under bfloat16 compute
    return functools.reduce(jnp.add, parts).astype(x.dtype)


def _kernel_grad_whole(g, x, w_shape, strides, pads):
    """d/dw: input channels act as the batch and the batch as the feature axis (canonical form)."""
    grad_pads = []
    for axis, (lo, _) in enumerate(pads):
        k, s, size = w_shape[axis], strides[axis], x.shape[1 + axis]
        hi = k + (g.shape[1 + axis] - 1) * s - size - lo
        if hi < 0:  # the stride never reaches the last rows: drop them instead of negative padding
            x = lax.slice_in_dim(x, 0, size + hi, axis=1 + axis)
            hi = 0
        grad_pads.append((lo, hi))
    out = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), grad_pads,
                                   rhs_dilation=strides, dimension_numbers=NHWC)
    return out.transpose(1, 2, 0, 3)


def _bwd(strides, pads, barrier, residuals, g):
    x, w = residuals
    return (_input_grad(g, w, x.shape, strides, pads).astype(x.dtype),
            _kernel_grad(g, x, w.shape, strides, pads).astype(w.dtype))


canonical_conv.defvjp(_fwd, _bwd)


def flax_conv_fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None, *, barrier=False,
                 **unused):
    """The `conv_general_dilated` signature flax's `nn.Conv` calls, for plain NHWC convolutions.

    `barrier=True` adds the fusion barrier on differentiated inputs (bind with functools.partial).
    """
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) or feature_group_count != 1:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return canonical_conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), barrier)


# The same, with the fusion barrier (one shared object, so models compare equal).
flax_conv_fn_with_barrier = functools.partial(flax_conv_fn, barrier=True)
