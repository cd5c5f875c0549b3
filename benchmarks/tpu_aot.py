"""Compile the project's real programs for a Cloud TPU topology on a machine without a TPU, and
size them: memory per chip, FLOPs, XLA's time estimate, and how many seeds fit per chip.

  pip install -e .[tpu]          # libtpu: compiles for TPUs, needs no TPU
  python benchmarks/tpu_aot.py --topology=v5e:4x4 --model=resnet20 --seeds=32
  python benchmarks/tpu_aot.py --topology=v4:2x2x2 --model=resnet20 --seeds=32 --programs=train,evaluate

Programs (the same code a TPU would run, traced for the TPU: XLA's convolutions, the seeds vmapped):
  train        one compiled segment of STEPS_PER_CALL steps (lax.scan; FLOPs are per step)
  evaluate     the whole test set, every seed
  perturb      shuffle within layers of every seed's kept weights (a perturbation at k)
  instability  the interpolation path between two copies of every seed (BatchNorm recomputed)
One JSON line per program: per chip the bytes of arguments, temporaries and outputs; FLOPs per
seed of one loop iteration (XLA's cost analysis counts a loop body once: one training step, one
test batch, one point of the path); XLA's estimated seconds of that; and, extrapolated linearly
from the compiled seeds per chip (the replicated dataset is the fixed part), the most seeds per
chip that fit in the HBM of each TPU generation below. "Per chip" means per JAX device of the topology; a v4 or v5p
topology described without hardware shows each TensorCore as a device (two per v4 chip:
`devices_per_chip`), while the seed estimates assume one program per chip with the whole HBM (as
in megacore mode, a TPU VM's default).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # per chip, Cloud TPU documentation
USABLE = 0.9                                             # leave room for the runtime
PROGRAMS = ("train", "evaluate", "perturb", "instability")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:4x4", help="TPU generation and chip grid, e.g. v5e:2x2, v4:2x2x2")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--seeds", type=int, default=32, help="seeds over the whole slice (a multiple of the chips)")
    p.add_argument("--preset", default="cifar10_resnet20")
    p.add_argument("--image_shape", default="32x32x3", help="HxWxC of the (synthetic) dataset")
    p.add_argument("--train_examples", type=int, default=50_000)
    p.add_argument("--test_examples", type=int, default=10_000)
    p.add_argument("--matmul_precision", default="highest", choices=("default", "high", "highest"))
    p.add_argument("--programs", default=",".join(PROGRAMS))
    return p.parse_args()


def topology_mesh(name: str):
    """The devices of a TPU topology (no hardware needed), as the 1-D seed mesh."""
    try:
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(name, "tpu").devices
    except Exception as err:  # libtpu missing, or a topology it does not know
        raise SystemExit(f"tpu_aot.py: cannot describe TPU topology {name!r} ({str(err).splitlines()[0][:200]}); "
                         "install libtpu with `pip install -e .[tpu]`") from None
    from early_jax import sharding
    return sharding.seed_mesh(devices)


def abstract_trainer(args, mesh):
    """A Trainer over the topology's devices whose data are shapes only."""
    import numpy as np
    from early_jax import config as cfg
    from early_jax.data import make_dataset
    from early_jax.train import Trainer
    h, w, c = map(int, args.image_shape.split("x"))
    zeros = lambda n: np.zeros((n, h, w, c), np.uint8)
    labels = lambda n: np.arange(n) % 10
    dataset = make_dataset("synthetic", zeros(args.train_examples), labels(args.train_examples),
                           zeros(args.test_examples), labels(args.test_examples), num_classes=10)
    config = cfg.validate(cfg.override(cfg.PRESETS[args.preset], {
        "model": args.model, "num_seeds": str(args.seeds), "matmul_precision": args.matmul_precision}))
    return Trainer(config, dataset, mesh=mesh, abstract=True)


