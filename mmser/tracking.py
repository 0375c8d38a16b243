"""Experiment tracking: Lightning loggers for one run. The only module that imports wandb.

Every run gets a CSVLogger in its run dir (csv/metrics.csv, continued across resumes). W&B is
optional and can never fail or stall a run: mode "offline" writes local files under run_dir/wandb/
(upload later with `wandb sync run_dir/wandb/offline-run-*`), "online" needs an account and
network, "disabled" skips it. Any W&B error at start-up or at the end becomes a warning and the run
goes on without it. W&B's own folders (settings, caches, artifact staging) stay in the home folder
unless it cannot be written: then they go under run_dir/wandb/ (`wandb_home_dirs`).

What a W&B run holds:
- config: the run identity as flat top-level keys (`run_identity`: experiment, test_session, seed,
  method, audio_source, text_source, fusion_head, stage, mmser_version, git_commit), so the UI can
  group and filter by them, then the whole resolved config and the provenance;
- summary: the final metrics under the names Lightning logs during training (`test/ua`, `test/wa`,
  `test/macro_f1`, `test_improvised/ua`, `val/ua`, ...) plus `test/confusion` and
  `test/recall/<class>`; the test confusion matrix as a W&B plot;
- artifacts (`tracking.artifacts`): predictions.csv, the model folder, pre-trained encoders; a run
  declares the artifacts it started from (`inputs`): online through `use_artifact`; offline W&B
  refuses `use_artifact`, so they are in the config (`inputs`) only.
One `cv-summary` run per experiment (`log_cv_summary`) holds Table 11, the summed confusion matrix
and the command. `fetch_wandb_runs` reads finished runs back through `wandb.Api` for `mmser compare`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from mmser.config import Config, to_dict
from mmser.io import atomic_write_text
from mmser.provenance import provenance

log = logging.getLogger(__name__)


def make_loggers(cfg: Config, run_dir: str | Path, name: str, group: str, job_type: str,
                 resume_step: int | None = None, identity: dict | None = None, run_id: str | None = None,
                 inputs: Sequence[tuple[str, str]] = ()) -> list[Logger]:
    """[CSVLogger(run_dir/csv)] plus a WandbLogger when `cfg.tracking.wandb` != "disabled" and it starts.

    name: W&B run name (e.g. "vft-s1-seed0"); group: the experiment; job_type: the stage
    ("finetune", "tapt", ...). The W&B run id is `run_id` (a sweep trial's: the agent's) or derived
    from run_dir, so a resumed run continues the same W&B run. `identity`: flat config keys
    (`run_identity`; default: from `cfg` alone). `inputs`: (artifact name, type) this run starts from
    (`declare_inputs`).

    resume_step: the optimizer steps of the checkpoint a resumed run starts from. csv/metrics.csv
    then keeps the rows logged before it (step < resume_step), drops those logged after it (they
    are logged again) and continues: every step and epoch once. Without it (a fresh start) an
    earlier attempt's metrics.csv is kept aside as metrics.attempt-K.csv.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is None:
        _keep_previous_csv(run_dir / "csv")
    else:
        _drop_rows_after(run_dir / "csv" / "metrics.csv", resume_step)
    # Lightning's logger connector saves the CSV after every log call: a killed run keeps the rows
    # logged before it died.
    loggers: list[Logger] = [_ContinuedCSVLogger(save_dir=str(run_dir), name="csv", version="")]
    mode = cfg.tracking.wandb
    if mode == "disabled":
        return loggers
    trial = sweep_trial()
    if trial is not None and run_id != trial[1]:
        # In a sweep, wandb.init takes the agent's run id whatever id it is given: another run of
        # this process (a pre-training stage, a cv-summary) would be merged into the trial's run.
        log.info("W&B sweep trial %s: %s is not the trial's run, CSV logs only (%s)", trial[1], name, run_dir)
        return loggers
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    wandb_home_dirs(run_dir)
    try:
        import wandb

        if run_id is None:
            run_id = f"{name}-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]}"[:64]
        flat = dict(identity) if identity is not None else run_identity(cfg, stage=job_type)
        flat.setdefault("stage", job_type)
        if inputs:
            flat["inputs"] = [f"{n}:latest ({t})" for n, t in inputs]
        wandb_logger = WandbLogger(
            name=name,
            save_dir=str(run_dir),
            dir=str(run_dir),
            id=run_id,
            project=cfg.tracking.project,
            entity=cfg.tracking.entity,
            group=group,
            job_type=job_type,
            tags=list(cfg.tracking.tags),
            config={**flat, **to_dict(cfg), "provenance": provenance()},
            mode=mode,
            resume="allow",
            settings=wandb.Settings(init_timeout=cfg.tracking.init_timeout_s, silent=True,
                                    console="off"),
        )
        # Lightning passes anonymous=None to wandb.init, which wandb 0.19+ answers with "The anonymous
        # setting has no effect and will be removed" on every run: leave the unset value out.
        init_kwargs = getattr(wandb_logger, "_wandb_init", None)
        if isinstance(init_kwargs, dict) and init_kwargs.get("anonymous", False) is None:
            del init_kwargs["anonymous"]
        _ = wandb_logger.experiment  # start now, so a failure is caught here and not inside fit
    except Exception as e:  # W&B must never fail a run
        log.warning("W&B disabled for this run (%s: %s); CSV logs are in %s", type(e).__name__, e, run_dir)
        _finish_wandb_quietly()
        return loggers
    loggers.append(wandb_logger)
    declare_inputs(loggers, inputs)
    return loggers


