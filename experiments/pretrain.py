"""Pre-training on random labels, blurred inputs or rotation prediction, then IMP from that point
(the paper's Section 5, Figs. 7-8).

  python experiments/pretrain.py --task=blur --pretrain_epochs=1,2,4 --levels=3 --num_seeds=2
  python experiments/pretrain.py --task=rotation --pretrain_epochs=1,2 --sparse_level=3
  python experiments/pretrain.py --preset=cifar10_resnet20 --task=blur+rotation --pretrain_epochs=1,2,4,8,16,40

Pre-trained states and IMP levels are reused across invocations. Writes results.csv and two plots
(accuracy vs pre-training epochs at the chosen levels, with the supervised rewind-to-0 and
rewind-to-k references; accuracy vs sparsity per pre-training length).
"""
import os

from early_jax import cli, data, pipeline, plans, pretrain, report, runs, tables

NOT_READ = {"rewind_iters": "--rewind_iter (the supervised reference k)"}


def main(args):
    config = cli.config_from_args(args)
    exp = pipeline.Experiment(config, data.from_config(config.data))
    task = pretrain.parse_task(args.task, label_fraction=args.label_fraction, blur_factor=args.blur_factor,
                               rotation=args.rotation, rotate_first=args.rotate_first,
                               subset_fraction=args.subset_fraction)
    pretrain.check_task(task, exp.dataset, config.train.batch_size)
    epochs = cli.numbers(args.pretrain_epochs, int)
    for e in epochs:
        pretrain.start_step(exp, e, args.offset)  # refuses impossible lengths before training
    rewind = exp.steps(args.rewind_iter)
    pipeline.check_rewind_steps(exp, [0, rewind])
    levels = config.prune.levels
    reference_levels = max(levels, args.sparse_level)  # the references reach the sparse level
    plans.print_plan(f"pre-training {task.name} for {epochs} epoch(s), then "
                     + (f"the level-{args.sparse_level} subnetwork" if args.sparse_level else f"IMP ({levels} levels)"),
                     _pieces(exp, task, epochs, args, rewind, reference_levels), exp, plans.measure(exp))
    references = {f"IMP, rewind to {k}": pipeline.imp(exp, [k], reference_levels) for k in sorted({0, rewind})}
    for e in epochs:
        if args.sparse_level:
            pretrain.sparse_pretrain(exp, task, e, args.sparse_level, rewind, args.offset)
        else:
            pretrain.pretrain_imp(exp, task, e, levels, args.offset)
    rows = pretrain.rows_on_disk(exp, task, args.offset, exp.level(rewind, args.sparse_level) if args.sparse_level else None)
    out = os.path.join(exp.path(exp.dense), "pretrain", f"{task.name}_{args.offset}"
                       + (f"_sparse{args.sparse_level}" if args.sparse_level else ""))
    tables.write_csv(rows, os.path.join(out, "results.csv"))
    shown = [args.sparse_level] if args.sparse_level else sorted({min(levels, 1), levels} - {0}) or [0]
    report.plot_vs_pretraining(rows, references, shown, os.path.join(out, "pretrain_vs_epochs.png"),
                               f"pre-training: {task.name}, {config.model.name}")
    if not args.sparse_level:
        by_epochs = [r | {"curve": f"{r['pretrain_epochs']} epochs"} for r in rows]
        by_epochs += [r | {"curve": name} for name, ref_rows in references.items() for r in ref_rows
                      if r["level"] <= levels]  # the supervised IMP curves alongside
        report.plot_accuracy_vs_remaining(by_epochs, "curve", os.path.join(out, "pretrain_curves.png"),
                                          f"IMP after pre-training on {task.name}")
    cells = tables.summarize(rows, ("pretrain_epochs", "level"), "accuracy")
    for e in epochs:
        print(f"{e} epoch(s): " + ", ".join(f"level {lv}: {s.text()}%" for (ep, lv), s in cells.items() if ep == e))
    print(f"results: {out}/results.csv, pretrain_vs_epochs.png")


def _pieces(exp, task, epochs, args, rewind, reference_levels) -> list:
    pieces = plans.dense_and_imp(exp, {0, rewind}, reference_levels)
    for e in epochs:
        sparse = exp.level(rewind, args.sparse_level) if args.sparse_level else None
        pre = runs.Pretraining(exp.dense, task, e, sparse)
        start = pretrain.start_step(exp, e, args.offset)
        pieces.append(plans.Piece(f"pre-training {e}ep", pre, len(exp.seeds), 0, e * exp.steps_per_epoch,
                                  new_program=True))
        for level in [0] if sparse else range(exp.config.prune.levels + 1):
            after = runs.AfterPretraining(pre, args.offset, exp.prune if level else None, level)
            pieces.append(plans.Piece(f"  then level {args.sparse_level or level}", after, len(exp.seeds),
                                      start, exp.total_steps))
    return pieces


if __name__ == "__main__":
    p = cli.parser(__doc__, NOT_READ)
    p.add_argument("--task", default="blur", help="random_labels, blur, rotation, subset, or a '+' combination")
    p.add_argument("--pretrain_epochs", default="1,2,4", help="comma-separated pre-training lengths")
    p.add_argument("--offset", default="replace", choices=pretrain.OFFSETS,
                   help="replace: pre-training replaces the first P epochs; none: full run after")
    p.add_argument("--rewind_iter", default="500it", help="the supervised rewinding reference k")
    p.add_argument("--sparse_level", type=int, default=0,
                   help="pre-train only the subnetwork of this IMP level (rewound to --rewind_iter)")
    p.add_argument("--rotation", default="fixed", choices=("fixed", "redraw"),
                   help="one rotation per example, or a new one each time it is seen")
    p.add_argument("--rotate_first", action="store_true",
                   help="rotate before crop and flip, as the paper's code (the flip then makes 90 and "
                        "270 degrees look alike); default: rotate after")
    p.add_argument("--blur_factor", type=int, default=4)
    p.add_argument("--label_fraction", type=float, default=1.0)
    p.add_argument("--subset_fraction", type=float, default=0.1)
    cli.main(main, p)
