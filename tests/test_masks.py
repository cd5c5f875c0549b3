import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import masks


def tree(rng):
    """A params-like tree: two prunable kernels, a bias and a BatchNorm scale."""
    return {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                     "bias": jnp.ones(4)},
            "bn": {"scale": jnp.ones(4)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}}


def kept_and_pruned(params, mask):
    kept, pruned = [], []
    for w, m in masks.masked_kernels(params, mask).values():
        w, m = np.abs(np.asarray(w)), np.asarray(m)
        kept.append(w[m])
        pruned.append(w[~m])
    return np.concatenate(kept), np.concatenate(pruned)


def test_prunable_mask_covers_kernels_only_and_respects_ignore(rng):
    params = tree(rng)
    mask = masks.prunable_mask(params)
    assert set(mask) == {"conv", "head"} and set(mask["conv"]) == {"kernel"}
    assert masks.prunable_mask(params, ignore=("head",)).keys() == {"conv"}


def test_global_pruning_removes_the_right_count_by_one_threshold(rng):
    params = tree(rng)
    mask = masks.magnitude_prune(params, masks.prunable_mask(params), 0.2)
    kept, pruned = kept_and_pruned(params, mask)
    assert len(pruned) == int(np.ceil(0.2 * 96))
    assert kept.min() >= pruned.max()


def test_layerwise_pruning_prunes_each_layer_by_the_fraction(rng):
    params = tree(rng)
    mask = masks.magnitude_prune(params, masks.prunable_mask(params), 0.25, scope="layerwise")
    assert int((~mask["conv"]["kernel"]).sum()) == 18 and int((~mask["head"]["kernel"]).sum()) == 6
    for w, m in masks.masked_kernels(params, mask).values():
        w, m = np.abs(np.asarray(w)), np.asarray(m)
        assert w[m].min() >= w[~m].max()


def test_masks_nest_across_levels_and_never_revive(rng):
    params = tree(rng)
    mask = masks.prunable_mask(params)
    remaining = 96
    for level in range(1, 6):
        # new weights each level (as after retraining), so pruned ones could look large again
        params = jax.tree.map(lambda x: x + 0.5, tree(rng))
        new = masks.magnitude_prune(params, mask, 0.2)
        for old_m, new_m in zip(jax.tree.leaves(mask), jax.tree.leaves(new)):
            assert not np.any(np.asarray(new_m) & ~np.asarray(old_m))
        mask = new
        # each level removes ceil(20%) of what remains (open_lth): within one weight of 0.8x per level
        remaining -= int(np.ceil(0.2 * remaining))
        assert float(masks.density(mask)) * 96 == pytest.approx(remaining)
        assert abs(remaining - 96 * 0.8 ** level) <= level


def test_ties_are_broken_deterministically(rng):
    params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((8,))}}
    m1 = masks.magnitude_prune(params, masks.prunable_mask(params), 0.5)
    m2 = masks.magnitude_prune(params, masks.prunable_mask(params), 0.5)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)))
    assert float(masks.density(m1)) == 0.5


def test_ignored_layers_and_other_parameters_are_untouched(rng):
    params = tree(rng)
    mask = masks.magnitude_prune(params, masks.prunable_mask(params, ignore=("head",)), 0.5)
    pruned = masks.apply_mask(params, mask)
    np.testing.assert_array_equal(pruned["head"]["kernel"], params["head"]["kernel"])
    np.testing.assert_array_equal(pruned["conv"]["bias"], params["conv"]["bias"])
    assert int((np.asarray(pruned["conv"]["kernel"]) == 0).sum()) == 36


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_random_pruning_hits_the_density(rng, scope):
    params = {"a": {"kernel": jnp.ones((40, 25))}, "b": {"kernel": jnp.ones((500,))}}
    mask = masks.random_prune(jax.random.key(0), masks.prunable_mask(params), 0.3, scope)
    assert float(masks.density(mask)) == pytest.approx(0.3, abs=1e-3)
    if scope == "layerwise":
        assert int(mask["a"]["kernel"].sum()) == 300 and int(mask["b"]["kernel"].sum()) == 150
    other = masks.random_prune(jax.random.key(1), masks.prunable_mask(params), 0.3, scope)
    assert not np.array_equal(mask["a"]["kernel"], other["a"]["kernel"])


def test_pruning_under_vmap_gives_each_seed_its_own_mask(rng):
    stacked = jax.tree.map(lambda *x: jnp.stack(x), tree(rng), tree(rng))
    stacked_mask = jax.vmap(masks.prunable_mask)(stacked)
    pruned = jax.vmap(lambda p, m: masks.magnitude_prune(p, m, 0.5))(stacked, stacked_mask)
    one = masks.magnitude_prune(jax.tree.map(lambda x: x[1], stacked),
                                jax.tree.map(lambda x: x[1], stacked_mask), 0.5)
    np.testing.assert_array_equal(pruned["conv"]["kernel"][1], one["conv"]["kernel"])
    assert not np.array_equal(pruned["conv"]["kernel"][0], pruned["conv"]["kernel"][1])


def test_sparsity_report_counts_per_layer_and_total(rng):
    params = tree(rng)
    report = masks.sparsity_report(masks.magnitude_prune(params, masks.prunable_mask(params), 0.5))
    assert report["total"] == (48, 96)
    assert report["conv/kernel"][1] == 72 and report["head/kernel"][1] == 24
