"""Cross-validation over the manifest's folds: every (test session, seed), resumable.

The folds are the manifest's (mmser.data.manifest): IEMOCAP's leave-one-session-out sessions 1..5,
a prepared corpus's groups or k folds, or one fold per test set of a predefined split (`test`;
MSP-Podcast's `test1`, `test2`), which trains on "train", validates on "dev" and tests on that test
set. Selection (finetune.test_checkpoint=best_val) only ever looks at the validation set.

    out_dir/
      cv_config.yaml           the resolved config every run of this experiment shares
      pretrain/s{k}/...        pre-training artifacts, once per fold (TAPT / P-TAPT only;
                               pretrain/{name}/ for a named fold)
      s{k}-seed{n}/            one run folder each (see mmser.training.run; {name}-seed{n} for a
                               named fold)
      summary.md, summary.csv  Table 11 form, with the command that produced them, and per-class recall
      summary_ua.png           per-session bars
      summary_confusion.png    test confusion matrix summed over folds and seeds, rows normalised
      cv-summary/wandb/        the experiment's W&B `cv-summary` run (unless tracking.wandb=disabled):
                               Table 11, the summed confusion matrix and the command
      failures.json            runs that raised, with the error (the others still ran)
      inputs.json              the data (manifest sha256, ...) every run here is made from

A run whose metrics.json exists is complete and is skipped. Pre-training stages run once per
fold and hand their checkpoint to the fine-tuning runs by explicit path. A failed run is logged
and reported; it does not stop the others (KeyboardInterrupt does) -- except under several
processes (DDP: every rank runs this loop, in lockstep through each run's collectives): there a
rank that failed (an out-of-memory on the rank with the longest bucket) re-raises and stops, and
after every run the ranks agree (`failed_on_any_rank`, an all-reduce) before the next one starts,
so no rank goes on to another run while a peer is still in, or died in, this one (which would pair
their collectives across different runs, or leave the others waiting until the backend's timeout).
The rerun resumes from the finished runs. A run or pre-training stage
another live process holds (two `mmser cv` on one folder) is skipped and reported as held, not
failed: the processes share the work.

The sessions, folds and trainer settings are checked before anything is written. A folder with a
finished run of another config or of other data is refused; one without a finished run takes the
new config.
"""

from __future__ import annotations

import copy
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mmser.config import Config, check_same_config, config_diff, save_config, to_dict
from mmser.data.manifest import FoldId, classes_for, fold_tag, load_manifest, resolve_folds
from mmser.io import FolderHeld, atomic_write_json, atomic_write_text, check_inputs, write_inputs
from mmser.metrics import table11
from mmser.report import METRICS, collect, plot_comparison, plot_confusion, summary_rows, write_summary
from mmser.tasks import record_filter

log = logging.getLogger(__name__)

@dataclass
class CVSummary:
    out_dir: Path
    markdown: str
    completed: list[tuple[FoldId, int]] = field(default_factory=list)
    skipped: list[tuple[FoldId, int]] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    # runs another live process holds: skipped, not failed ({session, seed, stage, holder})
    held: list[dict] = field(default_factory=list)


def run_dir_for(out_dir: Path, session: FoldId, seed: int) -> Path:
    from mmser.training.run import run_name

    return out_dir / run_name(session, seed)


def resolve_cv_folds(cfg: Config, sessions=None) -> list[FoldId]:
    """The manifest's folds named by `sessions` (ints or strings, e.g. [1, 2] or ["test1"]; None =
    every fold of the manifest), or a ValueError naming what the manifest has."""
    records = load_manifest(cfg.data.manifest)
    return resolve_folds(records, sessions, str(cfg.data.manifest), _task_classes(cfg, records), **record_filter(cfg))


def _task_classes(cfg: Config, records: list[dict]):
    """The run's classes (data.classes checked against the manifest); () for a dimensional task."""
    return classes_for(records, cfg.data) if cfg.target.kind != "dimensional" else ()


def check_cv_inputs(cfg: Config, sessions: list[FoldId]) -> dict:
    """Everything a cross-validation can check before writing: the manifest has each session, every
    fold splits (validation speaker, best_val needs a validation set), the trainer settings resolve.
    Returns the data's record for inputs.json."""
    from mmser.tasks import task_from_config
    from mmser.training.run import build_fold, data_inputs, trainer_kwargs

    records = load_manifest(cfg.data.manifest)
    classes = _task_classes(cfg, records)  # data.classes fits the manifest
    task_from_config(cfg, records, classes)  # the task's dimensions have values and one scale each
    for session in resolve_folds(records, sessions, str(cfg.data.manifest), classes, **record_filter(cfg)):
        build_fold(cfg, records, session, check_audio=False)  # each run checks its fold's audio files
    trainer_kwargs(cfg)
    return data_inputs(cfg)


