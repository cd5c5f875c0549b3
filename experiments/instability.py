"""Instability to SGD noise vs the rewind step k (linear mode connectivity), all seeds at once.

  python experiments/instability.py --rewind_iters=0,100,500 --num_seeds=2
  python experiments/instability.py --preset=cifar10_resnet20 --rewind_iters=0,100,500,2000 --level=8 --num_seeds=4

From the state at each k, two copies train to the end with different data order and augmentation;
the error barrier on the straight line between them is reported for the test set and a fixed subset
of the training set. With --level=L the same is done for IMP level L's subnetwork (rewound to k,
IMP run or reused first) next to the dense network. Writes instability.csv (barrier per seed, k,
level, split), instability_path.csv (error along the path) and instability.png; finished pieces
(dense run, IMP levels, copies, measured paths) are reused.
"""
import os

from early_jax import cli, data, instability, pipeline, report
from early_jax.config import to_steps
from early_jax.errors import UserError
from early_jax.train import Trainer


def out_dir(trainer, level: int) -> str:
    dense = pipeline.dense_run_dir(trainer)
    if level == 0:
        return os.path.join(dense.path, "instability")
    return os.path.join(pipeline.imp_dir(trainer, dense), f"instability_level{level}")


def main(args):
    config = cli.cfg.config_from_args(args)
    if args.level < 0:
        raise UserError(f"--level must be >= 0, got {args.level}")
    trainer = Trainer(config, data.load(config.data.name, config.data.data_dir))
    steps = sorted({to_steps(k, trainer.steps_per_epoch) for k in config.prune.rewind_iters})
    pipeline.check_rewind_steps(trainer, steps)
    options = dict(alphas=cli.numbers(args.alphas), recompute_bn=args.bn_batches > 0,
                   bn_batches=max(args.bn_batches, 1), train_examples=args.train_examples)
    instability.PathSettings(tuple(options["alphas"]), options["recompute_bn"], options["bn_batches"],
                             options["train_examples"]).check()
    options["alpha_chunk"] = args.alpha_chunk or None
    levels = [0] + ([args.level] if args.level else [])
    print(f"instability: {config.model.name}, k in {steps}, level(s) {levels}, {config.num_seeds} "
          f"seed(s) x 2 copies, {trainer.total_steps} steps per training, "
          f"{len(options['alphas'])} points per path, BatchNorm "
          + (f"recomputed from {args.bn_batches} batches" if args.bn_batches > 0 else "interpolated"))
    path = []
    for level in levels:
        path += instability.instability(trainer, steps, level=level, **options)
    summary = instability.barriers(path)
    out = out_dir(trainer, args.level)
    report.write_csv(summary, os.path.join(out, "instability.csv"))
    report.write_csv(path, os.path.join(out, "instability_path.csv"))
    title = f"instability, {config.model.name}, {config.num_seeds} seed(s)"
    instability.plot(summary, path, os.path.join(out, "instability.png"), title)
    for (level, split), points in instability.summarize(summary).items():
        name = "dense" if level == 0 else f"level {level}"
        print(f"{name} {split} barrier: " + ", ".join(
            f"k={k} {100 * m:.2f}" + (f"+-{100 * s:.2f}" if n > 1 else "") for k, m, s, n in points)
            + " (percentage points)")
    print(f"results: {out}/instability.csv, instability_path.csv and instability.png")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--level", type=int, default=0,
                   help="also measure IMP level L's subnetwork (0: the dense network only)")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in instability.DEFAULT_ALPHAS),
                   help="interpolation points, increasing from 0 (copy 1) to 1 (copy 2)")
    p.add_argument("--bn_batches", type=int, default=50,
                   help="training batches to recompute each point's BatchNorm statistics from "
                        "(at most one epoch); 0: interpolate the running statistics instead")
    p.add_argument("--train_examples", type=int, default=10_000,
                   help="size of the fixed training subset on which train error is measured")
    p.add_argument("--alpha_chunk", type=int, default=0,
                   help="path points evaluated at once (vmapped); 0: all on accelerators, one at a "
                        "time on CPU. Lower it if the path evaluation runs out of device memory")
    cli.main(main, p)
