"""Dimensional emotion (issue 19 items 1-3): arousal / valence / dominance from the corpora into the
manifest, the three task kinds end to end (audio, text, fusion), and CCC over the whole test set."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import CONFIGS, SAMPLE_RATE, TINY_CONFIGS, tiny_config, tone, write_csv_table, write_toy_corpus

from mmser.data.iemocap import prepare_iemocap
from mmser.data.manifest import ManifestError, load_manifest, split_fold, task_records
from mmser.io import write_jsonl
from mmser.metrics import ccc, dimensional_report, mae, pearson
from mmser.tasks import Task, batch_ccc

DIMS = ("arousal", "valence", "dominance")
log = logging.getLogger(__name__)


# -- metrics ------------------------------------------------------------------------------------


def _reference_ccc(t: np.ndarray, p: np.ndarray) -> float:
    """Lin (1989), written out: 2 s_tp / (s_t^2 + s_p^2 + (m_t - m_p)^2), population moments."""
    n = len(t)
    mt, mp = sum(t) / n, sum(p) / n
    st = sum((x - mt) ** 2 for x in t) / n
    sp = sum((x - mp) ** 2 for x in p) / n
    stp = sum((x - mt) * (y - mp) for x, y in zip(t, p, strict=True)) / n
    return 2 * stp / (st + sp + (mt - mp) ** 2)


def test_ccc_equals_the_reference_formula_and_its_limits():
    rng = np.random.default_rng(0)
    t = rng.normal(3.0, 1.0, 500)
    p = 0.6 * t + rng.normal(0.5, 0.7, 500)  # correlated, biased, another spread
    assert ccc(t, p) == pytest.approx(_reference_ccc(t, p), abs=1e-12)
    assert ccc(t, t) == pytest.approx(1.0)
    big = rng.normal(size=20000)
    assert abs(ccc(big, rng.permutation(big))) < 0.03  # shuffled: ~0
    assert ccc(np.sort(t), np.sort(t)[::-1]) < -0.9  # a rising series against itself reversed
    assert ccc(t, 6.0 - t) < -0.9
    # CCC punishes a shift that Pearson r ignores
    assert pearson(t, t + 1.0) == pytest.approx(1.0) and ccc(t, t + 1.0) < 0.7
    assert mae(t, t + 1.0) == pytest.approx(1.0)
    # the torch batch estimate (the loss) is the same formula
    tt, pp = torch.tensor(t)[:, None], torch.tensor(p)[:, None]
    assert float(batch_ccc(pp, tt)[0]) == pytest.approx(_reference_ccc(t, p), abs=1e-6)


def test_ccc_of_a_set_is_not_the_mean_of_its_batch_cccs():
    """What metrics.json reports is over the whole set; averaging per-batch CCCs gives another number."""
    rng = np.random.default_rng(1)
    t = rng.normal(size=64)
    p = t + rng.normal(0.0, 0.8, 64)
    batches = [ccc(t[i:i + 8], p[i:i + 8]) for i in range(0, 64, 8)]
    assert abs(np.mean(batches) - ccc(t, p)) > 0.02
    rep = dimensional_report({"arousal": t, "valence": -t}, {"arousal": p, "valence": p})
    assert rep["ccc"]["arousal"] == pytest.approx(ccc(t, p)) and rep["ccc"]["valence"] < 0
    assert rep["ccc_mean"] == pytest.approx((rep["ccc"]["arousal"] + rep["ccc"]["valence"]) / 2)
    assert rep["n"] == 64 and set(rep["pearson"]) == set(rep["mae"]) == {"arousal", "valence"}


def test_task_scales_targets_and_splits_outputs():
    task = Task(kind="multitask", classes=("a", "b"), dimensions=("arousal", "valence"),
                scales={"arousal": (1.0, 5.0), "valence": (1.0, 7.0)})
    assert task.num_outputs == 4 and task.monitor == "val/ua"
    assert task.scaled_targets({"arousal": 3.0, "valence": 7.0}) == [0.5, 1.0]
    assert task.to_corpus_scale([0.5], "valence") == [4.0]
    logits, dims = task.split(torch.zeros(3, 4))
    assert logits.shape == (3, 2) and dims.shape == (3, 2)
    assert Task(kind="dimensional", dimensions=("arousal",), scales={"arousal": (1, 5)}).monitor == "val/ccc_mean"


# -- manifests ----------------------------------------------------------------------------------


def test_iemocap_consensus_line_order_is_valence_arousal_dominance(tmp_path):
    from fake_iemocap import UTTERANCES, make_fake_iemocap

    release = make_fake_iemocap(tmp_path)
    res = prepare_iemocap(release, tmp_path / "out")
    by_id = {r["id"]: r for r in load_manifest(res.manifest)}
    coded = [u for u in UTTERANCES if u["code"] is not None]
    for u in coded:
        v, a, d = u["vad"]  # the line's [V, A, D]
        r = by_id[u["id"]]
        assert (r["valence"], r["arousal"], r["dominance"]) == (v, a, d)
        assert r["dim_scales"]["arousal"] == [1.0, 5.0]
    assert all(by_id[u["id"]]["arousal"] is None for u in UTTERANCES if u["code"] is None)
    report = json.loads(res.report.read_text())
    assert report["counts"]["dimensional"] == {
        "scales": {d: [1.0, 5.0] for d in DIMS}, "with_values": len(coded),
        "without_values": len(UTTERANCES) - len(coded)}
    # the dimensional task is every turn with the values, whatever its class (fru, xxx included)
    dim_recs = task_records(load_manifest(res.manifest), dimensions=DIMS, categorical=False)
    assert len(dim_recs) == len(coded) > sum(u["label"] is not None for u in UTTERANCES)


def test_msp_podcast_columns_reach_the_manifest(tmp_path):
    from fake_msp_podcast import make_fake_msp_podcast

    from mmser.data.msp_podcast import prepare_msp_podcast

    root, rows = make_fake_msp_podcast(tmp_path / "msp")
    res = prepare_msp_podcast(root, tmp_path / "out")
    by_id = {r["id"]: r for r in load_manifest(res.manifest)}
    for row in rows:
        r = by_id[row["FileName"][:-4]]
        for dim, col in (("arousal", "EmoAct"), ("valence", "EmoVal"), ("dominance", "EmoDom")):
            assert r[dim] == (float(row[col]) if row[col] else None)
        assert r["dim_scales"] == {d: [1.0, 7.0] for d in DIMS}
    dim = json.loads(res.report.read_text())["counts"]["dimensional"]
    n_empty = sum(not row["EmoAct"] for row in rows)
    assert n_empty > 0 and dim["without_values"]["arousal"] == n_empty and dim["scales"]["valence"] == [1.0, 7.0]


def _csv_corpus(root: Path, values: list[tuple], extra_rows: int = 0) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (act, val) in enumerate(values):
        name = f"u{i}.wav"
        sf.write(str(root / name), tone(220.0 * (1 + i % 4), 0.3, rng), SAMPLE_RATE, subtype="PCM_16")
        lines.append({"file": name, "emotion": ["ang", "hap", "neu", "sad"][i % 4], "spk": f"s{i % 4}",
                      "act": act, "val": val})
    return write_csv_table(root / "labels.csv", lines)


def test_csv_columns_reach_the_manifest_with_a_given_or_inferred_scale(tmp_path, capsys):
    from mmser.cli import main

    values = [(str(1 + i % 7), "" if i == 3 else str(2 + i % 5)) for i in range(12)]
    table = _csv_corpus(tmp_path / "c", values)
    base = ["prepare", "csv", str(table), "--column", "path=file", "--column", "label=emotion",
            "--column", "speaker=spk", "--column", "arousal=act", "--column", "valence=val", "--folds", "kfold:4"]
    assert main([*base, "--out", str(tmp_path / "given"), "--scale", "1,7"]) == 0
    recs = load_manifest(tmp_path / "given" / "manifest.jsonl")
    by_id = {r["id"]: r for r in recs}
    assert [by_id[f"u{i}"]["arousal"] for i in range(12)] == [float(a) for a, _ in values]
    assert by_id["u3"]["valence"] is None and by_id["u4"]["valence"] == 6.0
    assert by_id["u0"]["dim_scales"] == {"arousal": [1.0, 7.0], "valence": [1.0, 7.0]}
    assert "dominance" in by_id["u0"] and by_id["u0"]["dominance"] is None  # no column: null
    dim = json.loads((tmp_path / "given" / "prepare_report.json").read_text())["counts"]["dimensional"]
    assert dim["scale_source"] == "given" and dim["without_values"] == {"arousal": 0, "valence": 1}
    # without --scale: each column's min and max, reported as inferred
    assert main([*base, "--out", str(tmp_path / "inferred")]) == 0
    rep = json.loads((tmp_path / "inferred" / "prepare_report.json").read_text())["counts"]["dimensional"]
    assert rep["scales"] == {"arousal": [1.0, 7.0], "valence": [2.0, 6.0]}
    assert rep["scale_source"].startswith("inferred")


def test_manifest_refuses_a_value_outside_its_scale(tmp_path):
    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1, 2))
    recs = load_manifest(manifest)
    recs[0].update({"arousal": 6.0, "dim_scales": {"arousal": [1.0, 5.0]}})
    write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(ManifestError, match="arousal is 6.0, outside its scale"):
        load_manifest(tmp_path / "bad.jsonl")


# -- end to end -----------------------------------------------------------------------------------


def add_dimensions(manifest: Path, rng_seed: int = 0, drop: int = 1) -> Path:
    """The toy corpus with arousal from its tone (what the audio carries) and valence / dominance at
    random; the first `drop` labelled utterances of session 1 have no arousal (outside the task)."""
    rng = np.random.default_rng(rng_seed)
    level = {"angry": 4.5, "happy": 3.5, "neutral": 2.0, "sad": 1.5, None: 3.0}
    recs = load_manifest(manifest)
    for r in recs:
        r.update({"arousal": level[r["label"]], "valence": float(rng.uniform(1, 5)),
                  "dominance": float(rng.uniform(1, 5)), "dim_scales": {d: [1.0, 5.0] for d in DIMS}})
    for r in [r for r in recs if r["session"] == 2 and r["label"] is not None][:drop]:
        r["arousal"] = None
    write_jsonl(manifest, recs)
    return manifest


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("dim")
    manifest = add_dimensions(write_toy_corpus(root / "toy", per_class=1, durations=(0.25, 0.4)))
    return root, manifest


def _cfg(root, manifest, extra=(), overrides=()):
    from mmser.config import load_config

    return load_config(*TINY_CONFIGS, *extra, overrides=[f"output_dir={root / 'runs'}", f"data.manifest={manifest}",
                                                          f"text.cache_dir={root / 'cache'}", "finetune.epochs=1",
                                                          *overrides])


MODELS = {  # name -> (config files, overrides)
    "audio": ((), ()),
    "text": ((CONFIGS / "text.yaml",), ("fusion.hidden_size=16",)),
    "decision": ((CONFIGS / "fusion_concat.yaml",), ("fusion.head=decision", "fusion.hidden_size=16")),
    "concat": ((CONFIGS / "fusion_concat.yaml",), ("fusion.hidden_size=16",)),
    "cross_attention": ((CONFIGS / "fusion_concat.yaml",),
                        ("fusion.head=cross_attention", "fusion.hidden_size=16", "fusion.num_heads=2")),
}


@pytest.mark.parametrize("kind, model", [
    ("dimensional", "audio"), ("multitask", "audio"), ("dimensional", "text"), ("multitask", "text"),
    ("dimensional", "decision"), ("multitask", "decision"), ("dimensional", "cross_attention"),
    ("multitask", "concat"),
])
def test_each_task_kind_trains_end_to_end_and_reloads(toy, kind, model):
    from mmser.models.pretrained import from_pretrained
    from mmser.training.multimodal import run_task

    root, manifest = toy
    files, overrides = MODELS[model]
    cfg = _cfg(root, manifest, [*files, CONFIGS / f"{kind}.yaml"], [f"experiment={kind}-{model}", *overrides])
    run_dir = root / "runs" / f"{kind}-{model}" / "s2-seed0"
    m = run_task(cfg, test_session=2, seed=0, run_dir=run_dir)
    test = m["test"]
    # session 2's utterances with all three values: its labelled ones minus the one without arousal;
    # the dimensional kind also takes its unlabelled ("fru") turns, which have values
    recs = load_manifest(manifest)
    expected = [r["id"] for r in recs if r["session"] == 2 and r["arousal"] is not None
                and (kind == "dimensional" or r["label"] is not None)]
    assert test["n"] == len(expected) and m["counts"]["test"]["n"] == len(expected)
    assert set(test["ccc"]) == set(DIMS) and -1 <= test["ccc_mean"] <= 1
    assert m["target"]["kind"] == kind and m["target"]["scales"]["arousal"] == [1.0, 5.0]
    assert ("ua" in test) == (kind == "multitask")
    # predictions.csv: id, (class columns in multitask), true_<dim>, pred_<dim>; metrics = recomputed
    with open(run_dir / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    head = list(rows[0])
    assert head[0] == "id" and head[-6:] == [f"{w}_{d}" for d in DIMS for w in ("true", "pred")]
    assert ("true" in head) == (kind == "multitask")
    assert sorted(r["id"] for r in rows) == sorted(expected)
    by_id = {r["id"]: r for r in recs}
    for d in DIMS:
        t = [float(r[f"true_{d}"]) for r in rows]
        assert t == pytest.approx([by_id[r["id"]][d] for r in rows], abs=1e-5)  # the corpus's own scale
        assert ccc(t, [float(r[f"pred_{d}"]) for r in rows]) == pytest.approx(test["ccc"][d], abs=1e-4)
    # the saved folder reloads and gives the outputs the run checked; its config says which are which
    saved = from_pretrained(run_dir / "model")
    meta = json.loads((run_dir / "model" / "config.json").read_text())
    assert meta["target"]["dimensions"] == list(DIMS)
    assert saved.classes[-3:] == list(DIMS) and len(saved.classes) == 3 + 4 * (kind == "multitask")
    # predict does not give dimensions yet (issue 19 item 4): it refuses rather than misreading them
    from mmser.inference import EmotionClassifier

    with pytest.raises(ValueError, match=f"a {kind} model .* inference of dimensions is not built yet"):
        EmotionClassifier.from_pretrained(run_dir)


def test_whisper_audio_dimensional_through_mmser_cv(toy, tmp_path):
    from test_whisper import save_tiny_whisper

    from mmser.cli import main

    root, manifest = toy
    whisper = save_tiny_whisper(tmp_path / "tiny-whisper")
    out = tmp_path / "runs" / "whisper-dim"
    assert main(["cv", *[a for f in TINY_CONFIGS for a in ("-c", str(f))], "-c", "dimensional", "--sessions", "3",
                 "--seeds", "1", "--out", str(out), f"data.manifest={manifest}", "encoder.kind=whisper",
                 f"encoder.name={whisper}", "finetune.epochs=1", "experiment=whisper-dim"]) == 0
    m = json.loads((out / "s3-seed0" / "metrics.json").read_text())
    assert set(m["test"]["ccc"]) == set(DIMS) and m["target"]["kind"] == "dimensional"
    assert "**CCC mean (Table 11 form" in (out / "summary.md").read_text()


def test_best_val_selects_on_the_validation_mean_ccc(toy):
    from mmser.training.run import run_one

    root, manifest = toy
    cfg = _cfg(root, manifest, [CONFIGS / "dimensional.yaml"],
               ["experiment=dim-best", "data.validation=speaker", "finetune.test_checkpoint=best_val",
                "finetune.epochs=2", "finetune.keep_checkpoints=true"])
    run_dir = root / "runs" / "dim-best" / "s1-seed0"
    m = run_one(cfg, test_session=1, seed=0, run_dir=run_dir)
    assert m["val"]["ccc_mean"] is not None and "ua" not in m["val"]
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    states = [v for v in best["callbacks"].values() if isinstance(v, dict) and v.get("monitor")]
    assert [s["monitor"] for s in states] == ["val/ccc_mean"]
    # the tested weights are the best validation epoch's: validated again, they give its score
    assert m["val"]["ccc_mean"] == pytest.approx(float(states[0]["best_model_score"]), abs=1e-5)


def test_mse_loss_switch_and_dimension_subset(toy):
    from mmser.training.run import run_one

    root, manifest = toy
    cfg = _cfg(root, manifest, [CONFIGS / "dimensional.yaml"],
               ["experiment=dim-mse", "target.loss=mse", "target.dimensions=[valence]"])
    m = run_one(cfg, test_session=3, seed=0, run_dir=root / "runs" / "dim-mse" / "s3-seed0")
    assert list(m["test"]["ccc"]) == ["valence"] and m["target"]["loss"] == "mse"


def test_cv_summary_has_a_table_per_dimension_and_compare_tests_ccc(toy):
    from mmser.report import collect, write_summary
    from mmser.training.cv import summarize

    root, manifest = toy
    from mmser.training.run import run_one

    for exp, seed in (("cvdim", 0), ("cvdim", 1), ("cvdim2", 0), ("cvdim2", 1)):
        cfg = _cfg(root, manifest, [CONFIGS / "dimensional.yaml"], [f"experiment={exp}"])
        run_one(cfg, test_session=4, seed=seed, run_dir=root / "runs" / exp / f"s4-seed{seed}")
    md = summarize(root / "runs" / "cvdim")
    for label in ("CCC mean", "CCC arousal", "CCC valence", "CCC dominance"):
        assert f"**{label} (Table 11 form" in md
    assert "UA %" not in md
    res = collect(root / "runs" / "cvdim")
    values = [json.loads((root / "runs" / "cvdim" / f"s4-seed{s}" / "metrics.json").read_text())["test"]
              for s in (0, 1)]
    t = res.table("test", "ccc.valence")
    assert t["sessions"][4]["mean"] == pytest.approx(np.mean([v["ccc"]["valence"] for v in values]))
    out = root / "cmp"
    out.mkdir()
    md2 = write_summary([res, collect(root / "runs" / "cvdim2")], out)
    assert "**Paired tests, CCC mean (B − A)" in md2


def test_wandb_summary_keys_of_a_dimensional_run():
    from mmser.tracking import final_summary

    flat = final_summary({"test": {"ccc": {"arousal": 0.5, "valence": 0.1}, "ccc_mean": 0.3, "n": 9,
                                   "pearson": {"arousal": 0.6, "valence": None}, "mae": {"arousal": 0.4}}})
    assert flat["test/ccc/arousal"] == 0.5 and flat["test/ccc_mean"] == 0.3 and flat["test/pearson/arousal"] == 0.6
    assert "test/pearson/valence" not in flat and flat["test/mae/arousal"] == 0.4


def test_dimensional_split_without_classes_has_no_class_requirement(toy):
    root, manifest = toy
    recs = load_manifest(manifest)
    for r in recs:
        r["label"] = None
    write_jsonl(root / "nolabels.jsonl", recs)
    fold = split_fold(load_manifest(root / "nolabels.jsonl"), 1, tiny_config(root).data, dimensions=DIMS,
                      categorical=False)
    assert fold.classes == () and len(fold.test) == sum(r["session"] == 1 for r in recs)


# -- a corpus where the audio carries arousal and the text valence ---------------------------------


def write_av_corpus(root: Path, sessions=(1, 2, 3, 4, 5), reps: int = 3) -> Path:
    """Per session and actor, every (arousal, valence) combination `reps` times: arousal high = a
    1760 Hz tone, low = 220 Hz (the audio); valence high = "it was good", low = "it was bad" (the
    transcript). Balanced, so a prediction that follows one side only is uncorrelated with the other."""
    rng = np.random.default_rng(0)
    recs = []
    for s in sessions:
        for g in ("F", "M"):
            k = 0
            for a in (0, 1):
                for v in (0, 1):
                    for _ in range(reps):
                        uid = f"Ses{s:02d}{g}_impro01_{g}{k:03d}"
                        k += 1
                        path = root / f"{uid}.wav"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        sf.write(str(path), tone(1760.0 if a else 220.0, float(rng.uniform(0.25, 0.35)), rng),
                                 SAMPLE_RATE, subtype="PCM_16")
                        recs.append({"id": uid, "path": str(path), "session": s, "speaker": f"Ses{s:02d}{g}",
                                     "gender": g, "dialog": f"Ses{s:02d}{g}_impro01", "scripted": False,
                                     "emotion_code": None, "label": None,
                                     "transcript": "it was good" if v else "it was bad",
                                     "duration": sf.info(str(path)).duration,
                                     "arousal": 4.0 if a else 2.0, "valence": 4.0 if v else 2.0, "dominance": 3.0 + a,
                                     "dim_scales": {d: [1.0, 5.0] for d in DIMS}})
    write_jsonl(root / "manifest.jsonl", recs)
    return root / "manifest.jsonl"


@pytest.mark.slow
def test_audio_hears_arousal_text_reads_valence_fusion_both(tmp_path):
    from mmser.training.multimodal import run_task

    manifest = write_av_corpus(tmp_path / "av")
    out = {}
    for name, files, ov in (("audio", (), ["finetune.epochs=6"]),
                            ("text", (CONFIGS / "text.yaml",), ["finetune.epochs=20", "fusion.hidden_size=32"]),
                            ("fusion", (CONFIGS / "fusion_concat.yaml",),
                             ["finetune.epochs=8", "fusion.hidden_size=32", "fusion.freeze_audio=false"])):
        cfg = _cfg(tmp_path, manifest, [*files, CONFIGS / "dimensional.yaml"],
                   [f"experiment=av-{name}", "target.dimensions=[arousal,valence]", *ov])
        out[name] = run_task(cfg, test_session=1, seed=0, run_dir=tmp_path / "runs" / name / "s1-seed0")["test"]["ccc"]
    log.info("CCC on session 1 (arousal, valence): %s", {k: (round(v["arousal"], 3), round(v["valence"], 3))
                                                         for k, v in out.items()})
    assert out["audio"]["arousal"] > 0.7 and abs(out["audio"]["valence"]) < 0.2, out
    assert out["text"]["valence"] > 0.7 and abs(out["text"]["arousal"]) < 0.2, out
    assert out["fusion"]["arousal"] > 0.5 and out["fusion"]["valence"] > 0.5, out


# -- units: the module's whole-split metrics, the multitask loss, decision fusion's dimensions --------


class _TableModel(torch.nn.Module):
    """Outputs looked up by utterance id."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, batch):
        return torch.tensor([self.table[u] for u in batch["ids"]]) + self.bias