def _check_same_experiment(cfg: Config, out_dir: Path, inputs: dict) -> None:
    """Refuse to mix runs of different configs or data under one experiment folder (read only).

    A folder holding a finished run refuses another config; one without takes the new config (a
    failed start must not block the corrected rerun; each unfinished run folder drops its old
    checkpoints itself). Other data is refused once anything was made from the old data (a
    finished run, a pre-training stage); every finished run's own record is checked too (`mmser
    train` writes into the same folders)."""
    finished = sorted(out_dir.glob("*/metrics.json"))
    saved = out_dir / "cv_config.yaml"
    if saved.is_file():
        if finished:
            check_same_config(saved, cfg, "this experiment folder")
        else:
            try:
                diff = config_diff(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg))
            except yaml.YAMLError:
                diff = ["cv_config.yaml: unreadable"]
            if diff:
                log.warning("%s: no finished run, so cv_config.yaml is replaced by this config (%s)", out_dir,
                            "; ".join(diff[:6]))
    try:
        recorded = check_inputs(out_dir, inputs, "this experiment")
    except ValueError:
        if finished or (out_dir / "pretrain").is_dir():
            raise
        log.warning("%s: nothing made from its old data yet, so inputs.json is replaced", out_dir)
        recorded = True
    if not recorded and finished:
        log.warning("%s: %d finished run(s) from before experiments recorded their data (inputs.json): "
                    "their data cannot be checked", out_dir, len(finished))
    for m in finished:
        check_inputs(m.parent, inputs, "this finished run")


