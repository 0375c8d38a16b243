"""A synthetic, IEMOCAP-shaped corpus spoken by espeak-ng (`mmser synth`).

IEMOCAP is licensed and nobody here has it, so the whole pipeline (prepare -> folds -> training ->
fusion) is exercised on a stand-in written in the REAL release's layout (see
/work/shared/IEMOCAP.md): the very same `prepare` code that users run on `IEMOCAP_full_release/`
reads this tree.

    root = synthesize(Path("runs/synth"), per_class=6, seed=0)   # -> runs/synth/IEMOCAP_full_release

What is in it
- 5 sessions x 2 actors (F, M), each actor with its own espeak-ng voice; improvised dialogs
  (`Ses01F_impro01`) and scripted ones (`Ses01M_script01_1`; plus the real quirks
  `Ses03M_impro05a/b` and `Ses05M_script01_1b`); both actors speak in every dialog.
- Per actor: `per_class` utterances of each 4-class label (neu, ang, sad; happy split between the
  codes hap and exc) plus a few out-of-task codes (fru, sur, xxx).
- EmoEvaluation consensus files with annotator lines, the Categorical / Attribute /
  Self-evaluation subfolders, transcriptions with the quirks of the real ones (lines without an id,
  `..._MXX0` turns with no wav and no label, [LAUGHTER] / [BREATHING] tokens), 16 kHz mono 16-bit
  PCM wavs under `sentences/wav/<dialog>/`. (Whole-dialog wavs under dialog/wav are not written.)

Learnable and honest, by construction
- Audio: emotion-dependent prosody (espeak rate, pitch, amplitude, pitch range, word gap, spectral tilt) with
  per-utterance jitter and per-actor offsets, so classes overlap (neutral/sad and angry/happy are
  partly confusable) and leave-one-session-out means unseen voices.
- Text: everyday English sentences; a cue phrase of the true class in ~60% of them, a misleading
  cue of another class in ~15%, none in ~25%. Text alone is imperfect too; the two views are
  drawn independently given the label, so audio + text fusion beats both.
- Scripted dialogs reuse the SAME sentences in every session (as in the real corpus, where this
  makes text models on gold transcripts look optimistic); each session's actors perform about a
  fifth of the script lines with another emotion than written. Improvised sentences are drawn per session.

Beside the tree, `out_dir` gets README.txt (what this is, how it was made) and
synth_utterances.jsonl (per utterance: code, label, spoken text, cue kind, prosody; for analysis;
not part of the IEMOCAP layout). `learnability_check(out_dir)` measures how hard the corpus is
with simple leave-one-session-out baselines (prosodic features, bag of words, their late fusion).

Same seed and settings -> the same bytes (with the same espeak-ng build). The tree is written
into a staging folder and renamed into place, so a killed run leaves nothing half-written; a
finished tree with the same settings is reused.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter, resample_poly

from mmser.io import atomic_write_text, read_jsonl, write_jsonl
from mmser.labels import CLASSES, label_of_code

log = logging.getLogger(__name__)

# Bump when the generator changes what it writes (recorded in README.txt and the stamp).
SYNTH_VERSION = "2"
ROOT_NAME = "IEMOCAP_full_release"
STAMP_NAME = ".mmser_synth.json"  # inside the root: marks a tree this module wrote
SAMPLE_RATE = 16000
ESPEAK_RATE = 22050  # espeak-ng's output rate
MIN_DURATION_S = 0.6  # IEMOCAP.md: real utterances run from 0.6 s

# ----------------------------------------------------------------------------------------------
# Voices and prosody
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    """One actor's espeak-ng voice (language + variant) and personal offsets."""

    voice: str  # espeak-ng -v argument, e.g. "en-us+f2"
    pitch_offset: float  # added to the class pitch (espeak 0..99 scale)
    rate_offset: float  # added to the class rate (words per minute)
    gain_db: float  # recording level of this actor's microphone


# (session, gender) -> voice. F actors use female variants, M actors male ones; all distinct.
ACTOR_VOICES: dict[tuple[int, str], Voice] = {
    (1, "F"): Voice("en-us+f2", 6.0, -8.0, 0.0),
    (1, "M"): Voice("en-us+m1", -4.0, 6.0, -2.0),
    (2, "F"): Voice("en-gb+f1", 2.0, 10.0, 2.5),
    (2, "M"): Voice("en-gb+m3", 0.0, -6.0, 1.0),
    (3, "F"): Voice("en-us+f4", -3.0, 4.0, -3.0),
    (3, "M"): Voice("en-us+m2", 5.0, -10.0, 3.0),
    (4, "F"): Voice("en-gb-x-rp+f3", 8.0, 0.0, -1.0),
    (4, "M"): Voice("en-us+m4", -6.0, 12.0, 0.5),
    (5, "F"): Voice("en-us+f5", -1.0, -4.0, 1.5),
    (5, "M"): Voice("en-gb+m7", 3.0, 2.0, -2.5),
}


@dataclass(frozen=True)
class Prosody:
    """espeak-ng prosody: rate (-s, wpm), pitch (-p, 0..99), amplitude (-a, 0..200),
    pitch range (SSML <prosody range="N%">), word gap (-g, units of 10 ms), and vocal effort as a
    spectral tilt applied after synthesis (-1..1: > 0 brighter, pressed voice; < 0 darker, lax)."""

    rate: float
    pitch: float
    amplitude: float
    range: float
    gap: float
    tilt: float = 0.0