def test_module_reports_ccc_over_the_whole_split_not_per_batch():
    from mmser.training.finetune import ClassifierModule

    rng = np.random.default_rng(3)
    n = 24
    true = rng.uniform(0, 1, n)
    pred = true + rng.normal(0, 0.3, n)
    task = Task(kind="dimensional", dimensions=("valence",), scales={"valence": (1.0, 5.0)})
    ids = [f"u{i:02d}" for i in range(n)]
    module = ClassifierModule(_TableModel({u: [float(p)] for u, p in zip(ids, pred, strict=True)}), task=task)
    for i in range(0, n, 4):  # six batches of four
        module._eval_step({"ids": ids[i:i + 4], "labels": torch.full((4,), -1),
                           "targets": torch.tensor(true[i:i + 4], dtype=torch.float32)[:, None]})
    rows, report = module._eval_epoch_end("test")
    whole = ccc(1 + 4 * true, 1 + 4 * pred)  # on the corpus's scale (CCC does not depend on it)
    per_batch = np.mean([ccc(true[i:i + 4], pred[i:i + 4]) for i in range(0, n, 4)])
    assert report["ccc"]["valence"] == pytest.approx(whole, abs=1e-5)
    assert abs(per_batch - whole) > 0.02  # what averaging batch CCCs would have reported
    assert rows[0]["true_dims"]["valence"] == pytest.approx(1 + 4 * true[0], abs=1e-5)
    assert report["mae"]["valence"] == pytest.approx(np.abs(4 * (true - pred)).mean(), abs=1e-4)


