"""Which of the paper's findings a study reproduced, decided from its numbers (not from prose).

Each check compares two groups of seeds with the same test: the difference of their means against
its pooled standard error, sqrt(s_a^2/n_a + s_b^2/n_b) with sample standard deviations. A finding
is *reproduced* when the difference points the paper's way by more than `Z` pooled standard errors,
*mixed* when it points that way by less (or only some of its parts hold), and *not at this scale*
otherwise; a check whose inputs are missing says so.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from early_jax import tables

Z = 2.0
REPRODUCED, MIXED, NOT, MISSING = "reproduced", "mixed", "not at this scale", "not measured"


@dataclasses.dataclass(frozen=True)
class Verdict:
    finding: str        # the paper's claim, with its section
    numbers: str        # ours
    test: str
    verdict: str


def z_score(a: tables.Stat, b: tables.Stat) -> float:
    """(mean a - mean b) / pooled SE; +-inf when both spreads are zero and the means differ."""
    if not (a.n and b.n):
        return math.nan
    se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)
    diff = a.mean - b.mean
    if se == 0:
        return math.copysign(math.inf, diff) if diff else 0.0
    return diff / se


def by_z(z: float) -> str:
    """The verdict of a one-sided comparison expected to come out positive."""
    if math.isnan(z):
        return MISSING
    return REPRODUCED if z > Z else MIXED if z > 0 else NOT


def combine(verdicts: list[str]) -> str:
    """All parts reproduced: reproduced; none: not; else mixed (missing parts count as missing)."""
    if MISSING in verdicts:
        return MISSING
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return NOT if all(v == NOT for v in verdicts) else MIXED


def _text(s: tables.Stat, scale=100.0) -> str:
    return s.text(scale) if s.n else "n/a"


def _accuracy(rows, **where) -> tables.Stat:
    return tables.stat([r["accuracy"] for r in tables.finite_rows(rows)
                        if all(r.get(k) == v for k, v in where.items())])


def rewinding(imp: list[dict], dense: list[dict]) -> list[Verdict]:
    """Section 3 / Fig. 1: at the sparsest level rewinding to k beats rewinding to 0, and
    rewinding to 0 falls below the dense network."""
    if not imp:
        return [Verdict("IMP: rewinding to k > 0 beats rewinding to 0 at the highest sparsity (Sec. 3, Fig. 1)",
                        "no IMP rows", "-", MISSING)]
    level, k = max(r["level"] for r in imp), max(r["rewind"] for r in imp)
    at_k, at_0 = _accuracy(imp, level=level, rewind=k), _accuracy(imp, level=level, rewind=0)
    dense_acc = tables.stat([r["accuracy"] for r in tables.finite_rows(dense)])
    left = tables.stat([r["density"] for r in imp if r["level"] == level]).mean
    z1, z2 = z_score(at_k, at_0), z_score(dense_acc, at_0)
    return [
        Verdict(f"IMP: rewinding to k > 0 beats rewinding to 0 at the highest sparsity (Sec. 3, Fig. 1)",
                f"{100 * left:.1f}% left: k={k} {_text(at_k)}% vs k=0 {_text(at_0)}% (z = {z1:.1f})",
                f"difference > {Z:g} pooled SE", by_z(z1)),
        Verdict("IMP: rewinding to 0 falls below the dense network there (Sec. 3, Fig. 1)",
                f"dense {_text(dense_acc)}% vs k=0 {_text(at_0)}% (z = {z2:.1f})",
                f"difference > {Z:g} pooled SE", by_z(z2)),
    ]


def loses_benefit(rows: list[dict], treatment: str, level: int, control: str, zero: str) -> tuple[str, str]:
    """(numbers, verdict) for 'the treatment loses most of the rewinding benefit': it falls below
    the rewind-to-k control by > Z SE, and keeps less than half of the control's lead over k = 0."""
    t, c, o = (_accuracy(rows, level=level, treatment=name) for name in (treatment, control, zero))
    if not (t.n and c.n and o.n):
        return f"{treatment}: not run", MISSING
    benefit = c.mean - o.mean
    kept = (t.mean - o.mean) / benefit if benefit > 0 else math.nan
    z = z_score(c, t)
    share = ("n/a" if math.isnan(kept) else "none: below rewinding to 0" if kept < 0
             else f"{100 * kept:.0f}% of the benefit")
    numbers = f"{treatment} {_text(t)}% vs control {_text(c)}%, rewind to 0 {_text(o)}% (z = {z:.1f}, keeps {share})"
    if benefit <= 0:
        return numbers + "; rewinding to k has no benefit here", NOT
    verdict = by_z(z)
    if verdict == REPRODUCED and kept >= 0.5:
        verdict = MIXED
    return numbers, verdict


