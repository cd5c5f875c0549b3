"""Early-phase telemetry (the paper's Fig. 3): weight statistics over the first N iterations.

  python experiments/telemetry.py --steps=1000 --num_seeds=2
  python experiments/telemetry.py --preset=cifar10_resnet20 --steps=4000 --level=8 --rewind_iter=500

Trains (or reuses) the dense run, replays its first N steps with the statistics computed inside the
compiled step, and writes telemetry.csv, telemetry_layers.csv and telemetry.png. With --level=L the
statistics are also computed over the weights kept by IMP level L (rewinding to --rewind_iter).
"""
from early_jax import cli, data, pipeline, plans, telemetry
from early_jax.errors import UserError

NOT_READ = {"rewind_iters": "--rewind_iter (the rewind step of --level)",
            "levels": "--level (the IMP level whose subnetwork is measured)"}


def main(args):
    config = cli.config_from_args(args)
    exp = pipeline.Experiment(config, data.from_config(config.data))
    steps = min(exp.steps(args.steps), exp.total_steps)
    rewind = exp.steps(args.rewind_iter)
    if args.level < 0 or args.every < 1 or steps < 1:
        raise UserError("--level must be >= 0, --every >= 1 and --steps at least one step")
    if args.level:
        pipeline.check_rewind_steps(exp, [rewind])
    pieces = plans.dense_and_imp(exp, [rewind] if args.level else [], args.level) + [plans.Piece(
        f"replay of {steps} steps", telemetry.descriptor_of(exp, steps, level=args.level, rewind=rewind,
                                                             every=args.every), len(exp.seeds), 0, steps,
        evals=len(telemetry.log_spaced_steps(steps)), new_program=True)]
    plans.print_plan("telemetry", pieces, exp, plans.measure(exp))
    out = telemetry.run_telemetry(exp, steps, level=args.level, rewind=rewind, every=args.every)
    print(f"results: {out}/telemetry.csv, telemetry_layers.csv, telemetry.png")


if __name__ == "__main__":
    p = cli.parser(__doc__, NOT_READ)
    p.add_argument("--steps", default="4000it", help="telemetry window (capped at the run's length)")
    p.add_argument("--level", type=int, default=0, help="also measure this IMP level's subnetwork")
    p.add_argument("--rewind_iter", default="500it", help="rewind step of that IMP level")
    p.add_argument("--every", type=int, default=1, help="write every m-th step (plus eval steps)")
    cli.main(main, p)