def test_multitask_loss_is_ce_plus_weighted_dimensional_loss():
    from mmser.training.finetune import ClassifierModule

    outputs = torch.tensor([[2.0, 0.0, 0.3], [0.0, 1.0, 0.9], [1.0, 1.0, 0.1]])
    batch = {"labels": torch.tensor([0, 1, 0]), "targets": torch.tensor([[0.2], [0.8], [0.4]])}
    for w in (0.0, 2.5):
        task = Task(kind="multitask", classes=("a", "b"), dimensions=("arousal",), scales={"arousal": (1, 5)},
                    dimensional_weight=w)
        module = ClassifierModule(_TableModel({}), task=task)
        ce = torch.nn.functional.cross_entropy(outputs[:, :2], batch["labels"])
        p, t = outputs[:, 2], batch["targets"][:, 0]
        one_minus_ccc = 1 - 2 * ((p - p.mean()) * (t - t.mean())).mean() / (
            p.var(unbiased=False) + t.var(unbiased=False) + (p.mean() - t.mean()) ** 2)
        assert float(module.task_loss(outputs, batch)) == pytest.approx(float(ce + w * one_minus_ccc), abs=1e-5)
    mse = Task(kind="dimensional", dimensions=("arousal",), scales={"arousal": (1, 5)}, loss="mse")
    assert float(mse.dimensional_loss(p[:, None], t[:, None])) == pytest.approx(float(((p - t) ** 2).mean()))


