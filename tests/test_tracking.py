"""W&B tracking (offline, read back from the .wandb files): flat run identity, stable metric names,
artifacts and lineage, the cv-summary run; and the W&B side of `mmser compare` (a fake wandb.Api)."""

from __future__ import annotations

import json

import pytest
from helpers import single_torch_thread, tiny_config, write_toy_corpus  # noqa: F401 (fixture)
from wandb_offline import offline_runs

from mmser import tracking
from mmser.config import load_config
from mmser.io import atomic_write_json
from mmser.provenance import provenance


@pytest.fixture(autouse=True)
def _wandb_files_in_tmp(tmp_path, monkeypatch):
    # W&B's artifact staging and cache go under tmp_path, not the home folder
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)


def test_tapt_cv_offline_identity_metrics_artifacts_lineage_and_cv_summary(tmp_path):
    """One tiny TAPT cross-validation (fold 2, seed 0) with W&B offline, everything read back from the
    .wandb files: the TAPT run logs the fold's encoder, the fine-tuning run declares it and logs its
    predictions and model, every run has the flat identity keys, and the cv-summary run has Table 11
    and the summed confusion matrix."""
    from mmser.training.cv import run_cv

    manifest = write_toy_corpus(tmp_path / "toy", per_class=2, durations=(0.4, 0.6))
    cfg = tiny_config(tmp_path, manifest, [
        "experiment=tapt-toy", "pretrain=tapt", "finetune.epochs=1", "tapt.total_steps=2", "tapt.warmup_steps=1",
        "tapt.hold_steps=0", "tapt.mask_time_length=4", "tapt.num_negatives=5", "tapt.max_batch_seconds=4.0",
        "tracking.wandb=offline"])
    out = tmp_path / "runs" / "tapt-toy"
    summary = run_cv(cfg, sessions=[2], seeds=[0], out_dir=out, command="mmser cv -c tapt --sessions 2")
    assert not summary.failed, summary.failed
    metrics = json.loads((out / "s2-seed0" / "metrics.json").read_text())
    prov = provenance()

    (tapt_run,) = offline_runs(out / "pretrain" / "s2")
    assert tapt_run.job_type == "tapt" and tapt_run.group == "tapt-toy"
    assert {k: tapt_run.config[k] for k in ("test_session", "seed", "method", "stage")} == \
        {"test_session": 2, "seed": None, "method": "tapt", "stage": "tapt"}
    (encoder,) = [a for a in tapt_run.artifacts if a["type"] == "encoder"]
    assert encoder["name"] == "tapt-toy-tapt-encoder-s2" == tracking.encoder_artifact("tapt-toy", "tapt", 2)
    # tracking.artifacts=reference (default): the encoder files by reference, nothing copied
    assert "model.safetensors" in encoder["paths"]
    assert all(r.startswith("file://") for r in encoder["references"]) and encoder["references"]

    (ft,) = offline_runs(out / "s2-seed0")
    assert ft.job_type == "finetune" and ft.group == "tapt-toy"
    flat = {k: ft.config[k] for k in ("experiment", "test_session", "seed", "method", "audio_source",
                                      "text_source", "fusion_head", "mmser_version", "git_commit")}
    assert flat == {"experiment": "tapt-toy", "test_session": 2, "seed": 0, "method": "tapt", "audio_source": "tapt",
                    "text_source": None, "fusion_head": None, "mmser_version": prov["mmser"],
                    "git_commit": prov["git_commit"]}
    assert ft.config["finetune"]["epochs"] == 1  # the whole config is still there
    # lineage: the fine-tuning run names the fold's encoder it started from (offline: in its config)
    assert ft.config["inputs"] == ["tapt-toy-tapt-encoder-s2:latest (encoder)"]
    # stable metric names: what Lightning logged during the run and the final summary agree
    assert any("test/ua" in row for row in ft.history)
    assert ft.summary["test/ua"] == pytest.approx(metrics["test"]["ua"])
    assert ft.summary["test_improvised/ua"] == pytest.approx(metrics["test_improvised"]["ua"])
    assert ft.summary["test/confusion"] == metrics["test"]["confusion"]
    by_type = {a["type"]: a for a in ft.artifacts}
    assert by_type["predictions"]["name"] == "tapt-toy-predictions-s2-seed0"
    assert by_type["predictions"]["paths"] == ["predictions.csv"] and not by_type["predictions"]["references"]
    assert by_type["model"]["name"] == "tapt-toy-model-s2-seed0"
    assert {"model.safetensors", "config.json"} <= set(by_type["model"]["paths"])
    assert by_type["model"]["references"]

    (cv_run,) = offline_runs(out / "cv-summary")
    assert cv_run.job_type == "cv-summary" and cv_run.group == "tapt-toy"
    assert cv_run.config["command"] == "mmser cv -c tapt --sessions 2"
    logged = {k for row in cv_run.history for k in row}
    # the summed confusion matrix as a W&B confusion-matrix plot (its data table is logged beside it)
    assert "table11/_type" in logged and "confusion_matrix_table/_type" in logged
    assert "confusion_normalised/_type" in logged  # the PNG
    chart = cv_run.config["_wandb"]["visualize"]["confusion_matrix"]["panel_config"]
    assert chart["panelDefId"] == "wandb/confusion_matrix/v1"
    (cm_file,) = (out / "cv-summary").glob("wandb/offline-run-*/files/media/table/confusion_matrix_table*.table.json")
    cm_rows = json.loads(cm_file.read_text())["data"]  # [actual, predicted, count]
    classes = metrics["test"]["classes"]
    cm = [[0] * len(classes) for _ in classes]
    for actual, predicted, count in cm_rows:
        cm[classes.index(actual)][classes.index(predicted)] += count
    assert cm == metrics["test"]["confusion"]  # one run: the sum over folds and seeds is its matrix
    assert cv_run.summary["cv/test/ua/avg"] == pytest.approx(metrics["test"]["ua"])
    assert cv_run.summary["cv/test/ua/s2/mean"] == pytest.approx(metrics["test"]["ua"])
    assert cv_run.summary["cv/test/confusion"] == metrics["test"]["confusion"]
    tables = list((out / "cv-summary").glob("wandb/offline-run-*/files/media/table/table11*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["experiment", "metric", "session", "mean", "std", "n_seeds"]
    assert ["tapt-toy", "UA", "2", pytest.approx(metrics["test"]["ua"]), 0.0, 1] in table["data"]
    assert (out / "summary_confusion.png").stat().st_size > 0


def test_run_identity_of_text_fusion_and_audio_runs(tmp_path):
    asr = tmp_path / "asr.jsonl"
    asr.write_text(json.dumps({"id": "u1", "text": "hi", "backend": "faster-whisper", "model": "tiny.en"}) + "\n")
    text = load_config("base", "vft", "text", overrides=[f"text.source={asr}"])
    assert {k: v for k, v in tracking.run_identity(text, 3, 1, text_source="faster-whisper:tiny.en").items()
            if k in ("method", "audio_source", "text_source", "fusion_head", "test_session", "seed")} == \
        {"method": "text", "audio_source": None, "text_source": "faster-whisper:tiny.en", "fusion_head": None,
         "test_session": 3, "seed": 1}
    fusion = load_config("base", "vft", "fusion_xattn", overrides=["fusion.audio_runs=runs/vft"])
    ident = tracking.run_identity(fusion, 1, 0)
    assert (ident["method"], ident["audio_source"], ident["text_source"], ident["fusion_head"]) == \
        ("fusion", "runs:vft", "gold", "cross_attention")
    vft = tracking.run_identity(load_config("base", "vft"), 1, 0)
    assert (vft["method"], vft["audio_source"]) == ("vft", "facebook/wav2vec2-base")
    assert tracking.run_identity(load_config("base", "vft", "ptapt"), 1, 0)["method"] == "ptapt"


def test_fusion_runs_declare_the_audio_model_they_start_from(tmp_path, monkeypatch):
    from mmser.training.run import run_inputs

    atomic_write_json(tmp_path / "vft-runs" / "s3-seed1" / "metrics.json", {"experiment": "vft", "test_session": 3})
    fusion = load_config("base", "vft", "fusion_concat", overrides=[f"fusion.audio_runs={tmp_path / 'vft-runs'}"])
    assert run_inputs(fusion, 3, 1) == [("vft-model-s3-seed1", "model")]
    tapt = load_config("base", "vft", "tapt", overrides=["experiment=t"])
    assert run_inputs(tapt, 4, 0) == [("t-tapt-encoder-s4", "encoder")]
    assert run_inputs(load_config("base", "vft"), 1, 0) == []

    # Online, the inputs are declared through use_artifact (W&B refuses it offline): a spy run.
    used, logged = [], []

    class FakeRun:
        settings = type("S", (), {"_offline": False})()

        def use_artifact(self, name, type=None):
            used.append((name, type))

        def log_artifact(self, art):
            logged.append(art)

        def finish(self, exit_code=0):
            pass

    class Recorder:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self._experiment = FakeRun()

        @property
        def experiment(self):
            return self._experiment

    monkeypatch.setattr(tracking, "WandbLogger", Recorder)
    cfg = tiny_config(tmp_path, None, ["tracking.wandb=online"])
    loggers = tracking.make_loggers(cfg, tmp_path / "run", name="f-s3-seed1", group="f", job_type="fusion",
                                    inputs=run_inputs(fusion, 3, 1))
    assert used == [("vft-model-s3-seed1:latest", "model")]
    assert loggers[1].kwargs["config"]["inputs"] == ["vft-model-s3-seed1:latest (model)"]
    # tracking.artifacts=none logs nothing; the default uploads small files
    (tmp_path / "p.csv").write_text("id,true,pred\n")
    assert tracking.log_artifact(loggers, cfg, "x", "predictions", tmp_path / "p.csv", large=False)
    cfg.tracking.artifacts = "none"
    assert not tracking.log_artifact(loggers, cfg, "x", "predictions", tmp_path / "p.csv", large=False)
    assert len(logged) == 1 and logged[0].name == "x"


# -- W&B-side compare: a fake wandb.Api -----------------------------------------------------------------


class FakeApiRun:
    def __init__(self, experiment, session, seed, ua, job_type="finetune", state="finished", flat=True):
        self.config = {"experiment": experiment, **({"test_session": session, "seed": seed} if flat else {})}
        self.summary = {"test/ua": ua, "test/wa": ua - 0.01, "test/confusion": [[2, 0], [1, 1]],
                        "test/classes": ["a", "b"]} if flat else {"final/test/ua": ua}
        self.name, self.job_type, self.state = f"{experiment}-s{session}-seed{seed}", job_type, state
        self.group = experiment
        self.path = ["ent", "proj", f"{experiment}{session}{seed}"]


class FakeApi:
    def __init__(self, runs):
        self._runs, self.queries = runs, []

    def runs(self, path, filters=None):
        self.queries.append((path, filters))
        return [r for r in self._runs if r.group == filters["group"]]

    def run(self, path):
        self.queries.append((path, None))
        return next(r for r in self._runs if "/".join(r.path) == path)


def test_fetch_wandb_runs_reads_groups_and_run_paths_through_the_api():
    runs = [FakeApiRun("vft", 1, 0, 0.5), FakeApiRun("vft", 2, 0, 0.6), FakeApiRun("vft", 1, 1, 0.7, flat=False),
            FakeApiRun("vft", 3, 0, 0.9, job_type="cv-summary"), FakeApiRun("vft", 4, 0, 0.9, state="running"),
            FakeApiRun("tapt", 1, 0, 0.55)]
    api = FakeApi(runs)
    got = tracking.fetch_wandb_runs("ent/proj/vft", api=api)
    assert api.queries == [("ent/proj", {"group": "vft"})]
    assert sorted((m["test_session"], m["seed"], m["test"]["ua"]) for m in got) == \
        [(1, 0, 0.5), (1, 1, 0.7), (2, 0, 0.6)]  # the cv-summary and the unfinished run left out
    one = tracking.fetch_wandb_runs("https://wandb.ai/ent/proj/runs/tapt10", api=api)
    assert [(m["experiment"], m["test"]["ua"], m["test"]["confusion"]) for m in one] == \
        [("tapt", 0.55, [[2, 0], [1, 1]])]
    with pytest.raises(ValueError, match="expected wandb:ENTITY/PROJECT/GROUP"):
        tracking.fetch_wandb_runs("ent/proj", api=api)


def test_compare_wandb_sources_offline_says_how_to_sync_and_online_gives_the_same_tables(tmp_path, monkeypatch,
                                                                                       capsys):
    from mmser.cli import main

    # local folder a; W&B group b (same values through the fake Api)
    for s, ua in ((1, 0.50), (2, 0.60)):
        atomic_write_json(tmp_path / "a" / f"s{s}-seed0" / "metrics.json", {"test_session": s, "seed": 0,
                                                                             "test": {"ua": ua}})
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["compare", str(tmp_path / "a"), "wandb:ent/proj/b", "--out", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err
    assert "wandb:ent/proj/b" in err and "wandb sync" in err
    assert "Not read: wandb:ent/proj/b" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert main(["compare", "wandb:ent/proj/b", "--out", str(tmp_path / "x")]) == 2  # nothing to compare
    assert "nothing to compare" in capsys.readouterr().err

    monkeypatch.delenv("WANDB_MODE")
    api = FakeApi([FakeApiRun("b", 1, 0, 0.55), FakeApiRun("b", 2, 0, 0.70)])
    monkeypatch.setattr(tracking, "_wandb_api", lambda timeout=30: api)
    assert main(["compare", str(tmp_path / "a"), "wandb:ent/proj/b", "--out", str(tmp_path / "cmp2")]) == 0
    md = (tmp_path / "cmp2" / "comparison.md").read_text()
    assert "| a | 50.0±0.0 (n=1) | 60.0±0.0 (n=1) | 55.0 | 2 |" in md
    assert "| b | 55.0±0.0 (n=1) | 70.0±0.0 (n=1) | 62.5 | 2 |" in md
    # the paired test: 2 pairs, differences +5 and +10 points -> mean +7.50
    assert "| a | b | 2 | +7.50 |" in md
    assert (tmp_path / "cmp2" / "confusion_b.png").stat().st_size > 0  # from the runs' test/confusion

    def broken(timeout=30):
        raise ConnectionError("no network")

    monkeypatch.setattr(tracking, "_wandb_api", broken)
    assert main(["compare", str(tmp_path / "a"), "wandb:ent/proj/b", "--out", str(tmp_path / "cmp3")]) == 0
    assert "ConnectionError: no network" in capsys.readouterr().err


# -- sweeps: the agent emulated through its environment variables ---------------------------------------


def agent_command(sweep_file, params: dict) -> list[str]:
    """The command line `wandb agent` runs for one trial of `sweep_file` (wandb_agent.Agent._command_run's
    substitution of ${env}, ${interpreter}, ${program} and the ${args...} forms)."""
    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep = yaml.safe_load(sweep_file.read_text())
    variables = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    variables.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    out = []
    for chunk in create_sweep_command(list(sweep["command"])):
        chunk = str(chunk)
        out += variables.get(chunk[2:-1]) or [] if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return out


def start_trial(monkeypatch, tmp_path, sweep_id: str, run_id: str, params: dict) -> None:
    """What the agent sets in a trial's environment (wandb_agent.Agent._command_run). The agent runs
    each trial in a new process; in this one, wandb's settings singleton is torn down as the agent
    does between in-process trials, so the next wandb.init reads the new environment."""
    import wandb
    from wandb.sdk.lib import config_util

    wandb.teardown()

    param_path = tmp_path / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
    config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in params.items()})
    monkeypatch.setenv("WANDB_SWEEP_ID", sweep_id)
    monkeypatch.setenv("WANDB_RUN_ID", run_id)
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(param_path))


