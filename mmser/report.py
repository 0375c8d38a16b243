"""Summaries of finished runs: the paper's Table 11 per experiment, and comparisons across
experiments (methods, text sources, fusion heads), as Markdown, CSV and a plot.

An experiment folder holds one run folder per (test session, seed), each with a metrics.json
(written last by `run_one`, so its presence means the run is complete). Nothing here trains. A
session is any fold id: IEMOCAP's 1..5 (columns S1..S5), or a named fold such as a predefined
split's test set (column `test`); the chance line of the plot is 1 / the number of classes.
Dimensional runs (mmser/tasks.py) get a Table 11 per dimension (each run's CCC over its whole test
set; session mean ± std over seeds) and the mean CCC, which the paired tests and the plot then use.
An experiment can also come from W&B (`wandb:ENTITY/PROJECT/GROUP`, read through
mmser.tracking, the only module that imports wandb). Beside Table 11: paired tests between
experiments over their shared (session, seed) runs (mmser.stats), per-class recall and row-normalised
confusion matrices summed over folds and seeds. `mmser compare` refuses experiments of different
class sets, corpora or manifests (`check_comparable`: pairing their runs would pair unrelated test
sets) and leaves out, with a warning, experiment folders without a finished run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmser.data.manifest import fold_label, fold_sort_key
from mmser.io import INPUTS_FILE, atomic_write_text, publish_temp
from mmser.metrics import table11

log = logging.getLogger(__name__)

# (metrics.json section, metric key, column label); a dotted key reads a nested value
# ("ccc.arousal" = metrics["test"]["ccc"]["arousal"]).
CATEGORICAL_METRICS = (
    ("test", "ua", "UA"),
    ("test", "wa", "WA"),
    ("test", "macro_f1", "macro-F1"),
    ("test_improvised", "ua", "UA (improvised only)"),
)
# Dimensional tasks (mmser/tasks.py): CCC over each run's whole test set, per dimension and averaged.
DIMENSIONAL_METRICS = (
    ("test", "ccc_mean", "CCC mean"),
    ("test", "ccc.arousal", "CCC arousal"),
    ("test", "ccc.valence", "CCC valence"),
    ("test", "ccc.dominance", "CCC dominance"),
)
METRICS = CATEGORICAL_METRICS + DIMENSIONAL_METRICS


def metric_value(section: dict | None, metric: str):
    """`section[metric]`, a dotted metric read as nested keys; None where absent."""
    value = section
    for key in metric.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def is_dimensional_metric(metric: str) -> bool:
    return metric.startswith(("ccc", "pearson", "mae"))


def headline_metric(results: list[ExperimentResult]) -> str:
    """What the paired tests and plots compare: UA, or the mean CCC when no experiment has UA
    (dimensional runs)."""
    has = {m for r in results for (_, m) in r.scores}
    return "ua" if "ua" in has or "ccc_mean" not in has else "ccc_mean"


@dataclass
class ExperimentResult:
    name: str
    folder: Path
    # {(section, metric): {session: [value per seed]}}
    scores: dict[tuple[str, str], dict[int | str, list[float]]] = field(default_factory=dict)
    seeds: dict[int | str, list[int]] = field(default_factory=dict)
    runs: int = 0
    # {(section, metric): {(session, seed): value}}: what the paired tests pair
    values: dict[tuple[str, str], dict[tuple[int | str, int], float]] = field(default_factory=dict)
    # test confusion matrix summed over every run (rows = true class), and its class names
    confusion: np.ndarray | None = None
    classes: list[str] | None = None  # the runs' class names (runs that disagree are an error)
    # What the runs are made from, where known (W&B runs carry neither): the corpus names of their
    # metrics.json ("" = a manifest without one, IEMOCAP's) and the sha256 of their manifest (inputs.json)
    corpora: set[str] = field(default_factory=set)
    manifests: set[str] = field(default_factory=set)
    # run folders (*-seed*) without a metrics.json: running, failed or killed
    unfinished: list[str] = field(default_factory=list)

    def table(self, section: str = "test", metric: str = "ua") -> dict | None:
        s = self.scores.get((section, metric))
        return table11(s) if s else None


def collect(folder: str | Path, name: str | None = None) -> ExperimentResult:
    """Read every complete run (metrics.json) under an experiment folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such experiment folder")
    res = ExperimentResult(name=name or folder.name, folder=folder)
    for mfile in sorted(folder.glob("*/metrics.json")):
        try:
            m = json.loads(mfile.read_text())
            add_run(res, m)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"{mfile}: not a valid metrics file ({type(e).__name__}: {str(e)[:200]})") from None
        inputs = mfile.parent / INPUTS_FILE
        if inputs.is_file():
            try:
                sha = json.loads(inputs.read_text())["manifest"]["sha256"]
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
                raise ValueError(f"{inputs}: not a valid inputs file ({type(e).__name__})") from None
            res.manifests.add(str(sha))
    res.unfinished = sorted(d.name for d in folder.glob("*-seed*")
                            if d.is_dir() and RUN_FOLDER.fullmatch(d.name) and not (d / "metrics.json").is_file())
    return res


