"""Bad inputs a user can give, each run as a real command: exit code, the message, time to fail.

  python benchmarks/bad_inputs.py            # prints a markdown table (about 4 minutes on 2 cores)
  python benchmarks/bad_inputs.py --only=lr  # the cases whose name contains 'lr'

Every case should end with exit code 2 and one line starting `error:` (no traceback), before any
long work. Small datasets are written to a temporary folder; the scripts run on them with a tiny
model so that the cases which do start training fail within seconds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=convnet_tiny", "--batch_size=16", "--duration=4ep", "--milestones=2ep", "--eval_every=2ep",
        "--eval_batch_size=16", "--save_steps=0it,3it,6it", "--num_seeds=2"]


def datasets(folder: str) -> dict[str, str]:
    """Good and broken .npz files: {name: path}."""
    rng = np.random.default_rng(0)
    good = dict(x_train=rng.integers(0, 255, (96, 8, 8, 1), dtype=np.uint8), y_train=np.arange(96) % 4,
                x_test=rng.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8), y_test=np.arange(40) % 4)
    variants = {"good": {}, "empty_test": dict(x_test=good["x_test"][:0], y_test=good["y_test"][:0]),
                "float_labels": dict(y_train=np.arange(96) % 4 + 0.5),
                "label_200": dict(y_train=np.where(np.arange(96) == 7, 200, np.arange(96) % 4)),
                "zero_channels": dict(x_train=good["x_train"][..., :0], x_test=good["x_test"][..., :0]),
                "one_pixel": dict(x_train=good["x_train"][:, :1, :1], x_test=good["x_test"][:, :1, :1]),
                "nchw": dict(x_train=np.zeros((96, 3, 8, 8), np.uint8), x_test=np.zeros((40, 3, 8, 8), np.uint8)),
                "float_images": dict(x_train=good["x_train"].astype(np.float32))}
    paths = {}
    for name, change in variants.items():
        paths[name] = os.path.join(folder, f"{name}.npz")
        np.savez(paths[name], **(good | change))
    paths["missing_keys"] = os.path.join(folder, "missing_keys.npz")
    np.savez(paths["missing_keys"], x_train=good["x_train"])
    paths["truncated"] = os.path.join(folder, "truncated.npz")
    with open(paths["good"], "rb") as f, open(paths["truncated"], "wb") as g:
        g.write(f.read()[:3000])
    return paths


def cases(d: dict, work: str) -> list[tuple[str, str, list[str], str]]:
    """(name, script, flags, how to prepare) per case; flags run on the good tiny data unless a
    case names its own --dataset."""
    good = f"--dataset={d['good']}"
    t = lambda *flags: [good, *TINY, f"--workdir={work}", *flags]
    data = lambda name, *flags: [f"--dataset={d[name]}", *TINY, f"--workdir={work}", *flags]
    return [
        ("lr huge (diverges)", "train.py", t("--lr=1e4"), ""),
        ("lr inf", "train.py", t("--lr=inf"), ""), ("lr nan", "train.py", t("--lr=nan"), ""),
        ("lr negative", "train.py", t("--lr=-0.1"), ""), ("lr text", "train.py", t("--lr=fast"), ""),
        ("momentum nan", "train.py", t("--momentum=nan"), ""), ("momentum 1.5", "train.py", t("--momentum=1.5"), ""),
        ("weight decay negative", "train.py", t("--weight_decay=-1e-4"), ""),
        ("gamma 0", "train.py", t("--gamma=0"), ""), ("duration 0ep", "train.py", t("--duration=0ep"), ""),
        ("duration in words", "train.py", t("--duration=10 epochs"), ""),
        ("warmup longer than the run", "train.py", t("--warmup=100ep"), ""),
        ("milestone after the end", "train.py", t("--milestones=99ep"), ""),
        ("batch size 0", "train.py", t("--batch_size=0"), ""),
        ("batch larger than the data", "train.py", t("--batch_size=100000"), ""),
        ("eval batch 0", "train.py", t("--eval_batch_size=0"), ""),
        ("num_seeds 0", "train.py", t("--num_seeds=0"), ""), ("num_seeds 2.5", "train.py", t("--num_seeds=2.5"), ""),
        ("seed negative", "train.py", t("--seed=-1"), ""),
        ("fraction 1.5", "imp.py", t("--fraction=1.5"), ""), ("fraction 0", "imp.py", t("--fraction=0"), ""),
        ("levels -1", "imp.py", t("--levels=-1"), ""), ("scope local", "imp.py", t("--scope=local"), ""),
        ("unknown model", "train.py", t("--model=resnet21"), ""),
        ("compute dtype float16", "train.py", t("--compute_dtype=float16"), ""),
        ("seed_parallel pmap", "train.py", t("--seed_parallel=pmap"), ""),
        ("on_divergence ignore", "train.py", t("--on_divergence=ignore"), ""),
        ("matmul precision low", "train.py", t("--matmul_precision=low"), ""),
        ("ignore pattern matching nothing", "imp.py", t("--ignore=classifier"), ""),
        ("flag prefix", "train.py", t("--num_seed=2"), ""), ("unknown flag", "train.py", t("--nope=1"), ""),
        ("bool flag maybe", "train.py", t("--augment=maybe"), ""),
        ("flag the script does not read", "shuffle_weights.py", t("--rewind_iters=100"), ""),
        ("telemetry given --levels", "telemetry.py", t("--levels=3"), ""),
        ("train.py given a prune flag", "train.py", t("--fraction=0.5"), ""),
        ("rewind step after the end", "shuffle_weights.py", t("--rewind_iter=999999"), ""),
        ("rewind step before every checkpoint", "shuffle_weights.py", t("--save_steps=5it", "--rewind_iter=2"), ""),
        ("noise scale nan", "gaussian_noise.py", t("--noise_scales=nan"), ""),
        ("perturbation level 0", "shuffle_weights.py", t("--perturb_levels=0"), ""),
        ("alphas not ending at 1", "instability.py", t("--rewind_iters=0", "--alphas=0,0.5"), ""),
        ("unknown pre-training task", "pretrain.py", t("--task=colour"), ""),
        ("blur larger than the image", "pretrain.py", t("--blur_factor=100"), ""),
        ("no such dataset file", "train.py", [f"--dataset={work}/nope.npz", *TINY], ""),
        ("TFDS dataset offline, not prepared", "train.py", ["--dataset=cifar10", f"--data_dir={work}/tfds", *TINY], ""),
        ("Fashion-MNIST folder missing", "train.py", ["--dataset=fashion_mnist_idx", f"--data_dir={work}/none"], ""),
        ("empty test split", "train.py", data("empty_test"), ""),
        ("float labels 2.5", "train.py", data("float_labels"), ""),
        ("a label of 200 in 4 classes", "train.py", data("label_200"), ""),
        ("zero channels", "train.py", data("zero_channels"), ""),
        ("1x1 images", "train.py", data("one_pixel"), ""),
        ("VGG on 8x8 images", "train.py", t("--model=vgg11"), ""),
        ("channels-first images", "train.py", data("nchw"), ""),
        ("float images", "train.py", data("float_images"), ""),
        ("npz without the arrays", "train.py", data("missing_keys"), ""),
        ("truncated npz", "train.py", data("truncated"), ""),
        ("work dir is a file", "train.py", [good, *TINY, f"--workdir={d['good']}"], ""),
        ("work dir on a read-only file system", "train.py", [good, *TINY, "--workdir=/sys/early_jax_runs"], ""),
        ("damaged run.json", "train.py", t(), "runjson"),
        ("damaged middle line of metrics.jsonl", "train.py", t(), "metrics"),
        ("checkpoint not matching its checksums", "train.py", t("--duration=8ep"), "checkpoint"),
        ("--distributed without a cluster", "train.py", t("--distributed"), ""),
        ("--distributed with only a coordinator", "train.py", t("--distributed", "--coordinator_address=x:1"), ""),
        ("report of a folder without tables", "make_figures.py", [f"--study_dir={work}"], ""),
    ]


def run(script: str, flags: list[str]) -> tuple[int, str, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *flags],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    message = errors[0] if errors else lines[-1] if lines else proc.stdout.strip().splitlines()[-1]
    if len(lines) > len(errors):
        message += f" (+{len(lines) - len(errors)} more lines)"
    if "Traceback" in proc.stderr:
        message = "TRACEBACK: " + message
    return proc.returncode, message, time.time() - start


def damage(kind: str, work: str, flags: list[str]) -> None:
    """Train the run first (short), then damage one of its files."""
    import glob
    if kind == "checkpoint":
        run("train.py", flags)
        [folder] = glob.glob(f"{work}/dense_*_seeds0-1")
        os.remove(os.path.join(folder, "result.json"))  # so that the rerun resumes from the end
        [final] = sorted(glob.glob(f"{folder}/checksums/*.json"), key=lambda p: int(os.path.basename(p)[:-5]))[-1:]
        with open(final) as f:
            text = f.read()
        with open(final, "w") as f:  # as if the arrays no longer matched what was written
            f.write(text.replace('"params/head/kernel": "', '"params/head/kernel": "0'))
        return
    run("train.py", flags)
    [folder] = glob.glob(f"{work}/dense_*_seeds0-1")
    if kind == "runjson":
        with open(os.path.join(folder, "run.json"), "w") as f:
            f.write('{"format": 2, "kind": ')
    else:
        os.remove(os.path.join(folder, "result.json"))
        with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
            f.write('{"step": 99, "tes\n{"step": 100}\n')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        d = datasets(folder)
        for i, (name, script, flags, prepare) in enumerate(cases(d, os.path.join(folder, "w")), 1):
            if args.only not in name:
                continue
            work = os.path.join(folder, f"w{i}")
            flags = [f.replace(os.path.join(folder, "w"), work) if f.startswith("--workdir") else f for f in flags]
            if prepare:
                damage(prepare, work, flags)
            code, message, seconds = run(script, flags)
            rows.append((i, name, script, code, message, seconds))
            print(f"{i:2d} {code} {seconds:5.1f}s {name}: {message[:150]}", file=sys.stderr, flush=True)
    print("| # | bad input | script | exit | message | seconds |\n|---|---|---|---|---|---|")
    for i, name, script, code, message, seconds in rows:
        print(f"| {i} | {name} | {script} | {code} | {message.replace('|', '/')[:220]} | {seconds:.1f} |")
    bad = [r for r in rows if r[3] != 2 or not r[4].startswith("error:")]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} refused with exit 2 and one error line"
          + (f"; not: {', '.join(r[1] for r in bad)}" if bad else ""))


if __name__ == "__main__":
    main()
