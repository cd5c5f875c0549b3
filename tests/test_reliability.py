"""Never a silent wrong result: divergence, damaged files, bad data and settings, interrupted runs."""
import dataclasses
import errno
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from early_jax import data, files, pipeline, runner, tables
from early_jax.errors import UserError
from early_jax.pipeline import Experiment
from early_jax.train import Trainer
from helpers import TINY_DATA, TinyRun, tiny_config, with_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----- divergence -----
def test_a_diverging_run_stops_with_the_seed_step_and_last_good_checkpoint(tmp_path):
    exp = Experiment(with_workdir(tiny_config(lr=1e4), tmp_path), TINY_DATA)
    with pytest.raises(UserError, match=r"training diverged .*seed 0 at step \d+.* last good checkpoint is "
                                        r"step \d+ in .*, kept.*--on_divergence=drop") as err:
        pipeline.train_dense(exp)
    kept = int(str(err.value).split("checkpoint is step ")[1].split()[0])
    run_dir = exp.run_dir(exp.dense)
    assert not run_dir.complete() and kept in run_dir.checkpoints().steps()
    run_dir.restore(kept, exp.trainer.abstract_state(2))  # the kept state is finite and loads


def test_drop_finishes_the_other_seeds_and_marks_the_diverged_one(tmp_path):
    trainer = Trainer(tiny_config(on_divergence="drop"), TINY_DATA)
    healthy = runner.run(trainer, TinyRun("a"), workdir=str(tmp_path), initial=lambda: trainer.init([0, 1]))

    def one_broken():
        states = trainer.init([0, 1])
        return states.replace(params=jax.tree.map(lambda x: x.at[1].set(jnp.nan), states.params))

    dropped = runner.run(trainer, TinyRun("b"), workdir=str(tmp_path), initial=one_broken)
    assert dropped.result["diverged"] == [False, True] and dropped.result["diverged_at"] == [None, 1]
    assert dropped.result["test_accuracy"][0] == healthy.result["test_accuracy"][0]  # seed 0 untouched
    assert np.isnan(dropped.result["test_accuracy"][1])
    rows = pipeline.result_rows(dropped.result, level=0)
    assert [r["diverged"] for r in rows] == [False, True]
    assert tables.stat([r["accuracy"] for r in tables.finite_rows(rows)]).n == 1  # never averaged in
    # a rerun finds the marks (also after a resume, from divergence.json)
    again = runner.run(trainer, TinyRun("b"), workdir=str(tmp_path), initial=lambda: pytest.fail("found"))
    assert again.result["diverged"] == [False, True]


def test_pruning_and_rewinding_refuse_non_finite_weights(tmp_path):
    exp = Experiment(with_workdir(tiny_config(), tmp_path), TINY_DATA)
    states = exp.trainer.init([0, 1])
    broken = states.replace(params=jax.tree.map(lambda x: x.at[0].set(jnp.inf), states.params))
    with pytest.raises(UserError, match=r"cannot prune: the weights of row\(s\) \[0\] are not finite"):
        pipeline.prune_next(exp, broken)
    with pytest.raises(UserError, match="cannot rewind"):
        pipeline.rewind(exp, broken, states.mask)


# ----- data and settings -----
@pytest.mark.parametrize("change,match", [
    (dict(x_test=np.zeros((0, 8, 8, 1), np.uint8), y_test=np.zeros(0, int)), "test split is empty"),
    (dict(x_train=np.zeros((16, 8, 8, 0), np.uint8)), r"H, W, C >= 1"),
    (dict(y_train=np.linspace(0, 3, 96)), "not whole numbers"),
    (dict(y_train=np.where(np.arange(96) == 5, 200, np.arange(96) % 4)), "would make a 201-class model"),
])
def test_bad_dataset_arrays_are_one_sentence(change, match):
    arrays = dict(x_train=TINY_DATA.x_train, y_train=TINY_DATA.y_train, x_test=TINY_DATA.x_test,
                  y_test=TINY_DATA.y_test) | change
    if "x_train" in change and "y_train" not in change:
        arrays["y_train"] = np.arange(len(arrays["x_train"])) % 4
    with pytest.raises(UserError, match=match):
        data.make_dataset("bad", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])


@pytest.mark.parametrize("model,shape", [("vgg11", (8, 8, 3)), ("convnet_tiny", (1, 1, 1))])
def test_images_too_small_for_the_model_are_one_sentence(model, shape):
    small = data.synthetic(num_train=32, num_test=8, shape=shape, num_classes=4)
    with pytest.raises(UserError, match=f"{model} cannot take {'x'.join(map(str, shape))} images"):
        Trainer(tiny_config(model=model), small)


# ----- files and the work dir -----
def test_a_damaged_middle_line_of_the_metrics_log_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "te\n{"step": 3}\n')
    with pytest.raises(UserError, match="metrics.jsonl line 2 is damaged"):
        files.read_jsonl(str(path))


def test_imp_tables_gather_every_rewind_step_finished_on_disk(tmp_path):
    exp = Experiment(with_workdir(tiny_config(), tmp_path), TINY_DATA)
    pipeline.imp(exp, [0], 1)
    pipeline.imp(exp, [3], 1)  # a later call with other rewind steps
    assert {(r["rewind"], r["level"]) for r in pipeline.imp_rows_on_disk(exp)} == {(0, 0), (0, 1), (3, 0), (3, 1)}