# -- W&B's folders outside the run ---------------------------------------------------------------------

# W&B keeps three folders of its own in the home folder: settings (~/.config/wandb), caches and
# wandb-core's logs (~/.cache/wandb) and artifact staging (~/.local/share/wandb). With HOME not
# writable (a container, a cluster job under another user) the run lost its final metrics (the
# confusion-matrix table is staged there) and wandb-core, without a log file, wrote 17 lines to stderr.
WANDB_HOME_DIRS = (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"))
_moved_by_mmser: dict[str, str] = {}  # the variables of WANDB_HOME_DIRS this process set, and to what


def _wandb_default_dir(var: str) -> Path:
    import platformdirs  # a dependency of wandb; the same calls as wandb.env's defaults

    if var == "WANDB_CONFIG_DIR":
        return Path("~", ".config", "wandb").expanduser()
    if var == "WANDB_CACHE_DIR":
        return Path(platformdirs.user_cache_dir("wandb"))
    return Path(platformdirs.user_data_dir("wandb"))


def _writable_dir(path: Path) -> bool:
    """Whether a file can be created in `path` (made if missing). A real probe: as root, permission
    bits do not refuse anything, but a read-only mount or a file in the way still does."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def wandb_home_dirs(run_dir: str | Path) -> list[str]:
    """Point W&B's home-folder dirs (WANDB_HOME_DIRS) whose default cannot be written at
    run_dir/wandb/{config,cache,data}, before W&B starts; a variable the user set is left alone, the
    writable defaults too (the user's W&B settings stay in use). Returns the variables set."""
    moved = []
    for var, kind in WANDB_HOME_DIRS:
        current = os.environ.get(var)
        if current and _moved_by_mmser.get(var) != current:
            continue  # the user's own choice
        if var not in _moved_by_mmser and _writable_dir(_wandb_default_dir(var)):
            continue
        target = str(Path(run_dir).resolve() / "wandb" / kind)
        os.environ[var] = _moved_by_mmser[var] = target
        moved.append(var)
    if moved and len(_moved_by_mmser) == len(moved):  # said once per process
        log.info("W&B: %s not writable (HOME=%s); %s under %s", ", ".join(str(_wandb_default_dir(v)) for v in moved),
                 os.environ.get("HOME", "?"), ", ".join(moved), Path(run_dir) / "wandb")
    return moved


# -- run identity -------------------------------------------------------------------------------------


def method_of(cfg: Config) -> str:
    """vft / tapt / ptapt (audio runs by their pre-training), text or fusion."""
    if cfg.task in ("text", "fusion"):
        return cfg.task
    return {"none": "vft"}.get(cfg.pretrain, cfg.pretrain)


def run_identity(cfg: Config, test_session: int | None = None, seed: int | None = None,
                 text_source: str | None = None, stage: str | None = None) -> dict:
    """The keys a W&B run is grouped and filtered by, flat (top level of the run config).

    audio_source: where the audio encoder came from (None for text-only runs): the encoder name
    (`facebook/wav2vec2-base`, `random`, a folder), `tapt` / `ptapt` (the fold's pre-trained encoder)
    or `runs:<folder>` (fusion from fine-tuned audio runs). text_source: None for audio runs, `gold`,
    or the ASR system (`text_source`, e.g. `faster-whisper:tiny.en`; default the transcript file's name).
    """
    prov = provenance()
    if cfg.task == "text":
        audio = None
    elif cfg.task == "fusion" and cfg.fusion.audio_runs:
        audio = f"runs:{Path(cfg.fusion.audio_runs).name}"
    elif cfg.pretrain != "none":
        audio = cfg.pretrain
    else:
        audio = cfg.encoder.name
    text = None
    if cfg.task in ("text", "fusion"):
        source = str(cfg.text.source)
        text = "gold" if source == "gold" else (text_source or Path(source).stem)
    return {"experiment": cfg.experiment, "test_session": test_session, "seed": seed, "method": method_of(cfg),
            "task": cfg.task, "audio_source": audio, "text_source": text,
            "fusion_head": cfg.fusion.head if cfg.task == "fusion" else None, "stage": stage,
            "mmser_version": prov["mmser"], "git_commit": prov["git_commit"], "git_dirty": prov["git_dirty"]}


def sweep_trial() -> tuple[str, str] | None:
    """(sweep id, run id) when this process is a W&B sweep trial (`wandb agent` sets WANDB_SWEEP_ID
    and WANDB_RUN_ID in the trial's environment), else None."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID", "").strip(), os.environ.get("WANDB_RUN_ID", "").strip()
    return (sweep, run) if sweep and run else None


# -- artifacts ------------------------------------------------------------------------------------------


def artifact_name(*parts: object) -> str:
    """A valid W&B artifact name (letters, digits, '-', '_', '.') from its parts joined by '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(p) for p in parts))[:128]


def _fold(session: int | str) -> str:
    """s3 for IEMOCAP's session 3; a named fold (a predefined split's test set) by its name."""
    return session if isinstance(session, str) else f"s{session}"


def model_artifact(experiment: str, session: int | str, seed: int) -> str:
    return artifact_name(experiment, "model", _fold(session), f"seed{seed}")


def predictions_artifact(experiment: str, session: int | str, seed: int) -> str:
    return artifact_name(experiment, "predictions", _fold(session), f"seed{seed}")


def encoder_artifact(experiment: str, stage: str, session: int | str) -> str:
    """A fold's pre-trained encoder (stage: tapt / ptapt)."""
    return artifact_name(experiment, stage, "encoder", _fold(session))


def _wandb_runs(loggers: Sequence[Logger]) -> list:
    runs = []
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            exp = getattr(lg, "_experiment", None)
            if exp is not None:
                runs.append(exp)
    return runs


def log_artifact(loggers: Sequence[Logger], cfg: Config, name: str, kind: str, path: str | Path, *,
                 large: bool, metadata: dict | None = None) -> bool:
    """Log `path` (a file or folder) as artifact `name` of type `kind` on the W&B run of `loggers`.

    tracking.artifacts: "none" logs nothing; "reference" uploads small outputs (large=False) and
    logs large ones (model folders, encoders) as references to their local files; "upload" uploads
    everything. A failure is a warning. Returns whether an artifact was logged."""
    mode = cfg.tracking.artifacts
    runs = _wandb_runs(loggers)
    if mode == "none" or not runs:
        return False
    try:
        import wandb

        path = Path(path).resolve()
        art = wandb.Artifact(name, type=kind, metadata={**(metadata or {}), "local_path": str(path)})
        if large and mode == "reference":
            art.add_reference(path.as_uri(), name=path.name if path.is_file() else None)
        elif path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        for run in runs:
            run.log_artifact(art)
        return True
    except Exception as e:
        log.warning("W&B: could not log artifact %s (%s: %s)", name, type(e).__name__, e)
        return False


def declare_inputs(loggers: Sequence[Logger], inputs: Sequence[tuple[str, str]]) -> list[str]:
    """Declare the artifacts a run starts from ((name, type): e.g. the fold's TAPT encoder, the audio
    model a fusion run starts from) as its inputs, at their latest version. W&B refuses
    `use_artifact` in offline mode: there they stay in the run config (`inputs`) only. Returns the
    names declared through W&B."""
    declared: list[str] = []
    for run in _wandb_runs(loggers):
        offline = bool(getattr(getattr(run, "settings", None), "_offline", False))
        if offline:
            if inputs:
                log.info("W&B offline: inputs %s recorded in the run config only (W&B records artifact use "
                         "online)", ", ".join(n for n, _ in inputs))
            continue
        for name, type_ in inputs:
            try:
                run.use_artifact(f"{name}:latest", type=type_)
                declared.append(name)
            except Exception as e:  # not logged yet (an offline producer not synced): keep going
                log.warning("W&B: could not declare input artifact %s (%s: %s)", name, e.__class__.__name__, e)
    return declared


def _keep_previous_csv(csv_dir: Path) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv; a resumed run keeps the earlier
    attempt's rows as metrics.attempt-K.csv instead."""
    current = csv_dir / "metrics.csv"
    if not current.is_file():
        return
    k = 1
    while (csv_dir / f"metrics.attempt-{k}.csv").exists():
        k += 1
    current.rename(csv_dir / f"metrics.attempt-{k}.csv")


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of metrics.csv logged before optimizer step `step` (a checkpoint's global_step:
    its training rows have step < global_step, and its epoch-end rows step global_step - 1)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if r.get("step") not in (None, "") and float(r["step"]) < step]
    if len(kept) < len(rows):
        log.info("%s: resuming at step %d: %d rows kept, %d logged after the checkpoint dropped", path, step,
                 len(kept), len(rows) - len(kept))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows(kept)
    atomic_write_text(path, buf.getvalue())


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted (on a
    resumed run it holds the rows logged before the checkpoint; `make_loggers` moves any other
    earlier file aside first)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                # the columns so far: a new key makes the writer rewrite the file with their union
                self.metrics_keys = list(next(csv.reader(f), []))


class _ContinuedCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


def final_summary(metrics: dict) -> dict:
    """metrics.json -> W&B summary keys, named as Lightning logs them during training (the same for
    every task): test/ua, test/wa, test/macro_f1, test/n, test/confusion, test/classes,
    test/recall/<class>, test_improvised/..., val/..., train/seconds, ...; a dimensional task:
    test/ccc_mean, test/ccc/<dim>, test/pearson/<dim>, test/mae/<dim>."""
    flat: dict = {}
    for split in ("test", "test_improvised", "val"):
        rep = metrics.get(split)
        if not rep:
            continue
        for key in ("ua", "wa", "macro_f1", "n", "ccc_mean"):
            if rep.get(key) is not None:
                flat[f"{split}/{key}"] = rep[key]
        # dimensional tasks (mmser/tasks.py): test/ccc/<dim>, test/pearson/<dim>, test/mae/<dim>
        for key in ("ccc", "pearson", "mae"):
            for d, v in (rep.get(key) or {}).items():
                if v is not None:
                    flat[f"{split}/{key}/{d}"] = v
        if split == "test":
            if rep.get("confusion") is not None:
                flat["test/confusion"] = rep["confusion"]
                flat["test/classes"] = list(rep.get("classes") or [])
            for c, r in (rep.get("per_class_recall") or {}).items():
                if r is not None:
                    flat[f"test/recall/{c}"] = r
    for key, name in (("padding_efficiency", "train/padding_efficiency"), ("throughput", "train/throughput"),
                      ("train_seconds", "train/seconds"), ("epochs_trained", "train/epochs")):
        if metrics.get(key) is not None:
            flat[name] = metrics[key]
    return flat


def log_final(loggers: Sequence[Logger], metrics: dict, y_true: Sequence[int], y_pred: Sequence[int],
              class_names: Sequence[str]) -> None:
    """Final test metrics into the W&B summary (`final_summary`), plus the test confusion matrix
    (no-op without W&B)."""
    for run in _wandb_runs(loggers):
        try:
            run.summary.update(final_summary(metrics))
        except Exception as e:
            log.warning("W&B: could not log final metrics (%s: %s)", type(e).__name__, e)
        if not len(y_true):
            continue
        try:  # a table, staged as a file: its failure does not take the summary with it
            import wandb

            run.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
                y_true=list(y_true), preds=list(y_pred), class_names=list(class_names))})
        except Exception as e:
            log.warning("W&B: could not log the test confusion matrix (%s: %s)", type(e).__name__, e)


