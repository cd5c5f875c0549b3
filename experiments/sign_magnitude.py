"""Signs versus magnitudes (the paper's Fig. 4): signs of W_k with magnitudes of W_0 or of a fresh
init, and signs of W_0 with magnitudes of W_k, against rewinding to k and to 0.

  python experiments/sign_magnitude.py --rewind_iter=500 --num_seeds=4
"""
from early_jax import cli
from early_jax.perturb import Treatment
from early_jax.errors import UserError

MIXES = ("signs_k_mags_0", "signs_k_mags_fresh", "signs_0_mags_k")


def main(args):
    chosen = [m.strip() for m in args.variants.split(",") if m.strip()]
    if not chosen or set(chosen) - set(MIXES):
        raise UserError(f"--variants takes a comma-separated subset of {', '.join(MIXES)}, got {args.variants!r}")
    cli.perturbation_main(args, [Treatment(m) for m in chosen], "signs vs magnitudes")


if __name__ == "__main__":
    p = cli.perturbation_parser(__doc__)
    p.add_argument("--variants", default=",".join(MIXES), help=f"comma-separated subset of {MIXES}")
    cli.main(main, p)
