"""Reinitialise the kept weights at the rewind point (optionally keeping their signs; the paper's
Fig. 4 "signs are not enough"), then train the IMP subnetworks from step k.

  python experiments/reinit_weights.py --rewind_iter=500 --keep_signs
"""
from early_jax import cli
from early_jax.perturb import Treatment


def main(args):
    name = "reinit_keep_signs" if args.keep_signs else "reinit"
    cli.perturbation_main(args, [Treatment(name)],
                          "reinitialised at k" + (", signs kept" if args.keep_signs else ""))


if __name__ == "__main__":
    p = cli.perturbation_parser(__doc__)
    p.add_argument("--keep_signs", action="store_true", help="fresh magnitudes, the signs of W_k")
    cli.main(main, p)
