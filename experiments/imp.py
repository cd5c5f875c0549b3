"""Iterative magnitude pruning with rewinding (the paper's Fig. 1), all seeds at once, resumable.

  python experiments/imp.py --rewind_iters=0,500 --levels=4 --num_seeds=2
  python experiments/imp.py --preset=cifar10_resnet20 --rewind_iters=0,100,500,2000 --levels=16 --num_seeds=4

Writes results.csv (seed, rewind, level, density, accuracy) and imp.png into the IMP folder of the
dense run, with every level finished there (this call's rewind steps and earlier ones'); finished
levels and the dense run are reused.
"""
import os

import jax

from early_jax import cli, data, masks, pipeline, plans, report, tables


def main(args):
    config = cli.config_from_args(args)
    exp = pipeline.Experiment(config, data.from_config(config.data))
    steps = sorted({exp.steps(k) for k in config.prune.rewind_iters})
    pipeline.check_rewind_steps(exp, steps)
    plans.print_plan(f"IMP, rewind to {steps}, {config.prune.levels} levels",
                     plans.dense_and_imp(exp, steps, config.prune.levels), exp, plans.measure(exp))
    pipeline.imp(exp, steps, config.prune.levels)
    rows = pipeline.imp_rows_on_disk(exp)
    out = exp.imp_path()
    tables.write_csv(rows, os.path.join(out, "results.csv"))
    report.plot_imp(rows, os.path.join(out, "imp.png"), f"IMP, {config.model.name}")
    if config.prune.levels:
        mask = pipeline.mask_of(exp, steps[-1], config.prune.levels)
        print(f"layer densities at level {config.prune.levels} (seed {config.seed}, rewind {steps[-1]}):")
        for layer, (kept, total) in masks.sparsity_report(jax.tree.map(lambda m: m[0], mask)).items():
            print(f"  {layer:40s} {kept:>9d} / {total:<9d} {100 * kept / total:5.1f}%")
    for k, points in report.curves(rows, "rewind").items():
        print(f"rewind {k}: " + ", ".join(f"{100 * d:.1f}% left -> {s.text()}%" for d, s in points))
    print(f"results: {out}/results.csv and imp.png")


if __name__ == "__main__":
    cli.main(main, cli.parser(__doc__))
