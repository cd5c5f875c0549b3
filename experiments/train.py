"""Dense training of S seeds at once, resumable; prints per-seed test accuracy and mean +- std.

  python experiments/train.py                          # the offline CPU preset (Fashion-MNIST)
  python experiments/train.py --preset=cifar10_resnet20 --num_seeds=8 --workdir=/tmp/runs
"""
import numpy as np

from early_jax import cli, data, pipeline
from early_jax.train import Trainer


def main(args):
    config = cli.cfg.config_from_args(args)
    dataset = data.load(config.data.name, config.data.data_dir)
    trainer = Trainer(config, dataset)
    print(f"dense {config.model.name} on {dataset.name}: {config.num_seeds} seed(s), "
          f"{trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch), seeds run by {trainer.parallel}")
    _, result, run_dir = pipeline.train_dense(trainer)
    accuracy = 100 * np.asarray(result["test_accuracy"])
    for seed, acc in zip(result["seeds"], accuracy):
        print(f"  seed {seed}: test accuracy {acc:.2f}%")
    print(f"mean {accuracy.mean():.2f}% +- {accuracy.std():.2f} over {len(accuracy)} seed(s); "
          f"results in {run_dir.path}")


if __name__ == "__main__":
    cli.main(main, cli.parser(__doc__))
