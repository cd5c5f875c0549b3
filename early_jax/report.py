"""Figures that mirror the paper's, and the study's report (written from result rows, no training).

Every curve is the mean over seeds with a band of one (sample) standard deviation; seeds that
diverged are left out of every mean and counted in the legend or table instead (tables.Stat).
"""
from __future__ import annotations

import os

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from early_jax import files, tables, verdicts  # noqa: E402
from early_jax.errors import UserError  # noqa: E402


def curves(rows: list[dict], group: str) -> dict:
    """{group value: [(mean density, accuracy Stat)] per level, densest first}."""
    density = tables.summarize(rows, (group, "level"), "density")
    out: dict = {}
    for (g, level), acc in tables.summarize(rows, (group, "level"), "accuracy").items():
        out.setdefault(g, []).append((density[(g, level)].mean, acc))
    return {g: sorted(points, key=lambda p: -p[0]) for g, points in out.items()}


def diverged_count(rows: list[dict], group: str) -> dict:
    """{group value: number of diverged rows} (only groups that have some)."""
    out: dict = {}
    for row in rows:
        if row.get("diverged"):
            out[row[group]] = out.get(row[group], 0) + 1
    return out


def plot_accuracy_vs_remaining(rows: list[dict], group: str, path: str, title: str,
                               label=lambda g: str(g), dense: list[float] | None = None) -> str:
    """Test accuracy vs percent of weights remaining (log x), one curve per group, mean +- std
    over seeds, the dense network's accuracy as a band (the paper's Fig. 1 style)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if dense:
        d = tables.stat(dense)
        ax.axhspan(100 * d.mean - max(100 * d.std, 0.05), 100 * d.mean + max(100 * d.std, 0.05),
                   color="0.85", label="dense")
    dropped = diverged_count(rows, group)
    for g, points in curves(rows, group).items():
        x = 100 * np.array([p[0] for p in points])
        y, s = (100 * np.array([getattr(p[1], a) for p in points]) for a in ("mean", "std"))
        extra = f" ({dropped[g]} diverged, left out)" if g in dropped else ""
        line, = ax.plot(x, y, marker="o", ms=3, label=label(g) + extra)
        ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    _plain_tick_labels(ax.xaxis, sorted({round(100 * p[0], 1) for points in curves(rows, group).values()
                                         for p in points}))
    ax.invert_xaxis()
    ax.set_xlabel("percent of weights remaining")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_imp(rows: list[dict], path: str, title: str) -> str:
    dense = [r["accuracy"] for r in tables.finite_rows(rows) if r["level"] == 0
             and r["rewind"] == min(x["rewind"] for x in rows)]
    return plot_accuracy_vs_remaining(rows, "rewind", path, title, label=lambda k: f"rewind to {k}",
                                      dense=dense)


def plot_perturbations(rows: list[dict], path: str, title: str) -> str:
    """Perturbations with the references; each treatment's mean effective std in its legend."""
    eff = tables.summarize(rows, ("treatment",), "effective_std")
    legend = lambda t: t if t.startswith(("control", "rewind")) or not eff[(t,)].n else \
        f"{t} (eff. std {eff[(t,)].mean:.2f})"
    return plot_accuracy_vs_remaining(rows, "treatment", path, title, label=legend)


def _plain_tick_labels(axis, ticks=None):
    """Numbers as written (0.8, 41, 2) on a log axis, not powers of ten; `ticks` where to put them."""
    if ticks is not None:
        axis.set_ticks(ticks)
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _save(fig, path: str) -> str:
    if files.is_primary():
        fig.tight_layout()
        with files.atomic(path, "wb") as f:
            fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
    return path


def _band(ax, rows, key, label, scale=1.0, **style):
    """Mean +- std over seeds of `key` against the step, for the rows that have it."""
    measured = [r for r in rows if r.get(key) not in (None, "") and np.isfinite(float(r[key]))]
    series = tables.summarize(measured, ("step",), key)
    if series:
        steps = np.array([s for (s,) in series])
        mean, std = (np.array([getattr(v, a) for v in series.values()]) for a in ("mean", "std"))
        line, = ax.plot(steps, scale * mean, label=label, **style)
        ax.fill_between(steps, scale * (mean - std), scale * (mean + std), color=line.get_color(), alpha=0.2)


