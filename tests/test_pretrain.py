import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import checkpoint, masks, pipeline, pretrain, runs
from early_jax.data import device as dev
from early_jax.errors import UserError
from early_jax.pipeline import Experiment
from early_jax.train import current_step
from helpers import TINY_DATA, tiny_config, with_workdir


@pytest.fixture(scope="module")
def main(tmp_path_factory):
    return Experiment(with_workdir(tiny_config(), tmp_path_factory.mktemp("pre")), TINY_DATA)


def test_task_names_parse_and_bad_names_are_refused():
    task = pretrain.parse_task("blur+rotation")
    assert (task.blur, task.rotation, task.random_labels, task.subset) == (4, "fixed", 0.0, 1.0)
    assert pretrain.parse_task("random_labels", label_fraction=0.5).random_labels == 0.5
    with pytest.raises(UserError, match="unknown pre-training task"):
        pretrain.parse_task("jigsaw")
    with pytest.raises(UserError, match="own labels"):
        pretrain.parse_task("random_labels+rotation")


@pytest.mark.parametrize("task, message", [(dict(blur_factor=16), "larger than"),
                                           (dict(subset_fraction=0.1), "fewer than one batch")])
def test_tasks_the_data_cannot_support_are_refused_before_training(task, message):
    text = "blur" if "blur_factor" in task else "subset"
    with pytest.raises(UserError, match=message):
        pretrain.check_task(pretrain.parse_task(text, **task), TINY_DATA, batch_size=16)
    wide = dataclasses.replace(TINY_DATA, x_train=np.zeros((96, 8, 6, 1), np.uint8))
    with pytest.raises(UserError, match="square"):
        pretrain.check_task(pretrain.parse_task("rotation"), wide, batch_size=16)


def test_random_label_task_is_fixed_per_example_and_hits_the_fraction():
    ds = dataclasses.replace(TINY_DATA, y_train=np.arange(4000, dtype=np.int32) % 4,
                             x_train=np.zeros((4000, 8, 8, 1), np.uint8))
    a = pretrain.task_dataset(pretrain.parse_task("random_labels", label_fraction=0.5), ds, seed=0)
    b = pretrain.task_dataset(pretrain.parse_task("random_labels", label_fraction=0.5), ds, seed=0)
    np.testing.assert_array_equal(a.y_train, b.y_train)  # the same labels every epoch and run
    assert abs(np.mean(a.y_train != ds.y_train) - 0.5 * 0.75) < 0.03


def _rotation_batch(labels, prep):
    arrays = dev.TrainArrays(jnp.asarray(TINY_DATA.x_train), jnp.asarray(labels), jnp.zeros(1), jnp.ones(1))
    x, y = dev.train_batch(arrays, prep, jnp.arange(len(labels)), 0, 16, jax.random.key(3))
    return np.asarray(x), np.asarray(y)


def test_rotation_labels_match_the_rotation_applied():
    task = pretrain.task_dataset(pretrain.parse_task("rotation"), TINY_DATA, seed=0)
    assert task.num_classes == 4 and set(np.unique(task.y_train)) <= {0, 1, 2, 3}
    for x, turns, original in zip(task.x_test, task.y_test, TINY_DATA.x_test):
        np.testing.assert_array_equal(x, np.rot90(original, turns, axes=(0, 1)))
    # fixed turns (the labels) and redrawn ones: each example in a batch is turned by its label
    for prep, labels in [(dev.Preprocess(augment=False, rotation="label"), task.y_train),
                         (dev.Preprocess(augment=False, rotation="redraw"), TINY_DATA.y_train)]:
        x, y = _rotation_batch(labels, prep)
        for image, turns, original in zip(x, y, TINY_DATA.x_train[:16]):
            np.testing.assert_allclose(image, np.rot90(original / 255.0, turns, axes=(0, 1)), atol=1e-6)
        assert len(set(y.tolist())) > 1


