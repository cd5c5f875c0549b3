import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import checkpoint, masks, pipeline, tables, telemetry
from early_jax.data.device import epoch_permutation, train_batch
from early_jax.errors import UserError
from early_jax.pipeline import Experiment
from early_jax.train import current_step
from helpers import TINY_DATA, tiny_config, with_workdir


def test_statistics_match_numpy_on_a_tiny_tree(rng):
    w, w0, wt = (rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3))
    keep = rng.random((3, 4)) < 0.6
    stats = telemetry.stats_from_sums(telemetry.layer_sums(*map(jnp.asarray, (w, w0, wt, keep))))
    k = keep
    expected = {"mean_abs": np.abs(w[k]).mean(), "sign_flip": 100 * np.mean(np.sign(w[k]) != np.sign(w0[k])),
                "dist_init": np.linalg.norm(w[k] - w0[k]), "dist_final": np.linalg.norm(w[k] - wt[k]),
                "cos_init": w[k] @ w0[k] / np.linalg.norm(w[k]) / np.linalg.norm(w0[k]),
                "cos_final": w[k] @ wt[k] / np.linalg.norm(w[k]) / np.linalg.norm(wt[k])}
    for name, value in expected.items():
        assert float(stats[name]) == pytest.approx(value, rel=1e-5), name


