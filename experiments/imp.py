"""Iterative magnitude pruning with rewinding (the paper's Fig. 1), all seeds at once, resumable.

  python experiments/imp.py --rewind_iter=0,500 --levels=4 --num_seeds=2
  python experiments/imp.py --preset=cifar10_resnet20 --rewind_iter=0,100,500,2000 --levels=16 --num_seeds=4

Writes results.csv (seed, rewind, level, density, accuracy) and imp.png into the IMP folder of the
dense run; finished levels and the dense run are reused.
"""
import os

import jax

from early_jax import cli, data, masks, pipeline, report
from early_jax.config import to_steps
from early_jax.train import Trainer


def rewind_steps(args, trainer) -> list[int]:
    text = args.rewind_iter or ",".join(trainer.config.prune.rewind_iters)
    return sorted({to_steps(t, trainer.steps_per_epoch) for t in text.split(",") if t.strip()})


def main(args):
    config = cli.cfg.config_from_args(args)
    trainer = Trainer(config, data.load(config.data.name, config.data.data_dir))
    steps = rewind_steps(args, trainer)
    pipeline.check_rewind_steps(trainer, steps)
    print(f"IMP: {config.model.name}, rewind to {steps}, {config.prune.levels} levels, "
          f"{config.num_seeds} seed(s), {trainer.total_steps} steps per training")
    rows = pipeline.imp(trainer, steps, config.prune.levels)
    out = pipeline.imp_dir(trainer, pipeline.dense_run_dir(trainer))
    report.write_csv(rows, os.path.join(out, "results.csv"))
    dense = [r["accuracy"] for r in rows if r["level"] == 0 and r["rewind"] == steps[0]]
    report.plot_accuracy_vs_remaining(rows, "rewind", os.path.join(out, "imp.png"),
                                      f"IMP, {config.model.name}", label=lambda k: f"rewind to {k}",
                                      dense=dense)
    deepest = pipeline.level_dir(trainer, pipeline.dense_run_dir(trainer), steps[-1], config.prune.levels)
    if config.prune.levels:
        mask = deepest.restore(trainer.total_steps, trainer.abstract_state(config.num_seeds)).mask
        first_seed = jax.tree.map(lambda m: m[0], mask)
        print(f"layer densities at level {config.prune.levels} (seed {config.seed}, rewind {steps[-1]}):")
        for layer, (kept, total) in masks.sparsity_report(first_seed).items():
            print(f"  {layer:40s} {kept:>9d} / {total:<9d} {100 * kept / total:5.1f}%")
    for k, points in report.summarize(rows, "rewind").items():
        print(f"rewind {k}: " + ", ".join(f"{100 * d:.1f}% left -> {100 * a:.2f}%" for d, a, _, _ in points))
    print(f"results: {out}/results.csv and imp.png")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--rewind_iter", default=None,
                   help="rewind step(s), comma-separated, in iterations or with a unit (500, 2ep); "
                        "default: the config's rewind_iters")
    cli.main(main, p)