def test_a_kill_during_a_checksum_write_resumes_to_the_same_result(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(), TINY_DATA)
    whole = runner.run(trainer, TinyRun("a"), workdir=str(tmp_path), initial=lambda: trainer.init([0, 1]),
                       save_steps=[3, 6])

    class Killed(BaseException):
        pass

    real_atomic = files.atomic

    def dies_writing_the_checksum_of_step_6(path, mode="w"):
        handle = real_atomic(path, mode)
        if path.endswith(os.path.join("checksums", "6.json")):
            class Dying:
                def __enter__(self):
                    f = handle.__enter__()
                    f.write('{"par')  # half of the file in the temporary, then the process dies
                    raise Killed
                def __exit__(self, *exc):
                    return False
            return Dying()
        return handle

    monkeypatch.setattr(files, "atomic", dies_writing_the_checksum_of_step_6)
    with pytest.raises(Killed):
        runner.run(trainer, TinyRun("b"), workdir=str(tmp_path), initial=lambda: trainer.init([0, 1]),
                   save_steps=[3, 6])
    monkeypatch.setattr(files, "atomic", real_atomic)
    assert not os.path.exists(tmp_path / "b" / "checksums" / "6.json")
    resumed = runner.run(trainer, TinyRun("b"), workdir=str(tmp_path), initial=lambda: pytest.fail("resume"),
                         save_steps=[3, 6])
    assert resumed.result["test_accuracy"] == whole.result["test_accuracy"]
    for a, b in zip(jax.tree.leaves(whole.states()), jax.tree.leaves(resumed.states())):
        np.testing.assert_array_equal(a, b)
    runner.RunDir(str(tmp_path / "b")).restore(6, trainer.abstract_state(2))  # verified against its checksum


# ----- the command line (subprocesses: exit codes and what the user sees) -----
def script(tmp_path, name, *flags, env=None, pre="pass"):
    """Run experiments/<name> on the tiny data; `pre` is Python run first (e.g. a patch)."""
    npz = tmp_path / "tiny.npz"
    if not npz.exists():
        data.save_npz(TINY_DATA, str(npz))
    base = [f"--dataset={npz}", "--model=convnet_tiny", "--batch_size=16", "--duration=4ep",
            "--milestones=2ep", "--eval_every=2ep", "--eval_batch_size=16", "--save_steps=0it,3it,6it",
            "--num_seeds=2", f"--workdir={tmp_path / 'wd'}"]
    code = (f"import sys, runpy; sys.argv = {[name] + base + list(flags)!r}; {pre}; "
            f"runpy.run_path({os.path.join(ROOT, 'experiments', name)!r}, run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name,flags,match", [
    ("shuffle_weights.py", ["--rewind_iters=100"], "--rewind_iters is not read by this script; use --rewind_iter"),
    ("train.py", ["--fraction=0.5"], "--fraction is not read by this script"),
    ("train.py", ["--lr=inf"], "--lr must be finite"),
    ("train.py", ["--warmup=100it"], "longer than the run"),
    ("train.py", ["--num_seed=3"], "did you mean --num_seeds"),
    ("train.py", ["--distributed"], "--distributed found no cluster"),
])
def test_refusals_are_exit_code_2_and_one_error_line(tmp_path, name, flags, match):
    code, _, err = finish(script(tmp_path, name, *flags))
    assert code == 2 and match in error_line(err)


def test_a_full_disk_mid_run_is_one_line_and_a_rerun_resumes(tmp_path):
    full = ("import errno, early_jax.files as f; real = f.atomic\n"
            "def atomic(path, mode='w'):\n"
            "    if path.endswith('result.json'): raise OSError(errno.ENOSPC, 'No space left on device', path)\n"
            "    return real(path, mode)\n"
            "f.atomic = atomic")
    code, _, err = finish(script(tmp_path, "train.py", pre=f"exec({full!r})"))
    assert code == 2 and "the disk is full; free space or pass another --workdir" in error_line(err)
    dense = [d for d in os.listdir(tmp_path / "wd") if d.startswith("dense_")]
    assert dense and os.listdir(tmp_path / "wd" / dense[0] / "checkpoints")  # what was done is kept
    code, out, err = finish(script(tmp_path, "train.py"))
    assert code == 0 and "resuming from step 24" in out, err


def test_a_read_only_work_dir_is_one_line(tmp_path):
    read_only = ("import errno, early_jax.files as f\n"
                 "def atomic(path, mode='w'): raise OSError(errno.EROFS, 'Read-only file system', path)\n"
                 "f.atomic = atomic")
    code, _, err = finish(script(tmp_path, "train.py", pre=f"exec({read_only!r})"))
    assert code == 2 and "the file system is read-only" in error_line(err)


def test_sigterm_saves_the_step_reached_and_the_rerun_ends_where_an_uninterrupted_run_does(tmp_path):
    long = ["--duration=400ep", "--milestones=200ep", "--eval_every=400ep"]
    slow = "import time, early_jax.train as t; real = t.Trainer.advance\n" \
           "def advance(self, *a, **k):\n    time.sleep(0.2)\n    return real(self, *a, **k)\n" \
           "t.Trainer.advance = advance"
    reference = finish(script(tmp_path / "ref", "train.py", *long))
    assert reference[0] == 0, reference[2]
    proc = script(tmp_path / "cut", "train.py", *long, pre=f"exec({slow!r})")
    for line in proc.stdout:  # wait for the plan; training starts right after it
        if "estimated total" in line:
            break
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 143 and "terminated (SIGTERM) at step" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err
    stopped = int(err.split("at step ")[1].split(":")[0])
    assert 0 < stopped < 2400
    code, out, err = finish(script(tmp_path / "cut", "train.py", *long))
    assert code == 0 and f"resuming from step {stopped}" in out, err
    result = lambda root: files.read_json(next(str(p) for p in (root / "wd").glob("dense_*/result.json")))
    ref, resumed = result(tmp_path / "ref"), result(tmp_path / "cut")
    assert (ref["test_accuracy"], ref["test_loss"]) == (resumed["test_accuracy"], resumed["test_loss"])