ITERATION = {"train": "one training step", "evaluate": "one test batch", "perturb": "the whole program",
             "instability": "one point of the path"}


def lowered(program: str, trainer):
    """The jax `Lowered` of one program, from abstract inputs."""
    import jax
    import jax.numpy as jnp
    from early_jax import branches, interpolation
    from early_jax.perturb import Treatment
    from early_jax.sharding import replicated
    seeds = trainer.config.num_seeds
    states = trainer.abstract_state(seeds)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(trainer.mesh))
    if program == "train":
        return trainer._advance[None].lower(states, (), trainer.arrays, scalar, scalar)
    if program == "evaluate":
        return trainer._evaluate.lower(states, trainer.test)
    if program == "perturb":
        fn = branches.perturbation_program(Treatment("shuffle_layer"), 1)
        return fn.lower(states.keys["perturb"], states.params, states.params, states.mask)
    settings = interpolation.PathSettings()
    fn = interpolation._path_program(trainer, settings, 1 if trainer.parallel == "map" else len(settings.alphas))
    batch = trainer.config.train.batch_size
    image = trainer.arrays.images.shape[1:]
    bn = jax.ShapeDtypeStruct((settings.bn_batches, batch, *image), jnp.float32, sharding=replicated(trainer.mesh))
    return fn.lower(states.params, states.batch_stats, states.params, states.batch_stats, bn, trainer.test,
                    trainer.test)  # the test set also stands in for the train-error subset


def first(analysis):
    return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def size(program: str, trainer, args) -> dict:
    import jax
    start = time.time()
    compiled = lowered(program, trainer).compile()
    memory, cost = compiled.memory_analysis(), first(compiled.cost_analysis()) or {}
    chips = trainer.mesh.size
    per_chip = trainer.config.num_seeds // chips
    replicated = sum(math.prod(x.shape) * x.dtype.itemsize
                     for x in jax.tree.leaves((trainer.arrays, trainer.test)))
    fixed = replicated if program in ("train", "evaluate", "instability") else 0
    total = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
    per_seed = max(total - fixed, 1) / per_chip
    fits = {gen: int((gib * 2 ** 30 * USABLE - fixed) // per_seed) for gen, gib in HBM_GIB.items()}
    flops = cost.get("flops")
    devices_per_chip = len({getattr(d, "core_on_chip", 0) for d in trainer.mesh.devices.flat})
    return {"program": program, "topology": args.topology, "model": args.model, "chips": chips,
            "devices_per_chip": devices_per_chip,
            "seeds": trainer.config.num_seeds, "seeds_per_chip": per_chip,
            "matmul_precision": args.matmul_precision, "compile_s": round(time.time() - start, 1),
            "MiB_per_chip": {"arguments": mib(memory.argument_size_in_bytes), "temp": mib(memory.temp_size_in_bytes),
                             "output": mib(memory.output_size_in_bytes), "total": mib(total)},
            "flops_per_seed": flops / per_chip if flops else None, "counted_over": ITERATION[program],
            "xla_estimated_s": estimate if (estimate := cost.get("optimal_seconds")) and estimate > 0 else None,
            "max_seeds_per_chip": fits}


def mib(n) -> float:
    return round(n / 2 ** 20, 1)


def main():
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend; the TPU is only a target
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import early_jax  # noqa: F401  (runtime settings before JAX starts)
    mesh = topology_mesh(args.topology)
    if args.seeds % mesh.size:
        raise SystemExit(f"tpu_aot.py: --seeds={args.seeds} must be a multiple of the {mesh.size} chips")
    trainer = abstract_trainer(args, mesh)
    for program in args.programs.split(","):
        if program not in PROGRAMS:
            raise SystemExit(f"tpu_aot.py: unknown program {program!r}; choose from {', '.join(PROGRAMS)}")
        print(json.dumps(size(program, trainer, args)), flush=True)


if __name__ == "__main__":
    main()
