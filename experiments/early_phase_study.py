"""The main job: a compact version of the whole paper in one command, resumable, with a report.

  python experiments/early_phase_study.py                      # offline CPU study (Fashion-MNIST)
  python experiments/early_phase_study.py --preset=cifar10_resnet20 --num_seeds=4 --workdir=/data/runs

Runs (or reuses) the dense run with its early checkpoints, telemetry of the early steps, IMP rewound
to 0 and to k, perturbations at k (shuffles with and without signs, sign-keeping reinit, Gaussian
noise), instability vs k and one pre-training task, all seeds at once; then writes report.md with
every figure and table. Ctrl-C stops cleanly; rerunning resumes.
"""
import time

from early_jax import cli, data, report, study
from early_jax.progress import format_seconds
from early_jax.train import Trainer


def main(args):
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    config, plan = study.study_config(args.preset, overrides)
    trainer = Trainer(config, data.load(config.data.name, config.data.data_dir))
    study.check(plan, trainer)
    start = time.time()
    study.print_plan(plan, trainer, study.measure_speed(trainer))
    out = study.study_dir(trainer, plan)
    study.run_study(trainer, plan, out)
    path = report.write_report(out)
    print(f"study finished in {format_seconds(time.time() - start)}; report: {path}")


if __name__ == "__main__":
    cli.main(main, cli.parser(__doc__))
