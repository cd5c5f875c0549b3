"""Ahead-of-time compiles for a TPU topology (libtpu, no TPU): the optional `.[tpu]` extra."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e .[tpu])")


def test_a_tiny_model_compiles_for_a_v5e_2x2_slice_and_is_sized():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tpu_aot.py"), "--topology=v5e:2x2",
                           "--model=convnet_tiny", "--seeds=8", "--image_shape=8x8x1", "--train_examples=256",
                           "--test_examples=64", "--preset=fashion_cpu", "--programs=train,evaluate,perturb"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert [l["program"] for l in lines] == ["train", "evaluate", "perturb"]
    for line in lines:
        assert line["chips"] == 4 and line["seeds_per_chip"] == 2
        assert line["MiB_per_chip"]["total"] > 0 and line["max_seeds_per_chip"]["v5p"] > line["max_seeds_per_chip"]["v5e"]
    train = lines[0]
    # the dataset (256 images of 8x8 on every chip) and 2 seeds' states are the arguments
    assert train["MiB_per_chip"]["arguments"] >= 256 * 64 / 2 ** 20
    assert train["flops_per_seed"] > 1e5 and train["counted_over"] == "one training step"
    assert train["xla_estimated_s"] > 0


def test_the_trainer_over_a_topology_compiles_for_the_tpu_not_this_cpu():
    code = ("import sys; sys.argv=['x']; sys.path.insert(0, sys.argv[0]);"
            "import benchmarks.tpu_aot as t; import argparse;"
            "args = argparse.Namespace(image_shape='8x8x1', train_examples=256, test_examples=16, "
            "preset='fashion_cpu', model='convnet_tiny', seeds=4, matmul_precision='default');"
            "tr = t.abstract_trainer(args, t.topology_mesh('v5e:2x2'));"
            "print(tr.platform, tr.parallel, 'cpu_kernel_grad_chunk' in tr.execution)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["tpu", "vmap", "False"]
