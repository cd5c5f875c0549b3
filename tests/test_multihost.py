"""Multi-controller runs on this machine: several JAX processes on 127.0.0.1 with CPU collectives,
each with its own CPU devices (a real multi-host run, as on a TPU pod slice), against one process
with as many devices."""
import glob
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from early_jax import data
from helpers import TINY_DATA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=convnet_tiny", "--batch_size=16", "--duration=4ep", "--milestones=2ep", "--eval_every=2ep",
        "--eval_batch_size=16", "--save_steps=0it,3it,6it", "--num_seeds=4", "--levels=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, flags, workdir, processes, devices_each):
    """Start `processes` processes of experiments/<script> (one if processes == 1, no cluster)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}")
    port = free_port()
    procs = []
    for i in range(processes):
        cluster = ([] if processes == 1 else
                   ["--distributed", f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                    f"--process_id={i}"])
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", script), *flags,
                                       f"--workdir={workdir}", *cluster], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def wait_all(procs, timeout=400):
    out = [p.communicate(timeout=timeout) for p in procs]
    for p, (o, e) in zip(procs, out):
        assert p.returncode == 0, e[-3000:]
    return out


def run_all(script, flags, workdir, processes, devices_each):
    return wait_all(launch(script, flags, workdir, processes, devices_each))


def results(workdir) -> dict:
    """{run folder relative to the work dir: (result numbers, final-checkpoint checksums)}."""
    out = {}
    for path in glob.glob(f"{workdir}/**/result.json", recursive=True):
        folder = os.path.dirname(path)
        result = json.load(open(path))
        numbers = {k: result.get(k) for k in ("test_accuracy", "test_loss", "density", "kept", "seeds")}
        sums = sorted(glob.glob(f"{folder}/checksums/*.json"))
        out[os.path.relpath(folder, workdir)] = (numbers, [json.load(open(s)) for s in sums])
    return out


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "tiny.npz")
    data.save_npz(TINY_DATA, path)
    return path


@pytest.fixture(scope="module")
def single(npz, tmp_path_factory):
    """IMP (2 levels, rewinding to 0 and 3) and a perturbation branch: one process, 4 devices."""
    workdir = str(tmp_path_factory.mktemp("one"))
    run_all("imp.py", [f"--dataset={npz}", *TINY, "--rewind_iters=0,3"], workdir, 1, 4)
    run_all("shuffle_weights.py", [f"--dataset={npz}", *TINY, "--rewind_iter=3", "--perturb_levels=2"], workdir, 1, 4)
    return results(workdir)


def test_two_processes_of_two_devices_equal_one_process_of_four(npz, single, tmp_path):
    out = run_all("imp.py", [f"--dataset={npz}", *TINY, "--rewind_iters=0,3"], tmp_path, 2, 2)
    run_all("shuffle_weights.py", [f"--dataset={npz}", *TINY, "--rewind_iter=3", "--perturb_levels=2"], tmp_path, 2, 2)
    assert "[dense]" in out[0][0] and "[dense]" not in out[1][0]  # process 1 is quiet: one voice per run
    multi = results(tmp_path)
    assert len(single) == 6 and multi.keys() == single.keys()  # dense, 2 x 2 levels, the branch
    for folder in single:
        assert multi[folder] == single[folder], folder  # numbers and every array's checksum
    csv = glob.glob(f"{tmp_path}/**/perturbations.csv", recursive=True)
    assert len(csv) == 1 and "shuffle_layer" in open(csv[0]).read()


def test_four_processes_of_one_device_equal_one_process_of_four(npz, single, tmp_path):
    run_all("imp.py", [f"--dataset={npz}", *TINY[:-1], "--levels=1", "--rewind_iters=3"], tmp_path, 4, 1)
    multi = results(tmp_path)
    assert len(multi) == 2 and all(multi[folder] == single[folder] for folder in multi)  # dense, level 1


def test_a_killed_process_stops_the_others_within_seconds_and_a_rerun_resumes(npz, tmp_path):
    long = [f"--dataset={npz}", *TINY[:-1], "--duration=600ep", "--milestones=400ep", "--eval_every=50ep"]
    run_all("train.py", long, tmp_path / "reference", 1, 4)
    procs = launch("train.py", long, tmp_path / "cut", 2, 2)
    for line in procs[0].stdout:  # an evaluation has passed: there is a resume point
        if "test acc" in line and "step 300/" in line:
            break
    procs[1].kill()
    killed = time.time()
    out, err = procs[0].communicate(timeout=60)
    assert time.time() - killed < 15 and procs[0].returncode == 1
    assert "another process of this multi-host run stopped" in err and "Traceback" not in err
    out = wait_all(launch("train.py", long, tmp_path / "cut", 2, 2))
    assert "resuming from step" in out[0][0]
    assert results(tmp_path / "cut") == results(tmp_path / "reference")