def _distributed() -> bool:
    """Whether this process is one of several in an initialised torch.distributed process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def failed_on_any_rank(failed: bool) -> bool:
    """`failed` of this process, all-reduced (max) over the default process group when several
    processes share one; `failed` alone otherwise. Every rank calls it at the same point (after a
    run that returned). A collective that fails itself (a peer process died: gloo raises at once,
    NCCL at its timeout) counts as a failure."""
    if not _distributed():
        return failed
    import torch
    import torch.distributed as dist

    cuda = dist.get_backend() == "nccl"
    flag = torch.tensor([int(failed)], device=torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    except Exception as e:  # noqa: BLE001 - gloo / NCCL raise RuntimeError subclasses of their own
        log.error("the ranks could not agree after a run (%s: %s): a peer process failed", type(e).__name__, e)
        return True
    return bool(flag.item())


class RankFailed(RuntimeError):
    """A run failed on another process of a multi-process cross-validation: this rank stops too."""


def _stop_if_distributed(what: str, error: BaseException) -> None:
    """Under several processes a failed run or stage stops this rank (re-raises `error`): its peers
    must not go on to another run without it."""
    if _distributed():
        import torch.distributed as dist

        log.error("%s failed under %d processes: stopping every rank (rerun to resume; finished runs are kept)",
                  what, dist.get_world_size())
        raise error


def _held(session: FoldId, seed: int, stage: str, e: FolderHeld) -> dict:
    return {"session": session, "seed": seed, "stage": stage, "holder": e.holder}


def run_cv(cfg: Config, sessions: list[FoldId] | None, seeds: list[int], out_dir: Path,
           command: str | None = None, run_fn=None) -> CVSummary:
    """Run (or resume) the cross-validation and write the Table 11 summary.

    `sessions`: the folds to run (None = every fold of the manifest).

    `run_fn(cfg, test_session=, seed=, run_dir=)` trains one run; default
    mmser.training.multimodal.run_task (audio V-FT, text-only or fusion, by cfg.task).
    """
    if run_fn is None:
        from mmser.training.multimodal import run_task as run_fn

    out_dir = Path(out_dir)
    sessions = resolve_cv_folds(cfg, sessions)
    inputs = check_cv_inputs(cfg, sessions)  # nothing is written before these checks
    _check_same_experiment(cfg, out_dir, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "cv_config.yaml")
    write_inputs(out_dir, inputs)
    summary = CVSummary(out_dir=out_dir, markdown="")
    for session in sessions:
        fold_cfg = cfg
        fold_complete = all((run_dir_for(out_dir, session, seed) / "metrics.json").exists() for seed in seeds)
        if cfg.pretrain != "none" and not fold_complete:  # nothing left to fine-tune: no need for it
            try:
                fold_cfg = pretrained_fold_config(cfg, session, out_dir)
            except KeyboardInterrupt:
                raise
            except FolderHeld as e:  # another process pre-trains this fold: its runs wait for it
                _stop_if_distributed(f"fold {session}: pre-training (held by another process)", e)
                log.info("fold %s: pre-training %s", session, e)
                summary.held += [_held(session, seed, "pretrain", e) for seed in seeds]
                continue
            except Exception as e:  # the fold's pre-training failed: its runs cannot run
                log.error("fold %s: pre-training failed: %s", session, e)
                for seed in seeds:
                    summary.failed.append(_failure(session, seed, "pretrain", e))
                _stop_if_distributed(f"fold {session}: pre-training", e)
                continue
            if failed_on_any_rank(False):
                raise RankFailed(f"fold {session}: pre-training failed on another process; stopping this one too")
        for seed in seeds:
            run_dir = run_dir_for(out_dir, session, seed)
            if (run_dir / "metrics.json").exists():
                log.info("%s seed %d: complete, skipped (%s)", fold_tag(session), seed, run_dir)
                summary.skipped.append((session, seed))
                continue
            log.info("%s seed %d: training -> %s", fold_tag(session), seed, run_dir)
            try:
                run_fn(fold_cfg, test_session=session, seed=seed, run_dir=run_dir)
                summary.completed.append((session, seed))
                (run_dir / "error.txt").unlink(missing_ok=True)  # from an earlier failed attempt
            except KeyboardInterrupt:
                raise
            except FolderHeld as e:
                _stop_if_distributed(f"{fold_tag(session)} seed {seed} (held by another process)", e)
                log.info("%s seed %d: %s", fold_tag(session), seed, e)
                summary.held.append(_held(session, seed, "finetune", e))
                continue
            except Exception as e:
                log.error("%s seed %d failed: %s", fold_tag(session), seed, e)
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_dir / "error.txt", traceback.format_exc())
                summary.failed.append(_failure(session, seed, "finetune", e))
                if _distributed():
                    atomic_write_json(out_dir / "failures.json", summary.failed)
                _stop_if_distributed(f"{fold_tag(session)} seed {seed}", e)
                continue
            if failed_on_any_rank(False):
                raise RankFailed(f"{fold_tag(session)} seed {seed}: failed on another process; stopping this one too")
    if summary.failed:
        atomic_write_json(out_dir / "failures.json", summary.failed)
    elif (out_dir / "failures.json").exists():
        (out_dir / "failures.json").unlink()
    # the W&B cv-summary run: when this call finished runs, or there is none yet
    track = bool(summary.completed) or not (out_dir / "cv-summary" / "wandb").is_dir()
    summary.markdown = summarize(out_dir, command=command, name=cfg.experiment,
                                 failed=summary.failed, held=summary.held, cfg=cfg if track else None)
    return summary


def _failure(session: FoldId, seed: int, stage: str, e: BaseException) -> dict:
    return {"session": session, "seed": seed, "stage": stage, "error": f"{type(e).__name__}: {e}"}


def summarize(out_dir: Path, command: str | None = None, name: str | None = None,
              failed: list[dict] | None = None, held: list[dict] | None = None, cfg: Config | None = None) -> str:
    """(Re)write summary.md / summary.csv / summary_ua.png / summary_confusion.png from the complete
    runs in out_dir; with `cfg` (and W&B on), also the experiment's W&B cv-summary run."""
    res = collect(out_dir, name=name)
    notes = []
    if failed:
        notes.append(f"**{len(failed)} run(s) failed** (see failures.json): "
                     + ", ".join(f"{fold_tag(f['session'])}-seed{f['seed']} ({f['stage']})" for f in failed))
    if held:
        notes.append(f"**{len(held)} run(s) skipped, held by another live process** (not failed; that "
                     "process writes them): " + ", ".join(f"{fold_tag(h['session'])}-seed{h['seed']} ({h['stage']}, "
                                                          f"{h['holder']})" for h in held))
    md = write_summary([res], out_dir, command=command, notes=notes)
    images = {"ua_per_session": plot_comparison([res], out_dir / "summary_ua.png"),
              "confusion_normalised": plot_confusion(res, out_dir / "summary_confusion.png")}
    if cfg is not None and res.runs:
        log_cv_summary(cfg, out_dir, res, {k: v for k, v in images.items() if v is not None}, command)
    _cards_with_cross_validation(out_dir, res, command)
    return md