# Class means. Arousal drives rate/amplitude/range and vocal effort (spectral tilt: high-arousal
# speech has a flatter spectrum), valence mostly pitch: angry and happy are both fast, loud and
# bright (happy higher and wider), sad and neutral both slow and soft (sad more so, and darker).
# The tilt is there because it is a real correlate of emotional arousal that a small model
# trained from scratch can hear within a few epochs (a frozen random CNN barely resolves pitch).
CLASS_PROSODY: dict[str, Prosody] = {
    "neu": Prosody(rate=170, pitch=45, amplitude=100, range=60, gap=1, tilt=0.0),
    "sad": Prosody(rate=148, pitch=38, amplitude=78, range=35, gap=3, tilt=-0.45),
    "ang": Prosody(rate=195, pitch=50, amplitude=150, range=90, gap=0, tilt=0.75),
    "hap": Prosody(rate=185, pitch=63, amplitude=125, range=140, gap=0, tilt=0.35),
    "exc": Prosody(rate=195, pitch=67, amplitude=138, range=150, gap=0, tilt=0.45),
    "fru": Prosody(rate=180, pitch=47, amplitude=125, range=75, gap=1, tilt=0.3),
    "sur": Prosody(rate=185, pitch=70, amplitude=120, range=160, gap=0, tilt=0.2),
}
# Per-utterance jitter (standard deviations): sized so that neighbouring classes overlap.
PROSODY_JITTER = Prosody(rate=14, pitch=6, amplitude=18, range=28, gap=1.5, tilt=0.25)
TINY_RATE_BOOST = 120.0  # tiny clips: 1-2 words at a fast rate

# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

# Everyday clauses with no emotional content (the body of every sentence).
CONTENT = (
    "I left the keys on the table", "the bus comes at nine", "we talked about it yesterday",
    "she called me this morning", "the store closes at six", "he moved to a new apartment",
    "they sent the letter last week", "I have to finish the report", "we are meeting after lunch",
    "the car is parked outside", "my brother works downtown", "the train was on time",
    "I read your message again", "we have dinner at seven", "the office is upstairs",
    "the package came today", "she bought a new phone", "he is waiting at the station",
    "we changed the plan for Friday", "the kids are at school", "I saw your mother at the market",
    "the rent is due on Monday", "you took the last bus home", "they painted the kitchen blue",
    "the flight lands at noon", "I found the old photos", "he fixed the door this weekend",
    "we sold the car", "the doctor called back", "the results came in the mail",
    "you start the new job tomorrow", "the meeting moved to Thursday", "my sister is coming over",
    "the house is quiet tonight", "I got a letter from the bank", "we drove to the coast",
    "the show starts at eight", "he read the whole book", "the phone was in my bag",
    "we need more milk",
)
# Cue phrases that carry an emotion (final punctuation included).
CUES: dict[str, tuple[str, ...]] = {
    "ang": ("I hate this.", "This is ridiculous.", "Stop lying to me.", "Get out of my way.",
            "I am so angry.", "How dare you!", "Don't you dare.", "That's outrageous.",
            "Leave me alone.", "This is unacceptable.", "Shut up and listen.", "I'm sick of this."),
    "hap": ("This is wonderful.", "I love it.", "That's great news.", "I'm so happy.", "We did it!",
            "How exciting!", "This is amazing.", "What a lovely surprise.", "I can't wait.",
            "That's fantastic.", "You made my day.", "I'm thrilled."),
    "sad": ("I miss her so much.", "I feel so lonely.", "I'm so sorry.", "It's all over.",
            "I feel terrible.", "Nobody cares anymore.", "I lost everything.", "It breaks my heart.",
            "I just want to cry.", "I'm tired of everything.", "It's hopeless.",
            "I wish he were here."),
    "neu": ("Okay.", "I see.", "Let me check.", "Alright then.", "As usual.", "Sure.", "Right.",
            "Just so you know.", "For the record.", "By the way.", "I guess.", "Noted."),
    "fru": ("Why does this always happen?", "I give up.", "This is so annoying.",
            "Nothing ever works.", "Not again."),
    "sur": ("Really?", "No way!", "Oh my god.", "Are you serious?", "I had no idea."),
}
CUES["exc"] = CUES["hap"]
FILLERS = ("Well,", "So,", "You know,", "Anyway,", "Actually,")  # shared by every class
# Tiny corpus: one or two words.
TINY_CUES: dict[str, tuple[str, ...]] = {
    "ang": ("Hate it.", "Stop!", "Furious.", "Shut up."),
    "hap": ("Great!", "Wonderful.", "Love it.", "Yay!"),
    "sad": ("Sorry.", "So lonely.", "Miss you.", "Hopeless."),
    "neu": ("Okay.", "Sure.", "Right.", "Noted."),
    "fru": ("Not again.", "Annoying."),
    "sur": ("Really?", "No way!"),
}
TINY_CUES["exc"] = TINY_CUES["hap"]
TINY_CONTENT = ("Tuesday.", "The bus.", "At noon.", "Downstairs.", "My keys.", "The office.",
                "Seven.", "The kitchen.", "Friday.", "The train.")
# Non-speech tokens of the real transcriptions (written in the transcript, not spoken).
NONSPEECH = ("[LAUGHTER]", "[BREATHING]", "[GARBAGE]")
BACKCHANNELS = ("Yeah.", "Uh-huh.", "Mm-hmm.", "Okay.", "Oh.")

# Text composition: P(cue of the true class), P(misleading cue of another class); rest: no cue.
P_TRUE_CUE = 0.6
P_MISLEADING_CUE = 0.15
P_FILLER = 0.25
P_CUE_ALONE = 0.4  # a cue without a content clause (keeps utterances about 1-3 s)
# Scripted dialogs: fraction of script lines an actor performs with another emotion than written.
P_REINTERPRET = 0.2

# ----------------------------------------------------------------------------------------------
# Annotation
# ----------------------------------------------------------------------------------------------

CATEGORY = {"neu": "Neutral", "hap": "Happiness", "exc": "Excited", "ang": "Anger",
            "sad": "Sadness", "fru": "Frustration", "sur": "Surprise", "fea": "Fear",
            "dis": "Disgust", "oth": "Other"}
