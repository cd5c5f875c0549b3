"""Dense training of S seeds at once, resumable; prints per-seed test accuracy and mean +- std.

  python experiments/train.py                          # the offline CPU preset (Fashion-MNIST)
  python experiments/train.py --preset=cifar10_resnet20 --num_seeds=8 --workdir=/tmp/runs
"""
from early_jax import cli, data, pipeline, plans, tables

NOT_READ = {name: "experiments/imp.py (pruning)" for name in ("fraction", "scope", "levels", "rewind_iters")}


def main(args):
    config = cli.config_from_args(args)
    exp = pipeline.Experiment(config, data.from_config(config.data))
    plans.print_plan("dense training", plans.dense_and_imp(exp, [], 0), exp, plans.measure(exp))
    result = pipeline.train_dense(exp).result
    rows = pipeline.result_rows(result, level=0)
    for row in rows:
        print(f"  seed {row['seed']}: test accuracy {100 * row['accuracy']:.2f}%"
              + (" (diverged)" if row["diverged"] else ""))
    print(f"mean {tables.stat([r['accuracy'] for r in tables.finite_rows(rows)]).text()}% over "
          f"{len(tables.finite_rows(rows))} seed(s); results in {exp.path(exp.dense)}")


if __name__ == "__main__":
    cli.main(main, cli.parser(__doc__, NOT_READ))