def perturbations(rows: list[dict], k: int) -> list[Verdict]:
    """Section 4: sign-keeping reinit and shuffles lose the benefit; noise damage grows with scale;
    effective std puts the perturbations on the noise scale."""
    if not rows:
        return []
    control, zero = f"control (rewind to {k})", "rewind to 0"
    level = max(r["level"] for r in rows if r["treatment"] not in (control, zero))
    out = []
    for name, claim in (("reinit_keep_signs", "Signs are not enough: reinitialising with the signs of W_k loses "
                                              "most of the benefit of rewinding (Sec. 4.1, Fig. 4)"),
                        ("shuffle_layer", "The weights are not i.i.d.: shuffling W_k within layers loses most "
                                          "of the benefit (Sec. 4.2, Fig. 5)"),
                        ("shuffle_layer_keep_signs", "... even when each weight keeps its sign (Sec. 4.2, Fig. 5)")):
        if any(r["treatment"] == name for r in rows):
            numbers, verdict = loses_benefit(rows, name, level, control, zero)
            out.append(Verdict(claim, numbers, f"control - treatment > {Z:g} pooled SE and < half the benefit kept",
                               verdict))
    noise = sorted({float(r["treatment"].split()[1][:-1]) for r in rows if r["treatment"].startswith("noise ")})
    if len(noise) >= 2:
        low, high = (_accuracy(rows, level=level, treatment=f"noise {n:g}x") for n in (noise[0], noise[-1]))
        z = z_score(low, high)
        out.append(Verdict("More Gaussian noise at k does more damage (Sec. 4.3, Fig. 6)",
                           f"noise {noise[0]:g}x {_text(low)}% vs {noise[-1]:g}x {_text(high)}% (z = {z:.1f})",
                           f"difference > {Z:g} pooled SE", by_z(z)))
        out.append(effective_std_lines_up(rows, level, noise))
    return out


def effective_std_lines_up(rows: list[dict], level: int, noise: list[float]) -> Verdict:
    """Each other perturbation's accuracy against the noise curve read at its effective std
    (linear between the measured noise scales, clamped at the ends): within Z pooled SE."""
    curve = [(n, _accuracy(rows, level=level, treatment=f"noise {n:g}x")) for n in noise]
    parts, verdicts = [], []
    others = sorted({r["treatment"] for r in rows if not r["treatment"].startswith(("noise", "control", "rewind"))})
    for name in others:
        eff = tables.stat([r["effective_std"] for r in rows if r["treatment"] == name and r["level"] == level])
        acc = _accuracy(rows, level=level, treatment=name)
        if not (eff.n and acc.n):
            continue
        expected = float(np.interp(eff.mean, [n for n, _ in curve], [s.mean for _, s in curve]))
        spread = float(np.interp(eff.mean, [n for n, _ in curve], [s.std for _, s in curve]))
        se = math.sqrt(acc.std ** 2 / acc.n + spread ** 2 / curve[0][1].n)
        z = abs(acc.mean - expected) / se if se else (0.0 if acc.mean == expected else math.inf)
        parts.append(f"{name}: eff. std {eff.mean:.2f}, {100 * acc.mean:.2f}% vs noise curve {100 * expected:.2f}%"
                     f" (|z| = {z:.1f})")
        verdicts.append(REPRODUCED if z <= Z else NOT)
    if not verdicts:
        return Verdict("Gaussian noise of matching effective std does comparable damage (Sec. 4.3, Fig. 6)",
                       "no perturbation besides noise", "-", MISSING)
    return Verdict("Gaussian noise of matching effective std does comparable damage (Sec. 4.3, Fig. 6)",
                   "; ".join(parts), f"|accuracy - noise curve at its effective std| <= {Z:g} pooled SE",
                   combine(verdicts))


def instability(barriers: list[dict]) -> list[Verdict]:
    """Fig. 2 (from Frankle et al. 2020): the test error barrier falls with the rewind step k."""
    out = []
    for level in sorted({r["level"] for r in barriers}):
        rows = [r for r in barriers if r["level"] == level and r["split"] == "test"]
        steps = sorted({r["rewind"] for r in rows})
        if len(steps) < 2:
            continue
        first, last = (tables.stat([r["barrier"] for r in rows if r["rewind"] == k]) for k in (steps[0], steps[-1]))
        z = z_score(first, last)
        name = "dense network" if level == 0 else f"IMP level {level} subnetwork"
        out.append(Verdict(f"Instability falls with k: the {name} becomes stable to SGD noise (Fig. 2)",
                           f"test barrier k={steps[0]} {first.text()} vs k={steps[-1]} {last.text()} points "
                           f"(z = {z:.1f})", f"difference > {Z:g} pooled SE", by_z(z)))
    return out


def pretraining(pre: list[dict], imp: list[dict]) -> list[Verdict]:
    """Section 5: pre-training (here on the plan's task) gets IMP closer to rewinding to k than
    rewinding to 0 does, at the sparsest level."""
    tasks = sorted({(r["task"], r["pretrain_epochs"]) for r in pre if r["pretrain_epochs"] > 0})
    if not tasks or not imp:
        return []
    level = max(r["level"] for r in pre)
    at_0 = _accuracy(imp, level=level, rewind=0)
    out = []
    for task, epochs in tasks:
        s = _accuracy(pre, level=level, task=task, pretrain_epochs=epochs)
        z = z_score(s, at_0)
        out.append(Verdict(f"Pre-training ({task}, {epochs} epoch(s)) beats rewinding to 0 (Sec. 5, Fig. 7)",
                           f"{_text(s)}% vs k=0 {_text(at_0)}% (z = {z:.1f})", f"difference > {Z:g} pooled SE",
                           by_z(z)))
    return out


def study(dense, imp, perturbation_rows, barriers, pre) -> list[Verdict]:
    k = max((r["rewind"] for r in imp), default=0)
    return (rewinding(imp, dense) + perturbations(perturbation_rows, k) + instability(barriers)
            + pretraining(pre, imp))


def markdown(verdicts: list[Verdict]) -> str:
    lines = ["| finding (paper) | our numbers | test | verdict |", "|---|---|---|---|"]
    lines += [f"| {v.finding} | {v.numbers} | {v.test} | **{v.verdict}** |" for v in verdicts]
    return "\n".join(lines)