# Plausible consensus (valence, activation, dominance) means on IEMOCAP's 1..5 scale.
VAD_MEANS = {"neu": (3.0, 2.4, 2.7), "hap": (3.9, 3.1, 3.0), "exc": (3.9, 3.6, 3.3),
             "ang": (1.9, 3.8, 3.8), "sad": (2.1, 2.3, 2.4), "fru": (2.1, 3.2, 3.2),
             "sur": (3.3, 3.6, 2.9), "xxx": (2.7, 2.9, 2.9)}
TASK_CODES = ("neu", "hap", "exc", "ang", "sad")
EXTRA_CODES = ("fru", "sur", "xxx")


# ----------------------------------------------------------------------------------------------
# The plan: everything random is decided here, before any audio is made
# ----------------------------------------------------------------------------------------------


@dataclass
class Turn:
    """One utterance with a wav (or, when `has_wav` is False, an `..._XX0` transcript-only turn)."""

    session: int
    gender: str  # the speaking actor
    code: str  # consensus code
    text: str  # what espeak says
    transcript: str  # what the transcription file says (may add [LAUGHTER] etc.)
    cue: str  # "true" (cue of the turn's own code), "misleading" (another code's cue), "none"
    cue_code: str | None
    scripted: bool
    has_wav: bool = True
    prosody: Prosody | None = None
    lead_s: float = 0.1  # silence kept before the speech
    tail_s: float = 0.1
    gain_db: float = 0.0
    noise_db: float = -55.0
    # Filled in later.
    id: str = ""
    dialog: str = ""
    start: float = 0.0
    end: float = 0.0
    duration: float = 0.0


@dataclass
class Dialog:
    name: str
    session: int
    scripted: bool
    turns: list[Turn] = field(default_factory=list)
    # (position, "F: Yeah.") lines without an id, inserted before turn `position`.
    idless: list[tuple[int, str]] = field(default_factory=list)


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """An independent, reproducible stream for (seed, keys...); strings hashed with crc32."""
    ints = [seed] + [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(ints))


