"""Shuffle the rewound weights W_k within each layer or filter, with or without keeping signs
(the paper's Fig. 5), then train the IMP subnetworks from step k.

  python experiments/shuffle_weights.py --rewind_iter=500
  python experiments/shuffle_weights.py --rewind_iter=500 --within=filter --keep_signs --num_seeds=8
"""
from early_jax import branches, cli


def main(args):
    name = f"shuffle_{args.within}" + ("_keep_signs" if args.keep_signs else "")
    branches.experiment_main(args, [branches.Treatment(name)], name,
                             f"weights shuffled within each {args.within}"
                             + (", signs kept" if args.keep_signs else ""))


if __name__ == "__main__":
    p = cli.parser(__doc__)
    branches.add_flags(p)
    p.add_argument("--within", default="layer", choices=("layer", "filter"))
    p.add_argument("--keep_signs", action="store_true", help="permute magnitudes only")
    cli.main(main, p)
