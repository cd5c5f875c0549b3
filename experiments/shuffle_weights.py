"""Shuffle the rewound weights W_k within each layer or filter, with or without keeping signs
(the paper's Fig. 5), then train the IMP subnetworks from step k.

  python experiments/shuffle_weights.py --rewind_iter=500
  python experiments/shuffle_weights.py --rewind_iter=500 --within=filter --keep_signs --num_seeds=8
"""
from early_jax import cli
from early_jax.perturb import Treatment


def main(args):
    name = f"shuffle_{args.within}" + ("_keep_signs" if args.keep_signs else "")
    cli.perturbation_main(args, [Treatment(name)], f"weights shuffled within each {args.within}"
                          + (", signs kept" if args.keep_signs else ""))


if __name__ == "__main__":
    p = cli.perturbation_parser(__doc__)
    p.add_argument("--within", default="layer", choices=("layer", "filter"))
    p.add_argument("--keep_signs", action="store_true", help="permute magnitudes only")
    cli.main(main, p)
