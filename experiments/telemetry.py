"""Early-phase telemetry (the paper's Fig. 3): weight statistics over the first N iterations.

  python experiments/telemetry.py --steps=1000 --num_seeds=2
  python experiments/telemetry.py --preset=cifar10_resnet20 --steps=4000 --level=8 --rewind_iter=500

Trains (or reuses) the dense run, replays its first N steps with the statistics computed inside the
compiled step, and writes telemetry.csv, telemetry_layers.csv and telemetry.png. With --level=L the
statistics are also computed over the weights kept by IMP level L (rewinding to --rewind_iter).
"""
from early_jax import cli, data, pipeline, telemetry
from early_jax.config import to_steps
from early_jax.errors import UserError
from early_jax.train import Trainer


def main(args):
    config = cli.cfg.config_from_args(args)
    trainer = Trainer(config, data.load(config.data.name, config.data.data_dir))
    steps = min(to_steps(args.steps, trainer.steps_per_epoch), trainer.total_steps)
    rewind = to_steps(args.rewind_iter, trainer.steps_per_epoch)
    if args.level < 0 or args.every < 1 or steps < 1:
        raise UserError("--level must be >= 0, --every >= 1 and --steps at least one step")
    if args.level:
        pipeline.check_rewind_steps(trainer, [rewind])
    print(f"telemetry of the first {steps} steps of {config.model.name} ({config.num_seeds} seed(s))"
          + (f", subnetwork of IMP level {args.level} rewound to {rewind}" if args.level else ""))
    out = telemetry.run_telemetry(trainer, steps, level=args.level, rewind=rewind, every=args.every)
    print(f"results: {out}/telemetry.csv, telemetry_layers.csv, telemetry.png")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--steps", default="4000it", help="telemetry window (capped at the run's length)")
    p.add_argument("--level", type=int, default=0, help="also measure this IMP level's subnetwork")
    p.add_argument("--rewind_iter", default="500it", help="rewind step of that IMP level")
    p.add_argument("--every", type=int, default=1, help="write every m-th step (plus eval steps)")
    cli.main(main, p)
