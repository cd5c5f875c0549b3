"""The main job: a compact version of the whole paper in one command, resumable, with a report.

  python experiments/early_phase_study.py                      # offline CPU study (fashion_resnet8)
  python experiments/early_phase_study.py --preset=fashion_cpu  # the quick one (small convnet)
  python experiments/early_phase_study.py --preset=cifar10_resnet20 --num_seeds=4 --workdir=/data/runs

Runs (or reuses) the dense run with its early checkpoints, telemetry of the early steps, IMP rewound
to 0 and to k, perturbations at k (shuffles with and without signs, sign-keeping reinit, Gaussian
noise), instability vs k and one pre-training task, all seeds at once; then writes report.md with
every figure and table, with a verdict per finding of the paper. Ctrl-C or SIGTERM stops cleanly;
rerunning resumes.
"""
import time

from early_jax import cli, data, pipeline, plans, report, study
from early_jax.progress import format_seconds


def main(args):
    config, plan = study.study_config(args.preset, cli.overrides(args))
    exp = pipeline.Experiment(config, data.from_config(config.data))
    study.check(plan, exp)
    start = time.time()
    speed = plans.measure(exp)
    plans.print_plan(f"early-phase study, rewind k={plan.rewind}, {plan.levels} IMP levels",
                     study.pieces(plan, exp, speed), exp, speed)
    study.run_study(exp, plan)
    path = report.write_report(exp.path(study.descriptor(exp, plan)))
    print(f"study finished in {format_seconds(time.time() - start)}; report: {path}")


if __name__ == "__main__":
    cli.main(main, cli.parser(__doc__, default_preset="fashion_resnet8"))
