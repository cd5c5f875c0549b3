import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import masks, pipeline, pretrain
from early_jax.data import device as dev
from early_jax.errors import UserError
from early_jax.train import Trainer, current_step
from helpers import TINY_DATA, tiny_config, with_workdir


@pytest.fixture(scope="module")
def main(tmp_path_factory):
    return Trainer(with_workdir(tiny_config(), tmp_path_factory.mktemp("pre")), TINY_DATA)


def test_task_names_parse_and_bad_names_are_refused():
    task = pretrain.parse_task("blur+rotation")
    assert (task.blur, task.rotation, task.random_labels, task.subset) == (4, "fixed", 0.0, 1.0)
    assert pretrain.parse_task("random_labels", label_fraction=0.5).random_labels == 0.5
    with pytest.raises(UserError, match="unknown pre-training task"):
        pretrain.parse_task("jigsaw")


def test_random_label_task_is_fixed_per_example_and_hits_the_fraction():
    ds = dataclasses.replace(TINY_DATA, y_train=np.arange(4000, dtype=np.int32) % 4,
                             x_train=np.zeros((4000, 8, 8, 1), np.uint8))
    a = pretrain.task_dataset(pretrain.parse_task("random_labels", label_fraction=0.5), ds, seed=0)
    b = pretrain.task_dataset(pretrain.parse_task("random_labels", label_fraction=0.5), ds, seed=0)
    np.testing.assert_array_equal(a.y_train, b.y_train)  # the same labels every epoch and run
    assert abs(np.mean(a.y_train != ds.y_train) - 0.5 * 0.75) < 0.03


def test_rotation_labels_match_the_rotation_applied():
    task = pretrain.task_dataset(pretrain.parse_task("rotation"), TINY_DATA, seed=0)
    assert task.num_classes == 4 and set(np.unique(task.y_train)) <= {0, 1, 2, 3}
    for x, turns, original in zip(task.x_train, task.y_train, TINY_DATA.x_train):
        np.testing.assert_array_equal(x, np.rot90(original, turns, axes=(0, 1)))
    # redrawn rotations: the label of each example in a batch is the turn applied to it
    arrays = dev.TrainArrays(jnp.asarray(TINY_DATA.x_train), jnp.asarray(TINY_DATA.y_train),
                             jnp.zeros(1), jnp.ones(1))
    prep = dev.Preprocess(augment=False, random_rotation=True)
    perm = jnp.arange(len(TINY_DATA.x_train))
    x, y = dev.train_batch(arrays, prep, perm, 0, 16, jax.random.key(3))
    for image, turns, original in zip(np.asarray(x), np.asarray(y), TINY_DATA.x_train[:16]):
        np.testing.assert_allclose(image, np.rot90(original / 255.0, turns, axes=(0, 1)), atol=1e-6)
    assert len(set(np.asarray(y).tolist())) > 1


def test_blur_task_blurs_the_test_set_and_keeps_labels():
    task = pretrain.task_dataset(pretrain.parse_task("blur"), TINY_DATA, seed=0)
    np.testing.assert_array_equal(task.y_test, TINY_DATA.y_test)
    assert task.x_test.std() < TINY_DATA.x_test.std()


def test_head_swap_keeps_everything_else_and_reinitialises_the_head(main):
    pre_trainer = pretrain.pretrain_trainer(main, pretrain.parse_task("rotation"), 1)
    pre = pre_trainer.advance(pre_trainer.init([0, 1]), 3)[0]
    assert pre.params["head"]["kernel"].shape[-1] == 4
    start = pretrain.main_start(main, pre, 6)
    for name in pre.params:
        if name != "head":
            for a, b in zip(jax.tree.leaves(start.params[name]), jax.tree.leaves(pre.params[name])):
                np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(start.batch_stats), jax.tree.leaves(pre.batch_stats)):
        np.testing.assert_array_equal(a, b)
    head = start.params["head"]["kernel"]
    assert head.shape == main.init([0, 1]).params["head"]["kernel"].shape  # the real task's classes
    # a fresh draw: neither the dense run's initial head nor zeros
    assert not np.allclose(head, main.init([0, 1]).params["head"]["kernel"])
    assert float(jnp.std(head)) > 0
    assert all(float(jnp.abs(t).max()) == 0 for t in jax.tree.leaves(start.opt_state))


def test_main_run_starts_at_the_chosen_schedule_offset(main, monkeypatch):
    assert pretrain.start_step(main, 1, "replace") == main.steps_per_epoch
    assert pretrain.start_step(main, 1, "none") == 0
    with pytest.raises(UserError, match="replace the whole"):
        pretrain.start_step(main, 4, "replace")
    pipeline.train_dense(main)
    starts, real = [], main.advance
    monkeypatch.setattr(main, "advance", lambda s, e, c=None: starts.append(current_step(s)) or real(s, e, c))
    rows = pretrain.pretrain_imp(main, pretrain.parse_task("blur"), 1, levels=1)
    assert starts[0] == 6 and 0 not in starts  # level 0 and level 1 both go on from step 6
    assert {r["level"] for r in rows} == {0, 1} and {r["task"] for r in rows} == {"blur4"}
    starts.clear()
    pretrain.pretrain_imp(main, pretrain.parse_task("blur"), 1, levels=1, offset="none")
    assert starts[0] == 0


def test_sparse_pretraining_keeps_pruned_weights_at_zero(main):
    rows = pretrain.sparse_pretrain(main, pretrain.parse_task("rotation"), 1, level=1, rewind=3)
    assert {r["level"] for r in rows} == {1} and all(r["density"] < 0.85 for r in rows)
    dense = pipeline.dense_run_dir(main)
    root = pretrain.study_dir(main, dense, pretrain.parse_task("rotation"), 1, "replace",
                              "_sparse_level1_k3")
    pre_trainer = pretrain.pretrain_trainer(main, pretrain.parse_task("rotation"), 1)
    pre = pipeline.RunDir(f"{root}/pretrain").restore(pre_trainer.total_steps, pre_trainer.abstract_state(2))
    body_mask = {k: v for k, v in pre.mask.items() if k != "head"}
    for kernel, kept in masks.masked_kernels({k: pre.params[k] for k in body_mask}, body_mask).values():
        assert np.all(np.asarray(kernel)[~np.asarray(kept)] == 0) and not np.all(np.asarray(kept))
