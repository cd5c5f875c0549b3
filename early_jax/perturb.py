"""Perturbations of the rewound weights W_k (paper section 4): reinit, sign/magnitude mixes,
shuffles, Gaussian noise, and the effective std that puts them all on the noise scale.

Every function is pure on Flax params trees and touches only the kept (mask=True) entries of the
kernels in the mask; pruned entries, biases, BatchNorm and kernels absent from the mask come back
exactly as they went in. Random ones take a key and draw layer i (sorted path order, as in
`masks.masked_kernels`) from `fold_in(key, i)`, so layers are independent and the result is a
function of the key alone. All are jit- and vmap-able over a leading seed axis.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp

from early_jax.errors import UserError
from early_jax.models import path_str

PERTURBATIONS = {
    "reinit": "kept weights from a fresh He-normal draw (the classic lottery-ticket control)",
    "reinit_keep_signs": "fresh He-normal magnitudes with the signs of W_k",
    "signs_k_mags_0": "signs of W_k, magnitudes of W_0 (Fig. 4, C)",
    "signs_k_mags_fresh": "signs of W_k, fresh-init magnitudes (Fig. 4, D; = reinit_keep_signs)",
    "signs_0_mags_k": "signs of W_0, magnitudes of W_k (Fig. 4, E)",
    "shuffle_layer": "permute the kept values within each layer (Fig. 5a)",
    "shuffle_layer_keep_signs": "permute kept magnitudes within each layer, signs stay (Fig. 5b)",
    "shuffle_filter": "permute the kept values within each output channel",
    "shuffle_filter_keep_signs": "permute kept magnitudes within each output channel, signs stay",
    "noise": "add N(0, (scale * sigma_l)^2) to the kept weights of layer l (Fig. 6)",
}


@dataclasses.dataclass(frozen=True)
class Treatment:
    """One perturbation as run: its name (a key of PERTURBATIONS) and, for noise, the multiplier
    n. These two fields are its identity (folders, random streams); `label` is only for display."""

    name: str
    scale: float | None = None

    @property
    def label(self) -> str:
        return f"noise {self.scale:g}x" if self.name == "noise" else self.name

    @property
    def stream_names(self) -> tuple:
        return ("perturbation", self.name) + ((f"{self.scale!r}",) if self.scale is not None else ())


def _sorted_paths(flat_mask) -> list[tuple]:
    return sorted(flat_mask, key=path_str)


def _map_kernels(fn, params, mask, *sources):
    """params with each masked kernel w set to fn(i, path, w, m, *source kernels) where m is True.

    `i` is the kernel's index in sorted path order (for per-layer keys); `sources` are trees whose
    kernels at the same paths are read; everything outside the kept entries is left as it was.
    """
    flat_mask = traverse.flatten_dict(mask)
    flat = traverse.flatten_dict(params, keep_empty_nodes=True)
    flat_sources = [traverse.flatten_dict(s) for s in sources]
    out = dict(flat)
    for i, k in enumerate(_sorted_paths(flat_mask)):
        w, m = flat[k], flat_mask[k]
        new = fn(i, path_str(k), w, m, *(s[k] for s in flat_sources))
        out[k] = jnp.where(m, new.astype(w.dtype), w)
    return traverse.unflatten_dict(out)


def _sign(x: jax.Array) -> jax.Array:
    """+1 or -1, with 0 (and -0.0) counted as +: a kept weight always has a sign to transfer."""
    return jnp.where(x < 0, -1, 1).astype(x.dtype)


def _draw(sampler, key, i: int, w: jax.Array) -> jax.Array:
    """Layer i's random array shaped like w, from fold_in(key, i).

    Drawn flat and reshaped: XLA:CPU compiles threefry on 4-D shapes several times slower.
    """
    return sampler(jax.random.fold_in(key, i), (w.size,), w.dtype).reshape(w.shape)


def _per_layer(sigma, mask) -> dict:
    """{path: sigma_l} from a per-layer tree shaped like the mask, or one scalar for every layer."""
    if isinstance(sigma, Mapping):
        return {path_str(k): v for k, v in traverse.flatten_dict(sigma).items()}
    return {path_str(k): sigma for k in traverse.flatten_dict(mask)}


def init_std(params, mask) -> dict:
    """sigma_l = sqrt(2 / fan_in) per masked kernel: the std of its untruncated He-normal init.

    fan_in = prod(shape[:-1]) for both HWIO conv and (in, out) dense kernels.
    """
    flat = traverse.flatten_dict(params)
    return traverse.unflatten_dict({
        k: jnp.asarray(math.sqrt(2.0 / math.prod(flat[k].shape[:-1])), jnp.float32)
        for k in traverse.flatten_dict(mask)})


def reinit(key, params, mask, keep_signs: bool = False):
    """Kept weights from a fresh N(0, sigma_l^2) draw; with keep_signs, |fresh| * sign(current)."""
    sigma = _per_layer(init_std(params, mask), mask)

    def fresh(i, path, w, m):
        draw = sigma[path] * _draw(jax.random.normal, key, i, w)
        return jnp.abs(draw) * _sign(w) if keep_signs else draw

    return _map_kernels(fresh, params, mask)


def mix_signs_magnitudes(base, signs_from, magnitudes_from, mask):
    """sign(signs_from) * |magnitudes_from| on kept weights; every other entry comes from `base`.

    `base` is the tree the branch trains from (W_k), so its biases, BatchNorm and pruned zeros are
    kept whichever checkpoints lend the signs and magnitudes (e.g. signs of W_0, magnitudes of W_k:
    base=W_k, signs_from=W_0, magnitudes_from=W_k).
    """
    return _map_kernels(lambda i, path, w, m, s, a: _sign(s) * jnp.abs(a),
                        base, mask, signs_from, magnitudes_from)


def _shuffle_kept(order: jax.Array, w: jax.Array, m: jax.Array) -> jax.Array:
    """1-D w with its kept entries permuted among the kept positions in the order of `order`.

    `order` holds distinct integer sort keys (entries of a random permutation; random floats would
    tie in large layers and bias the shuffle). The kept count is data-dependent, so nothing is
    sliced: pruned entries get the largest key, so `source` lists the kept positions in random
    order followed by the pruned ones in index order (stable sort); `slots` lists the kept
    positions in index order followed by the same pruned ones. Scattering w[source] into slots is a
    permutation that maps kept to kept at random and every pruned position to itself.
    """
    source = jnp.argsort(jnp.where(m, order, jnp.iinfo(order.dtype).max), stable=True)
    slots = jnp.argsort(~m, stable=True)
    return w.at[slots].set(w[source])


def shuffle(key, params, mask, within: str = "layer", keep_signs: bool = False):
    """Permute the kept values within each layer, or within each filter (last kernel axis).

    With keep_signs only magnitudes move: each kept position keeps its own sign. The mask, and so
    the set of kept positions, is unchanged.
    """
    if within not in ("layer", "filter"):
        raise ValueError(f"within must be 'layer' or 'filter', got {within!r}")

    def permute(i, path, w, m):
        values = jnp.abs(w) if keep_signs else w
        order = jax.random.permutation(jax.random.fold_in(key, i), w.size).reshape(w.shape)
        if within == "layer":
            moved = _shuffle_kept(order.ravel(), values.ravel(), m.ravel()).reshape(w.shape)
        else:  # one row per filter: (out_channels, everything else)
            rows = (x.reshape(-1, w.shape[-1]).T for x in (order, values, m))
            moved = jax.vmap(_shuffle_kept)(*rows).T.reshape(w.shape)
        return moved * _sign(w) if keep_signs else moved

    return _map_kernels(permute, params, mask)


def gaussian_noise(key, params, mask, scale, sigma):
    """Add N(0, (scale * sigma_l)^2) to kept weights; `sigma` is a per-layer tree or one scalar."""
    sigma = _per_layer(sigma, mask)

    def noisy(i, path, w, m):
        return w + scale * sigma[path] * _draw(jax.random.normal, key, i, w)

    return _map_kernels(noisy, params, mask)


def effective_std(before, after, mask, sigma) -> dict:
    """{path: std over kept entries of (after - before) / sigma_l, 'overall': ..., 'raw': ...}.

    Puts any perturbation on the scale of Gaussian noise `n` (whose effective std is ~n).
    'overall' is the kept-count-weighted mean of the per-layer values (paper_spec 4.3), so large
    layers dominate as they do in the network. 'raw' is the std of (after - before) over every kept
    weight of the network, unscaled (the paper quotes it in weight units). std is the population
    std (ddof=0); a layer with nothing kept reads 0 and carries no weight.
    """
    sigma = _per_layer(sigma, mask)
    flat_mask, flat_b, flat_a = (traverse.flatten_dict(t) for t in (mask, before, after))
    out, counts, sums, squares = {}, {}, {}, {}
    for k in _sorted_paths(flat_mask):
        m, path = flat_mask[k], path_str(k)
        diff = jnp.where(m, flat_a[k] - flat_b[k], 0)
        n = m.sum()
        mean = diff.sum() / jnp.maximum(n, 1)
        var = jnp.where(m, (diff - mean) ** 2, 0).sum() / jnp.maximum(n, 1)
        out[path], counts[path] = jnp.sqrt(var) / sigma[path], n
        sums[path], squares[path] = diff.sum(), (diff ** 2).sum()
    total = jnp.maximum(sum(counts.values()), 1)
    out["overall"] = sum(out[p] * counts[p] for p in counts) / total
    pooled_mean = sum(sums.values()) / total
    out["raw"] = jnp.sqrt(jnp.maximum(sum(squares.values()) / total - pooled_mean ** 2, 0))
    return out


_DISPATCH = {
    "reinit": lambda key, w_k, w_0, mask: reinit(key, w_k, mask),
    "reinit_keep_signs": lambda key, w_k, w_0, mask: reinit(key, w_k, mask, keep_signs=True),
    "signs_k_mags_0": lambda key, w_k, w_0, mask: mix_signs_magnitudes(w_k, w_k, w_0, mask),
    "signs_k_mags_fresh": lambda key, w_k, w_0, mask: mix_signs_magnitudes(
        w_k, w_k, reinit(key, w_k, mask), mask),
    "signs_0_mags_k": lambda key, w_k, w_0, mask: mix_signs_magnitudes(w_k, w_0, w_k, mask),
    "shuffle_layer": lambda key, w_k, w_0, mask: shuffle(key, w_k, mask, "layer"),
    "shuffle_layer_keep_signs": lambda key, w_k, w_0, mask: shuffle(key, w_k, mask, "layer", True),
    "shuffle_filter": lambda key, w_k, w_0, mask: shuffle(key, w_k, mask, "filter"),
    "shuffle_filter_keep_signs": lambda key, w_k, w_0, mask: shuffle(key, w_k, mask, "filter",
                                                                     True),
}


def apply(name: str, key, w_k, w_0, mask, scale=None):
    """The perturbation `name` (see PERTURBATIONS) of the rewound, masked weights w_k.

    w_0 is the same seed's masked init (used by the sign/magnitude mixes); `scale` is the noise
    multiplier n, required for 'noise' (whose sigma_l is the layer's init std).
    """
    if name not in PERTURBATIONS:
        raise UserError(f"unknown perturbation {name!r}: use one of {', '.join(PERTURBATIONS)}")
    if name == "noise":
        if scale is None:
            raise UserError("the 'noise' perturbation needs a scale (the multiplier n of sigma_l)")
        return gaussian_noise(key, w_k, mask, scale, init_std(w_k, mask))
    return _DISPATCH[name](key, w_k, w_0, mask)
