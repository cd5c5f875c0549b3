import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import files, masks, runner, sharding
from early_jax.checkpoint import Checkpoints
from early_jax.config import TrainConfig
from early_jax.errors import UserError
from early_jax.train import Trainer, current_step, make_schedule
from helpers import TINY_DATA, TinyRun, tiny_config


def assert_trees_equal(a, b, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def trainer():
    return Trainer(tiny_config(), TINY_DATA)


def test_schedule_is_a_function_of_the_absolute_step():
    sched = make_schedule(TrainConfig(lr=0.1, milestones=("80ep", "120ep")), 391)
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(31_279)) == pytest.approx(0.1)
    assert float(sched(31_280)) == pytest.approx(0.01)
    assert float(sched(46_920)) == pytest.approx(0.001)
    warm = make_schedule(TrainConfig(lr=0.2, milestones=("10it",), warmup="4it"), 5)
    assert [round(float(warm(s)), 6) for s in (0, 1, 2, 4, 9, 10)] == [0.0, 0.05, 0.1, 0.2, 0.2, 0.02]


def test_rewound_run_continues_the_schedule(trainer):
    """A run started at step k sees the learning rates of steps k, k+1, ... of the full run."""
    lr = [float(trainer.fns.schedule(t)) for t in range(trainer.total_steps)]
    assert lr[11] == pytest.approx(0.05) and lr[12] == pytest.approx(0.005)


def test_seed_i_of_a_multi_seed_run_equals_its_single_seed_run(trainer):
    both, metrics = trainer.advance(trainer.init([0, 1]), 9)
    alone, alone_metrics = trainer.advance(trainer.init([1]), 9)
    assert_trees_equal(jax.tree.map(lambda x: x[1:], both.params), alone.params, atol=1e-5)
    np.testing.assert_allclose(metrics["loss"][:, 1], alone_metrics["loss"][:, 0], atol=1e-5)
    assert not np.allclose(metrics["loss"][:, 0], metrics["loss"][:, 1])  # seeds really differ


def test_vmap_and_sequential_seeds_give_the_same_numbers(trainer):
    assert trainer.parallel == "map"  # the CPU default
    other = Trainer(tiny_config(seed_parallel="vmap"), TINY_DATA)
    a, _ = trainer.advance(trainer.init([0, 1]), 7)
    b, _ = other.advance(other.init([0, 1]), 7)
    assert_trees_equal(a.params, b.params, atol=1e-5)


def test_training_splits_anywhere_with_the_same_data_order(trainer):
    """Steps a->b then b->c equal a->c: data order and augmentation depend only on the step."""
    whole, _ = trainer.advance(trainer.init([0, 1]), 13)
    part, _ = trainer.advance(trainer.init([0, 1]), 5)
    part, _ = trainer.advance(part, 13)
    assert current_step(part) == 13
    assert_trees_equal(whole, part)


def test_pruned_weights_stay_exactly_zero_and_training_learns(trainer):
    states = trainer.init([0, 1])
    pruned = jax.vmap(lambda p, m: masks.magnitude_prune(p, m, 0.7))(states.params, states.mask)
    states = states.replace(mask=pruned, params=jax.vmap(masks.apply_mask)(states.params, pruned))
    before = trainer.evaluate(states)["test_loss"]
    states, _ = trainer.advance(states, trainer.total_steps)
    for kernel, kept in masks.masked_kernels(states.params, states.mask).values():
        kernel, kept = np.asarray(kernel), np.asarray(kept)
        assert np.all(kernel[~kept] == 0.0) and np.all(kernel[kept] != 0.0)
    assert np.all(trainer.evaluate(states)["test_loss"] < before)


def test_checkpoint_round_trip_of_the_full_state(trainer, tmp_path):
    states, _ = trainer.advance(trainer.init([0, 1]), 4)
    store = Checkpoints(str(tmp_path / "ck"), writable=True)
    store.save(4, states)
    restored = Checkpoints(str(tmp_path / "ck")).restore(4, trainer.abstract_state(2))
    assert_trees_equal(states, restored)
    assert current_step(restored) == 4 and restored.opt_state[1].trace  # momentum buffers came back


