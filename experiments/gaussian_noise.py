"""Add Gaussian noise N(0, (n sigma_l)^2) to the kept weights at the rewind point, sigma_l the
layer's init std (the paper's Fig. 6), then train the IMP subnetworks from step k.

  python experiments/gaussian_noise.py --rewind_iter=500 --noise_scales=0.5,1,2,3
"""
from early_jax import branches, cli
from early_jax.errors import UserError


def scales(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--noise_scales takes comma-separated numbers, got {text!r}") from None


def main(args):
    treatments = [branches.Treatment("noise", n) for n in scales(args.noise_scales)]
    branches.experiment_main(args, treatments, "gaussian_noise", "Gaussian noise at k")


if __name__ == "__main__":
    p = cli.parser(__doc__)
    branches.add_flags(p)
    p.add_argument("--noise_scales", default="0.5,1,2,3", help="multipliers n of sigma_l")
    cli.main(main, p)
