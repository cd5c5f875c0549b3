"""Tables and matplotlib figures that mirror the paper's (written from results, no training)."""
from __future__ import annotations

import csv
import os
from collections import defaultdict

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from early_jax.progress import read_json  # noqa: E402


def write_csv(rows: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))  # every column of every row
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)
    return path


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def summarize(rows: list[dict], group: str, x: str = "density", y: str = "accuracy") -> dict:
    """{group value: [(mean x, mean y, std y, n)] sorted by x descending}, over seeds."""
    cells = defaultdict(list)
    for row in rows:
        cells[(row[group], row["level"])].append((row[x], row[y]))
    out = defaultdict(list)
    for (g, _), values in cells.items():
        xs, ys = np.array(values).T
        out[g].append((xs.mean(), ys.mean(), ys.std(), len(ys)))
    return {g: sorted(v, key=lambda t: -t[0]) for g, v in out.items()}


def plot_accuracy_vs_remaining(rows: list[dict], group: str, path: str, title: str,
                               label=lambda g: str(g), dense: list[float] | None = None) -> str:
    """Test accuracy vs percent of weights remaining (log x), one curve per group, mean +- std
    over seeds, the dense network's accuracy as a band (the paper's Fig. 1 style)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if dense:
        mean, std = 100 * np.mean(dense), 100 * np.std(dense)
        ax.axhspan(mean - max(std, 0.05), mean + max(std, 0.05), color="0.85", label="dense")
    for g, points in summarize(rows, group).items():
        x = 100 * np.array([p[0] for p in points])
        y, s = 100 * np.array([p[1] for p in points]), 100 * np.array([p[2] for p in points])
        line, = ax.plot(x, y, marker="o", ms=3, label=label(g))
        ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    _plain_tick_labels(ax.xaxis)
    ax.invert_xaxis()
    ax.set_xlabel("percent of weights remaining")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plain_tick_labels(axis, ticks=None):
    """Numbers as written (0.8, 41, 2) on a log axis, not powers of ten; `ticks` where to put them."""
    if ticks is not None:
        axis.set_ticks(ticks)
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(rows: list[dict], key: str):
    """(steps, mean, std) over seeds of `key`, for the rows that have it."""
    by_step = defaultdict(list)
    for row in rows:
        value = row.get(key)
        if value is not None and value != "" and np.isfinite(float(value)):
            by_step[int(row["step"])].append(float(value))
    steps = np.array(sorted(by_step))
    values = [np.array(by_step[s]) for s in steps]
    return steps, np.array([v.mean() for v in values]), np.array([v.std() for v in values])


def _band(ax, rows, key, label, scale=1.0, **style):
    steps, mean, std = _series(rows, key)
    if len(steps):
        line, = ax.plot(steps, scale * mean, label=label, **style)
        ax.fill_between(steps, scale * (mean - std), scale * (mean + std), color=line.get_color(),
                        alpha=0.2)


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
    for ax, (ylabel, curves) in zip(axes.ravel(), panels):
        for key, label, scale in curves:
            _band(ax, rows, key, label, scale, marker="o" if key.startswith("test") else None, ms=3)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if curves:
            ax.legend(fontsize=7)
    first_seed = [r for r in rows if r["seed"] == rows[0]["seed"]] if rows else []
    sample_keys = [k for k in (rows[0] if rows else {}) if k.startswith("sample_")]
    for key in sample_keys:
        steps, mean, _ = _series(first_seed, key)
        axes[0, 3].plot(steps, mean, lw=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_vs_pretraining(rows: list[dict], references: dict, levels: list[int], path: str,
                        title: str) -> str:
    """Test accuracy at fixed sparsity levels vs pre-training epochs (the paper's Fig. 7), with
    supervised IMP references ({label: rows}, e.g. rewind to 0 and to k) as dashed lines."""
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.8), squeeze=False)
    for ax, level in zip(axes[0], levels):
        for task in sorted({r["task"] for r in rows}):
            cells = defaultdict(list)
            for r in rows:
                if r["task"] == task and r["level"] == level:
                    cells[r["pretrain_epochs"]].append(100 * r["accuracy"])
            epochs = sorted(cells)
            mean = np.array([np.mean(cells[e]) for e in epochs])
            std = np.array([np.std(cells[e]) for e in epochs])
            line, = ax.plot(epochs, mean, marker="o", label=task)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        for color, (label, ref_rows) in zip(("0.3", "C3", "C2", "C4"), references.items()):
            values = [100 * r["accuracy"] for r in ref_rows if r["level"] == level]
            if values:
                ax.axhline(np.mean(values), ls="--", color=color, label=label)
        density = [r["density"] for r in rows if r["level"] == level]
        ax.set_title(f"{100 * np.mean(density):.1f}% of weights remaining" if density else f"level {level}")
        ax.set_xscale("symlog", linthresh=1)
        _plain_tick_labels(ax.xaxis, sorted({r["pretrain_epochs"] for r in rows}))
        ax.set_xlabel("pre-training epochs")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


# ----- the study report -----
STUDY_TABLES = ("dense", "imp", "telemetry", "perturbations", "instability", "instability_path", "pretrain")


def _mean_std(values, scale=100.0, digits=2) -> str:
    values = scale * np.asarray(values, float)
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}" if len(values) > 1 else \
        f"{values.mean():.{digits}f}"


def _finite_mean(values) -> float | None:
    """Mean of the finite values, or None when there are none (e.g. the rewind-to-0 reference)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _grouped(rows: list[dict], keys: tuple, value: str) -> dict:
    cells = defaultdict(list)
    for row in rows:
        cells[tuple(row[k] for k in keys)].append(row[value])
    return dict(sorted(cells.items(), key=lambda kv: [str(x) if isinstance(x, str) else x for x in kv[0]]))


def imp_table(imp: list[dict]) -> str:
    rewinds = sorted({r["rewind"] for r in imp})
    levels = _grouped(imp, ("level",), "density")
    acc = _grouped(imp, ("level", "rewind"), "accuracy")
    body = [[level, f"{100 * np.mean(d):.1f}"] + [_mean_std(acc.get((level, k), [np.nan])) for k in rewinds]
            for (level,), d in levels.items()]
    return _markdown(["level", "% weights left"] + [f"acc. rewind {k} (%)" for k in rewinds], body)


def perturbation_table(rows: list[dict]) -> str:
    acc = _grouped(rows, ("level", "treatment"), "accuracy")
    dens = _grouped(rows, ("level", "treatment"), "density")
    spread = {name: _grouped([r | {name: r.get(name, np.nan)} for r in rows], ("level", "treatment"), name)
              for name in ("effective_std", "perturbation_std")}  # tables written before the raw std lack it
    shown = lambda name, cell, digits: ("" if _finite_mean(spread[name][cell]) is None
                                        else f"{_finite_mean(spread[name][cell]):.{digits}f}")
    levels = {lv for lv, t in acc if not t.startswith(("control", "rewind"))}
    body = [[lv, f"{100 * np.mean(dens[(lv, t)]):.1f}", t, _mean_std(acc[(lv, t)]),
             shown("effective_std", (lv, t), 2), shown("perturbation_std", (lv, t), 4)]
            for lv, t in acc if lv in levels]
    return _markdown(["level", "% left", "treatment", "accuracy (%)", "effective std",
                      "std of the change"], body)


def instability_table(barriers: list[dict]) -> str:
    cells = _grouped(barriers, ("level", "rewind", "split"), "barrier")
    keys = sorted({(lv, k) for lv, k, _ in cells})
    body = [[lv, k] + [_mean_std(cells.get((lv, k, s), [np.nan])) for s in ("test", "train")] for lv, k in keys]
    return _markdown(["level", "rewind k", "test barrier (points)", "train barrier (points)"], body)


def pretrain_table(rows: list[dict]) -> str:
    acc = _grouped(rows, ("task", "pretrain_epochs", "level"), "accuracy")
    dens = _grouped(rows, ("task", "pretrain_epochs", "level"), "density")
    body = [[t, e, lv, f"{100 * np.mean(dens[(t, e, lv)]):.1f}", _mean_std(v)] for (t, e, lv), v in acc.items()]
    return _markdown(["task", "pre-training epochs", "level", "% left", "accuracy (%)"], body)


def telemetry_table(rows: list[dict]) -> str:
    evals = sorted({r["step"] for r in rows if r.get("test_accuracy") not in (None, "")})
    shown = evals[:1] + evals[len(evals) // 2: len(evals) // 2 + 1] + evals[-1:]
    body = []
    for step in dict.fromkeys(shown):
        at = [r for r in rows if r["step"] == step]
        body.append([step, _mean_std([r["test_accuracy"] for r in at]),
                     _mean_std([r["all_mean_abs"] for r in at], 1, 4),
                     _mean_std([r["all_sign_flip"] for r in at], 1, 2),
                     _mean_std([r["all_dist_init"] for r in at], 1, 3),
                     _mean_std([r["all_cos_final"] for r in at], 1, 4)])
    return _markdown(["step", "test acc. (%)", "mean abs w", "signs flipped (%)", "L2 to W_0",
                      "cosine to W_T"], body)


def write_report(study_dir: str, title: str | None = None) -> str:
    """Figures and report.md from the study's CSVs (no training); returns the report's path.
    The title defaults to the one the study recorded in study.json."""
    load = lambda name: read_csv(os.path.join(study_dir, f"{name}.csv"))
    recorded = os.path.join(study_dir, "study.json")
    if title is None:
        title = read_json(recorded)["title"] if os.path.exists(recorded) else "early-phase study"
    missing = [n for n in STUDY_TABLES if not os.path.exists(os.path.join(study_dir, f"{n}.csv"))]
    if missing:
        from early_jax.errors import UserError
        raise UserError(f"{study_dir} lacks {', '.join(m + '.csv' for m in missing)}: run the study first")
    dense, imp, tel = load("dense"), load("imp"), load("telemetry")
    perturbations, barriers, along, pre = load("perturbations"), load("instability"), \
        load("instability_path"), load("pretrain")
    k = max(r["rewind"] for r in imp)
    fig = lambda name: os.path.join(study_dir, name)
    plot_accuracy_vs_remaining(imp, "rewind", fig("fig1_imp.png"), "IMP with rewinding",
                               label=lambda r: f"rewind to {r}", dense=[r["accuracy"] for r in dense])
    plot_telemetry(tel, fig("fig3_telemetry.png"), "early-phase telemetry",
                   subnet=any(r.get("sub_mean_abs") != r.get("all_mean_abs") for r in tel))
    eff = _grouped(perturbations, ("treatment",), "effective_std")
    plot_accuracy_vs_remaining(
        perturbations, "treatment", fig("fig4-6_perturbations.png"), f"perturbations at k={k}",
        label=lambda t: t if _finite_mean(eff[(t,)]) is None or t.startswith("control")
        else f"{t} (eff. std {_finite_mean(eff[(t,)]):.2f})")
    from early_jax import instability
    instability.plot(barriers, along, fig("instability.png"), "instability vs rewind step")
    references = {f"IMP, rewind to {r}": [x for x in imp if x["rewind"] == r] for r in sorted({0, k})}
    pre_levels = sorted({r["level"] for r in pre} - {0})
    plot_vs_pretraining(pre, references, pre_levels[-2:] or [0], fig("fig7_pretraining.png"),
                        "IMP after pre-training")
    text = f"""# {title}

Regenerate with `python experiments/make_figures.py --study_dir={study_dir}` (no training).

## Dense network
Test accuracy {_mean_std([r['accuracy'] for r in dense])}% over {len(dense)} seed(s).

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
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path