def add_run(res: ExperimentResult, m: dict) -> None:
    """Add one run's metrics (metrics.json's form: test_session, seed, test{ua, wa, macro_f1,
    confusion, classes}, test_improvised{...}) to `res`."""
    session, seed = m["test_session"], int(m["seed"])
    if not isinstance(session, str):  # IEMOCAP's sessions are ints; a named fold ("test1") stays a str
        session = int(session)
    res.runs += 1
    res.seeds.setdefault(session, []).append(seed)
    for section, metric, _ in METRICS:
        value = metric_value(m.get(section), metric)
        if value is not None:
            res.scores.setdefault((section, metric), {}).setdefault(session, []).append(float(value))
            res.values.setdefault((section, metric), {})[(session, seed)] = float(value)
    if "corpus" in m:
        res.corpora.add(str(m["corpus"] or ""))
    test = m.get("test") or {}
    named = m.get("classes") or test.get("classes")
    if named:
        if res.classes is not None and list(named) != res.classes:
            raise ValueError(f"classes {list(named)} differ from the experiment's other runs ({res.classes})")
        res.classes = list(named)
    if test.get("confusion") is not None:
        cm = np.asarray(test["confusion"], dtype=np.int64)
        classes = list(test.get("classes") or named or [str(i) for i in range(len(cm))])
        if res.confusion is None:
            res.confusion, res.classes = cm, classes
        elif classes != res.classes or cm.shape != res.confusion.shape:
            raise ValueError(f"classes {classes} differ from the experiment's other runs ({res.classes})")
        else:
            res.confusion = res.confusion + cm


# A run folder's name (mmser.training.run.run_name): s3-seed0, test1-seed2
RUN_FOLDER = re.compile(r".+-seed\d+")


def _corpus_label(name: str) -> str:
    return repr(name) if name else "none named (IEMOCAP)"


def check_comparable(results: list[ExperimentResult]) -> None:
    """Raise ValueError, naming both experiments and what differs, unless every experiment's runs are
    of one task on one data: the same class set, the same corpus and the same manifest (sha256),
    wherever both sides record it (W&B runs record neither corpus nor manifest). Paired tests pair
    runs by (session, seed): across corpora or class sets that pairs unrelated test sets."""
    for r in results:
        if len(r.manifests) > 1:
            raise ValueError(f"{r.name} ({r.folder}): its runs are made from {len(r.manifests)} different "
                             f"manifests (sha256 {', '.join(sorted(x[:12] for x in r.manifests))}); "
                             "compare runs of one data set")
        if len(r.corpora) > 1:
            raise ValueError(f"{r.name} ({r.folder}): its runs are of different corpora "
                             f"({', '.join(_corpus_label(c) for c in sorted(r.corpora))})")
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            differs = []
            if a.classes and b.classes and set(a.classes) != set(b.classes):
                differs.append(f"classes {a.classes} vs {b.classes}")
            if a.corpora and b.corpora and a.corpora != b.corpora:
                differs.append(f"corpus {_corpus_label(next(iter(a.corpora)))} vs "
                               f"{_corpus_label(next(iter(b.corpora)))}")
            shared = [m for m in ("ua", "ccc_mean") if ("test", m) in a.scores and ("test", m) in b.scores]
            if a.scores and b.scores and not shared:
                differs.append("one is categorical (UA), the other dimensional (CCC): no metric in common")
            if a.manifests and b.manifests and a.manifests != b.manifests:
                differs.append(f"manifest sha256 {next(iter(a.manifests))[:12]} vs {next(iter(b.manifests))[:12]}")
            if differs:
                raise ValueError(f"{a.name} ({a.folder}) and {b.name} ({b.folder}) are not comparable: "
                                 f"{'; '.join(differs)}. Compare experiments of one task on one data set")