def test_mismatched_checkpoint_names_the_folder_and_step(trainer, tmp_path):
    store = Checkpoints(str(tmp_path / "ck"), writable=True)
    store.save(0, trainer.init([0, 1]))
    with pytest.raises(UserError, match=r"ck/checkpoints/0 \(step 0\)"):
        store.restore(0, trainer.abstract_state(4))
    other = Trainer(tiny_config(model="lenet300_100"), TINY_DATA)
    with pytest.raises(UserError, match="different configuration or is damaged"):
        store.restore(0, other.abstract_state(2))
    with pytest.raises(UserError, match="no checkpoint for step 7"):
        store.restore(7, trainer.abstract_state(2))


def test_corrupt_checkpoint_is_a_clear_error(trainer, tmp_path):
    store = Checkpoints(str(tmp_path / "ck"), writable=True)
    store.save(3, trainer.advance(trainer.init([0, 1]), 3)[0])
    for root, _, names in os.walk(tmp_path / "ck" / "checkpoints" / "3"):
        for name in names:
            if "manifest" in name or name.startswith(("_", "d")):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    with pytest.raises(UserError, match="step 3"):
        Checkpoints(str(tmp_path / "ck")).restore(3, trainer.abstract_state(2))


def test_a_checkpoint_whose_arrays_changed_fails_its_checksum(trainer, tmp_path):
    import shutil
    states = trainer.advance(trainer.init([0, 1]), 3)[0]
    Checkpoints(str(tmp_path / "ck"), writable=True).save(3, states)
    # damage Orbax cannot see: valid files holding other numbers (one weight moved by one ulp)
    kernel = states.params["fc"]["kernel"]
    changed = states.replace(params={**states.params, "fc": {**states.params["fc"],
                                     "kernel": kernel.at[1, 0, 0].set(jnp.nextafter(kernel[1, 0, 0], 9.0))}})
    Checkpoints(str(tmp_path / "other"), writable=True).save(3, changed)
    shutil.rmtree(tmp_path / "ck" / "checkpoints" / "3")
    shutil.copytree(tmp_path / "other" / "checkpoints" / "3", tmp_path / "ck" / "checkpoints" / "3")
    with pytest.raises(UserError, match=r"step 3\) is damaged: 1 array\(s\) differ from their checksums \(params/fc/kernel\)"):
        Checkpoints(str(tmp_path / "ck")).restore(3, trainer.abstract_state(2))


def test_non_finite_weights_in_a_checkpoint_are_refused_and_old_ones_load_unverified(trainer, tmp_path, capsys):
    states = trainer.init([0, 1])
    bad = states.replace(params=jax.tree.map(lambda x: x * jnp.nan, states.params))
    store = Checkpoints(str(tmp_path / "ck"), writable=True)
    store.save(0, bad)
    with pytest.raises(UserError, match="holds non-finite parameters"):
        store.restore(0, trainer.abstract_state(2))
    store.save(1, states.replace(step=states.step + 1))
    os.remove(tmp_path / "ck" / "checksums" / "1.json")  # as a checkpoint of an earlier version
    restored = Checkpoints(str(tmp_path / "ck")).restore(1, trainer.abstract_state(2))
    assert_trees_equal(states.params, restored.params)
    assert "carry no checksums" in capsys.readouterr().err


def test_training_past_the_end_is_refused(trainer):
    with pytest.raises(UserError, match="ends at step 24"):
        trainer.advance(trainer.init([0, 1]), 25)


def test_seed_count_must_divide_over_devices():
    mesh = sharding.seed_mesh(np.array(jax.devices() * 3))  # pretend 3 devices
    with pytest.raises(UserError, match="not a multiple of the 3 devices"):
        sharding.check_seed_count(4, mesh)


