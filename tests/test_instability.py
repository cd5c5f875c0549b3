import dataclasses
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import instability as ins
from early_jax import interpolation as interp
from early_jax import pipeline
from early_jax.errors import UserError
from early_jax.pipeline import Experiment
from early_jax.train import current_step
from helpers import TINY_DATA, tiny_config, with_workdir

REWINDS = [0, 3]
SEEDS = 2


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Dense instability at k = 0 and 3 for 2 seeds on tiny data, run once for the module.

    Without augmentation (pad-4 crops of 8x8 images) the tiny network learns (~95% test accuracy),
    so its paths have structure; the copies then differ by data order only."""
    config = tiny_config(augment=False)
    exp = Experiment(with_workdir(config, tmp_path_factory.mktemp("instability")), TINY_DATA)
    return exp, ins.instability(exp, REWINDS)


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def rows_of(tree, rows):
    return jax.tree.map(lambda x: np.asarray(x)[rows], tree)


def dense_final(exp):
    return pipeline.final_states(exp, exp.dense)


def copies_final(exp, steps, level=0):
    """Copy 1 and copy 2 of every (k, seed) row."""
    return ins.first_copies(exp, steps, level), ins.second_copies(exp, steps, level)


def group(states, index):
    """The S rows of the index-th k."""
    return rows_of(states, ins.group_rows(index, SEEDS))


def alone(exp, k, level=0):
    """Copy 2 of one k trained as a run of its own."""
    start = interp.with_second_copy_keys(ins.starting_states(exp, k, level))
    return exp.trainer.advance(start, exp.total_steps)[0]


def assert_close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


# ----- pure pieces -----
def test_barrier_is_the_worst_error_minus_the_mean_of_the_ends():
    assert interp.barrier([0.1, 0.3, 0.2]) == pytest.approx(0.15)
    assert interp.barrier([0.2, 0.2, 0.2]) == 0.0
    assert interp.barrier([0.1, 0.1, 0.3]) == pytest.approx(0.1)  # the worst point is an end
    assert interp.barrier([0.3, 0.1, 0.3]) == 0.0                 # never below 0 when an end is worst


def test_interpolate_hits_both_ends_exactly_and_a_network_with_itself_everywhere(rng):
    a = {"w": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "b": {"c": jnp.asarray(rng.normal(size=3))}}
    b = jax.tree.map(lambda x: x * 3.7 + 0.1, a)
    assert leaves_equal(interp.interpolate(a, b, 0.0), a)
    assert leaves_equal(interp.interpolate(a, b, 1.0), b)
    mid = interp.interpolate(a, b, 0.3)
    np.testing.assert_allclose(mid["w"], 0.7 * a["w"] + 0.3 * b["w"], rtol=1e-5, atol=1e-6)
    for alpha in interp.DEFAULT_ALPHAS:
        assert leaves_equal(interp.interpolate(a, a, alpha), a)


def test_bad_alphas_and_rewind_steps_are_refused_before_training(study, monkeypatch):
    exp, _ = study
    monkeypatch.setattr(exp.trainer, "advance", lambda *a, **k: pytest.fail("nothing may train"))
    with pytest.raises(UserError, match="from 0 to 1"):
        ins.instability(exp, [0], settings=interp.PathSettings(alphas=(0.0, 0.5)))
    with pytest.raises(UserError, match="outside the run"):
        ins.instability(exp, [0, 500])


# ----- the path program -----
def test_a_network_with_itself_has_a_flat_path_and_zero_barrier(study):
    exp, _ = study
    final = dense_final(exp)
    errors = interp.path_errors(exp.trainer, final, final)
    assert errors.shape == (SEEDS, len(interp.DEFAULT_ALPHAS), len(interp.SPLITS))
    for seed in range(SEEDS):
        for split in range(len(interp.SPLITS)):
            path = errors[seed, :, split]
            assert np.all(path == path[0])
            assert interp.barrier(path) == 0.0


def test_a_network_with_a_reinitialised_one_has_a_barrier(study):
    exp, _ = study
    final = dense_final(exp)
    fresh = exp.trainer.init([100, 101])
    errors = interp.path_errors(exp.trainer, final, fresh)
    for seed in range(SEEDS):
        for split in range(len(interp.SPLITS)):
            assert errors[seed, 0, split] < 0.3 and errors[seed, -1, split] > 0.5  # trained vs random
            assert interp.barrier(errors[seed, :, split]) > 0.05


def permuted_units(states, rng):
    """The same functions with every layer's units reordered (conv channels with their BatchNorm,
    the hidden dense units): equal predictions at both ends, while the straight line between them
    averages unrelated units."""
    params, stats = jax.tree.map(np.array, (states.params, states.batch_stats))
    c0, c1, hidden = (rng.permutation(n) for n in (4, 8, 16))
    params["conv0"]["kernel"] = params["conv0"]["kernel"][..., c0]
    params["conv1"]["kernel"] = params["conv1"]["kernel"][..., c0, :][..., c1]
    for tree, order in ((params["bn0"], c0), (stats["bn0"], c0), (params["bn1"], c1), (stats["bn1"], c1)):
        tree.update({name: value[..., order] for name, value in tree.items()})
    fc = params["fc"]["kernel"]  # [S, flattened (h, w, c), hidden]
    fc = fc.reshape(fc.shape[0], -1, 8, 16)[:, :, c1].reshape(fc.shape)
    params["fc"] = {"kernel": fc[..., hidden], "bias": params["fc"]["bias"][..., hidden]}
    params["head"]["kernel"] = params["head"]["kernel"][:, hidden, :]
    return states.replace(params=params, batch_stats=stats)


def test_a_network_and_its_permuted_twin_have_equal_ends_and_a_barrier_in_between(study, rng):
    exp, _ = study
    final = dense_final(exp)
    errors = interp.path_errors(exp.trainer, final, permuted_units(final, rng))
    for seed in range(SEEDS):
        for split in range(len(interp.SPLITS)):
            path = errors[seed, :, split]
            assert path[0] == pytest.approx(path[-1], abs=1e-6)  # the same function at both ends
            assert path.max() > path[0] + 0.1                      # worse in between (0.3-0.6 seen)
            assert interp.barrier(path) == pytest.approx(path.max() - path[0], abs=1e-6)


def test_interpolated_running_statistics_are_the_mix_of_the_two_copies(study):
    """With recompute_bn=False the path's networks use (1 - alpha) * stats_a + alpha * stats_b: at
    alpha 0.5 between a network and its twin with doubled variance, the errors equal those of the
    network evaluated with 1.5 x its variance."""
    exp, _ = study
    final = dense_final(exp)
    scaled = lambda factor: final.replace(batch_stats=jax.tree.map(
        lambda v: v, {name: {"mean": bn["mean"], "var": bn["var"] * factor}
                      for name, bn in final.batch_stats.items()}))
    settings = interp.PathSettings(alphas=(0.0, 0.5, 1.0), recompute_bn=False)
    along = interp.path_errors(exp.trainer, final, scaled(2.0), settings)
    at_ends = interp.path_errors(exp.trainer, scaled(1.5), scaled(1.5), settings)
    np.testing.assert_array_equal(along[:, 1], at_ends[:, 0])
    recomputed = interp.path_errors(exp.trainer, final, scaled(2.0), dataclasses.replace(settings, recompute_bn=True))
    np.testing.assert_array_equal(recomputed[:, 0], recomputed[:, -1])  # the stats a copy had do not matter


def test_alphas_in_chunks_and_one_at_a_time_give_the_same_path(study):
    exp, _ = study
    final = dense_final(exp)
    fresh = exp.trainer.init([100, 101])
    one_at_a_time = interp.path_errors(exp.trainer, final, fresh, alpha_chunk=1)
    np.testing.assert_array_equal(interp.path_errors(exp.trainer, final, fresh, alpha_chunk=4), one_at_a_time)


def test_batchnorm_recompute_averages_batch_statistics_and_keeps_the_params(study):
    exp, _ = study
    model = exp.trainer.fns.model
    final = rows_of(dense_final(exp), 0)
    images = interp.bn_images(exp.trainer, 4)
    params_before = jax.tree.map(np.array, final.params)
    stats = jax.jit(lambda p, s, x: interp.recompute_batch_stats(model, p, s, x))(
        final.params, final.batch_stats, images)
    assert jax.tree.structure(stats) == jax.tree.structure(final.batch_stats)
    assert not leaves_equal(stats, final.batch_stats)
    assert leaves_equal(final.params, params_before)

    # the first BatchNorm's statistics are the mean over batches of its input's batch statistics
    def conv0_out(x):
        _, state = model.apply({"params": final.params, "batch_stats": final.batch_stats}, x, train=True,
                               mutable=["batch_stats", "intermediates"],
                               capture_intermediates=lambda mdl, _: mdl.name == "conv0")
        return state["intermediates"]["conv0"]["__call__"][0]

    outs = [np.asarray(conv0_out(x), np.float64) for x in images]
    mean = np.mean([o.mean((0, 1, 2)) for o in outs], 0)
    var = np.mean([o.var((0, 1, 2)) for o in outs], 0)
    np.testing.assert_allclose(stats["bn0"]["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["bn0"]["var"], var, rtol=1e-4, atol=1e-5)


# ----- the copies and the experiment -----
def test_copy_one_retraces_the_dense_run_and_copy_two_differs(study):
    exp, _ = study
    dense = dense_final(exp)
    first, second = (group(states, 1) for states in copies_final(exp, REWINDS))  # k = 3
    # copy 1 is loaded, not trained: training the start state with the original keys is the dense run
    start = ins.starting_states(exp, 3, 0)
    retraced, _ = exp.trainer.advance(start, exp.total_steps)
    for a, b, c in zip(jax.tree.leaves((first.params, first.batch_stats)),
                       jax.tree.leaves((dense.params, dense.batch_stats)),
                       jax.tree.leaves((retraced.params, retraced.batch_stats))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(c, b, rtol=0, atol=1e-6)
    assert not np.array_equal(second.keys["order"], dense.keys["order"])
    assert not np.array_equal(second.keys["augment"], dense.keys["augment"])
    np.testing.assert_array_equal(second.keys["init"], dense.keys["init"])
    for a, b in zip(jax.tree.leaves(second.params), jax.tree.leaves(dense.params)):
        assert not np.allclose(a, b)


def test_each_k_of_the_stacked_second_copies_equals_its_own_run(study):
    """Rows of a later k join the stacked run at k: each group equals a run from k of its own."""
    exp, _ = study
    _, second = copies_final(exp, REWINDS)
    assert np.asarray(second.params["head"]["kernel"]).shape[0] == len(REWINDS) * SEEDS
    for index, k in enumerate(REWINDS):
        assert_close(group(second, index), alone(exp, k))
    assert not np.allclose(group(second, 0).params["head"]["kernel"], group(second, 1).params["head"]["kernel"])


@pytest.mark.parametrize("steps", [REWINDS, [0, 12]])  # k = 12: the join is on an evaluation step
def test_a_kill_after_a_join_resumes_to_the_same_copies(study, monkeypatch, steps):
    exp, _ = study
    _, finished = copies_final(exp, steps)
    assert_close(group(finished, 1), alone(exp, steps[1]))
    run_dir = exp.run_dir(ins.copies(exp, steps, 0))
    shutil.rmtree(run_dir.path)

    class Killed(Exception):
        pass

    real_advance = exp.trainer.advance
    def advance(states, end, *args, **kwargs):  # dies once past the resume point at step 12
        if current_step(states) >= 12:
            raise Killed
        return real_advance(states, end, *args, **kwargs)

    monkeypatch.setattr(exp.trainer, "advance", advance)
    with pytest.raises(Killed):
        ins.second_copies(exp, steps, 0)
    assert exp.run_dir(ins.copies(exp, steps, 0)).latest_step() == 12  # at or past the join
    monkeypatch.setattr(exp.trainer, "advance", real_advance)
    resumed = ins.second_copies(exp, steps, 0)  # the join is not applied again
    assert_close(resumed, finished, atol=0)


def test_copies_folders_are_named_by_their_k_values_and_stay_short(study):
    exp, _ = study
    name = lambda steps: os.path.basename(exp.path(ins.copies(exp, steps, 0)))
    assert name([0, 3]) == "k0-3"
    many = list(range(0, 5000, 7))
    assert len(name(many)) < 64 and name(many) != name(many[:-1])


def test_the_path_rows_of_each_k_are_measured_between_that_ks_copies(study):
    exp, rows = study
    first, second = copies_final(exp, REWINDS)
    for index, k in enumerate(REWINDS):
        errors = interp.path_errors(exp.trainer, group(first, index), group(second, index))
        for seed in range(SEEDS):
            for s, split in enumerate(interp.SPLITS):
                measured = [r["error"] for r in rows if (r["rewind"], r["seed"], r["split"]) == (k, seed, split)]
                np.testing.assert_allclose(measured, errors[seed, :, s], atol=1e-6)
    assert not np.allclose(*(interp.path_errors(exp.trainer, group(first, i), group(second, i)) for i in (0, 1)))


def test_every_seed_rewind_split_and_alpha_has_a_row_and_a_finite_barrier(study):
    exp, rows = study
    assert len(rows) == SEEDS * len(REWINDS) * len(interp.SPLITS) * len(interp.DEFAULT_ALPHAS)
    assert all(0 <= r["error"] <= 1 and r["level"] == 0 and r["density"] == 1.0 for r in rows)
    summary = ins.barriers(rows)
    assert {(r["seed"], r["rewind"], r["split"]) for r in summary} == {
        (s, k, split) for s in range(SEEDS) for k in REWINDS for split in interp.SPLITS}
    assert all(math.isfinite(r["barrier"]) and r["barrier"] >= 0 for r in summary)
    # the ends of the path are the copies themselves
    ends = {(r["seed"], r["rewind"], r["split"]): r["error_copy1"] for r in summary}
    assert all(ends[(r["seed"], r["rewind"], r["split"])] == r["error"] for r in rows if r["alpha"] == 0)


def test_rerun_reuses_finished_copies_and_retrains_only_what_is_missing(study, monkeypatch):
    exp, rows = study
    real_advance = exp.trainer.advance
    monkeypatch.setattr(exp.trainer, "advance", lambda *a, **k: pytest.fail("nothing may be retrained"))
    assert ins.instability(exp, REWINDS) == rows
    run_dir = exp.run_dir(ins.copies(exp, REWINDS, 0))
    for name in os.listdir(run_dir.path):  # the measured path is recomputed from the stored copies
        if name.startswith("path_"):
            os.remove(run_dir.file(name))
    assert ins.instability(exp, REWINDS) == rows
    shutil.rmtree(run_dir.path)  # lost copies are retrained from the first k, and nothing else
    starts, num_rows = [], []

    def advance(states, end, *args, **kwargs):
        starts.append(current_step(states))
        num_rows.append(np.asarray(states.step).shape[0])
        return real_advance(states, end, *args, **kwargs)

    monkeypatch.setattr(exp.trainer, "advance", advance)
    assert ins.instability(exp, REWINDS) == rows
    assert min(starts) == 0 and set(num_rows) == {len(REWINDS) * SEEDS}  # the stacked copies only


def test_an_imp_subnetwork_trains_both_copies_with_the_level_mask(study):
    """Each k has its own IMP level (rewound to k) and its mask (level 1's prunes the dense run, so
    it is the same for every k; deeper levels differ); its rows train with it."""
    exp, _ = study
    rows = ins.instability(exp, REWINDS, level=1)
    assert {r["level"] for r in rows} == {1}
    assert all(r["density"] == pytest.approx(0.8, abs=0.01) for r in rows)
    first, second = copies_final(exp, REWINDS, level=1)
    for index, k in enumerate(REWINDS):
        level = pipeline.final_states(exp, exp.level(k, 1))
        assert leaves_equal(group(first, index).mask, level.mask)
        assert leaves_equal(group(second, index).mask, level.mask)
        retraced, _ = exp.trainer.advance(ins.starting_states(exp, k, 1), exp.total_steps)
        assert_close(retraced.params, level.params)  # copy 1 retraces IMP level 1 rewound to k
        assert_close(group(second, index), alone(exp, k, level=1))
    summary = ins.barriers(rows)
    assert len(summary) == SEEDS * len(REWINDS) * len(interp.SPLITS)
    assert all(math.isfinite(r["barrier"]) for r in summary)