WANDB_PREFIX = "wandb:"


def collect_sources(sources: list[str], api=None) -> tuple[list[ExperimentResult], list[str]]:
    """Experiments from local folders and W&B sources, in the order given; and a note per W&B source
    that could not be read (offline, no login, no network: `mmser compare` goes on without it).

    A W&B source is `wandb:ENTITY/PROJECT/GROUP` (every finished run of that group, i.e. experiment)
    or `wandb:ENTITY/PROJECT/runs/ID[,ID...]` (those runs, one experiment per config `experiment`);
    `api` is a wandb.Api-like object (tests pass a fake)."""
    results: list[ExperimentResult] = []
    skipped: list[str] = []
    for source in sources:
        if not str(source).startswith(WANDB_PREFIX):
            res = collect(source)
            if res.runs == 0:  # an empty or not yet finished experiment: no row of zeros
                what = (f"{len(res.unfinished)} run folder(s), none finished (no metrics.json)" if res.unfinished
                        else "no run folders (*-seed*/metrics.json)")
                skipped.append(f"{source}: no finished run ({what}); left out")
            else:
                results.append(res)
            continue
        from mmser import tracking  # imports Lightning and wandb: only for W&B sources

        try:
            runs = tracking.fetch_wandb_runs(str(source)[len(WANDB_PREFIX):], api=api)
        except tracking.WandbUnavailable as e:  # the caller says so (mmser compare: one warning line each)
            skipped.append(str(e))
            continue
        by_experiment: dict[str, ExperimentResult] = {}
        for m in runs:
            name = str(m.get("experiment") or source)
            res = by_experiment.setdefault(name, ExperimentResult(name=name, folder=Path(str(source))))
            add_run(res, m)
        if not by_experiment:
            skipped.append(f"{source}: no finished runs with test metrics")
        results += list(by_experiment.values())
    return results, skipped


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _fmt(metric: str):
    """A value's cell text: % with one decimal (UA, WA, F1), three decimals for CCC-like metrics."""
    return (lambda x: f"{x:.3f}") if is_dimensional_metric(metric) else _pct