def test_kill_and_resume_gives_the_uninterrupted_result(trainer, tmp_path):
    go = lambda name, initial, **kw: runner.run(trainer, TinyRun(name, **kw), workdir=str(tmp_path),
                                                initial=initial, save_steps=[3])
    whole = go("a", lambda: trainer.init([0, 1]))

    class Killed(Exception):
        pass

    def killed_after(step):
        def on_boundary(s, _):
            if s > step:
                raise Killed
        return on_boundary

    run_dir = runner.RunDir(str(tmp_path / "b"))
    real_advance = trainer.advance
    try:
        trainer.advance = lambda states, end, on_chunk=None, stop=None: real_advance(states, end, killed_after(14))
        with pytest.raises(Killed):
            go("b", lambda: trainer.init([0, 1]))
    finally:
        trainer.advance = real_advance
    assert run_dir.latest_step() == 12 and not run_dir.complete()
    resumed = go("b", lambda: pytest.fail("must resume, not restart"))
    assert_trees_equal(whole.states(), resumed.states())
    assert resumed.result["test_accuracy"] == whole.result["test_accuracy"]
    lines = [l["step"] for l in files.read_jsonl(os.path.join(run_dir.path, "metrics.jsonl"))]
    assert lines == [12, 24]
    assert runner.RunDir(str(tmp_path / "b")).checkpoints().steps() == [3, 24]  # the resume point is gone
    # a finished run is found from its JSON, not retrained; its states load on demand
    again = go("b", lambda: pytest.fail("must load"))
    assert again.result == resumed.result
    assert_trees_equal(whole.states(), again.states())
    with pytest.raises(UserError, match="holds a different run"):
        go("b", lambda: None, seeds=(0, 2))


def test_a_kill_right_after_saving_an_evaluated_step_keeps_its_metrics_line(trainer, tmp_path, monkeypatch):
    from early_jax import checkpoint

    class Killed(Exception):
        pass

    real_save = checkpoint.Checkpoints.save

    def save_then_die(self, step, state):
        real_save(self, step, state)
        if step == 12:
            raise Killed

    go = lambda initial: runner.run(trainer, TinyRun("r"), workdir=str(tmp_path), initial=initial,
                                    save_steps=[12])
    monkeypatch.setattr(checkpoint.Checkpoints, "save", save_then_die)
    with pytest.raises(Killed):
        go(lambda: trainer.init([0, 1]))
    monkeypatch.setattr(checkpoint.Checkpoints, "save", real_save)
    go(lambda: pytest.fail("must resume"))
    lines = files.read_jsonl(str(tmp_path / "r" / "metrics.jsonl"))
    assert [line["step"] for line in lines] == [12, 24] and [l["train_steps"] for l in lines] == [12, 12]


def test_a_run_dir_trains_in_one_process_at_a_time(trainer, tmp_path):
    import fcntl
    (tmp_path / "locked").mkdir()
    with open(tmp_path / "locked" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another process training it would
        with pytest.raises(UserError, match="another process is training"):
            runner.run(trainer, TinyRun("locked"), workdir=str(tmp_path),
                       initial=lambda: pytest.fail("must not start"))


def test_restoring_a_seed_count_the_devices_cannot_split_is_a_clear_error(trainer, monkeypatch):
    monkeypatch.setattr(trainer, "mesh", sharding.seed_mesh(np.array(jax.devices() * 3)))
    with pytest.raises(UserError, match="not a multiple of the 3 devices"):
        trainer.abstract_state(4)


FOUR_DEVICES = textwrap.dedent("""
    import sys, numpy as np, jax
    sys.path.insert(0, sys.argv[1])
    from helpers import TINY_DATA, TinyRun, tiny_config
    from early_jax import sharding
    from early_jax.train import Trainer
    assert len(jax.devices()) == 4
    out = []
    for devices in (jax.devices(), jax.devices()[:1]):
        tr = Trainer(tiny_config(), TINY_DATA, mesh=sharding.seed_mesh(devices))
        states, _ = tr.advance(tr.init([0, 1, 2, 3]), 8)
        assert len(states.params['head']['kernel'].sharding.device_set) == len(devices)
        out.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(states.params)]))
        out.append(tr.evaluate(states)['test_accuracy'])
    np.testing.assert_allclose(out[0], out[2], atol=1e-5)
    np.testing.assert_allclose(out[1], out[3], atol=1e-6)
    print("OK")
""")


def test_four_device_run_equals_one_device_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_a_metrics_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "test_acc')
    assert [line["step"] for line in files.read_jsonl(str(path))] == [1, 2]
