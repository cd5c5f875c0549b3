"""Add Gaussian noise N(0, (n sigma_l)^2) to the kept weights at the rewind point, sigma_l the
layer's init std (the paper's Fig. 6), then train the IMP subnetworks from step k.

  python experiments/gaussian_noise.py --rewind_iter=500 --noise_scales=0.5,1,2,3
"""
from early_jax import cli
from early_jax.perturb import Treatment


def main(args):
    treatments = [Treatment("noise", n) for n in cli.numbers(args.noise_scales)]
    cli.perturbation_main(args, treatments, "Gaussian noise at k")


if __name__ == "__main__":
    p = cli.perturbation_parser(__doc__)
    p.add_argument("--noise_scales", default="0.5,1,2,3", help="multipliers n of sigma_l")
    cli.main(main, p)