def test_global_statistics_pool_layers_by_weight_count(rng):
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(2, 3)))},
              "b": {"kernel": jnp.asarray(rng.normal(size=(5,)))}}
    init = jax.tree.map(lambda x: x * 0 + 1.0, params)
    mask = masks.prunable_mask(params)
    refs = telemetry.make_refs(init, params, mask, None, jax.random.key(0))
    state = type("S", (), {"params": params, "mask": mask})
    out = telemetry.observe(state, refs)
    flat = np.concatenate([np.ravel(params["a"]["kernel"]), np.ravel(params["b"]["kernel"])])
    assert float(out["all_mean_abs"]) == pytest.approx(np.abs(flat).mean(), rel=1e-6)
    assert float(out["all_sign_flip"]) == pytest.approx(100 * np.mean(flat < 0), rel=1e-6)
    assert float(out["all_dist_final"]) == pytest.approx(0.0, abs=1e-6)
    assert set(np.asarray(out["samples"]).tolist()) <= set(flat.tolist())
    ones = np.ones_like(flat)
    assert float(out["all_dist_init"]) == pytest.approx(np.linalg.norm(flat - ones), rel=1e-6)
    assert float(out["all_cos_init"]) == pytest.approx(flat.sum() / np.linalg.norm(flat) / np.sqrt(flat.size), abs=1e-6)
    per_layer = [np.ravel(params[name]["kernel"]) for name in ("a", "b")]
    np.testing.assert_allclose(out["layer_all_mean_abs"], [np.abs(w).mean() for w in per_layer], atol=1e-6)
    np.testing.assert_allclose(out["layer_all_cos_init"], [w.sum() / np.linalg.norm(w) / np.sqrt(w.size)
                                                           for w in per_layer], atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    exp = Experiment(with_workdir(tiny_config(), tmp_path_factory.mktemp("tel")), TINY_DATA)
    final = pipeline.train_dense(exp).states()
    return exp, final, exp.run_dir(exp.dense)


def test_replay_reproduces_the_runs_early_weights_exactly(trained):
    exp, final, dense = trained
    trainer = exp.trainer
    start = pipeline.state_at(exp, 0)
    refs = jax.jit(jax.vmap(telemetry.make_refs))(start.params, final.params, start.mask, None,
                                                   telemetry.sample_keys(start))
    replayed, per_step = telemetry.replay(trainer, start, refs, 6)
    saved = dense.restore(6, trainer.abstract_state(2))
    for a, b in zip(jax.tree.leaves(replayed.params), jax.tree.leaves(saved.params)):
        np.testing.assert_array_equal(a, b)
    assert per_step["all_dist_init"].shape == (7, 2) and np.all(per_step["all_dist_init"][0] == 0)
    assert list(per_step["eval_steps"]) == [0, 1, 2, 4, 6]


def test_a_replay_that_drifts_from_the_runs_checkpoints_is_refused(trained):
    exp, final, dense = trained
    trainer = exp.trainer
    start = pipeline.state_at(exp, 0)
    refs = jax.jit(jax.vmap(telemetry.make_refs))(start.params, final.params, start.mask, None,
                                                   telemetry.sample_keys(start))
    saved_3 = dense.restore(3, trainer.abstract_state(2)).params
    nudged = jax.tree.map(lambda w: w * 1.01, saved_3)
    telemetry.replay(trainer, pipeline.state_at(exp, 0), refs, 4, saved={3: lambda: saved_3})
    with pytest.raises(UserError, match="does not reproduce its checkpoint at step 3"):
        telemetry.replay(trainer, start, refs, 4, saved={3: lambda: nudged})


def test_in_scan_statistics_equal_step_by_step_statistics(trained):
    exp, final, dense = trained
    trainer = exp.trainer
    start = pipeline.state_at(exp, 0)
    refs = jax.jit(jax.vmap(telemetry.make_refs))(start.params, final.params, start.mask, None,
                                                   telemetry.sample_keys(start))
    _, per_step = telemetry.replay(trainer, pipeline.state_at(exp, 0), refs, 4)
    states = start
    observe = jax.jit(jax.vmap(telemetry.observe))
    observed = [k for k in per_step if k.startswith(("all_", "sub_", "layer_")) or k == "samples"]
    assert len(observed) == 4 * len(telemetry.STATS) + 1
    for step in range(1, 5):
        states, metrics = trainer.advance(states, step)  # one step at a time, then observe outside
        outside = observe(states, refs)
        assert current_step(states) == step
        for key in observed:
            np.testing.assert_allclose(per_step[key][step], np.asarray(outside[key]), rtol=1e-5,
                                       atol=1e-6, err_msg=key)
        for key in ("loss", "accuracy", "grad_norm"):
            np.testing.assert_allclose(per_step[key][step], metrics[key][0], rtol=1e-5, err_msg=key)


def test_gradient_norm_is_the_norm_of_the_minibatch_loss_gradient(trained):
    """The step's grad_norm: the loss gradient alone (before weight decay and momentum), on the
    batch that step trains on."""
    exp, _, dense = trained
    trainer = exp.trainer
    start = pipeline.state_at(exp, 0)
    one = jax.tree.map(lambda x: jnp.array(x[0]), start)
    _, metrics = trainer.advance(start, 1)
    perm = epoch_permutation(one.key("order"), 0, len(trainer.dataset.x_train))
    x, y = train_batch(trainer.arrays, trainer.fns.prep, perm, 0, trainer.fns.batch_size,
                       jax.random.fold_in(one.key("augment"), 0))
    grads = jax.grad(lambda p: trainer.fns.loss_and_updates(p, one.batch_stats, x, y)[0])(one.params)
    expected = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    assert float(metrics["grad_norm"][0, 0]) == pytest.approx(expected, rel=1e-4)


def test_run_telemetry_writes_tables_and_figure_with_a_subnetwork(trained, monkeypatch):
    exp, _, _ = trained
    out = telemetry.run_telemetry(exp, 8, level=1, rewind=3)
    rows = tables.read_csv(f"{out}/telemetry.csv")
    assert {r["step"] for r in rows} == set(range(9)) and {r["seed"] for r in rows} == {0, 1}
    # the subnetwork keeps fewer weights than all, so its statistics differ
    assert any(r["sub_mean_abs"] != r["all_mean_abs"] for r in rows)
    layers = tables.read_csv(f"{out}/telemetry_layers.csv")
    assert {r["layer"] for r in layers} == {"conv0/kernel", "conv1/kernel", "fc/kernel", "head/kernel"}
    monkeypatch.setattr(checkpoint.Checkpoints, "restore", lambda *a, **k: pytest.fail("found, not restored"))
    assert telemetry.run_telemetry(exp, 8, level=1, rewind=3) == out