@pytest.mark.parametrize("rotate_first", [False, True])
def test_rotation_comes_after_the_flip_unless_asked_first(rotate_first):
    """flip(turn by 1) == turn by 3 of the flipped image: only rotating after the flip keeps the
    image a turn of a flip-augmented image by exactly its label."""
    turns = np.full(len(TINY_DATA.x_train), 1, np.int32)
    prep = dev.Preprocess(augment=True, crop_padding=0, rotation="label", rotate_first=rotate_first)
    x, _ = _rotation_batch(turns, prep)
    originals = TINY_DATA.x_train[:16] / 255.0
    flipped = [np.allclose(img, np.rot90(o[:, ::-1], 1, axes=(0, 1)), atol=1e-6) for img, o in zip(x, originals)]
    turned_back = [np.allclose(img, np.rot90(o, 1, axes=(0, 1))[:, ::-1], atol=1e-6) for img, o in zip(x, originals)]
    assert any(turned_back if rotate_first else flipped)  # some examples were flipped...
    assert not any(flipped if rotate_first else turned_back)  # ...in the asked-for order


def test_blur_task_blurs_the_test_set_and_keeps_labels():
    task = pretrain.task_dataset(pretrain.parse_task("blur"), TINY_DATA, seed=0)
    np.testing.assert_array_equal(task.y_test, TINY_DATA.y_test)
    assert task.x_test.std() < TINY_DATA.x_test.std()


def test_pretraining_batches_are_turned_and_blurred_as_the_task_says(main):
    """Blur and rotation are linear and keep constants, so they commute with normalisation: the
    task's batch is the plain batch (same crop and flip), turned by its labels and blurred."""
    task = pretrain.parse_task("blur+rotation")
    pre = pretrain.pretrain_trainer(main, task, 1)
    perm, key = jnp.arange(len(pre.arrays.labels)), jax.random.key(5)
    x, turns = dev.train_batch(pre.arrays, pre.fns.prep, perm, 0, 16, key)
    plain, labels = dev.train_batch(pre.arrays, dev.Preprocess(augment=main.config.data.augment), perm, 0, 16, key)
    np.testing.assert_array_equal(turns, labels)  # fixed turns: the task's labels
    expected = dev.blur(dev.rotate_quarter_turns(plain, turns), task.blur)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(x - plain).max()) > 0.1


