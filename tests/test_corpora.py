"""Corpora beyond IEMOCAP (issue 14, part 2): `mmser prepare csv` (CSV / JSONL, any class set,
leave-one-group-out / k-fold by speaker / predefined split), `mmser prepare msp-podcast` on a fake
release tree, and the class list flowing from the manifest into models, metrics, reports and
predict. Tiny models on short tones: the 6-class end-to-end run takes seconds."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fake_msp_podcast import LAYOUT, make_fake_msp_podcast
from helpers import CONFIGS, single_torch_thread, tone, write_csv_table, write_toy_corpus  # noqa: F401 (fixture)

from mmser.cli import main
from mmser.config import DataConfig
from mmser.data.corpus import CorpusError, CorpusSpec, kfold_by_speaker, prepare_corpus
from mmser.data.manifest import (
    classes_for,
    fold_ids,
    load_manifest,
    resolve_classes,
    split_fold,
)
from mmser.data.msp_podcast import prepare_msp_podcast
from mmser.labels import CLASSES

TINY = ["-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / "vft.yaml"), "-c", str(CONFIGS / "tiny.yaml")]
RAW6 = ["neu", "hap", "sad", "ang", "fea", "dis"]
FREQ6 = {"neu": 220.0, "hap": 880.0, "sad": 440.0, "ang": 1760.0, "fea": 1320.0, "dis": 660.0, "exc": 880.0,
         "fru": 3000.0}


def write_csv_corpus(root: Path, speakers: dict[str, str | None], per_class: int = 2, seed: int = 0,
                     extra_codes: tuple[str, ...] = ("exc", "fru"), sample_rate: int = 16000,
                     channels: int = 1) -> Path:
    """wavs/<speaker>/<n>.wav tones + corpus.csv (path, emotion, spk, split, text): `per_class` turns of
    each of the 6 raw labels per speaker, plus one of each `extra_codes` (exc maps to hap, fru is
    outside the task). `speakers`: speaker -> split value (None: no split column)."""
    rng = np.random.default_rng(seed)
    rows = []
    for spk, split in speakers.items():
        detune = 1.0 + 0.02 * rng.standard_normal()
        codes = [c for c in RAW6 for _ in range(per_class)] + list(extra_codes)
        for n, code in enumerate(codes):
            rel = Path("wavs") / spk / f"{n:03d}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            wav = tone(FREQ6[code] * detune, float(rng.uniform(0.25, 0.45)), rng, sample_rate)
            if channels > 1:
                wav = np.stack([wav] * channels, axis=1)
            sf.write(str(root / rel), wav, sample_rate, subtype="PCM_16")
            row = {"file": rel.as_posix(), "emotion": code, "spk": spk, "text": f"{code} said by {spk}"}
            if split is not None:
                row["part"] = split
            rows.append(row)
    return write_csv_table(root / "corpus.csv", rows)


COLUMNS = ["--column", "path=file", "--column", "label=emotion", "--column", "speaker=spk",
           "--column", "split=part,transcript=text"]


# -- the 6-class predefined-split corpus, end to end ---------------------------------------------------


def test_six_class_predefined_split_prepare_cv_compare_predict(tmp_path, capsys):
    root = tmp_path / "corpus"
    table = write_csv_corpus(root, {"s1": "train", "s2": "train", "s3": "Development", "s4": "test"})
    out = tmp_path / "data"
    assert main(["prepare", "csv", str(table), "--out", str(out), *COLUMNS, "--labels", ",".join(RAW6),
                 "--map", "exc=hap", "--name", "Toy6"]) == 0
    printed = capsys.readouterr().out
    assert "Toy6: wrote" in printed and "folds (split): test" in printed and "| test | val (dev) |" in printed
    records = load_manifest(out / "manifest.jsonl")
    assert len(records) == 4 * (12 + 2)
    classes = classes_for(records)
    assert classes == tuple(sorted(RAW6))
    assert Counter(r["label"] for r in records)["hap"] == 4 * 3  # 2 hap + 1 exc per speaker
    assert {r["emotion_code"] for r in records if r["label"] is None} == {"fru"}
    assert fold_ids(records) == ["test"]
    assert {r["split"] for r in records} == {"train", "dev", "test"}
    assert all(r["corpus"] == "Toy6" and r["transcript"].endswith(r["speaker"]) for r in records)
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["counts"]["per_split"]["dev"]["task"] == 13 and report["fold_files"] == ["folds/fold-test.json"]
    fold = split_fold(records, "test", DataConfig())
    assert {r["speaker"] for r in fold.train} == {"s1", "s2"} and {r["speaker"] for r in fold.val} == {"s3"}
    assert {r["speaker"] for r in fold.test} == {"s4"} and fold.val_policy == "split"

    # cv: one fold named after the split; dev validates (best_val selects on it), test only tests
    runs = tmp_path / "runs"
    common = [*TINY, f"data.manifest={out / 'manifest.jsonl'}", f"output_dir={runs}", "finetune.epochs=1",
              "finetune.test_checkpoint=best_val", "--seeds", "1"]
    assert main(["cv", *common, "experiment=six"]) == 0
    assert "| six |" in capsys.readouterr().out
    run = runs / "six" / "test-seed0"
    m = json.loads((run / "metrics.json").read_text())
    assert m["test_session"] == "test" and m["classes"] == sorted(RAW6) and m["corpus"] == "Toy6"
    assert m["test"]["n"] == 13 and len(m["test"]["confusion"]) == 6 and m["test_improvised"] is None
    assert m["val"]["n"] == 13 and m["counts"]["train"]["n"] == 26 and m["test_checkpoint"] == "best_val"
    assert list(m["class_weights"]) == sorted(RAW6)
    head = (run / "predictions.csv").read_text().splitlines()[0]
    assert head == "id,true,pred," + ",".join(f"prob_{c}" for c in sorted(RAW6))
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["classes"] == sorted(RAW6) and saved["architecture"]["num_classes"] == 6
    assert saved["corpus"] == "Toy6" and "Toy6 test set test" in (run / "model" / "README.md").read_text()

    # compare: the fold's column is named after it
    assert main(["compare", str(runs / "six"), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| method | test | avg | runs |" in md and (tmp_path / "cmp" / "comparison_ua.png").is_file()

    # predict: the model's 6 classes, in its order
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(root / "wavs" / "s4"), "--out", str(preds)]) == 0
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 14 and all(r["label"] in RAW6 and not r["error"] for r in rows)
    assert [k for k in rows[0] if k.startswith("prob_")] == [f"prob_{c}" for c in sorted(RAW6)]
    assert abs(sum(float(rows[0][f"prob_{c}"]) for c in RAW6) - 1) < 1e-4


def test_data_classes_orders_and_selects_the_task(tmp_path):
    root = tmp_path / "corpus"
    table = write_csv_corpus(root, {"s1": "train", "s2": "dev", "s3": "test"}, per_class=1)
    prepare_corpus(table, tmp_path / "data", spec=CorpusSpec(
        columns={"path": "file", "label": "emotion", "speaker": "spk", "split": "part"}, map={"exc": "hap"}))
    records = load_manifest(tmp_path / "data" / "manifest.jsonl")
    assert classes_for(records) == ("ang", "dis", "fea", "fru", "hap", "neu", "sad")  # no --labels: every label
    cfg = DataConfig(classes=["neu", "hap", "sad", "ang"])
    assert classes_for(records, cfg) == ("neu", "hap", "sad", "ang")  # the order given
    fold = split_fold(records, "test", cfg)
    assert fold.classes == ("neu", "hap", "sad", "ang") and {r["label"] for r in fold.test} == set(cfg.classes)
    with pytest.raises(ValueError, match="data.classes: class.*angry label no utterance"):
        resolve_classes(records, ["neu", "angry"])


def test_iemocap_class_order_is_unchanged(tmp_path):
    records = load_manifest(write_toy_corpus(tmp_path / "toy", per_class=1))
    assert classes_for(records) == CLASSES == ("angry", "happy", "neutral", "sad")
    assert fold_ids(records) == [1, 2, 3, 4, 5]


# -- leave-one-group-out and k-fold by speaker: no speaker leakage ---------------------------------------


@pytest.mark.parametrize("folds", ["logo:speaker", "kfold:3"])
@pytest.mark.parametrize("validation", ["none", "speaker", "fraction"])
def test_speaker_folds_never_leak_a_speaker(tmp_path, folds, validation):
    root = tmp_path / "corpus"
    speakers = {f"spk{i}": None for i in range(1, 6)}
    table = write_csv_corpus(root, speakers, per_class=1, extra_codes=())
    out = tmp_path / "data"
    prepare_corpus(table, out, spec=CorpusSpec(
        columns={"path": "file", "label": "emotion", "speaker": "spk"}, folds=folds))
    records = load_manifest(out / "manifest.jsonl")
    folds_found = fold_ids(records)
    assert folds_found == (sorted(speakers) if folds.startswith("logo") else [1, 2, 3])
    cfg = DataConfig(validation=validation, val_fraction=0.2)
    tested = Counter()
    for f in folds_found:
        fold = split_fold(records, f, cfg)
        test_spk = {r["speaker"] for r in fold.test}
        train_spk = {r["speaker"] for r in fold.train}
        val_spk = {r["speaker"] for r in fold.val}
        assert test_spk and not test_spk & train_spk and not test_spk & val_spk  # no speaker leakage
        if validation == "speaker":
            assert len(val_spk) == 1 and not val_spk & train_spk
        tested.update(test_spk)
        assert len(fold.train) + len(fold.val) + len(fold.test) == len(records)
    assert set(tested) == set(speakers) and set(tested.values()) == {1}  # each speaker tested once


def test_kfold_balances_speakers_deterministically():
    counts = {"a": 10, "b": 9, "c": 4, "d": 4, "e": 3}
    assert kfold_by_speaker(counts, 2) == {"a": 1, "b": 2, "c": 2, "d": 1, "e": 2}
    with pytest.raises(ValueError, match="only 5 speaker"):
        kfold_by_speaker(counts, 6)


def test_logo_by_an_integer_column_keeps_numbered_folds_and_jsonl_input(tmp_path):
    root = tmp_path / "corpus"
    write_csv_corpus(root, {"a": None, "b": None, "c": None}, per_class=1, extra_codes=())
    rows = list(csv.DictReader((root / "corpus.csv").open()))
    table = root / "corpus.jsonl"
    table.write_text("".join(json.dumps({"path": r["file"], "label": r["emotion"], "speaker": r["spk"],
                                         "session": {"a": 1, "b": 2, "c": 3}[r["spk"]]}) + "\n" for r in rows))
    prepare_corpus(table, tmp_path / "data")  # default folds: logo:session (a session column)
    records = load_manifest(tmp_path / "data" / "manifest.jsonl")
    assert fold_ids(records) == [1, 2, 3] and (tmp_path / "data" / "folds" / "fold2.json").is_file()


# -- bad rows, audio checks, resampling ------------------------------------------------------------------


def test_bad_rows_are_one_error_naming_file_line_and_problem(tmp_path, capsys):
    root = tmp_path / "corpus"
    table = write_csv_corpus(root, {"s1": "train", "s2": "test"}, per_class=1, extra_codes=())
    lines = table.read_text().splitlines()
    lines[2] = lines[2].replace("wavs/s1/001.wav", "wavs/s1/missing.wav")  # line 3: no such file
    lines[4] = lines[4].rsplit(",", 1)[0] + ",holdout"  # line 5: unknown split
    lines.append(lines[6])  # a duplicate of line 7
    lines.append(",neu,s1,x,train")  # empty path
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError) as e:
        prepare_corpus(table, tmp_path / "data", spec=CorpusSpec(
            columns={"path": "file", "label": "emotion", "speaker": "spk", "split": "part"}))
    msg = str(e.value)
    assert msg.startswith(f"{table}:3: ") and "missing.wav: audio file not found" in msg
    assert len(e.value.problems) == 4 and "\n" not in msg
    assert f"{table}:5: unknown split value 'holdout'" in e.value.problems[1]
    assert "duplicate id 'wavs/s1/005' (first on line 7)" in e.value.problems[2]
    assert e.value.problems[3] == f"{table}:{len(lines)}: empty file"
    assert not (tmp_path / "data").exists()
    assert main(["prepare", "csv", str(table), "--out", str(tmp_path / "d2"), *COLUMNS]) == 2
    assert f"mmser: error: {table}:3: " in capsys.readouterr().err
    # --split-map and --skip-bad-audio turn those into a valid corpus (the duplicate and empty row go)
    table.write_text("\n".join(lines[:-2]) + "\n")
    res = prepare_corpus(table, tmp_path / "d3", spec=CorpusSpec(
        columns={"path": "file", "label": "emotion", "speaker": "spk", "split": "part"},
        split_map={"holdout": "train"}, skip_bad_audio=True))
    assert [x["row"] for x in res.skipped] == [f"{table}:3"] and res.counts["utterances"] == 11
    again = prepare_corpus(table, tmp_path / "d3", spec=CorpusSpec(
        columns={"path": "file", "label": "emotion", "speaker": "spk", "split": "part"},
        split_map={"holdout": "train"}, skip_bad_audio=True))
    assert again.reused


def test_missing_columns_and_absent_classes_are_refused(tmp_path):
    root = tmp_path / "corpus"
    table = write_csv_corpus(root, {"s1": "train", "s2": "test"}, per_class=1, extra_codes=())
    with pytest.raises(ValueError, match=r"no column\(s\) path, label, speaker .*--column ROLE=NAME"):
        prepare_corpus(table, tmp_path / "data")
    with pytest.raises(ValueError, match=r"--labels: class\(es\) joy label no row"):
        prepare_corpus(table, tmp_path / "data", spec=CorpusSpec(
            columns={"path": "file", "label": "emotion", "speaker": "spk", "split": "part"}, labels=["neu", "joy"]))


def test_other_rates_are_refused_or_resampled(tmp_path):
    root = tmp_path / "corpus"
    table = write_csv_corpus(root, {"s1": "train", "s2": "test"}, per_class=1, extra_codes=(), sample_rate=22050,
                             channels=2)
    spec = dict(columns={"path": "file", "label": "emotion", "speaker": "spk", "split": "part"})
    with pytest.raises(CorpusError, match=r":2: .*22050 Hz, 2 channel\(s\); expected 16000 Hz mono"):
        prepare_corpus(table, tmp_path / "data", spec=CorpusSpec(**spec))
    res = prepare_corpus(table, tmp_path / "data", spec=CorpusSpec(**spec, resample=True))
    records = load_manifest(res.manifest)
    for r in records:
        info = sf.info(r["path"])
        assert r["path"].startswith(str((tmp_path / "data" / "audio").resolve()))
        assert (info.samplerate, info.channels) == (16000, 1)
        assert abs(r["duration"] - info.frames / 16000) < 1e-9
    assert json.loads(res.report.read_text())["resampled"] == len(records)


# -- MSP-Podcast ------------------------------------------------------------------------------------------


def _expected(split: str, classes: str) -> int:
    speakers, codes = LAYOUT[split]
    return len(speakers) * sum(c in classes for c in codes)


def test_msp_podcast_fake_tree_prepares_with_the_right_counts_and_splits(tmp_path, capsys):
    root, rows = make_fake_msp_podcast(tmp_path / "MSP-PODCAST")
    out = tmp_path / "msp"
    assert main(["prepare", "msp-podcast", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MSP-Podcast: wrote" in printed and "folds (split): test1, test2" in printed
    records = load_manifest(out / "manifest.jsonl")
    assert len(records) == len(rows)  # every listed turn, labelled or not
    assert classes_for(records) == ("angry", "happy", "neutral", "sad")
    split_of = {"Train": "train", "Development": "dev", "Test1": "test1", "Test2": "test2", "Test3": "test3"}
    for split, name in split_of.items():
        got = [r for r in records if r["split"] == name and r["label"] is not None]
        assert len(got) == _expected(split, "NHSA"), split
    assert fold_ids(records) == ["test1", "test2"]  # Test3 has no labels: never a fold
    fold = split_fold(records, "test1", DataConfig())
    assert (len(fold.train), len(fold.val), len(fold.test)) == (_expected("Train", "NHSA"),
                                                                 _expected("Development", "NHSA"),
                                                                 _expected("Test1", "NHSA"))
    assert {r["split"] for r in fold.train} == {"train"} and {r["split"] for r in fold.val} == {"dev"}
    assert not any(r["split"] == "test2" for r in fold.train + fold.val + fold.test)
    by_id = {r["id"]: r for r in records}
    first = by_id["MSP-PODCAST_0001_0001"]
    assert first["label"] == "neutral" and first["emotion_code"] == "N" and first["speaker"] == "0001"
    assert first["gender"] == "Female" and first["transcript"] == "turn 0 of podcast 1"
    assert first["corpus"] == "MSP-Podcast" and first["session"] is None
    assert {r["emotion_code"] for r in records if r["label"] is None} == {"U", "C", "D", "F", "O", "X", None}
    assert by_id["MSP-PODCAST_0003_0001"]["speaker"] == "Unknown"  # the Train speaker without an id
    with pytest.raises(ValueError, match="dev part is the validation set"):
        split_fold(records, "test1", DataConfig(validation="speaker"))
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["counts"]["per_split"]["test3"] == {"angry": 0, "happy": 0, "neutral": 0, "sad": 0,
                                                      "task": 0, "utterances": 4}
    assert report["fold_files"] == ["folds/fold-test1.json", "folds/fold-test2.json"]
    assert prepare_msp_podcast(root, out).reused  # idempotent


def test_msp_podcast_eight_classes_and_old_label_file_name(tmp_path):
    root, rows = make_fake_msp_podcast(tmp_path / "MSP", labels_name="labels_concensus.csv", transcripts=False)
    res = prepare_msp_podcast(root, tmp_path / "msp8", classes=8)
    records = load_manifest(res.manifest)
    assert classes_for(records) == ("angry", "contempt", "disgust", "fear", "happy", "neutral", "sad", "surprise")
    assert res.counts["task"] == sum(_expected(s, "NHSAUCDF") for s in LAYOUT)
    assert all(r["transcript"] is None for r in records)
    assert any("Transcripts: missing folder" in w for w in res.warnings)


def test_msp_podcast_bad_label_rows_name_the_line(tmp_path):
    root, _ = make_fake_msp_podcast(tmp_path / "MSP")
    labels = root / "Labels" / "labels_consensus.csv"
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].replace(",Train", ",Training")
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=rf"{labels}:4: unknown Split_Set 'Training'"):
        prepare_msp_podcast(root, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing .*labels_consensus.csv"):
        prepare_msp_podcast(tmp_path, tmp_path / "out")


# -- saved models carry their class list -----------------------------------------------------------------


def test_saved_model_class_names_must_match_its_outputs(tmp_path):
    from helpers import tiny_audio_classifier

    from mmser.models.pretrained import ModelFormatError, from_pretrained, save_pretrained

    model = tiny_audio_classifier()  # 4 outputs
    with pytest.raises(ModelFormatError, match="6 class names .* for a model with 4 outputs"):
        save_pretrained(model, tmp_path / "m", {"task": "audio", "classes": RAW6, "sample_rate": 16000})
    save_pretrained(model, tmp_path / "m", {"task": "audio", "classes": ["a", "b", "c", "d"], "sample_rate": 16000})
    assert from_pretrained(tmp_path / "m").classes == ["a", "b", "c", "d"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "classes": ["a", "b"]}))
    with pytest.raises(ModelFormatError, match="2 class names"):
        from_pretrained(tmp_path / "m")


def test_cli_fold_arguments_take_numbers_ranges_and_names():
    from mmser.cli import parse_args, parse_folds

    assert parse_folds("1-3,5") == [1, 2, 3, 5] and parse_folds("test1,test2") == ["test1", "test2"]
    assert parse_args(["cv", "--folds", "test"]).sessions == ["test"]
    assert parse_args(["cv"]).sessions is None  # every fold of the manifest
    assert parse_args(["train", "--session", "test1"]).session == "test1"
    assert parse_args(["train", "--session", "2"]).session == 2
