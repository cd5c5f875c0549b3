"""Add Gaussian noise N(0, (n sigma_l)^2) to the kept weights at the rewind point, sigma_l the
layer's init std (the paper's Fig. 6), then train the IMP subnetworks from step k.

  python experiments/gaussian_noise.py --rewind_iter=500 --noise_scales=0.5,1,2,3
"""
from early_jax import branches, cli


def main(args):
    treatments = [branches.Treatment("noise", n) for n in cli.numbers(args.noise_scales)]
    branches.experiment_main(args, treatments, "gaussian_noise", "Gaussian noise at k")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    branches.add_flags(p)
    p.add_argument("--noise_scales", default="0.5,1,2,3", help="multipliers n of sigma_l")
    cli.main(main, p)