def test_head_swap_keeps_everything_else_and_reinitialises_the_head(main):
    pre_trainer = pretrain.pretrain_trainer(main, pretrain.parse_task("rotation"), 1)
    pre = pre_trainer.advance(pre_trainer.init([0, 1]), 3)[0]
    assert pre.params["head"]["kernel"].shape[-1] == 4
    start = pretrain.main_start(main, pre, 6, new_head=True)
    for name in pre.params:
        if name != "head":
            for a, b in zip(jax.tree.leaves(start.params[name]), jax.tree.leaves(pre.params[name])):
                np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(start.batch_stats), jax.tree.leaves(pre.batch_stats)):
        np.testing.assert_array_equal(a, b)
    # a fresh draw for the real task (here also 4 classes, so the shape alone could not tell):
    # neither the trained rotation head nor the dense run's initial head
    fresh = jax.vmap(lambda s: pretrain.fresh_head(main.trainer, s))(jnp.arange(2))
    for a, b in zip(jax.tree.leaves(start.params["head"]), jax.tree.leaves(fresh)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # compiled apart: ulp differences
    head = start.params["head"]["kernel"]
    assert not np.allclose(head, pre.params["head"]["kernel"])
    assert not np.allclose(head, main.trainer.init([0, 1]).params["head"]["kernel"])
    assert all(float(jnp.abs(t).max()) == 0 for t in jax.tree.leaves(start.opt_state))


def test_main_run_starts_at_the_chosen_schedule_offset(main, monkeypatch):
    assert pretrain.start_step(main, 1, "replace") == main.steps_per_epoch
    assert pretrain.start_step(main, 1, "none") == 0
    with pytest.raises(UserError, match="replace the whole"):
        pretrain.start_step(main, 4, "replace")
    pipeline.train_dense(main)
    starts, first_params, real = [], [], main.trainer.advance

    def advance(states, end, on_chunk=None, stop=None):
        starts.append(current_step(states))
        if not first_params:
            first_params.append(jax.tree.map(np.array, states.params))
        return real(states, end, on_chunk)

    monkeypatch.setattr(main.trainer, "advance", advance)
    task = pretrain.parse_task("blur")
    rows = pretrain.pretrain_imp(main, task, 1, levels=1)
    assert starts[0] == 6 and 0 not in starts  # level 0 and level 1 both go on from step 6
    assert {r["level"] for r in rows} == {0, 1} and {r["task"] for r in rows} == {"blur4"}
    # ...from the pre-trained weights (not the dense run's step-6 weights)
    pre_trainer = pretrain.pretrain_trainer(main, task, 1)
    pre = main.run_dir(runs.Pretraining(main.dense, task, 1)).restore(pre_trainer.total_steps,
                                                                      pre_trainer.abstract_state(2))
    dense_at_6 = pipeline.state_at(main, 6)
    for started, trained, dense in zip(*map(jax.tree.leaves, (first_params[0], pre.params, dense_at_6.params))):
        np.testing.assert_array_equal(started, trained)
        assert not np.array_equal(started, dense)
    starts.clear()
    pretrain.pretrain_imp(main, pretrain.parse_task("blur"), 1, levels=1, offset="none")
    assert starts[0] == 0  # the pre-training is shared by both offsets: only the main runs train
    monkeypatch.setattr(checkpoint.Checkpoints, "restore", lambda *a, **k: pytest.fail("found, not restored"))
    assert pretrain.pretrain_imp(main, task, 1, levels=1) == rows


def test_sparse_pretraining_keeps_pruned_weights_at_zero(main):
    rows = pretrain.sparse_pretrain(main, pretrain.parse_task("rotation"), 1, level=1, rewind=3)
    assert {r["level"] for r in rows} == {1} and all(r["density"] < 0.85 for r in rows)
    task = pretrain.parse_task("rotation")
    descriptor = runs.Pretraining(main.dense, task, 1, sparse=main.level(3, 1))
    pre_trainer = pretrain.pretrain_trainer(main, task, 1)
    pre = main.run_dir(descriptor).restore(pre_trainer.total_steps, pre_trainer.abstract_state(2))
    body_mask = {k: v for k, v in pre.mask.items() if k != "head"}
    for kernel, kept in masks.masked_kernels({k: pre.params[k] for k in body_mask}, body_mask).values():
        assert np.all(np.asarray(kernel)[~np.asarray(kept)] == 0) and not np.all(np.asarray(kept))
    # the subnetwork is IMP level 1's (rewound to 3), and the real-task run after it keeps it pruned
    level = pipeline.final_states(main, main.level(3, 1))
    after = pipeline.final_states(main, runs.AfterPretraining(descriptor, "replace"))
    for name in body_mask:
        for a, b in zip(jax.tree.leaves(pre.mask[name]), jax.tree.leaves(level.mask[name])):
            np.testing.assert_array_equal(a, b)
    for kernel, kept in masks.masked_kernels(after.params, level.mask).values():
        assert np.all(np.asarray(kernel)[~np.asarray(kept)] == 0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.mask), jax.tree.leaves(level.mask)))


def test_widened_mask_keeps_the_level_mask_and_the_ignore_list():
    """The rotation head (another shape) is kept whole; an ignored layer stays out of the mask, so
    the pre-training state has the structure its checkpoints are restored into."""
    params = {"conv0": {"kernel": jnp.ones((3, 3, 1, 2))}, "head": {"kernel": jnp.ones((8, 4))}}
    level = masks.prunable_mask({"conv0": params["conv0"], "head": {"kernel": jnp.ones((8, 10))}})
    level["conv0"]["kernel"] = level["conv0"]["kernel"].at[0].set(False)
    wide = pretrain.widen_mask(level, params, ignore=())
    np.testing.assert_array_equal(wide["conv0"]["kernel"], level["conv0"]["kernel"])
    assert wide["head"]["kernel"].shape == (8, 4) and bool(wide["head"]["kernel"].all())
    ignored = pretrain.widen_mask(level, params, ignore=("head",))
    assert jax.tree.structure(ignored) == jax.tree.structure(masks.prunable_mask(params, ("head",)))


def test_the_tables_of_a_task_gather_every_length_finished_on_disk(main):
    task = pretrain.parse_task("blur")
    pretrain.pretrain_imp(main, task, 1, levels=1, offset="none")
    pretrain.pretrain_imp(main, task, 2, levels=1, offset="none")  # another call, another length
    rows = pretrain.rows_on_disk(main, task, "none")
    assert {(r["pretrain_epochs"], r["level"]) for r in rows} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert not pretrain.rows_on_disk(main, pretrain.parse_task("rotation"), "none")