def log_cv_summary(cfg: Config, out_dir: Path, res, images: dict[str, Path], command: str | None) -> bool:
    """The experiment's W&B cv-summary run: Table 11 (every metric, per session and averaged) as a
    table, per-session mean / std and the averages in its summary (`cv/test/ua/s1/mean`,
    `cv/test/ua/avg`, ...), the summed confusion matrix, the plots and the command."""
    from mmser import tracking  # Lightning + wandb: imported only when there is something to log

    rows = summary_rows([res])
    columns = ["experiment", "metric", "session", "mean", "std", "n_seeds"]
    values: dict = {"cv/runs": res.runs}
    for section, metric, _ in METRICS:
        scores = res.scores.get((section, metric))
        if not scores:
            continue
        t = table11(scores)
        key = f"cv/{section}/{metric.replace('.', '/')}"  # cv/test/ua, cv/test/ccc/arousal
        for s, st in t["sessions"].items():
            tag = fold_tag(s)  # s1 ... s5, or a named fold's name
            values.update({f"{key}/{tag}/mean": st["mean"], f"{key}/{tag}/std": st["std"], f"{key}/{tag}/n": st["n"]})
        values.update({f"{key}/avg": t["average"], f"{key}/std_of_session_means": t["std_of_session_means"],
                       f"{key}/std_all_runs": t["std_all_runs"]})
    confusion = res.confusion.tolist() if res.confusion is not None else None
    if confusion is not None:
        values["cv/test/confusion"] = confusion
    return tracking.log_cv_summary(cfg, out_dir, table_columns=columns,
                                   table_rows=[[r["experiment"], r["metric"], str(r["session"]), r["mean"], r["std"],
                                                r["n_seeds"] if r["n_seeds"] != "" else None] for r in rows],
                                   summary=values,
                                   confusion=confusion, classes=res.classes, images=images, command=command)


def _cards_with_cross_validation(out_dir: Path, res, command: str | None) -> None:
    """Every fold's model card (run_dir/model/README.md) gains the experiment's per-fold UA/WA."""
    from mmser.card import with_cross_validation
    from mmser.report import DIMENSIONAL_METRICS, table11_markdown

    metrics = [(m, f"test {m.upper()}") for m in ("ua", "wa")]
    if ("test", "ua") not in res.scores:  # a dimensional experiment: its CCC tables
        metrics = [(m, f"test {label}") for _, m, label in DIMENSIONAL_METRICS if ("test", m) in res.scores]
    tables = "\n\n".join(table11_markdown([res], metric=m, title=title) for m, title in metrics)
    for card in sorted(out_dir.glob("*-seed*/model/README.md")):  # s1-seed0, test-seed0, ...
        atomic_write_text(card, with_cross_validation(card.read_text(encoding="utf-8"), tables, command))


def check_ptapt_has_classes(cfg: Config) -> None:
    """P-TAPT's step (a) trains a frame-level classifier on the manifest's classes (its training
    folds' labels), whatever the fine-tuning task: a manifest without two classes (a dimensional-only
    corpus) is refused in one line (no dimensional frame step is built)."""
    from mmser.data.manifest import manifest_labels

    labels = manifest_labels(load_manifest(cfg.data.manifest))
    if len(labels) < 2:
        raise ValueError(f"pretrain=ptapt: P-TAPT's step (a) trains a frame-level emotion classifier on the "
                         f"manifest's classes, and {cfg.data.manifest} has {len(labels)} "
                         f"(target.kind={cfg.target.kind}); use pretrain=tapt or pretrain=none")


def pretrained_fold_config(cfg: Config, session: FoldId, out_dir: Path) -> Config:
    """Run the fold's pre-training stage (once; resumable) and point the encoder at its output.

    The stage folder's inputs.json records the manifest it is made from: a finished or partial
    stage of another manifest is refused (the stages' own fingerprints cover their config and the
    training utterance ids, which a corpus prepared again from another tree keeps)."""
    from mmser.training.pretrain import pretrain_fold
    from mmser.training.run import data_inputs

    if cfg.pretrain == "ptapt":
        check_ptapt_has_classes(cfg)
    stage_dir = out_dir / "pretrain" / fold_tag(session)
    inputs = {"manifest": data_inputs(cfg)["manifest"]}  # pre-training reads the audio only
    if not check_inputs(stage_dir, inputs, "this pre-training stage"):
        if stage_dir.is_dir() and any(stage_dir.iterdir()):
            log.warning("%s: stage from before stages recorded their data (inputs.json); its data cannot be "
                        "checked", stage_dir)
        write_inputs(stage_dir, inputs)
    checkpoint = pretrain_fold(cfg, test_session=session, out_dir=stage_dir)
    fold_cfg = copy.deepcopy(cfg)
    fold_cfg.encoder.name = str(checkpoint)
    return fold_cfg