def plot_telemetry(rows: list[dict], path: str, title: str, subnet: bool = False) -> str:
    """The paper's Fig. 3 panel over the early steps (symlog x), mean +- std over seeds."""
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    panels = [
        ("test accuracy (%)", [("test_accuracy", "test accuracy", 100)]),
        ("mean |w|", [("all_mean_abs", "all weights", 1)] + [("sub_mean_abs", "subnetwork", 1)] * subnet),
        ("signs differing from init (%)", [("all_sign_flip", "all weights", 1)]
         + [("sub_sign_flip", "subnetwork", 1)] * subnet),
        ("10 sampled weights (first seed)", []),
        ("gradient norm", [("grad_norm", "minibatch gradient", 1)]),
        ("L2 distance", [("all_dist_init", "to W_0", 1), ("all_dist_final", "to W_T", 1)]),
        ("cosine similarity", [("all_cos_init", "to W_0", 1), ("all_cos_final", "to W_T", 1)]),
        ("test loss / train loss", [("test_loss", "test loss", 1), ("loss", "train loss (step)", 1)]),
    ]
    for ax, (ylabel, lines) in zip(axes.ravel(), panels):
        for key, label, scale in lines:
            _band(ax, rows, key, label, scale, marker="o" if key.startswith("test") else None, ms=3)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    first_seed = [r for r in rows if r["seed"] == rows[0]["seed"]] if rows else []
    for key in [k for k in (rows[0] if rows else {}) if k.startswith("sample_")]:
        axes[0, 3].plot([r["step"] for r in first_seed], [r[key] for r in first_seed], lw=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_vs_pretraining(rows: list[dict], references: dict, levels: list[int], path: str,
                        title: str) -> str:
    """Test accuracy at fixed sparsity levels vs pre-training epochs (the paper's Fig. 7), with
    supervised IMP references ({label: rows}, e.g. rewind to 0 and to k) as dashed lines."""
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.8), squeeze=False)
    cells = tables.summarize(rows, ("task", "level", "pretrain_epochs"), "accuracy")
    density = tables.summarize(rows, ("level",), "density")
    for ax, level in zip(axes[0], levels):
        for task in sorted({r["task"] for r in rows}):
            points = {e: s for (t, lv, e), s in cells.items() if t == task and lv == level}
            epochs = sorted(points)
            mean, std = (100 * np.array([getattr(points[e], a) for e in epochs]) for a in ("mean", "std"))
            line, = ax.plot(epochs, mean, marker="o", label=task)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        for color, (label, ref_rows) in zip(("0.3", "C3", "C2", "C4"), references.items()):
            ref = tables.stat([r["accuracy"] for r in tables.finite_rows(ref_rows) if r["level"] == level])
            if ref.n:
                ax.axhline(100 * ref.mean, ls="--", color=color, label=label)
        ax.set_title(f"{100 * density[(level,)].mean:.1f}% of weights remaining" if (level,) in density
                     else f"level {level}")
        ax.set_xscale("symlog", linthresh=1)
        _plain_tick_labels(ax.xaxis, sorted({r["pretrain_epochs"] for r in rows}))
        ax.set_xlabel("pre-training epochs")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_instability(barrier_rows: list[dict], along: list[dict], path: str, title: str) -> str:
    """Left: barrier vs k (symlog x, so k=0 shows), mean +- std over seeds, per level and split.
    Right: mean test error along the path for each (level, k)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = sorted({r["rewind"] for r in barrier_rows})
    levels = sorted({r["level"] for r in barrier_rows})
    color = lambda i: plt.get_cmap("tab10")(i % 10)
    density = tables.summarize(barrier_rows, ("level",), "density")
    cells = tables.summarize(barrier_rows, ("level", "split", "rewind"), "barrier")
    for level, split in dict.fromkeys((lv, s) for lv, s, _ in cells):  # colour: level; line: split
        points = {k: v for (lv, s, k), v in cells.items() if (lv, s) == (level, split)}
        k = np.array(sorted(points))
        mean, std = (100 * np.array([getattr(points[x], a) for x in k]) for a in ("mean", "std"))
        name = "dense" if level == 0 else f"level {level} ({100 * density[(level,)].mean:.1f}% left)"
        c = color(levels.index(level))
        left.plot(k, mean, marker="o", ms=4, color=c, ls="-" if split == "test" else "--",
                  label=f"{name}, {split}")
        left.fill_between(k, mean - std, mean + std, color=c, alpha=0.15)
    positive = [k for k in steps if k > 0]
    left.set_xscale("symlog", linthresh=min(positive) if positive else 1)
    left.set_xticks(steps, [str(k) for k in steps])
    left.axhline(0, color="0.5", lw=0.8)
    left.set_xlabel("rewind iteration k (symlog)")
    left.set_ylabel("error barrier (percentage points)")
    left.set_title(title)
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    errors = tables.summarize([r for r in along if r["split"] == "test"], ("level", "rewind", "alpha"), "error")
    for level, k in dict.fromkeys((lv, k) for lv, k, _ in errors):  # colour: k; line: level
        points = {a: v for (lv, kk, a), v in errors.items() if (lv, kk) == (level, k)}
        alphas = sorted(points)
        name = "dense" if level == 0 else f"level {level}"
        right.plot(alphas, [100 * points[a].mean for a in alphas], marker=".", color=color(steps.index(k)),
                   ls=["-", "--", ":", "-."][levels.index(level) % 4], label=f"{name}, k={k}")
    right.set_xlabel("interpolation alpha (copy 1 -> copy 2)")
    right.set_ylabel("test error (%)")
    right.set_title("error along the path (mean over seeds)")
    right.legend(fontsize=7)
    right.grid(True, alpha=0.3)
    return _save(fig, path)


# ----- the study report -----
STUDY_TABLES = ("dense", "imp", "telemetry", "perturbations", "instability", "instability_path", "pretrain")


def _markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _diverged_note(rows: list[dict]) -> str:
    bad = [r for r in rows if r.get("diverged")]
    if not bad:
        return ""
    cells = ", ".join(f"seed {r['seed']}" + (f" ({r['treatment']})" if "treatment" in r else "")
                      + (f" level {r['level']}" if "level" in r else "") for r in bad)
    return f"\n\nDiverged and left out of every mean: {cells}."


def imp_table(imp: list[dict]) -> str:
    rewinds = sorted({r["rewind"] for r in imp})
    density = tables.summarize(imp, ("level",), "density")
    acc = tables.summarize(imp, ("level", "rewind"), "accuracy")
    body = [[level, f"{100 * d.mean:.1f}"] + [acc.get((level, k), tables.stat([])).text() for k in rewinds]
            for (level,), d in density.items()]
    return _markdown(["level", "% weights left"] + [f"acc. rewind {k} (%)" for k in rewinds], body) \
        + _diverged_note(imp)


def perturbation_table(rows: list[dict]) -> str:
    keys = ("level", "treatment")
    acc, dens = tables.summarize(rows, keys, "accuracy"), tables.summarize(rows, keys, "density")
    eff, raw = tables.summarize(rows, keys, "effective_std"), tables.summarize(rows, keys, "perturbation_std")
    shown = lambda s, digits: f"{s.mean:.{digits}f}" if s.n else ""
    levels = {lv for lv, t in acc if not str(t).startswith(("control", "rewind"))}
    body = [[lv, f"{100 * dens[(lv, t)].mean:.1f}", t, acc[(lv, t)].text(), shown(eff[(lv, t)], 2),
             shown(raw[(lv, t)], 4)] for lv, t in acc if lv in levels]
    return _markdown(["level", "% left", "treatment", "accuracy (%)", "effective std",
                      "std of the change"], body) + _diverged_note(rows)


def instability_table(barriers: list[dict]) -> str:
    cells = tables.summarize(barriers, ("level", "rewind", "split"), "barrier")
    keys = dict.fromkeys((lv, k) for lv, k, _ in cells)
    body = [[lv, k] + [cells.get((lv, k, s), tables.stat([])).text() for s in ("test", "train")] for lv, k in keys]
    return _markdown(["level", "rewind k", "test barrier (points)", "train barrier (points)"], body)


def pretrain_table(rows: list[dict]) -> str:
    keys = ("task", "pretrain_epochs", "level")
    acc, dens = tables.summarize(rows, keys, "accuracy"), tables.summarize(rows, keys, "density")
    body = [[t, e, lv, f"{100 * dens[(t, e, lv)].mean:.1f}", s.text()] for (t, e, lv), s in acc.items()]
    return _markdown(["task", "pre-training epochs", "level", "% left", "accuracy (%)"], body) \
        + _diverged_note(rows)


def telemetry_table(rows: list[dict]) -> str:
    evals = sorted({r["step"] for r in rows if r.get("test_accuracy") not in (None, "")})
    shown = evals[:1] + evals[len(evals) // 2: len(evals) // 2 + 1] + evals[-1:]
    body = []
    for step in dict.fromkeys(shown):
        at = [r for r in rows if r["step"] == step]
        column = lambda key, scale, digits: tables.stat([r[key] for r in at]).text(scale, digits)
        body.append([step, column("test_accuracy", 100, 2), column("all_mean_abs", 1, 4),
                     column("all_sign_flip", 1, 2), column("all_dist_init", 1, 3),
                     column("all_cos_final", 1, 4)])
    return _markdown(["step", "test acc. (%)", "mean abs w", "signs flipped (%)", "L2 to W_0",
                      "cosine to W_T"], body)


def write_report(study_dir: str, title: str | None = None) -> str:
    """Figures and report.md from the study's CSVs (no training); returns the report's path.
    The title defaults to the one the study recorded in study.json."""
    load = lambda name: tables.read_csv(os.path.join(study_dir, f"{name}.csv"))
    recorded = os.path.join(study_dir, "study.json")
    if title is None:
        title = files.read_json(recorded)["title"] if os.path.exists(recorded) else "early-phase study"
    missing = [n for n in STUDY_TABLES if not os.path.exists(os.path.join(study_dir, f"{n}.csv"))]
    if missing:
        raise UserError(f"{study_dir} lacks {', '.join(m + '.csv' for m in missing)}: run the study first")
    dense, imp, tel = load("dense"), load("imp"), load("telemetry")
    perturbations, barriers, along, pre = load("perturbations"), load("instability"), \
        load("instability_path"), load("pretrain")
    k = max(r["rewind"] for r in imp)
    fig = lambda name: os.path.join(study_dir, name)
    plot_imp(imp, fig("fig1_imp.png"), "IMP with rewinding")
    plot_telemetry(tel, fig("fig3_telemetry.png"), "early-phase telemetry",
                   subnet=any(r.get("sub_mean_abs") != r.get("all_mean_abs") for r in tel))
    plot_perturbations(perturbations, fig("fig4-6_perturbations.png"), f"perturbations at k={k}")
    plot_instability(barriers, along, fig("instability.png"), "instability vs rewind step")
    references = {f"IMP, rewind to {r}": [x for x in imp if x["rewind"] == r] for r in sorted({0, k})}
    pre_levels = sorted({r["level"] for r in pre} - {0})
    plot_vs_pretraining(pre, references, pre_levels[-2:] or [0], fig("fig7_pretraining.png"),
                        "IMP after pre-training")
    text = f"""# {title}

