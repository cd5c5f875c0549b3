"""Pruning masks as pytrees: a nested dict holding one boolean array per prunable kernel.

A mask mirrors the parameter tree but only contains the prunable kernels (True = kept); every other
parameter (biases, BatchNorm) is absent and therefore never pruned.
"""
from __future__ import annotations

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp

from early_jax.models import path_str, prunable_paths


def _split(path: str) -> tuple:
    return tuple(path.split("/"))


def prunable_mask(params, ignore=()) -> dict:
    """The all-True mask over the conv and dense kernels not matched by `ignore`."""
    flat = traverse.flatten_dict(params)
    return traverse.unflatten_dict({_split(p): jnp.ones(flat[_split(p)].shape, bool)
                                    for p in prunable_paths(params, ignore)})


def apply_mask(params, mask):
    """Zero the pruned entries; parameters absent from the mask pass through unchanged."""
    flat_mask = traverse.flatten_dict(mask)
    flat = traverse.flatten_dict(params)
    return traverse.unflatten_dict({k: jnp.where(flat_mask[k], v, jnp.zeros_like(v)) if k in flat_mask
                                    else v for k, v in flat.items()})


def masked_kernels(params, mask) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{path: (kernel, mask)} for each prunable kernel, in the sorted order every consumer shares."""
    flat_mask = traverse.flatten_dict(mask)
    flat = traverse.flatten_dict(params)
    return {path_str(k): (flat[k], flat_mask[k]) for k in sorted(flat_mask, key=path_str)}


def _from_paths(masks_by_path: dict) -> dict:
    return traverse.unflatten_dict({_split(p): m for p, m in masks_by_path.items()})


def _keep_smallest_out(scores: jax.Array, kept: jax.Array, fraction: float) -> jax.Array:
    """Remove ceil(fraction * remaining) of the kept entries with the lowest score.

    Pruned entries score +inf so they are never chosen (and never revived); ties go to the lower flat
    index because the sort is stable, which makes the result deterministic.
    """
    remaining = kept.sum()
    to_remove = jnp.ceil(fraction * remaining).astype(jnp.int32)
    scores = jnp.where(kept, scores, jnp.inf)
    rank = jnp.empty_like(scores, dtype=jnp.int32).at[jnp.argsort(scores, stable=True)].set(
        jnp.arange(scores.size, dtype=jnp.int32))
    return kept & (rank >= to_remove)


def _prune_by_scores(scores: dict, mask: dict, fraction: float, scope: str) -> dict:
    paths = list(scores)
    if scope == "layerwise":
        return _from_paths({p: _keep_smallest_out(scores[p].ravel(), masks.ravel(), fraction)
                            .reshape(masks.shape) for p, masks in mask.items()})
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    flat_scores = jnp.concatenate([scores[p].ravel() for p in paths])
    flat_kept = jnp.concatenate([mask[p].ravel() for p in paths])
    new = _keep_smallest_out(flat_scores, flat_kept, fraction)
    sizes = [mask[p].size for p in paths]
    return _from_paths({p: new[o:o + n].reshape(mask[p].shape)
                        for p, o, n in zip(paths, _offsets(sizes), sizes)})


def _offsets(sizes) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


def magnitude_prune(params, mask, fraction: float, scope: str = "global") -> dict:
    """Remove `fraction` of the *remaining* weights with the smallest |w| (one threshold if global)."""
    pairs = masked_kernels(params, mask)
    return _prune_by_scores({p: jnp.abs(w) for p, (w, _) in pairs.items()},
                            {p: m for p, (_, m) in pairs.items()}, fraction, scope)


def random_prune(key: jax.Array, mask_like, density: float, scope: str = "global") -> dict:
    """The random-subnetwork control: keep a uniformly random `density` of the prunable weights.

    Works from the full mask shape (the pruned pattern of `mask_like` is ignored), so the count kept
    is exactly round(density * size) globally or per layer.
    """
    flat = {path_str(k): v for k, v in traverse.flatten_dict(mask_like).items()}
    paths = sorted(flat)
    keys = jax.random.split(key, len(paths))
    scores = {p: jax.random.uniform(k, flat[p].shape) for p, k in zip(paths, keys)}
    full = {p: jnp.ones(flat[p].shape, bool) for p in paths}
    if scope == "layerwise":
        return _from_paths({p: _keep_random(scores[p], density) for p in paths})
    flat_scores = jnp.concatenate([scores[p].ravel() for p in paths])
    kept = _keep_random(flat_scores, density)
    sizes = [full[p].size for p in paths]
    return _from_paths({p: kept[o:o + n].reshape(full[p].shape)
                        for p, o, n in zip(paths, _offsets(sizes), sizes)})


def _keep_random(scores: jax.Array, density: float) -> jax.Array:
    keep = round(density * scores.size)
    rank = jnp.argsort(jnp.argsort(scores.ravel()))
    return (rank < keep).reshape(scores.shape)


def density(mask) -> jax.Array:
    """Fraction of prunable weights kept, for one network (vmap it over a seed axis)."""
    leaves = jax.tree.leaves(mask)
    return sum(m.sum() for m in leaves) / sum(m.size for m in leaves)


def sparsity_report(mask) -> dict:
    """{path: (kept, total)} per prunable layer plus 'total' (host ints, for tables and logs)."""
    report = {path_str(k): (int(v.sum()), int(v.size)) for k, v in traverse.flatten_dict(mask).items()}
    report["total"] = tuple(sum(x[i] for x in report.values()) for i in (0, 1))
    return report