def log_cv_summary(cfg: Config, out_dir: str | Path, *, table_columns: Sequence[str], table_rows: Sequence[Sequence],
                   summary: dict, confusion: Sequence[Sequence[int]] | None, classes: Sequence[str] | None,
                   images: dict[str, Path] | None = None, command: str | None = None) -> bool:
    """One W&B run (job_type `cv-summary`, group = the experiment) for a cross-validation: Table 11
    as a `wandb.Table` (`table11`), `summary` (per-session mean / std, averages) in the run summary,
    the confusion matrix summed over folds and seeds as a W&B plot (`confusion_matrix`) and as
    images (`images`: key -> PNG), and the command in the config. Its id is derived from out_dir, so
    a later `mmser cv` on the same folder updates the same run. Never fails: False when W&B is off
    or failed."""
    if cfg.tracking.wandb == "disabled":
        return False
    out_dir = Path(out_dir)
    loggers: list[Logger] = []
    try:
        import wandb

        name = f"{cfg.experiment}-cv-summary"
        run_id = f"{name}-{hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:8]}"[:64]
        identity = {**run_identity(cfg, stage="cv-summary"), "command": command}
        loggers = make_loggers(cfg, out_dir / "cv-summary", name=name, group=cfg.experiment, job_type="cv-summary",
                               identity=identity, run_id=run_id)
        runs = _wandb_runs(loggers)
        if not runs:
            return False
        run = runs[0]
        data: dict = {"table11": wandb.Table(columns=list(table_columns), data=[list(r) for r in table_rows])}
        if confusion is not None and classes:
            y_true = [i for i, row in enumerate(confusion) for j, c in enumerate(row) for _ in range(int(c))]
            y_pred = [j for i, row in enumerate(confusion) for j, c in enumerate(row) for _ in range(int(c))]
            data["confusion_matrix"] = wandb.plot.confusion_matrix(y_true=y_true, preds=y_pred,
                                                                   class_names=list(classes))
        for key, png in (images or {}).items():
            data[key] = wandb.Image(str(png))
        run.log(data)
        run.summary.update({**summary, "command": command})
        return True
    except Exception as e:
        log.warning("W&B: could not log the cv-summary run (%s: %s)", type(e).__name__, e)
        return False
    finally:
        finish(loggers)


