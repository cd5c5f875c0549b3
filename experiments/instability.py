"""Instability to SGD noise vs the rewind step k (linear mode connectivity), all seeds at once.

  python experiments/instability.py --rewind_iters=0,100,500 --num_seeds=2
  python experiments/instability.py --preset=cifar10_resnet20 --rewind_iters=0,100,500,2000 --level=8 --num_seeds=4

From the state at each k, two copies train to the end with different data order and augmentation;
the error barrier on the straight line between them is reported for the test set and a fixed subset
of the training set. With --level=L the same is done for IMP level L's subnetwork (rewound to k,
IMP run or reused first) next to the dense network. Writes instability.csv (barrier per seed, k,
level, split), instability_path.csv (error along the path) and instability.png, with every k ever
measured there with these path settings; finished pieces (dense run, IMP levels, copies, measured
paths) are reused.
"""
import os

from early_jax import cli, data, instability, pipeline, plans, report, tables
from early_jax.errors import UserError
from early_jax.interpolation import DEFAULT_ALPHAS, PathSettings

NOT_READ = {"levels": "--level (the IMP level whose subnetwork is measured)"}


def main(args):
    config = cli.config_from_args(args)
    if args.level < 0:
        raise UserError(f"--level must be >= 0, got {args.level}")
    exp = pipeline.Experiment(config, data.from_config(config.data))
    steps = sorted({exp.steps(k) for k in config.prune.rewind_iters})
    pipeline.check_rewind_steps(exp, steps)
    settings = PathSettings(tuple(cli.numbers(args.alphas)), args.bn_batches > 0, max(args.bn_batches, 1),
                            args.train_examples).check()
    levels = [0] + ([args.level] if args.level else [])
    speed = plans.measure(exp)
    pieces = plans.dense_and_imp(exp, steps, args.level)
    for level in levels:
        copies = instability.copies(exp, steps, level)
        pieces.append(plans.Piece(f"copies 2, level {level} ({len(steps)} k x seeds)", copies,
                                  len(copies.seeds), steps[0], exp.total_steps, new_program=True,
                                  extra_s=plans.path_seconds(exp, speed, len(copies.seeds), settings)))
    plans.print_plan(f"instability, k in {steps}, {len(settings.alphas)} points per path", pieces, exp, speed)
    path = []
    for level in levels:
        instability.instability(exp, steps, level=level, settings=settings, alpha_chunk=args.alpha_chunk or None)
        path += instability.rows_on_disk(exp, level, settings)
    summary = instability.barriers(path)
    out = os.path.dirname(exp.path(instability.copies(exp, steps, args.level)))
    tables.write_csv(summary, os.path.join(out, "instability.csv"))
    tables.write_csv(path, os.path.join(out, "instability_path.csv"))
    report.plot_instability(summary, path, os.path.join(out, "instability.png"),
                            f"instability, {config.model.name}, {config.num_seeds} seed(s)")
    for (level, split), cells in _by_level_split(summary).items():
        name = "dense" if level == 0 else f"level {level}"
        print(f"{name} {split} barrier: " + ", ".join(f"k={k} {s.text()}" for k, s in cells)
              + " (percentage points)")
    print(f"results: {out}/instability.csv, instability_path.csv and instability.png")


def _by_level_split(summary):
    out = {}
    for (level, split, k), s in tables.summarize(summary, ("level", "split", "rewind"), "barrier").items():
        out.setdefault((level, split), []).append((k, s))
    return out


if __name__ == "__main__":
    p = cli.parser(__doc__, NOT_READ)
    p.add_argument("--level", type=int, default=0,
                   help="also measure IMP level L's subnetwork (0: the dense network only)")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
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
