"""Search for a CPU setting in which the early-phase findings show up: run candidate settings
through the CLI scripts and print one results table.

For each candidate (name -> config flags, rewind step k, perturbation level L) this runs, as
subprocesses pinned with taskset, in `<runs>/<name>` (default runs: runs/study_search):
  experiments/imp.py --rewind_iters=0,k                finding 1 (k beats 0 at the sparsest level)
and with --full, reusing that dense run and those IMP levels:
  experiments/early_phase_study.py --rewind_iters=k    the whole study: perturbations at k
                                                       (findings 2, 3), dense instability (4), ...
  experiments/instability.py --rewind_iters=0,k --level=L   the sparse level's barrier (4)
Every piece resumes/reuses what is in the work dir, so running this again only re-reads the
results (seconds per script) and prints the same table; the minutes column is the wall time of the
first (computing) run of each script, kept in `<runs>/<name>/timings.json` (the study's time
excludes the dense run and IMP, which the imp column holds).

  python benchmarks/study_search.py                      # every candidate, IMP screen only
  python benchmarks/study_search.py --only=s4 --full     # + the study and the sparse instability
  python benchmarks/study_search.py --table              # the table of what is on disk

Statistics: mean and sample std (ddof=1) over seeds; pooled standard error
SE = sqrt(s0^2/n + sk^2/n); z = (acc_k - acc_0) / SE, at the sparsest level (and per level in the
last column). Accuracies and barriers in percent (points). Add a candidate to CANDIDATES.
s4-s6 use Fashion-MNIST average-pooled to 14x14 (`--pool=2`); s6 is the `fashion_resnet8` preset.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by every candidate: Fashion-MNIST IDX (the fashion_cpu preset's data), 3 seeds, no warmup.
BASE = {"num_seeds": "3", "warmup": "0it", "save_steps": "0it,10it,25it,50it,100it,200it"}
F14 = {"dataset": "fashion_mnist_idx", "pool": "2"}
TWO_EP = {"duration": "2ep", "milestones": "1ep", "eval_every": "2ep"}

# name -> (config flags, rewind k, perturbation/instability level L)
CANDIDATES = {
    # s1 was first run by hand with these flags (its imp time, 14.1 min, was written to timings.json)
    "s1": ({**TWO_EP, "model": "convnet_small", "lr": "0.1", "fraction": "0.8", "levels": "3"}, 50, 3),
    "s2": ({"duration": "1ep", "milestones": "350it", "eval_every": "1ep", "model": "resnet8_w8", "lr": "0.2",
            "fraction": "0.6", "levels": "3"}, 50, 3),
    # s3 (convnet_small, lr 0.4) diverged (20% accuracy at step 250) and was stopped.
    # Fashion-MNIST pooled to 14x14: ResNets ~4x cheaper per step
    "s4": ({**F14, "duration": "3ep", "milestones": "2ep", "eval_every": "3ep", "model": "resnet8_w8",
            "lr": "0.2", "fraction": "0.6", "levels": "3"}, 100, 3),
    "s5": ({**F14, "duration": "3ep", "milestones": "2ep", "eval_every": "3ep", "model": "resnet8_w8",
            "lr": "0.4", "fraction": "0.6", "levels": "3"}, 100, 3),
    # the fashion_resnet8 preset: s5 with 2 levels (16% left is the sparsest)
    "s6": ({"preset": "fashion_resnet8"}, 100, 2),
}


# the CPU study plans' path settings, for the sparse instability run
PATH = ["--alphas=0,0.25,0.5,0.75,1", "--train_examples=2000", "--bn_batches=20"]


def flags(d: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in d.items()]


def run(name: str, script: str, args: list[str], key: str, runs: str, cores: str) -> str:
    """Run one experiment script; returns its stdout. Records its wall time on first computation."""
    cmd = (["taskset", "-c", cores] if cores else []) + [sys.executable, os.path.join(ROOT, "experiments", script)] + args
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.setdefault("EARLY_JAX_CACHE", os.path.join(runs, "jax_cache"))
    log = os.path.join(runs, name, f"{key}.log")  # progress lands here as it runs
    os.makedirs(os.path.dirname(log), exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    if rc:
        raise SystemExit(f"{name}: {script} failed (rc {rc}); see {log}")
    timings = os.path.join(runs, name, "timings.json")
    times = json.load(open(timings)) if os.path.exists(timings) else {}
    times[key] = max(times.get(key, 0.0), seconds)  # a rerun that only reuses is faster: keep the first
    json.dump(times, open(timings, "w"), indent=1)
    return open(log).read()


def results_dir(stdout: str) -> str:
    return re.findall(r"results: (\S+?)/(?:results|instability)\.csv", stdout)[-1]


def read(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def stats(values) -> tuple[float, float, int]:
    values = [100 * float(v) for v in values]  # fractions -> percent
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def candidate(name: str, runs: str, cores: str, full: bool) -> dict:
    config, k, level = CANDIDATES[name]
    common = flags({**BASE, **config, "workdir": os.path.join(runs, name)})
    row = {"name": name}
    imp = read(os.path.join(results_dir(run(name, "imp.py", common + [f"--rewind_iters=0,{k}"], "imp", runs, cores)),
                            "results.csv"))
    last = max(int(r["level"]) for r in imp)
    cell = lambda rw, lv: [r["accuracy"] for r in imp if int(r["rewind"]) == rw and int(r["level"]) == lv]
    row["dense"] = stats(cell(0, 0))
    row["left%"] = 100 * float(next(r["density"] for r in imp if int(r["level"]) == last))
    row["k0"], row["k"] = stats(cell(0, last)), stats(cell(k, last))
    se = math.sqrt(row["k0"][1] ** 2 / row["k0"][2] + row["k"][1] ** 2 / row["k"][2])
    row["z"] = (row["k"][0] - row["k0"][0]) / se if se else float("inf")
    row["z_levels"] = []
    for lv in range(1, last + 1):
        (m0, s0, n0), (mk, sk, nk) = stats(cell(0, lv)), stats(cell(k, lv))
        row["z_levels"].append((lv, mk - m0, (mk - m0) / math.sqrt(s0 ** 2 / n0 + sk ** 2 / nk)))
    if full:
        # the whole study (reuses the dense run and the IMP levels above): perturbations, dense
        # instability, telemetry, pre-training
        out = run(name, "early_phase_study.py", common + [f"--rewind_iters={k}it"], "study", runs, cores)
        study = re.findall(r"report: (\S+)/report\.md", out)[-1]
        for r in read(os.path.join(study, "perturbations.csv")):
            if int(r["level"]) == level:
                row.setdefault("pert", {}).setdefault(r["treatment"], []).append(
                    (float(r["accuracy"]), float(r["effective_std"] or "nan")))
        barriers = read(os.path.join(study, "instability.csv"))
        # the sparse level's barrier at 0 and k (the IMP chains of both exist already)
        out = run(name, "instability.py", common + [f"--rewind_iters=0,{k}", f"--level={level}", *PATH], "instability",
                  runs, cores)
        barriers += [r for r in read(os.path.join(results_dir(out), "instability.csv")) if int(r["level"]) == level]
        for r in barriers:
            if r["split"] == "test":
                row.setdefault("barrier", {}).setdefault((int(r["level"]), int(r["rewind"])), []).append(
                    100 * float(r["barrier"]))
    timings = os.path.join(runs, name, "timings.json")
    row["minutes"] = json.load(open(timings)) if os.path.exists(timings) else {}
    return row


def fmt(ms) -> str:
    return f"{ms[0]:.2f}+-{ms[1]:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| setting | dense | % left | k=0 | k>0 | diff / SE | perturbations at L (acc; eff. std) | "
             "test barrier dense (k: pp) | test barrier at L | level: k-0 diff (z) | minutes (1 core) |", "|" + "---|" * 11]
    for r in rows:
        pert = "; ".join(f"{t} {fmt(stats([a for a, _ in v]))} ({sum(e for _, e in v) / len(v):.2f})"
                     for t, v in r.get("pert", {}).items() if not t.startswith(("control", "rewind"))) or "-"
        bars = lambda lv: ", ".join(f"{k}: {sum(v) / len(v):.1f}" for (l, k), v in sorted(r.get("barrier", {}).items())
                                    if l == lv) or "-"
        levels = sorted({l for l, _ in r.get("barrier", {})})
        minutes = ", ".join(f"{k} {v / 60:.1f}" for k, v in r["minutes"].items())
        lines.append(f"| {r['name']} | {fmt(r['dense'])} | {r['left%']:.2f} | {fmt(r['k0'])} | {fmt(r['k'])} | "
                     f"{r['z']:.1f} | {pert} | {bars(0)} | {bars(levels[-1]) if len(levels) > 1 else '-'} | "
                     + ", ".join(f"{lv}: {d:+.2f} ({z:.1f})" for lv, d, z in r["z_levels"]) + f" | {minutes} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/study_search", help="parent of the candidates' work dirs")
    p.add_argument("--only", default="", help="comma-separated name prefixes (default: all candidates)")
    p.add_argument("--full", action="store_true", help="also perturbations and instability")
    p.add_argument("--cores", default="1", help="taskset core list ('' for no pinning)")
    p.add_argument("--table", action="store_true", help="only candidates already run (IMP results on disk)")
    a = p.parse_args()
    names = [n for n in CANDIDATES if not a.only or n.startswith(tuple(a.only.split(",")))]
    if a.table:
        names = [n for n in names if glob.glob(os.path.join(a.runs, n, "dense_*", "imp_*", "results.csv"))]
    rows = []
    for n in names:
        full = a.full or (a.table and os.path.exists(os.path.join(a.runs, n, "study.log")))
        rows.append(candidate(n, a.runs, a.cores, full))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
