"""Images/s of the real train step on one GPU for S = 1..32 seeds, float32 and bfloat16.

    python benchmarks/gpu_sweep.py                 # ResNet-20, batch 128, synthetic CIFAR-shaped data
    python benchmarks/gpu_sweep.py --json          # one JSON line instead of the table

Sized to finish in under 8 minutes on one GPU: it builds (compiles) the configurations most
important first (S = 1 and 8 in float32, then in bfloat16, then the other seed counts), starts no
new compilation after 60% of `--budget_s` (default 420 s) and no new timing round after 85%, and
prints whatever it measured. Seeds run with the configured seed parallelism (`auto` = vmap on an
accelerator). Each row: ms per step of all S seeds, images/s, and images/s relative to S = 1 of the
same dtype (goal: >= 4 at S = 8). bfloat16 = bf16 compute, float32 parameters and optimizer state.

On a CPU-only machine it refuses to run unless `--allow_cpu` is given (then use e.g.
`--model=convnet_small --seeds=1,2` to keep it short).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T0 = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", default="1,2,4,8,16,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--seed_parallel", default="auto", choices=("auto", "vmap", "map"))
    p.add_argument("--steps", type=int, default=20, help="steps per timed call (<= 50)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget_s", type=float, default=420.0)
    p.add_argument("--allow_cpu", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import early_jax  # noqa: F401  first: it sets XLA flags before JAX starts a backend
    import jax
    import train_speed
    if jax.default_backend() == "cpu" and not args.allow_cpu:
        raise SystemExit("gpu_sweep.py: no GPU/TPU backend (jax.default_backend() == 'cpu'); run it "
                         "where one is available, or pass --allow_cpu for a small test")
    seeds = [int(v) for v in args.seeds.split(",")]
    dtypes = args.dtypes.split(",")
    first = [n for n in (1, 8) if n in seeds]
    order = [(d, n) for d in dtypes for n in first] + \
            [(d, n) for d in dtypes for n in seeds if n not in first]
    combos = [(d, args.seed_parallel, n) for d, n in order]
    sweep_args = train_speed.parse_args([f"--model={args.model}", f"--batch={args.batch}",
                                         f"--steps={args.steps}", f"--rounds={args.rounds}",
                                         f"--budget_s={args.budget_s}"])
    out = train_speed.sweep(sweep_args, combos, t_start=T0)
    by = {(r["compute_dtype"], r["seeds"]): r for r in out["rows"]}
    out["goal_S8_images_per_s_vs_S1"] = {
        d: round(by[(d, 8)]["images_per_s"] / by[(d, 1)]["images_per_s"], 2)
        for d in dtypes if (d, 1) in by and (d, 8) in by}
    if all((d, 1) in by for d in dtypes) and len(dtypes) > 1:
        out["bf16_over_f32_images_per_s"] = {
            n: round(by[("bfloat16", n)]["images_per_s"] / by[("float32", n)]["images_per_s"], 2)
            for n in seeds if ("bfloat16", n) in by and ("float32", n) in by}
    out["total_s"] = round(time.perf_counter() - T0, 1)
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        train_speed.print_sweep(out)
        print("S=8 vs S=1 images/s:", out["goal_S8_images_per_s_vs_S1"],
              "| bf16/f32 images/s:", out.get("bf16_over_f32_images_per_s"),
              f"| {out['total_s']} s in all")


if __name__ == "__main__":
    main()