# -- reading runs back (mmser compare) ------------------------------------------------------------------


class WandbUnavailable(RuntimeError):
    """W&B could not be read (offline, no login, no network, no such project or run)."""


# job types of the runs that test a (session, seed): V-FT / TAPT / P-TAPT fine-tuning, text, fusion
TEST_JOB_TYPES = ("finetune", "audio", "text", "fusion")
_RUN_NAME = re.compile(r"-s(\d+)-seed(\d+)$")
SYNC_HINT = ("offline runs are uploaded with `wandb sync RUN_DIR/wandb/offline-run-*` (after `wandb login`); "
             "local experiment folders compare without W&B: mmser compare runs/EXP_A runs/EXP_B --out DIR")


def _wandb_api(timeout: int = 30):
    import wandb

    return wandb.Api(timeout=timeout)


def fetch_wandb_runs(path: str, api=None) -> list[dict]:
    """Finished test runs of W&B `path`, each in metrics.json's form (experiment, test_session, seed,
    test{ua, wa, macro_f1, confusion, classes}, test_improvised{...}) for mmser.report.

    path: ENTITY/PROJECT/GROUP (the runs of one experiment) or ENTITY/PROJECT/runs/ID[,ID...] (also
    as a https://wandb.ai/... address). Raises WandbUnavailable, saying how to sync, when W&B cannot
    be read (WANDB_MODE offline or disabled, no login, no network)."""
    path = re.sub(r"^https?://[^/]+/", "", path.strip()).strip("/")
    parts = path.split("/")
    if len(parts) == 3:
        entity, project, group = parts
        run_ids = None
    elif len(parts) == 4 and parts[2] == "runs":
        entity, project, group = parts[0], parts[1], None
        run_ids = [r for r in parts[3].split(",") if r]
    else:
        raise ValueError(f"wandb:{path}: expected wandb:ENTITY/PROJECT/GROUP or wandb:ENTITY/PROJECT/runs/ID")
    if api is None and os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise WandbUnavailable(f"wandb:{path}: WANDB_MODE={os.environ['WANDB_MODE']}, W&B not read; {SYNC_HINT}")
    try:
        api = api or _wandb_api()
        if run_ids is None:
            runs = list(api.runs(f"{entity}/{project}", filters={"group": group}))
        else:
            runs = [api.run(f"{entity}/{project}/{rid}") for rid in run_ids]
    except Exception as e:  # no login, no network, no such project: compare goes on without it
        text = " ".join(str(e).split())[:200]
        raise WandbUnavailable(f"wandb:{path}: W&B could not be read ({type(e).__name__}: {text}); "
                               f"{SYNC_HINT}") from None
    return [m for m in (_run_metrics(r) for r in runs) if m is not None]


