"""Run identity: names from non-default fields, paths that create nothing, data by content."""
import dataclasses
import os

import numpy as np
import pytest

from early_jax import config as cfg
from early_jax import data, runs, study
from early_jax.errors import UserError
from early_jax.perturb import Treatment
from early_jax.pipeline import Experiment
from early_jax.pretrain import Task
from helpers import TINY_DATA, tiny_config, with_workdir


def every_kind(exp: Experiment, plan=study.Plan()) -> list[runs.Run]:
    """One descriptor of each kind of run."""
    level = exp.level(3, 2)
    pre = runs.Pretraining(exp.dense, Task(blur=4), 1)
    return [exp.dense, level,
            runs.Perturbation(exp.dense, exp.prune, 3, ((1, Treatment("noise", 1.0)), (2, Treatment("reinit")))),
            runs.InstabilityCopies(exp.dense, None, 0, (0, 3)),
            runs.InstabilityCopies(exp.dense, exp.prune, 2, (0, 3)),
            runs.Telemetry(exp.dense, 12, 1, level), pre, runs.Pretraining(exp.dense, Task(rotation="fixed"), 2, level),
            runs.AfterPretraining(pre, "none"), runs.AfterPretraining(pre, "replace", exp.prune, 2),
            runs.Study(exp.dense, exp.prune, plan)]


def with_new_field(instance, name="new_knob", default=0.5):
    """The same values in a copy of the instance's dataclass with one more field (with a default)."""
    cls = type(instance)
    extended = dataclasses.make_dataclass(cls.__name__, [(name, float, dataclasses.field(default=default))],
                                          bases=(cls,), frozen=True)
    return extended(**{f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)})


def test_adding_a_config_field_with_a_default_keeps_every_run_path(tmp_path):
    config = with_workdir(tiny_config(), tmp_path)
    exp = Experiment(config, TINY_DATA)
    before = [d.path(str(tmp_path)) for d in every_kind(exp)]
    extended = dataclasses.replace(config, model=with_new_field(config.model), train=with_new_field(config.train),
                                   prune=with_new_field(config.prune))
    later = Experiment(extended, TINY_DATA)
    assert [d.path(str(tmp_path)) for d in every_kind(later, with_new_field(study.Plan()))] == before
    # a value other than the default is part of the identity
    changed = dataclasses.replace(extended, train=dataclasses.replace(extended.train, new_knob=0.7))
    assert Experiment(changed, TINY_DATA).dense.folder() != exp.dense.folder()


def test_only_what_determines_the_numbers_names_a_run(tmp_path):
    exp = Experiment(with_workdir(tiny_config(), tmp_path), TINY_DATA)
    how = tiny_config(eval_every="1ep", save_steps="0it", seed_parallel="vmap", eval_batch_size=8,
                      on_divergence="drop", levels=5, rewind_iters="0it")
    assert Experiment(with_workdir(how, tmp_path), TINY_DATA).dense.folder() == exp.dense.folder()
    for flag, value in (("lr", "0.07"), ("augment", "false"), ("weight_decay", "0"), ("num_seeds", "4"),
                        ("matmul_precision", "default")):
        other = Experiment(with_workdir(tiny_config(**{flag: value}), tmp_path), TINY_DATA)
        assert other.dense.folder() != exp.dense.folder(), flag
    pruned = Experiment(with_workdir(tiny_config(fraction="0.5"), tmp_path), TINY_DATA)
    assert pruned.dense == exp.dense and pruned.level(3, 1).folder() != exp.level(3, 1).folder()


def test_computing_paths_and_asking_about_runs_creates_nothing(tmp_path):
    workdir = tmp_path / "fresh"
    exp = Experiment(with_workdir(tiny_config(), workdir), TINY_DATA)
    for descriptor in every_kind(exp):
        descriptor.path(str(workdir))
        assert not descriptor.exists(str(workdir)) and not descriptor.complete(str(workdir))
        exp.run_dir(descriptor).checkpoints().steps()
    from early_jax import pipeline
    pipeline.check_rewind_steps(exp, [0, 3])
    pipeline.imp_rows_on_disk(exp)
    assert not workdir.exists()


def test_the_data_is_identified_by_its_content_not_its_path(tmp_path):
    path_a, path_b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    data.save_npz(TINY_DATA, path_a)
    data.save_npz(TINY_DATA, path_b)
    name = lambda path: Experiment(with_workdir(tiny_config(dataset=path), tmp_path),
                                   data.load(path)).dense.folder()
    assert name(path_a) == name(path_b)  # the same arrays from another file: the same run
    first = name(path_a)
    x_test = TINY_DATA.x_test.copy()
    x_test[0, 0, 0, 0] ^= 1  # one pixel of one test image, edited in place
    stat = os.stat(path_a)
    data.save_npz(dataclasses.replace(TINY_DATA, x_test=x_test), path_a)
    assert os.stat(path_a).st_size == stat.st_size  # the same size: only the content tells
    os.utime(path_a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as an edit a second later
    assert name(path_a) != first


def test_run_dirs_of_the_earlier_layout_are_refused_with_a_way_out(tmp_path):
    exp = Experiment(with_workdir(tiny_config(), tmp_path), TINY_DATA)
    old = tmp_path / f"dense_{exp.dense.label}_0123456789_seeds0-1"
    old.mkdir()
    (old / "run.json").write_text('{"kind": "dense", "seeds": [0, 1]}')
    with pytest.raises(UserError, match="earlier early_jax .* move that folder out of the work dir"):
        Experiment(with_workdir(tiny_config(), tmp_path), TINY_DATA)


def test_identity_leaves_out_defaults_and_non_identity_fields():
    assert runs.identity(cfg.TrainConfig()) == {}
    assert runs.identity(cfg.TrainConfig(lr=0.2, eval_every="3ep")) == {"lr": 0.2}
    assert runs.identity(cfg.DataConfig(name="x", data_dir="/y")) == {}
    assert runs.identity(Treatment("noise", 2.0)) == {"name": "noise", "scale": 2.0}
    np.testing.assert_equal(runs.digest(Treatment("reinit")), runs.digest(Treatment("reinit")))