def actor_codes(per_class: int, gender: str) -> list[str]:
    """The consensus codes one actor utters: `per_class` per 4-class label (happy split between
    hap and exc), plus out-of-task fru/sur/xxx. Depends only on per_class and gender, so scripts
    (which fix codes per line) are the same in every session."""
    n_hap = per_class // 2 + (per_class % 2 if gender == "F" else 0)
    counts = {"neu": per_class, "hap": n_hap, "exc": per_class - n_hap, "ang": per_class,
              "sad": per_class, "fru": max(1, per_class // 3), "sur": max(1, per_class // 6),
              "xxx": max(1, per_class // 3)}
    out: list[str] = []
    for code, n in counts.items():
        out += [code] * n
    return out


def _pick(rng: np.random.Generator, items: tuple[str, ...] | list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def make_sentence(code: str, rng: np.random.Generator, tiny: bool = False) -> tuple[str, str, str | None]:
    """(text, cue kind, cue code) for an utterance of consensus `code`.

    A cue of the true class with P_TRUE_CUE, a misleading cue of another 4-class code with
    P_MISLEADING_CUE, otherwise none; a cue comes alone (P_CUE_ALONE) or before/after an
    everyday clause. For xxx (no agreement) the cue, if any, is of a random class.
    """
    cues = TINY_CUES if tiny else CUES
    u = rng.random()
    if code == "xxx":
        kind, cue_code = ("misleading", _pick(rng, ("neu", "hap", "ang", "sad", "fru"))) if u < 0.5 \
            else ("none", None)
    elif u < P_TRUE_CUE:
        kind, cue_code = "true", code
    elif u < P_TRUE_CUE + P_MISLEADING_CUE:
        own = "hap" if code == "exc" else code
        others = [c for c in ("neu", "hap", "ang", "sad") if c != own]
        kind, cue_code = "misleading", _pick(rng, others)
    else:
        kind, cue_code = "none", None
    if tiny:
        text = _pick(rng, cues[cue_code]) if cue_code else _pick(rng, TINY_CONTENT)
        return text, kind, cue_code
    if cue_code is not None and rng.random() < P_CUE_ALONE:
        return _pick(rng, cues[cue_code]), kind, cue_code
    content = _pick(rng, CONTENT)
    if rng.random() < P_FILLER:
        content = f"{_pick(rng, FILLERS)} {content}"
    content = content[0].upper() + content[1:] + "."
    if cue_code is None:
        return content, kind, None
    cue = _pick(rng, cues[cue_code])
    text = f"{cue} {content}" if rng.random() < 0.5 else f"{content} {cue}"
    return text, kind, cue_code


def _cue_kind(code: str, cue_code: str | None) -> str:
    """"true" when the cue belongs to the utterance's class (hap and exc share cues)."""
    if cue_code is None:
        return "none"
    same = {"exc": "hap"}
    return "true" if same.get(cue_code, cue_code) == same.get(code, code) else "misleading"


def _prosody_for(code: str, voice: Voice, rng: np.random.Generator, tiny: bool) -> Prosody:
    base_code = code
    if code == "xxx":  # no agreement: the performance sits somewhere among the classes
        base_code = _pick(rng, ("neu", "hap", "ang", "sad", "fru"))
    m, j = CLASS_PROSODY[base_code], PROSODY_JITTER
    rate = m.rate + voice.rate_offset + j.rate * rng.standard_normal()
    if tiny:
        rate += TINY_RATE_BOOST
    return Prosody(
        rate=float(np.clip(round(rate), 80, 450)),
        pitch=float(np.clip(round(m.pitch + voice.pitch_offset + j.pitch * rng.standard_normal()), 5, 99)),
        amplitude=float(np.clip(round(m.amplitude + j.amplitude * rng.standard_normal()), 30, 200)),
        range=float(np.clip(round(m.range + j.range * rng.standard_normal()), 10, 200)),
        gap=float(np.clip(round(m.gap + j.gap * rng.standard_normal()), 0, 8)),
        tilt=float(np.clip(round(m.tilt + j.tilt * rng.standard_normal(), 3), -0.9, 0.9)),
    )


def _dialog_count(n_turns: int) -> int:
    """Dialogs per session and kind (improvised / scripted): even (one per marker actor F/M),
    about 15 turns each."""
    return 2 * max(1, round(n_turns / 30))


def _split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


def _interleave(f: list[Turn], m: list[Turn], rng: np.random.Generator) -> list[Turn]:
    """Merge two actors' turns in a random order (each actor's own order kept)."""
    order = np.array([0] * len(f) + [1] * len(m))
    rng.shuffle(order)
    fi, mi = iter(f), iter(m)
    return [next(fi) if o == 0 else next(mi) for o in order]


def plan_corpus(per_class: int, seed: int, tiny: bool) -> list[Dialog]:
    """Every dialog and turn of the corpus: codes, texts, prosody, ids (no audio yet)."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    # Scripts: fixed lines (text + written emotion) per marker slot, the same in every session.
    # Each actor's codes alternate between improvised and scripted material.
    srng = _rng(seed, "script")
    script_lines: dict[str, list[tuple[str, str, str, str | None]]] = {}
    impro_codes: dict[str, list[str]] = {}
    for g in ("F", "M"):
        codes = actor_codes(per_class, g)
        impro_codes[g] = codes[0::2]
        lines = []
        for code in codes[1::2]:
            text, kind, cue_code = make_sentence(code, srng, tiny)
            lines.append((code, text, kind, cue_code))
        order = srng.permutation(len(lines))
        script_lines[g] = [lines[i] for i in order]
    n_script = _dialog_count(len(script_lines["F"]) + len(script_lines["M"]))
    # Script membership and within-dialog order are fixed too.
    script_f = _split(list(range(len(script_lines["F"]))), n_script)
    script_m = _split(list(range(len(script_lines["M"]))), n_script)
    script_orders = []
    for k in range(n_script):
        order = np.array([0] * len(script_f[k]) + [1] * len(script_m[k]))
        srng.shuffle(order)
        script_orders.append(order)

    dialogs: list[Dialog] = []
    for s in range(1, 6):
        rng = _rng(seed, "session", s)
        voices = {g: ACTOR_VOICES[(s, g)] for g in ("F", "M")}

        def turn(g: str, code: str, text: str, kind: str, cue_code: str | None, scripted: bool,
                 voices=voices, s=s, rng=rng) -> Turn:  # bound now: called inside this loop iteration
            v = voices[g]
            return Turn(session=s, gender=g, code=code, text=text, transcript=text, cue=kind,
                        cue_code=cue_code, scripted=scripted,
                        prosody=_prosody_for(code, v, rng, tiny),
                        lead_s=0.02 if tiny else float(rng.uniform(0.05, 0.2)),
                        tail_s=0.02 if tiny else float(rng.uniform(0.05, 0.2)),
                        gain_db=v.gain_db + float(rng.uniform(-1.5, 1.5)),
                        noise_db=float(rng.uniform(-60.0, -48.0)))

        # Improvised: fresh sentences per session.
        impro: dict[str, list[Turn]] = {}
        for g in ("F", "M"):
            codes = list(impro_codes[g])
            rng.shuffle(codes)
            impro[g] = [turn(g, c, *make_sentence(c, rng, tiny), scripted=False) for c in codes]
        n_impro = _dialog_count(len(impro["F"]) + len(impro["M"]))
        parts_f, parts_m = _split(impro["F"], n_impro), _split(impro["M"], n_impro)
        for k in range(n_impro):
            marker = "F" if k % 2 == 0 else "M"
            dialogs.append(Dialog(f"Ses{s:02d}{marker}_impro{k // 2 + 1:02d}", s, False,
                                  _interleave(parts_f[k], parts_m[k], rng)))
        # Scripted: the same lines; about P_REINTERPRET of them performed with another emotion
        # (codes permuted among the chosen lines, so per-actor counts stay exact).
        performed: dict[str, list[str]] = {}
        for g in ("F", "M"):
            codes = [ln[0] for ln in script_lines[g]]
            chosen = [i for i in range(len(codes)) if rng.random() < P_REINTERPRET]
            permuted = [codes[i] for i in chosen]
            rng.shuffle(permuted)
            for i, c in zip(chosen, permuted, strict=True):
                codes[i] = c
            performed[g] = codes
        for k in range(n_script):
            marker = "F" if k % 2 == 0 else "M"
            name = f"script{k // 4 + 1:02d}_{(k // 2) % 2 + 1}"
            fi, mi = iter(script_f[k]), iter(script_m[k])
            turns = []
            for o in script_orders[k]:
                g, i = ("F", next(fi)) if o == 0 else ("M", next(mi))
                _, text, kind, cue_code = script_lines[g][i]
                code = performed[g][i]
                kind = _cue_kind(code, cue_code)  # relative to the performed emotion
                turns.append(turn(g, code, text, kind, cue_code, scripted=True))
            dialogs.append(Dialog(f"Ses{s:02d}{marker}_{name}", s, True, turns))
    dialogs = _real_quirk_names(dialogs)
    for d in dialogs:
        _add_transcript_quirks(d, _rng(seed, "quirks", d.name))
        counters = Counter()
        for t in d.turns:
            if t.has_wav:
                t.id = f"{d.name}_{t.gender}{counters[t.gender]:03d}"
                counters[t.gender] += 1
            else:
                t.id = f"{d.name}_{t.gender}XX0"
            t.dialog = d.name
    return dialogs


def _real_quirk_names(dialogs: list[Dialog]) -> list[Dialog]:
    """Names seen in the real release: Ses03M_impro05a / Ses03M_impro05b (one improvisation in
    two parts) and Ses05M_script01_1b."""
    out = []
    split_done = False
    for d in dialogs:
        n = Counter(t.gender for t in d.turns)
        if not split_done and d.name.startswith("Ses03M_impro") and min(n["F"], n["M"]) >= 2:
            # Each part keeps both actors: the first half of each actor's turns goes to part a.
            seen: Counter = Counter()
            part_a, part_b = [], []
            for t in d.turns:
                (part_a if seen[t.gender] < n[t.gender] // 2 else part_b).append(t)
                seen[t.gender] += 1
            out.append(Dialog("Ses03M_impro05a", 3, False, part_a))
            out.append(Dialog("Ses03M_impro05b", 3, False, part_b))
            split_done = True
            continue
        if d.name == "Ses05M_script01_1":
            d.name = "Ses05M_script01_1b"
        out.append(d)
    return out


def _add_transcript_quirks(d: Dialog, rng: np.random.Generator) -> None:
    """One [LAUGHTER]-like token, one `_XX0` turn (no wav, no label) and one line without an id
    per dialog, like the real transcriptions."""
    wav_turns = [t for t in d.turns if t.has_wav]
    if wav_turns:
        t = wav_turns[int(rng.integers(len(wav_turns)))]
        tok = _pick(rng, NONSPEECH)
        t.transcript = f"{tok} {t.transcript}" if rng.random() < 0.5 else f"{t.transcript} {tok}"
    g = _pick(rng, ("F", "M"))
    xx = Turn(session=d.session, gender=g, code="", text="", transcript=_pick(rng, BACKCHANNELS),
              cue="none", cue_code=None, scripted=d.scripted, has_wav=False)
    xx.duration = float(rng.uniform(0.4, 1.2))
    d.turns.insert(int(rng.integers(1, len(d.turns) + 1)), xx)
    d.idless.append((int(rng.integers(0, len(d.turns) + 1)),
                     f"{_pick(rng, ('F', 'M'))}: {_pick(rng, BACKCHANNELS)}"))


# ----------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------


def find_espeak() -> str:
    """Path of the espeak-ng executable, or a RuntimeError that says how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "mmser synth needs the espeak-ng speech synthesiser, which was not found on PATH. "
            "Install it: `sudo apt-get install espeak-ng` (Debian/Ubuntu), `brew install espeak-ng` "
            "(macOS), or `conda install -c conda-forge espeak-ng`.")
    return exe


def espeak_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().split("  ")[0] or "unknown"


def _ssml(text: str, p: Prosody) -> str:
    esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return f'<speak><prosody range="{p.range:.0f}%">{esc}</prosody></speak>'


def apply_tilt(x: np.ndarray, tilt: float) -> np.ndarray:
    """Spectral tilt at constant RMS: tilt > 0 pre-emphasis y[n] = x[n] - t x[n-1] (brighter),
    tilt < 0 a one-pole low-pass y[n] = x[n] + |t| y[n-1] (darker)."""
    if tilt == 0.0 or x.size == 0:
        return x
    rms = np.sqrt(np.mean(x ** 2))
    y = lfilter([1.0, -tilt], [1.0], x) if tilt > 0 else lfilter([1.0], [1.0, tilt], x)
    y_rms = np.sqrt(np.mean(y ** 2))
    return y * (rms / y_rms) if y_rms > 0 else y


def render(turn: Turn, exe: str, tmp_dir: Path, seed: int, tiny: bool) -> np.ndarray:
    """Speak one turn: espeak-ng (22,050 Hz) -> 16 kHz, trimmed, level and noise applied.
    Returns int16 samples."""
    p = turn.prosody
    assert p is not None
    wav = tmp_dir / f"{turn.id}.wav"
    cmd = [exe, "-m", "-v", ACTOR_VOICES[(turn.session, turn.gender)].voice,
           "-s", f"{p.rate:.0f}", "-p", f"{p.pitch:.0f}", "-a", f"{p.amplitude:.0f}",
           "-g", f"{p.gap:.0f}", "-w", str(wav), _ssml(turn.text, p)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0 or not wav.is_file():
        raise RuntimeError(f"espeak-ng failed for {turn.id} ({' '.join(cmd[:-1])}): {res.stderr.strip()}")
    x, sr = sf.read(wav, dtype="float64")
    wav.unlink()
    if sr != ESPEAK_RATE:
        raise RuntimeError(f"espeak-ng wrote {sr} Hz audio for {turn.id}; expected {ESPEAK_RATE}")
    x = resample_poly(x, 320, 441)  # 22,050 -> 16,000 Hz (320/441 exactly)
    x = apply_tilt(x, p.tilt)
    # Trim espeak's own silences, keep a planned margin.
    loud = np.flatnonzero(np.abs(x) > 0.02 * max(np.abs(x).max(), 1e-9))
    if loud.size:
        x = x[loud[0]:loud[-1] + 1]
    lead, tail = int(turn.lead_s * SAMPLE_RATE), int(turn.tail_s * SAMPLE_RATE)
    x = np.concatenate([np.zeros(lead), x, np.zeros(tail)])
    lo_s, hi_s = (0.2, 0.5) if tiny else (MIN_DURATION_S, None)
    if hi_s is not None:
        x = x[: int(hi_s * SAMPLE_RATE)]
    if x.size < int(lo_s * SAMPLE_RATE):  # pad with silence, half before, half after
        missing = int(lo_s * SAMPLE_RATE) - x.size
        x = np.pad(x, (missing // 2, missing - missing // 2))
    rng = _rng(seed, "noise", turn.id)
    x = x * 10 ** (turn.gain_db / 20) + 10 ** (turn.noise_db / 20) * rng.standard_normal(x.size)
    return np.round(np.clip(x, -1.0, 32767 / 32768) * 32768).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Writing the release layout
# ----------------------------------------------------------------------------------------------


def _vad_ratings(code: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) integer annotator ratings 1..5 around the code's (V, A, D) mean."""
    mean = np.array(VAD_MEANS[code])
    return np.clip(np.rint(mean + 0.7 * rng.standard_normal((n, 3))), 1, 5).astype(int)


def _categorical(code: str, rng: np.random.Generator, n: int) -> list[str]:
    """n annotator categories whose majority is the consensus `code` (none for xxx)."""
    others = [c for c in ("neu", "hap", "exc", "ang", "sad", "fru", "sur", "fea", "oth") if c != code]
    if code == "xxx":  # no agreement: all different
        return [CATEGORY[c] for c in rng.choice(others, size=n, replace=False)]
    cats = [CATEGORY[code]] * n
    if rng.random() < 0.5:
        cats[int(rng.integers(n))] = CATEGORY[_pick(rng, others)]
    return cats


def _write_dialog(d: Dialog, root: Path, rng: np.random.Generator) -> None:
    sess = root / f"Session{d.session}"
    dia = sess / "dialog"
    emo_lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
    cat_files: dict[str, list[str]] = {}
    atr_files: dict[str, list[str]] = {}
    self_files: dict[str, list[str]] = {}
    for t in d.turns:
        if not t.has_wav:
            continue
        evaluators = sorted(int(e) for e in rng.choice(np.arange(1, 7), size=3, replace=False))
        cats = _categorical(t.code, rng, 3)
        ratings = _vad_ratings(t.code, rng, 2)
        self_cat = _categorical(t.code, rng, 1)[0]
        self_rating = _vad_ratings(t.code, rng, 1)[0]
        vad = np.vstack([ratings, self_rating[None]]).mean(axis=0)
        emo_lines.append(f"[{t.start:.4f} - {t.end:.4f}]\t{t.id}\t{t.code}\t"
                         f"[{vad[0]:.4f}, {vad[1]:.4f}, {vad[2]:.4f}]")
        for e, c in zip(evaluators, cats, strict=True):
            emo_lines.append(f"C-E{e}:\t{c};\t()")
            shown = "Neutral state" if c == "Neutral" else c
            cat_files.setdefault(f"{d.name}_e{e}_cat.txt", []).append(f"{t.id} :{shown}; ()")
        emo_lines.append(f"C-{t.gender}1:\t{self_cat};\t()")
        shown = "Neutral state" if self_cat == "Neutral" else self_cat
        self_files.setdefault(f"{d.name}_{t.gender}_cat.txt", []).append(f"{t.id} :{shown}; ()")
        for e, (v, a, dm) in zip(evaluators[1:], ratings, strict=True):
            emo_lines.append(f"A-E{e}:\tval {v}; act {a}; dom  {dm};\t()")
            atr_files.setdefault(f"{d.name}_e{e}_atr.txt", []).append(
                f"{t.id} :act {a}; :val {v}; :dom  {dm};  ()")
        v, a, dm = self_rating
        emo_lines.append(f"A-{t.gender}1:\tval {v}; act {a}; dom  {dm};\t()")
        emo_lines.append("")
    _write_text(dia / "EmoEvaluation" / f"{d.name}.txt", "\n".join(emo_lines) + "\n")
    for sub, files in (("Categorical", cat_files), ("Attribute", atr_files),
                       ("Self-evaluation", self_files)):
        for name, lines in sorted(files.items()):
            _write_text(dia / "EmoEvaluation" / sub / name, "\n".join(lines) + "\n")
    # Transcriptions: time order, with the quirks.
    tr_lines = [f"{t.id} [{t.start:08.4f}-{t.end:08.4f}]: {t.transcript}" for t in d.turns]
    for pos, line in sorted(d.idless, reverse=True):
        tr_lines.insert(pos, line)
    _write_text(dia / "transcriptions" / f"{d.name}.txt", "\n".join(tr_lines) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _stamp(per_class: int, seed: int, tiny: bool, espeak: str) -> dict:
    return {"generator": "mmser synth", "version": SYNTH_VERSION, "per_class": per_class,
            "seed": seed, "tiny": tiny, "espeak_ng": espeak}


def _is_complete(out_dir: Path, root: Path, stamp: dict) -> bool:
    f = root / STAMP_NAME
    if not (f.is_file() and (out_dir / "README.txt").is_file()
            and (out_dir / "synth_utterances.jsonl").is_file()):
        return False
    try:
        return json.loads(f.read_text()).get("settings") == stamp
    except json.JSONDecodeError:
        return False


def synthesize(out_dir: Path, per_class: int = 6, seed: int = 0, tiny: bool = False) -> Path:
    """Write a synthetic corpus in IEMOCAP's release layout under `out_dir`; return its
    `IEMOCAP_full_release` root.

    `per_class` utterances of each 4-class label per actor (10 actors), plus a few out-of-task
    ones. `tiny=True` makes 0.2-0.5 s clips of one or two words (unit tests). Reuses a finished
    tree with the same settings; replaces one this module wrote with other settings; refuses to
    touch an `IEMOCAP_full_release` it did not write. Raises RuntimeError when espeak-ng is
    missing. One run per `out_dir` at a time.
    """
    out_dir = Path(out_dir)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    exe = find_espeak()
    version = espeak_version(exe)
    root = out_dir / ROOT_NAME
    stamp = _stamp(per_class, seed, tiny, version)
    if root.exists():
        if _is_complete(out_dir, root, stamp):
            log.info("%s already holds this synthetic corpus (seed %d, per_class %d, tiny %s): reused",
                     root, seed, per_class, tiny)
            return root
        if not (root / STAMP_NAME).is_file():
            raise ValueError(f"{root} exists and was not written by mmser synth (no {STAMP_NAME}); "
                             "refusing to overwrite it: choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed run (one run per out_dir at a time is assumed).
    stale_dirs = sorted(out_dir.glob(f".{ROOT_NAME}.partial-*")) + sorted(out_dir.glob(f".{ROOT_NAME}.old-*"))
    for stale in stale_dirs:
        log.info("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    t0 = time.perf_counter()
    dialogs = plan_corpus(per_class, seed, tiny)
    turns = [t for d in dialogs for t in d.turns if t.has_wav]
    stage = Path(tempfile.mkdtemp(prefix=f".{ROOT_NAME}.partial-", dir=out_dir))
    try:
        scratch = stage / "_espeak"
        scratch.mkdir()
        # espeak-ng calls wait more than they compute (~30 ms wall, ~10 ms CPU): a few threads
        # more than cores help a little.
        with ThreadPoolExecutor(max_workers=max(4, min(8, os.cpu_count() or 1))) as pool:
            audio = list(pool.map(lambda t: render(t, exe, scratch, seed, tiny), turns))
        scratch.rmdir()
        stage_root = stage / ROOT_NAME
        for t, x in zip(turns, audio, strict=True):
            t.duration = x.size / SAMPLE_RATE
            path = stage_root / f"Session{t.session}" / "sentences" / "wav" / t.dialog / f"{t.id}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Encoded in memory: soundfile's close() fsyncs every file, and the staging folder
            # is renamed into place only when everything is written anyway.
            buf = io.BytesIO()
            sf.write(buf, x, SAMPLE_RATE, subtype="PCM_16", format="WAV")
            path.write_bytes(buf.getvalue())
        for d in dialogs:
            rng = _rng(seed, "timeline", d.name)
            now = float(rng.uniform(2.0, 8.0))
            for t in d.turns:
                t.start = round(now, 4)
                t.end = round(now + t.duration, 4)
                now = t.end + float(rng.uniform(0.2, 1.5))
            _write_dialog(d, stage_root, _rng(seed, "annotators", d.name))
        records = [_record(t, out_dir) for t in turns]
        summary = _summary(records)
        _write_text(stage_root / STAMP_NAME, json.dumps({"settings": stamp, **summary}, indent=2) + "\n")
        if root.exists():  # ours (checked above), other settings or unfinished extras: replace
            old = Path(tempfile.mkdtemp(prefix=f".{ROOT_NAME}.old-", dir=out_dir))
            os.replace(root, old / ROOT_NAME)
            shutil.rmtree(old)
        os.replace(stage_root, root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    write_jsonl(out_dir / "synth_utterances.jsonl", records)
    atomic_write_text(out_dir / "README.txt", _readme(stamp, summary))
    log.info("synthetic corpus: %d utterances (%d in the 4-class task), %.2f h, written to %s in %.1f s",
             summary["utterances"], summary["in_task"], summary["hours"], root,
             time.perf_counter() - t0)
    return root


def _record(t: Turn, out_dir: Path) -> dict:
    p = t.prosody
    assert p is not None
    return {"id": t.id, "session": t.session, "speaker": f"Ses{t.session:02d}{t.gender}",
            "gender": t.gender, "dialog": t.dialog, "scripted": t.scripted,
            "path": f"{ROOT_NAME}/Session{t.session}/sentences/wav/{t.dialog}/{t.id}.wav",
            "code": t.code, "label": label_of_code(t.code), "text": t.text,
            "transcript": t.transcript, "cue": t.cue, "cue_code": t.cue_code,
            "voice": ACTOR_VOICES[(t.session, t.gender)].voice, "prosody": asdict(p),
            "gain_db": round(t.gain_db, 3), "duration": t.duration}


def _summary(records: list[dict]) -> dict:
    task = [r for r in records if r["label"] is not None]
    dur = [r["duration"] for r in records]
    return {"utterances": len(records), "in_task": len(task),
            "labels": dict(sorted(Counter(r["label"] for r in task).items())),
            "codes": dict(sorted(Counter(r["code"] for r in records).items())),
            "hours": round(sum(dur) / 3600, 4),
            "duration_s": {"min": round(min(dur), 3), "mean": round(float(np.mean(dur)), 3),
                           "max": round(max(dur), 3)},
            "true_cue_fraction": round(float(np.mean([r["cue"] == "true" for r in task])), 3)}


def _readme(stamp: dict, summary: dict) -> str:
    tiny_flag = " --tiny" if stamp["tiny"] else ""
    return f"""SYNTHETIC corpus in the layout of IEMOCAP_full_release. NOT IEMOCAP.

Generated by `mmser synth` (mmser.data.synth, generator version {stamp['version']}) with
seed={stamp['seed']}, per_class={stamp['per_class']}, tiny={stamp['tiny']}; speech by
{stamp['espeak_ng']} (voices per actor, emotion-dependent prosody with random jitter).
Regenerate: mmser synth OUT_DIR --per-class {stamp['per_class']} --seed {stamp['seed']}{tiny_flag}

{summary['utterances']} utterances ({summary['in_task']} in the 4-class task: {summary['labels']}),
{summary['hours'] * 60:.1f} minutes; codes {summary['codes']}.

Emotion is carried partly by prosody (rate, pitch, loudness, pitch range; overlapping classes)
and partly by words (a cue phrase of the true class in about {P_TRUE_CUE:.0%} of sentences, a
misleading cue in about {P_MISLEADING_CUE:.0%}). Scripted dialogs reuse the same sentences in every
session (as in the real corpus). Numbers measured on this corpus say nothing about IEMOCAP.
synth_utterances.jsonl lists, per utterance, the code, the spoken text, the cue and the prosody.
"""


# ----------------------------------------------------------------------------------------------
# Learnability check: simple leave-one-session-out baselines
# ----------------------------------------------------------------------------------------------


def _yin_f0(frames: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 500.0,
            threshold: float = 0.15) -> np.ndarray:
    """f0 (Hz) of each frame by YIN (de Cheveigne & Kawahara 2002); NaN where unvoiced.
    Hand-written (vectorised numpy): no installed library tracks pitch without torchaudio."""
    n_frames, win = frames.shape
    half = win // 2
    if n_frames == 0:
        return np.zeros(0)
    # Difference d(tau) = sum_t (x_t - x_{t+tau})^2 over the first half-window, via FFT.
    nfft = 2 * win
    cross = np.fft.irfft(np.fft.rfft(frames, nfft, axis=1)
                         * np.conj(np.fft.rfft(frames[:, :half], nfft, axis=1)), nfft, axis=1)[:, :half]
    cs = np.concatenate([np.zeros((n_frames, 1)), np.cumsum(frames ** 2, axis=1)], axis=1)
    energy_tau = cs[:, half:2 * half] - cs[:, :half]  # (F, half): sum of x^2 over [tau, tau+half)
    d = cs[:, half:half + 1] + energy_tau - 2 * cross  # (F, half)
    d[:, 0] = 0.0
    # Cumulative mean normalised difference.
    cmnd = d[:, 1:] * np.arange(1, half) / np.maximum(np.cumsum(d[:, 1:], axis=1), 1e-12)
    lo, hi = int(sr / fmax), min(int(sr / fmin), half - 1)
    c = cmnd[:, lo - 1:hi - 1]  # lags lo .. hi-1
    below = c < threshold
    first = np.where(below.any(axis=1), below.argmax(axis=1), -1)
    f0 = np.full(n_frames, np.nan)
    for i in np.flatnonzero(first >= 0):  # walk down to the local minimum
        j = first[i]
        while j + 1 < c.shape[1] and c[i, j + 1] < c[i, j]:
            j += 1
        f0[i] = sr / (j + lo)
    return f0


def prosodic_features(x: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A small utterance-level prosodic vector (11 values): log duration, frame log-energy
    (mean, std, max over active frames), active fraction, log-f0 (median, std and 10-90% spread,
    in semitones), voiced fraction, zero-crossing rate, energy onsets per second."""
    x = np.asarray(x, dtype=np.float64)
    win, hop = int(0.04 * sr), int(0.01 * sr)
    if x.size < win:
        x = np.pad(x, (0, win - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop]  # (F, win)
    energy = np.log10((frames ** 2).mean(axis=1) + 1e-10)  # (F,)
    active = energy > energy.max() - 2.5  # within 25 dB of the loudest frame
    zcr = (np.abs(np.diff(np.sign(frames[active]), axis=1)) > 0).mean()
    f0 = _yin_f0(frames[active], sr)
    st = 12 * np.log2(f0[~np.isnan(f0)] / 100.0)  # semitones re 100 Hz
    if st.size < 2:
        st = np.zeros(2)
    e = energy[active]
    dur = x.size / sr
    return np.array([
        np.log(dur), e.mean(), e.std(), energy.max(), active.mean(),
        np.median(st), st.std(), np.percentile(st, 90) - np.percentile(st, 10),
        (~np.isnan(f0)).mean(), zcr, np.sum(np.diff(active.astype(int)) == 1) / dur,
    ])


def learnability_check(out_dir: Path, max_iter: int = 2000) -> dict:
    """Leave-one-session-out UA of three simple baselines on a synthesized corpus:
    logistic regression on `prosodic_features` (audio), on bag-of-words of the transcript
    (text), and their late fusion (sum of log-probabilities). Returns, per baseline, UA per test
    session, their mean, and UA over all folds' predictions on improvised and on scripted
    utterances (scripted text repeats across sessions, so text does better there)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mmser.metrics import ua

    out_dir = Path(out_dir)
    recs = [r for r in read_jsonl(out_dir / "synth_utterances.jsonl") if r["label"] is not None]
    feats = np.stack([prosodic_features(sf.read(out_dir / r["path"], dtype="float64")[0]) for r in recs])
    texts = [r["transcript"] for r in recs]
    y = np.array([CLASSES.index(r["label"]) for r in recs])
    sess = np.array([r["session"] for r in recs])
    scripted = np.array([r["scripted"] for r in recs])
    result: dict[str, list[float]] = {"audio": [], "text": [], "fusion": []}
    pred = {k: np.zeros_like(y) for k in result}
    for s in range(1, 6):
        tr, te = sess != s, sess == s
        audio = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=1.0))
        audio.fit(feats[tr], y[tr])
        text = make_pipeline(CountVectorizer(), LogisticRegression(max_iter=max_iter, C=1.0))
        text.fit([texts[i] for i in np.flatnonzero(tr)], y[tr])
        pa = audio.predict_log_proba(feats[te])
        pt = text.predict_log_proba([texts[i] for i in np.flatnonzero(te)])
        for k, logp in (("audio", pa), ("text", pt), ("fusion", pa + pt)):
            pred[k][te] = logp.argmax(1)
            result[k].append(ua(y[te], pred[k][te], len(CLASSES)))
    n = len(CLASSES)
    return {k: {"per_session": [round(v, 4) for v in vals], "mean": round(float(np.mean(vals)), 4),
                "improvised": round(ua(y[~scripted], pred[k][~scripted], n), 4),
                "scripted": round(ua(y[scripted], pred[k][scripted], n), 4)}
            for k, vals in result.items()}