def _run_metrics(run) -> dict | None:
    """A W&B run -> metrics.json's form, or None for a run that is not a finished test run."""
    if getattr(run, "state", "finished") != "finished":
        return None
    job_type = getattr(run, "job_type", None) or getattr(run, "jobType", None)
    if job_type is not None and job_type not in TEST_JOB_TYPES:
        return None
    config = dict(run.config or {})
    summary = getattr(run, "summary_metrics", None)  # wandb.Api runs: a plain dict
    if not isinstance(summary, dict):
        summary = dict(run.summary or {})
    session, seed = config.get("test_session"), config.get("seed")
    if session is None or seed is None:  # runs from before the flat identity keys: the run name
        m = _RUN_NAME.search(str(getattr(run, "name", "")))
        if not m:
            return None
        session, seed = int(m.group(1)), int(m.group(2))

    def split(name: str) -> dict | None:
        rep = {}
        for key in ("ua", "wa", "macro_f1", "n", "ccc_mean"):
            value = summary.get(f"{name}/{key}", summary.get(f"final/{name}/{key}"))
            if value is not None:
                rep[key] = value
        for key in ("ccc", "pearson", "mae"):  # dimensional tasks: {dim: value}
            per = {k.rsplit("/", 1)[1]: v for k, v in summary.items()
                   if isinstance(k, str) and k.startswith(f"{name}/{key}/") and v is not None}
            if per:
                rep[key] = per
        if name == "test" and summary.get("test/confusion") is not None:
            rep["confusion"] = summary["test/confusion"]
            rep["classes"] = summary.get("test/classes")
        return rep or None

    test = split("test")
    if not test or (test.get("ua") is None and test.get("ccc_mean") is None):
        return None
    session = session if isinstance(session, str) and not session.isdigit() else int(session)  # named fold
    return {"experiment": config.get("experiment") or getattr(run, "group", None), "test_session": session,
            "seed": int(seed), "test": test, "test_improvised": split("test_improvised"),
            "wandb_run": "/".join(str(x) for x in getattr(run, "path", []) or [])}


def finish(loggers: Sequence[Logger], exit_code: int = 0) -> None:
    """Close the W&B run (so the next run in this process starts a new one)."""
    for exp in _wandb_runs(loggers):
        try:
            exp.finish(exit_code=exit_code)
        except Exception as e:
            log.warning("W&B: could not finish the run (%s: %s)", type(e).__name__, e)
    _finish_wandb_quietly(exit_code)


def _finish_wandb_quietly(exit_code: int = 0) -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except Exception:  # noqa: BLE001 - best effort clean-up
        pass
