import os

import jax
import numpy as np
import pytest

from early_jax import checkpoint, files, masks, pipeline
from early_jax.errors import UserError
from early_jax.pipeline import Experiment
from early_jax.runner import RunDir
from early_jax.train import current_step
from helpers import TINY_DATA, tiny_config, with_workdir

REWINDS = [0, 3]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 2-level, 2-rewind-point, 2-seed IMP study on tiny data, run once for the module."""
    exp = Experiment(with_workdir(tiny_config(), tmp_path_factory.mktemp("imp")), TINY_DATA)
    return exp, pipeline.imp(exp, REWINDS, levels=2)


def test_study_has_every_row_with_nested_densities(study):
    exp, rows = study
    assert len(rows) == 2 * 3 * 2
    for row in rows:
        assert row["density"] == pytest.approx(0.8 ** row["level"], abs=0.01)
        assert 0 <= row["accuracy"] <= 1
    dense = {(r["seed"]) : r["accuracy"] for r in rows if r["level"] == 0}
    assert len(dense) == 2


def test_rewinding_restores_step_k_exactly_with_a_fresh_optimizer(study):
    exp, _ = study
    state_3 = pipeline.state_at(exp, 3)
    assert current_step(state_3) == 3
    mask = pipeline.prune_next(exp, state_3)
    rewound = pipeline.rewind(exp, state_3, mask)
    np.testing.assert_array_equal(np.asarray(rewound.step), [3, 3])
    for a, b in zip(jax.tree.leaves(rewound.batch_stats), jax.tree.leaves(state_3.batch_stats)):
        np.testing.assert_array_equal(a, b)
    masked = jax.vmap(masks.apply_mask)(state_3.params, mask)
    for a, b in zip(jax.tree.leaves(rewound.params), jax.tree.leaves(masked)):
        np.testing.assert_array_equal(a, b)
    assert all(float(np.abs(t).max()) == 0.0 for t in jax.tree.leaves(rewound.opt_state))
    assert any(float(np.abs(t).max()) > 0 for t in jax.tree.leaves(state_3.opt_state))


def test_a_step_missing_from_the_grid_is_replayed_exactly(study):
    exp, _ = study
    assert 4 not in exp.run_dir(exp.dense).checkpoints().steps()
    replayed = pipeline.state_at(exp, 4)
    direct = exp.trainer.advance(pipeline.state_at(exp, 3), 4)[0]
    for a, b in zip(jax.tree.leaves(replayed), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(a, b)


def test_level_one_trains_from_the_rewound_dense_state(study):
    exp, _ = study
    final = pipeline.final_states(exp, exp.level(3, 1))
    expected_mask = pipeline.prune_next(exp, pipeline.state_at(exp, exp.total_steps))
    for a, b in zip(jax.tree.leaves(final.mask), jax.tree.leaves(expected_mask)):
        np.testing.assert_array_equal(a, b)
    result = exp.level(3, 1).result(exp.config.workdir)
    kept = sum(int(np.asarray(m[0]).sum()) for m in jax.tree.leaves(final.mask))
    assert result["kept"][0] == kept and result["density"][0] == pytest.approx(kept / result["prunable"])


def test_rerun_finds_every_level_from_json_and_restores_nothing(study, monkeypatch):
    exp, rows = study
    restores = []
    real_restore = checkpoint.Checkpoints.restore
    monkeypatch.setattr(checkpoint.Checkpoints, "restore", lambda *a, **k: restores.append(a[1]) or real_restore(*a, **k))
    monkeypatch.setattr(exp.trainer, "advance", lambda *a, **k: pytest.fail("nothing may be retrained"))
    assert pipeline.imp(exp, REWINDS, levels=2) == rows
    assert restores == []
    assert sorted(map(str, pipeline.imp_rows_on_disk(exp)), key=str) == sorted(map(str, rows), key=str)


def test_resume_after_a_kill_recomputes_only_the_unfinished_level(tmp_path):
    exp = Experiment(with_workdir(tiny_config(), tmp_path), TINY_DATA)
    trainer = exp.trainer
    real_advance = trainer.advance

    def dies_midway_through_level_two(states, end, on_chunk=None, stop=None):
        if float(np.asarray(masks.density(jax.tree.map(lambda m: m[0], states.mask)))) < 0.7 \
                and current_step(states) >= 12:
            raise KeyboardInterrupt
        return real_advance(states, end, on_chunk)

    trainer.advance = dies_midway_through_level_two
    with pytest.raises(KeyboardInterrupt):
        pipeline.imp(exp, [3], levels=2)
    dense, level1, level2 = (exp.run_dir(exp.level(3, level)) for level in (0, 1, 2))
    assert dense.complete() and level1.complete() and not level2.complete()
    stamp = os.path.getmtime(level1.file("result.json"))
    starts = []
    trainer.advance = lambda s, e, c=None, stop=None: starts.append(current_step(s)) or real_advance(s, e, c)
    rows = pipeline.imp(exp, [3], levels=2)
    assert os.path.getmtime(level1.file("result.json")) == stamp
    assert starts[0] == 12  # level 2 went on from its last checkpoint; nothing before it reran
    assert len(rows) == 3 * 2 and level2.complete()


def test_rewind_steps_outside_the_run_are_refused_before_training(study):
    exp, _ = study
    with pytest.raises(UserError, match="outside the run"):
        pipeline.check_rewind_steps(exp, [0, 500])


def test_rewind_steps_before_the_checkpoint_grid_are_refused(study, tmp_path):
    no_grid = Experiment(with_workdir(tiny_config(save_steps="3it"), str(tmp_path)), TINY_DATA)
    with pytest.raises(UserError, match="precedes the first saved step 3"):
        pipeline.check_rewind_steps(no_grid, [2])
    pipeline.check_rewind_steps(no_grid, [0, 3, 5])  # 0 is rebuilt from the seeds, 5 replayed from 3
    # a dense run already on disk answers with the checkpoints it has, not the grid asked for now
    pipeline.train_dense(no_grid)
    finer = Experiment(with_workdir(tiny_config(save_steps="1it,3it"), str(tmp_path)), TINY_DATA)
    with pytest.raises(UserError, match=r"already \(partly\) trained"):
        pipeline.check_rewind_steps(finer, [1])


def test_step_zero_without_a_checkpoint_is_rebuilt_from_the_seeds(tmp_path):
    exp = Experiment(with_workdir(tiny_config(save_steps="3it"), str(tmp_path)), TINY_DATA)
    pipeline.train_dense(exp)
    assert 0 not in exp.run_dir(exp.dense).checkpoints().steps()
    rebuilt, fresh = pipeline.state_at(exp, 0), exp.trainer.init(exp.seeds)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(a, b)


def test_a_run_computed_another_way_is_not_replayed(study, tmp_path):
    exp, _ = study
    dense = exp.run_dir(exp.dense)
    assert files.read_json(dense.file("execution.json")) == exp.trainer.execution
    pipeline.check_replayable(exp, dense, 4)
    other = RunDir(str(tmp_path / "other"))
    files.write_json(other.file("execution.json"), exp.trainer.execution | {"seed_parallel": "other"})
    with pytest.raises(UserError, match="not reproduce the run"):
        pipeline.check_replayable(exp, other, 4)
