"""Regenerate a study's figures and report.md from its CSV tables, without training.

  python experiments/make_figures.py --study_dir=runs/dense_..._seeds0-1/study_global_f0.6_<hash>
"""
from early_jax import cli, report


def main(args):
    print(f"report: {report.write_report(args.study_dir)}")


if __name__ == "__main__":
    p = cli.Parser(description=__doc__)
    p.add_argument("--study_dir", required=True, help="the study folder (holds imp.csv, ...)")
    cli.main(main, p)