Regenerate with `python experiments/make_figures.py --study_dir={study_dir}` (no training).
Numbers are mean ± sample standard deviation over seeds.

## What reproduced at this scale
Each verdict is computed from the tables below (early_jax/verdicts.py): a difference in the
paper's direction by more than {verdicts.Z:g} pooled standard errors is *reproduced*, in that
direction but within the noise *mixed*, otherwise *not at this scale*.

{verdicts.markdown(verdicts.study(dense, imp, perturbations, barriers, pre))}

## Dense network
Test accuracy {tables.stat([r['accuracy'] for r in tables.finite_rows(dense)]).text()}% over {len(dense)} seed(s).{_diverged_note(dense)}

## IMP with rewinding (Fig. 1)
![IMP](fig1_imp.png)

{imp_table(imp)}

## Early-phase telemetry (Fig. 3)
![telemetry](fig3_telemetry.png)

{telemetry_table(tel)}

## Perturbations at the rewind point k={k} (Figs. 4-6)
![perturbations](fig4-6_perturbations.png)

{perturbation_table(perturbations)}

## Instability (linear mode connectivity) vs k
![instability](instability.png)

{instability_table(barriers)}

## Pre-training, then IMP (Fig. 7)
![pre-training](fig7_pretraining.png)

{pretrain_table(pre)}
"""
    path = os.path.join(study_dir, "report.md")
    files.write_text(path, text)
    return path