def table11_markdown(results: list[ExperimentResult], section: str = "test", metric: str = "ua",
                     title: str | None = None) -> str:
    """One row per experiment: per-session mean±std over seeds (ddof 0), and the average of the
    session means (the paper's Table 11 form). Values in % (CCC: as is, three decimals)."""
    _pct = _fmt(metric)  # the cell format of this metric
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
    all (session, seed) runs pooled (ddof 0); improvised-only UA beside the full test UA. The
    categorical columns, and the CCC ones where any experiment is dimensional."""
    has = {key for r in results for key in r.scores}
    metrics = [m for m in METRICS if m[:2] in has] if has else list(CATEGORICAL_METRICS)
    if any(m in CATEGORICAL_METRICS for m in metrics):
        metrics = list(CATEGORICAL_METRICS) + [m for m in metrics if m in DIMENSIONAL_METRICS]
    labels = {"UA (improvised only)": "UA improvised"}
    unit = "%" if all(m in CATEGORICAL_METRICS for m in metrics) else "UA / WA / F1 in %"
    lines = [f"| variant (mean of session means ± std over all runs, {unit}) | "
             + " | ".join(labels.get(label, label) for _, _, label in metrics) + " | runs |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for r in results:
        cells = []
        for section, metric, _ in metrics:
            t = r.table(section, metric)
            f = _fmt(metric)
            cells.append(f"{f(t['average'])}±{f(t['std_all_runs'])}" if t else "–")
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.runs} |")
    return "\n".join(lines)


def write_summary(results: list[ExperimentResult], out_dir: Path, command: str | None = None,
                  stem: str = "summary", notes: list[str] | None = None,
                  pairs: list[tuple[str, str]] | None = None) -> str:
    """Write STEM.md (tables + the command that produced them) and STEM.csv; return the Markdown.

    With two or more experiments, STEM.md also has the paired tests (`pairs`: (A, B) experiment
    names; default every pair) and STEM_paired.csv their numbers."""
    parts = []
    if command:
        parts += ["Produced by:", "", "```", command, "```", ""]
    for line in notes or []:
        parts += [line, ""]
    has = {key for r in results for key in r.scores}
    dimensional = [m for m in DIMENSIONAL_METRICS if m[:2] in has]
    if not dimensional or ("test", "ua") in has:
        parts += [table11_markdown(results, "test", "ua", "UA % (Table 11 form: per session mean±std over "
                                   "seeds, ddof 0; avg = mean of session means)"), ""]
        parts += [table11_markdown(results, "test_improvised", "ua", "UA % on improvised dialogs only"), ""]
    for section, metric, label in dimensional:  # one Table 11 per dimension (CCC over each whole test set)
        parts += [table11_markdown(results, section, metric, f"{label} (Table 11 form: per session mean±std "
                                   "over seeds, ddof 0; each run's CCC over its whole test set)"), ""]
    parts += [comparison_markdown(results)]
    if any(r.confusion is not None for r in results):
        parts += ["", per_class_markdown(results)]
    metric = headline_metric(results)
    tests = paired_tests(results, pairs, metric=metric) if len(results) >= 2 else []
    if tests:
        parts += ["", paired_markdown(tests, "CCC mean" if metric == "ccc_mean" else "UA")]
        atomic_write_text(out_dir / f"{stem}_paired.csv", rows_to_csv(paired_rows(tests)))
    md = "\n".join(parts) + "\n"
    atomic_write_text(out_dir / f"{stem}.md", md)
    atomic_write_text(out_dir / f"{stem}.csv", rows_to_csv(summary_rows(results)))
    return md


# -- per-class recall and confusion matrices ---------------------------------------------------------


def normalised_confusion(cm: np.ndarray) -> np.ndarray:
    """Rows divided by their sums (row i = how true class i was predicted; its diagonal entry is the
    recall of class i); an empty row stays 0."""
    cm = np.asarray(cm, dtype=float)
    support = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)


def per_class_markdown(results: list[ExperimentResult]) -> str:
    """Recall % of each class from the confusion matrix summed over every fold and seed (so a class
    counts each of its test utterances once per seed), and the UA of that summed matrix."""
    with_cm = [r for r in results if r.confusion is not None]
    classes = list(dict.fromkeys(c for r in with_cm for c in r.classes or []))
    lines = ["**Per-class recall % (confusion matrix summed over folds and seeds)**", "",
             "| experiment | " + " | ".join(classes) + " | UA of the summed matrix | utterances |",
             "|---|" + "---|" * (len(classes) + 2)]
    for r in with_cm:
        recall = np.diag(normalised_confusion(r.confusion))
        support = r.confusion.sum(axis=1)
        by_class = {c: (recall[i] if support[i] else None) for i, c in enumerate(r.classes or [])}
        cells = [_pct(by_class[c]) if by_class.get(c) is not None else "–" for c in classes]
        present = [v for v in by_class.values() if v is not None]
        ua = _pct(float(np.mean(present))) if present else "–"
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {ua} | {int(r.confusion.sum())} |")
    return "\n".join(lines)


def plot_confusion(result: ExperimentResult, path: Path) -> Path | None:
    """Row-normalised confusion matrix (summed over folds and seeds) as a PNG: % per cell, counts below."""
    if result.confusion is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = normalised_confusion(result.confusion)
    classes = result.classes or [str(i) for i in range(len(norm))]
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.1 * k + 2.2, 1.0 * k + 1.6))
    ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{100 * norm[i, j]:.0f}%\n({int(result.confusion[i, j])})", ha="center", va="center",
                    fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result.name}: {result.runs} runs, rows normalised", fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_confusions(results: list[ExperimentResult], out_dir: Path, prefix: str = "confusion_") -> list[Path]:
    """One `prefix`EXPERIMENT.png per experiment that has confusion matrices."""
    paths = [plot_confusion(r, out_dir / f"{prefix}{_file_part(r.name)}.png") for r in results]
    return [p for p in paths if p is not None]


def _file_part(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# -- paired tests ----------------------------------------------------------------------------------


def paired_tests(results: list[ExperimentResult], pairs: list[tuple[str, str]] | None = None,
                 section: str = "test", metric: str = "ua", n_boot: int = 10000, seed: int = 0) -> list:
    """mmser.stats.paired_test for each (A, B) pair of experiment names (default: every pair, in the
    given order, B after A), over the (session, seed) runs both have."""
    from mmser.stats import paired_test

    by_name = {r.name: r for r in results}
    if pairs is None:
        pairs = [(a.name, b.name) for i, a in enumerate(results) for b in results[i + 1:]]
    unknown = [n for pair in pairs for n in pair if n not in by_name]
    if unknown:
        raise ValueError(f"paired test: no experiment named {', '.join(map(repr, unknown))} "
                         f"(have: {', '.join(by_name)})")
    return [paired_test(by_name[a].values.get((section, metric), {}), by_name[b].values.get((section, metric), {}),
                        name_a=a, name_b=b, n_boot=n_boot, seed=seed) for a, b in pairs]


def _pp(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def paired_markdown(tests: list, label: str = "UA") -> str:
    lines = [f"**Paired tests, {label} (B − A) over the (session, seed) runs both experiments have**: mean "
             "difference in points, paired bootstrap 95% CI (10,000 resamples of the pairs, seed 0), "
             "two-sided Wilcoxon signed-rank p (exact up to 50 pairs without ties), seed noise σ = "
             "sqrt(mean over (experiment, session) of the variance over seeds, ddof 1); \"within seed "
             "noise\" = |mean difference| < σ; \"better\" = p < 0.05 and a CI without 0 (mmser/stats.py).",
             "", f"| A | B | pairs | mean Δ{label.replace(' ', '')} | 95% CI | Wilcoxon p | seed noise σ | "
             "within seed noise | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        ci = f"[{_pp(t.ci_low, True)}, {_pp(t.ci_high, True)}]" if t.ci_low is not None else "–"
        p = "–" if t.p_value is None else f"{t.p_value:.3g}"
        within = "–" if t.within_noise is None else "yes" if t.within_noise else "no"
        lines.append(f"| {t.a} | {t.b} | {t.n_pairs} | {_pp(t.mean_diff, True)} | {ci} | {p} | "
                     f"{_pp(t.seed_noise)} | {within} | {t.verdict} |")
    return "\n".join(lines)


def paired_rows(tests: list) -> list[dict]:
    return [{"a": t.a, "b": t.b, "pairs": t.n_pairs, "mean_diff": t.mean_diff, "ci_low": t.ci_low,
             "ci_high": t.ci_high, "wilcoxon_p": t.p_value, "seed_noise": t.seed_noise,
             "within_seed_noise": t.within_noise, "verdict": t.verdict}
            for t in tests]


def plot_comparison(results: list[ExperimentResult], path: Path, section: str = "test",
                    metric: str | None = None) -> Path | None:
    """Grouped bar chart: per-session mean UA (metric None: the mean CCC for dimensional runs,
    `headline_metric`) with std error bars, one bar per experiment."""
    metric = metric or headline_metric(results)
    scale = 1.0 if is_dimensional_metric(metric) else 100.0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.bar(x + i * width - 0.4 + width / 2, scale * np.array(means), width, yerr=scale * np.array(stds),
               label=name, capsize=2)
    ax.set_xticks(x, [fold_label(s) for s in sessions] + ["avg"])
    ax.set_ylabel(f"{metric.upper()} ({section})" if scale == 1.0 else f"{metric.upper()} % ({section})")
    n_classes = {len(r.classes) for r in results if r.classes}
    if len(n_classes) == 1 and metric == "ua":  # chance UA: 1 / number of classes
        ax.axhline(100 / n_classes.pop(), color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure atomically (PNG by the suffix) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    # a temp name of this process's own: two `mmser cv` on one folder may both write the plot
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fig.savefig(tmp, dpi=120)
        publish_temp(tmp, path)  # fsync, the umask's mode (mkstemp made it 0600), rename
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