@pytest.fixture
def fresh_wandb():
    """wandb's settings singleton torn down after the test too (the sweep environment goes)."""
    yield
    import wandb

    wandb.teardown()


def test_sweep_trials_get_their_own_run_folders_and_the_agents_run_ids(tmp_path, monkeypatch, fresh_wandb):
    from helpers import CONFIGS

    from mmser.cli import main

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1)
    tiny = ["-c", str(CONFIGS / "tiny.yaml"), f"data.manifest={manifest}", f"output_dir={tmp_path / 'runs'}",
            "finetune.epochs=1", "tracking.wandb=offline"]  # after the sweep's own files and overrides
    trials = {"r1": {"finetune.lr": 0.001, "finetune.class_weighted_loss": True},
              "r2": {"finetune.lr": 0.0003, "finetune.class_weighted_loss": False}}
    folders = {}
    for run_id, params in trials.items():
        cmd = agent_command(CONFIGS / "sweep_vft.yaml", params)
        assert cmd[:3] == ["/usr/bin/env", "mmser", "train"]
        start_trial(monkeypatch, tmp_path, "swp1", run_id, params)
        assert main(cmd[2:] + tiny) == 0
        folders[run_id] = tmp_path / "runs" / "sweep-vft" / "sweep-swp1" / run_id
    for run_id, folder in folders.items():
        assert (folder / "metrics.json").is_file()  # two complete run folders, not refused as "another config"
        saved = (folder / "config.yaml").read_text()
        assert f"lr: {trials[run_id]['finetune.lr']}" in saved
        (run,) = offline_runs(folder)
        assert (run.run_id, run.sweep_id) == (run_id, "swp1")  # the agent's run id: the sweep sees it
        assert run.config["finetune.lr"] == trials[run_id]["finetune.lr"]  # read from WANDB_SWEEP_PARAM_PATH
        assert run.config["finetune"]["lr"] == trials[run_id]["finetune.lr"]  # and trained with it
        assert "val/ua" in run.summary  # the sweep's metric: the validation speaker, not the test session
    # The agent starting trial r1 again: the same folder, found complete (an unfinished one resumes
    # from its last.ckpt); its W&B run is again r1 (resume="allow").
    before = (folders["r1"] / "metrics.json").stat().st_mtime_ns
    start_trial(monkeypatch, tmp_path, "swp1", "r1", trials["r1"])
    assert main(agent_command(CONFIGS / "sweep_vft.yaml", trials["r1"])[2:] + tiny) == 0
    assert (folders["r1"] / "metrics.json").stat().st_mtime_ns == before
    assert sorted(p.name for p in folders["r1"].parent.iterdir()) == ["r1", "r2"]
    # Any other run of a trial's process (a pre-training stage) would be merged into the trial's
    # W&B run by wandb.init: it keeps its CSV logs only.
    cfg = tiny_config(tmp_path, manifest, ["tracking.wandb=offline"])
    loggers = tracking.make_loggers(cfg, tmp_path / "stage", name="x-tapt-s1", group="x", job_type="tapt")
    assert [type(lg).__name__ for lg in loggers] == ["_ContinuedCSVLogger"]


def test_the_fusion_sweep_command_is_a_valid_mmser_train_line():
    from helpers import CONFIGS

    from mmser.cli import _load, parse_args

    for head in ("concat", "decision", "cross_attention"):
        cmd = agent_command(CONFIGS / "sweep_fusion.yaml", {"finetune.lr": 1e-4, "fusion.head": head})
        cfg = _load(parse_args(cmd[2:]))
        assert (cfg.task, cfg.fusion.head, cfg.finetune.lr, cfg.data.validation) == ("fusion", head, 1e-4, "speaker")
        assert cfg.experiment == "sweep-fusion" and cfg.fusion.audio_runs == "runs/vft"


def test_a_sweep_trial_refuses_an_explicit_run_dir(tmp_path, monkeypatch, capsys):
    from mmser.cli import main

    monkeypatch.setenv("WANDB_SWEEP_ID", "swp")
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    assert main(["train", "-c", "base", "-c", "vft", "--session", "1", "--run-dir", str(tmp_path / "x")]) == 2
    assert "a W&B sweep trial writes its own run folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
