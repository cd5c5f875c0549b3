import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import masks, perturb
from early_jax.errors import UserError

SHAPES = {"conv": {"kernel": (3, 3, 2, 8), "bias": (8,)}, "bn": {"scale": (8,), "bias": (8,)},
          "head": {"kernel": (16, 4), "bias": (4,)}}
BIG_SHAPES = {"conv": {"kernel": (3, 3, 64, 64), "bias": (64,)},
              "head": {"kernel": (256, 10), "bias": (10,)}}
RANDOM = [n for n in perturb.PERTURBATIONS if n not in ("signs_k_mags_0", "signs_0_mags_k")]


def random_tree(seed, shapes=SHAPES):
    """Standard-normal leaves from numpy (cheap: no per-shape compile of JAX's PRNG)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def setup(seed=0, shapes=SHAPES):
    """(w_k, w_0, mask): two masked random trees sharing a random ~50% mask.

    The mask keeps the larger half of each layer of an independent random tree, so it is uniform.
    """
    scores = random_tree(seed + 100, shapes)
    mask = masks.magnitude_prune(scores, masks.prunable_mask(scores), 0.5, scope="layerwise")
    w_k, w_0 = (masks.apply_mask(random_tree(s, shapes), mask) for s in (seed, seed + 1))
    return w_k, w_0, mask


def kernels(tree, mask):
    """{path: (kernel, mask)} as numpy arrays."""
    return {p: (np.asarray(w), np.asarray(m))
            for p, (w, m) in masks.masked_kernels(tree, mask).items()}


def untouched(tree):
    """{path: leaf} for every leaf that is not a prunable kernel (biases, BatchNorm)."""
    flat = [(jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return {k: np.asarray(v) for k, v in flat if "kernel" not in k}


def test_init_std_is_he_fan_in():
    w_k, _, mask = setup()
    std = perturb.init_std(w_k, mask)
    assert set(std) == {"conv", "head"} and "bias" not in std["conv"]
    np.testing.assert_allclose(std["conv"]["kernel"], math.sqrt(2 / 18), rtol=1e-6)
    np.testing.assert_allclose(std["head"]["kernel"], math.sqrt(2 / 16), rtol=1e-6)


@pytest.mark.parametrize("within", ["layer", "filter"])
def test_shuffle_keeps_mask_and_multiset_and_moves_values(within):
    w_k, _, mask = setup()
    out = perturb.shuffle(jax.random.key(1), w_k, mask, within=within)
    moved = 0
    for (w, m), (v, _) in zip(kernels(w_k, mask).values(), kernels(out, mask).values()):
        assert np.all(v[~m] == 0) and np.all(v[m] != 0)
        groups = [(w, m, v)] if within == "layer" else [
            (w[..., c], m[..., c], v[..., c]) for c in range(w.shape[-1])]
        for wg, mg, vg in groups:
            np.testing.assert_array_equal(np.sort(wg[mg]), np.sort(vg[mg]))
        moved += int(np.sum(w[m] != v[m]))
    assert moved > 0.5 * sum(int(m.sum()) for _, m in kernels(w_k, mask).values())


@pytest.mark.parametrize("within", ["layer", "filter"])
def test_shuffle_keep_signs_keeps_every_sign_and_permutes_magnitudes(within):
    w_k, _, mask = setup()
    out = perturb.shuffle(jax.random.key(1), w_k, mask, within=within, keep_signs=True)
    for (w, m), (v, _) in zip(kernels(w_k, mask).values(), kernels(out, mask).values()):
        np.testing.assert_array_equal(np.sign(v[m]), np.sign(w[m]))
        assert np.all(v[~m] == 0)
        np.testing.assert_array_equal(np.sort(np.abs(w[m])), np.sort(np.abs(v[m])))
        assert np.mean(np.abs(w[m]) != np.abs(v[m])) > 0.5


def test_shuffle_gives_identical_layers_independent_permutations():
    rng = np.random.default_rng(0)
    w, m = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), jnp.asarray(rng.random((6, 5)) < 0.5)
    mask = {"a": {"kernel": m}, "b": {"kernel": m}}
    params = masks.apply_mask({"a": {"kernel": w}, "b": {"kernel": w}}, mask)
    out = perturb.shuffle(jax.random.key(2), params, mask)
    assert not np.array_equal(out["a"]["kernel"], out["b"]["kernel"])


def test_shuffle_draws_every_arrangement_of_the_kept_values_equally_often():
    """Kept values 1, 2, 3 among pruned zeros: each of the 3! arrangements about 1/6 of the time."""
    params = {"a": {"kernel": jnp.array([1.0, 0.0, 2.0, 0.0, 3.0])}}
    mask = {"a": {"kernel": params["a"]["kernel"] != 0}}
    draws = 1200
    shuffled = jax.vmap(lambda k: perturb.shuffle(k, params, mask)["a"]["kernel"])(
        jax.random.split(jax.random.key(0), draws))
    arrangements, counts = np.unique(np.asarray(shuffled)[:, [0, 2, 4]], axis=0, return_counts=True)
    assert len(arrangements) == 6 and np.all(np.asarray(shuffled)[:, [1, 3]] == 0)
    chi2 = float(np.sum((counts - draws / 6) ** 2 / (draws / 6)))
    assert chi2 < 20.5  # p ~ 0.001 at 5 degrees of freedom


def test_reinit_matches_init_std_and_keep_signs_keeps_signs():
    w_k, _, mask = setup(shapes=BIG_SHAPES)
    sigma = math.sqrt(2 / (3 * 3 * 64))
    for keep_signs in (False, True):
        out = perturb.reinit(jax.random.key(3), w_k, mask, keep_signs=keep_signs)
        (w, m), (v, _) = kernels(w_k, mask)["conv/kernel"], kernels(out, mask)["conv/kernel"]
        assert abs(np.sqrt(np.mean(v[m] ** 2)) / sigma - 1) < 0.03
        assert np.all(v[~m] == 0) and np.mean(v[m] == w[m]) == 0
        if keep_signs:
            np.testing.assert_array_equal(np.sign(v[m]), np.sign(w[m]))
        else:
            assert abs(np.mean(v[m]) / sigma) < 0.03
            assert 0.45 < np.mean(np.sign(v[m]) == np.sign(w[m])) < 0.55


def test_mixes_take_signs_and_magnitudes_from_the_right_sources():
    w_k, w_0, mask = setup()
    key = jax.random.key(4)
    fresh = perturb.reinit(key, w_k, mask)
    cases = {"signs_k_mags_0": (w_k, w_0), "signs_0_mags_k": (w_0, w_k),
             "signs_k_mags_fresh": (w_k, fresh)}
    for name, (signs, mags) in cases.items():
        out = perturb.apply(name, key, w_k, w_0, mask)
        for p, (v, m) in kernels(out, mask).items():
            s, a = kernels(signs, mask)[p][0], kernels(mags, mask)[p][0]
            np.testing.assert_array_equal(v[m], np.sign(s[m]) * np.abs(a[m]))
            assert np.all(v[~m] == 0)
        jax.tree.map(np.testing.assert_array_equal, untouched(out), untouched(w_k))
    names = ("signs_k_mags_fresh", "reinit_keep_signs")
    same_op = [perturb.apply(n, key, w_k, w_0, mask) for n in names]
    jax.tree.map(np.testing.assert_array_equal, *same_op)


def test_mix_takes_non_kept_entries_from_base_and_counts_zero_as_positive():
    w_k, w_0, mask = setup()
    base = jax.tree.map(lambda x: x + 7.0, w_k)
    signs = jax.tree.map(jnp.zeros_like, w_0)
    out = perturb.mix_signs_magnitudes(base, signs, w_0, mask)
    for p, (v, m) in kernels(out, mask).items():
        b, a = kernels(base, mask)[p][0], kernels(w_0, mask)[p][0]
        np.testing.assert_array_equal(v[m], np.abs(a[m]))
        np.testing.assert_array_equal(v[~m], b[~m])
    jax.tree.map(np.testing.assert_array_equal, untouched(out), untouched(base))


def test_noise_has_std_scale_times_sigma_on_kept_and_nothing_elsewhere():
    w_k, _, mask = setup(shapes=BIG_SHAPES)
    sigma = perturb.init_std(w_k, mask)
    for scale, sig, expect in ((2.0, sigma, 2 * math.sqrt(2 / 576)), (1.0, 0.1, 0.1)):
        out = perturb.gaussian_noise(jax.random.key(5), w_k, mask, scale, sig)
        (w, m), (v, _) = kernels(w_k, mask)["conv/kernel"], kernels(out, mask)["conv/kernel"]
        assert abs(np.std(v[m] - w[m]) / expect - 1) < 0.03
        assert np.all(v[~m] == 0)
        jax.tree.map(np.testing.assert_array_equal, untouched(out), untouched(w_k))


@pytest.mark.parametrize("n", [0.5, 2.0])
def test_effective_std_of_noise_n_is_n(n):
    w_k, w_0, mask = setup(shapes=BIG_SHAPES)
    out = perturb.apply("noise", jax.random.key(6), w_k, w_0, mask, scale=n)
    eff = perturb.effective_std(w_k, out, mask, perturb.init_std(w_k, mask))
    assert set(eff) == {"conv/kernel", "head/kernel", "overall", "raw"}
    for name, value in eff.items():
        if name != "raw":
            assert abs(float(value) / n - 1) < 0.05
    changes = np.concatenate([(np.asarray(out_w) - np.asarray(w))[np.asarray(m)] for (w, m), (out_w, _)
                              in zip(kernels(w_k, mask).values(), kernels(out, mask).values())])
    np.testing.assert_allclose(float(eff["raw"]), changes.std(), rtol=1e-4)
    counts = {p: int(m.sum()) for p, (_, m) in kernels(w_k, mask).items()}
    weighted = sum(float(eff[p]) * c for p, c in counts.items()) / sum(counts.values())
    np.testing.assert_allclose(float(eff["overall"]), weighted, rtol=1e-5)


@pytest.mark.parametrize("name", list(perturb.PERTURBATIONS))
def test_every_perturbation_keeps_pruned_zero_and_other_params(name):
    w_k, w_0, mask = setup()
    out = perturb.apply(name, jax.random.key(7), w_k, w_0, mask, scale=1.0)
    assert jax.tree.structure(out) == jax.tree.structure(w_k)
    for p, (v, m) in kernels(out, mask).items():
        assert np.all(v[~m] == 0) and np.all(v[m] != 0)
        assert not np.array_equal(v, kernels(w_k, mask)[p][0])
    jax.tree.map(np.testing.assert_array_equal, untouched(out), untouched(w_k))


@pytest.mark.parametrize("name", RANDOM)
def test_same_key_same_result_other_key_different(name):
    w_k, w_0, mask = setup()
    run = lambda seed: perturb.apply(name, jax.random.key(seed), w_k, w_0, mask, scale=1.0)
    jax.tree.map(np.testing.assert_array_equal, run(8), run(8))
    pairs = zip(jax.tree.leaves(run(8)), jax.tree.leaves(run(9)))
    assert not all(np.array_equal(a, b) for a, b in pairs)


def test_vmap_over_seeds_equals_per_seed_calls():
    seeds = [setup(s) for s in range(3)]
    stack = lambda i: jax.tree.map(lambda *x: jnp.stack(x), *[s[i] for s in seeds])
    w_k, w_0, mask = stack(0), stack(1), stack(2)
    keys = jax.random.split(jax.random.key(10), 3)

    def all_of_them(key, w_k, w_0, mask):
        outs = {n: perturb.apply(n, key, w_k, w_0, mask, scale=1.5) for n in perturb.PERTURBATIONS}
        outs["init_std"] = perturb.init_std(w_k, mask)
        outs["effective_std"] = perturb.effective_std(w_k, outs["noise"], mask, outs["init_std"])
        return outs

    batched = jax.jit(jax.vmap(all_of_them))(keys, w_k, w_0, mask)
    for i, (wk, w0, m) in enumerate(seeds):
        single = all_of_them(keys[i], wk, w0, m)
        jax.tree.map(lambda b, s: np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-6),
                     batched, single)


def test_apply_rejects_unknown_names_and_noise_without_scale():
    w_k, w_0, mask = setup()
    with pytest.raises(UserError, match="shuffle_layer"):
        perturb.apply("shuffle_everything", jax.random.key(0), w_k, w_0, mask)
    with pytest.raises(UserError, match="scale"):
        perturb.apply("noise", jax.random.key(0), w_k, w_0, mask)