@pytest.mark.parametrize("classes", [0, 4])
def test_decision_fusion_averages_its_branches_dimensions(classes):
    from mmser.models.fusion import DecisionFusion

    torch.manual_seed(0)
    head = DecisionFusion(8, 6, classes + 2, hidden=0, dropout=0.0, num_dims=2).eval()
    frames, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    tokens, tmask = torch.randn(3, 4, 6), torch.ones(3, 4, dtype=torch.bool)
    out = head(frames, mask, tokens, tmask)
    assert out.shape == (3, classes + 2)
    a, t = head.last_branch_logits
    assert torch.allclose(out[:, classes:], 0.5 * (a[:, classes:] + t[:, classes:]), atol=1e-6)  # weights start equal
    if classes:
        assert torch.allclose(out[:, :classes].exp().sum(-1), torch.ones(3), atol=1e-5)  # log-probabilities
        assert torch.allclose(out[:, :classes], head._fuse_classes(a[:, :classes], t[:, :classes]))


def test_fraction_validation_of_a_dimensional_task_needs_no_classes(toy):
    root, manifest = toy
    recs = load_manifest(manifest)
    for r in recs:
        r["label"] = None
    data = tiny_config(root, overrides=["data.validation=fraction", "data.val_fraction=0.25"]).data
    fold = split_fold(recs, 1, data, dimensions=DIMS, categorical=False)
    assert fold.val and fold.train and not {r["id"] for r in fold.val} & {r["id"] for r in fold.train}
    assert all(r["session"] != 1 for r in fold.val + fold.train)


@pytest.mark.parametrize("override, message", [
    ("target.dimensions=[]", "target.dimensions must name each dimension once"),
    ("target.dimensions=[arousal,arousal]", "target.dimensions must name each dimension once"),
    ("target.dimensions=[joy]", "expected one of ['arousal', 'valence', 'dominance']"),
    ("target.dimensional_weight=-1", "target.dimensional_weight: must be >= 0"),
])
def test_target_config_is_checked(override, message):
    from mmser.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(*TINY_CONFIGS, "multitask", overrides=[override])
