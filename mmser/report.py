"""Summaries of finished runs: the paper's Table 11 per experiment, and comparisons across
experiments (methods, text sources, fusion heads), as Markdown, CSV and a plot.

An experiment folder holds one run folder per (test session, seed), each with a metrics.json
(written last by `run_one`, so its presence means the run is complete). Nothing here trains. A
session is any fold id: IEMOCAP's 1..5 (columns S1..S5), or a named fold such as a predefined
split's test set (column `test`); the chance line of the plot is 1 / the number of classes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mmser.data.manifest import fold_label, fold_sort_key
from mmser.io import atomic_write_text
from mmser.metrics import table11

log = logging.getLogger(__name__)

# (metrics.json section, metric key, column label)
METRICS = (
    ("test", "ua", "UA"),
    ("test", "wa", "WA"),
    ("test", "macro_f1", "macro-F1"),
    ("test_improvised", "ua", "UA (improvised only)"),
)


@dataclass
class ExperimentResult:
    name: str
    folder: Path
    # {(section, metric): {session: [value per seed]}}
    scores: dict[tuple[str, str], dict[int | str, list[float]]] = field(default_factory=dict)
    seeds: dict[int | str, list[int]] = field(default_factory=dict)
    runs: int = 0
    classes: list[str] | None = None  # the runs' class names (None when they disagree or none ran)

    def table(self, section: str = "test", metric: str = "ua") -> dict | None:
        s = self.scores.get((section, metric))
        return table11(s) if s else None


def collect(folder: str | Path, name: str | None = None) -> ExperimentResult:
    """Read every complete run (metrics.json) under an experiment folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such experiment folder")
    res = ExperimentResult(name=name or folder.name, folder=folder)
    class_sets = set()
    for mfile in sorted(folder.glob("*/metrics.json")):
        try:
            m = json.loads(mfile.read_text())
            session, seed = m["test_session"], int(m["seed"])
            if not isinstance(session, str):
                session = int(session)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{mfile}: not a valid metrics file ({e})") from None
        classes = m.get("classes") or (m.get("test") or {}).get("classes")
        if classes:
            class_sets.add(tuple(classes))
        res.runs += 1
        res.seeds.setdefault(session, []).append(seed)
        for section, metric, _ in METRICS:
            value = (m.get(section) or {}).get(metric)
            if value is not None:
                res.scores.setdefault((section, metric), {}).setdefault(session, []).append(float(value))
    if len(class_sets) == 1:
        res.classes = list(next(iter(class_sets)))
    return res


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table11_markdown(results: list[ExperimentResult], section: str = "test", metric: str = "ua",
                     title: str | None = None) -> str:
    """One row per experiment: per-session mean±std over seeds (ddof 0), and the average of the
    session means (the paper's Table 11 form). Values in %."""
    sessions = sorted({s for r in results for s in (r.scores.get((section, metric)) or {})}, key=fold_sort_key)
    lines = [f"**{title}**", ""] if title else []
    if not sessions:  # no table: a header without session columns is not valid Markdown
        return "\n".join(lines + ["_no finished runs_"])
    head = "| method | " + " | ".join(fold_label(s) for s in sessions) + " | avg | runs |"
    lines += [head, "|---|" + "---|" * (len(sessions) + 2)]
    for r in results:
        t = r.table(section, metric)
        if t is None:
            continue
        cells = []
        for s in sessions:
            st = t["sessions"].get(s)
            cells.append(f"{_pct(st['mean'])}±{_pct(st['std'])} (n={st['n']})" if st else "–")
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {_pct(t['average'])} | {r.runs} |")
    return "\n".join(lines)


def summary_rows(results: list[ExperimentResult]) -> list[dict]:
    """Flat rows (one per experiment x metric x session, plus 'avg'), for CSV."""
    rows = []
    for r in results:
        for section, metric, label in METRICS:
            t = r.table(section, metric)
            if t is None:
                continue
            for s, st in t["sessions"].items():
                rows.append({"experiment": r.name, "metric": label, "session": s, "mean": st["mean"],
                             "std": st["std"], "n_seeds": st["n"]})
            rows.append({"experiment": r.name, "metric": label, "session": "avg", "mean": t["average"],
                         "std": t["std_of_session_means"], "n_seeds": ""})
    return rows


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def comparison_markdown(results: list[ExperimentResult]) -> str:
    """One row per experiment: for each metric, the average of the session means ± the std over
    all (session, seed) runs pooled (ddof 0); improvised-only UA beside the full test UA."""
    lines = ["| variant (mean of session means ± std over all runs, %) | UA | WA | macro-F1 | "
             "UA improvised | runs |", "|---|---|---|---|---|---|"]
    for r in results:
        cells = []
        for section, metric, _ in METRICS:
            t = r.table(section, metric)
            cells.append(f"{_pct(t['average'])}±{_pct(t['std_all_runs'])}" if t else "–")
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.runs} |")
    return "\n".join(lines)


def write_summary(results: list[ExperimentResult], out_dir: Path, command: str | None = None,
                  stem: str = "summary", notes: list[str] | None = None) -> str:
    """Write STEM.md (tables + the command that produced them) and STEM.csv; return the Markdown."""
    parts = []
    if command:
        parts += ["Produced by:", "", "```", command, "```", ""]
    for line in notes or []:
        parts += [line, ""]
    parts += [table11_markdown(results, "test", "ua", "UA % (Table 11 form: per session mean±std over "
                               "seeds, ddof 0; avg = mean of session means)"), ""]
    parts += [table11_markdown(results, "test_improvised", "ua", "UA % on improvised dialogs only"), ""]
    parts += [comparison_markdown(results)]
    md = "\n".join(parts) + "\n"
    atomic_write_text(out_dir / f"{stem}.md", md)
    atomic_write_text(out_dir / f"{stem}.csv", rows_to_csv(summary_rows(results)))
    return md


def plot_comparison(results: list[ExperimentResult], path: Path, section: str = "test",
                    metric: str = "ua") -> Path | None:
    """Grouped bar chart: per-session mean UA with std error bars, one bar per experiment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tables = [(r.name, r.table(section, metric)) for r in results]
    tables = [(n, t) for n, t in tables if t]
    if not tables:
        return None
    sessions = sorted({s for _, t in tables for s in t["sessions"]}, key=fold_sort_key)
    x = np.arange(len(sessions) + 1)
    width = 0.8 / len(tables)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(x) + 0.4 * len(tables)), 4))
    for i, (name, t) in enumerate(tables):
        means = [t["sessions"].get(s, {}).get("mean", np.nan) for s in sessions] + [t["average"]]
        stds = [t["sessions"].get(s, {}).get("std", 0.0) for s in sessions] + [t["std_of_session_means"]]
        ax.bar(x + i * width - 0.4 + width / 2, 100 * np.array(means), width, yerr=100 * np.array(stds),
               label=name, capsize=2)
    ax.set_xticks(x, [fold_label(s) for s in sessions] + ["avg"])
    ax.set_ylabel(f"{metric.upper()} % ({section})")
    n_classes = {len(r.classes) for r in results if r.classes}
    if len(n_classes) == 1 and metric == "ua":  # chance UA: 1 / number of classes
        ax.axhline(100 / n_classes.pop(), color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temp name of this process's own: two `mmser cv` on one folder may both write the plot
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
