"""How much zero padding changes wav2vec2-base's CNN features of a short clip (group norm).

    .venv/bin/python benchmarks/groupnorm_padding.py [--seed 0] [--out F]

wav2vec2-base's first CNN layer is a GroupNorm with one group per channel: each channel is
normalised over ALL time steps of the padded row, padding included (the reference runs the CNN on
the zero-padded waveform without a mask, and so does mmser). So a clip's features depend on how
much padding its batch adds: the reference drew random batches of 64 (a short clip is padded to
~10 s), mmser's length-bucketed batches pad it to about its own length (data.num_buckets=1 gives
random batches). This prints, for clips of 1 / 2 / 3.6 / 6 s, the relative L2 difference
||f(clip padded to 10 s) - f(clip padded by 2 %)|| / ||f(clip padded by 2 %)|| over the clip's
valid frames, after the first layer (conv + group norm + GELU: "first_layer_*") and at the CNN
output (the feature projection's input: "cnn_output_*"), as one JSON line.

Weights: a RANDOMLY INITIALISED wav2vec2-base-shaped CNN (no pretrained weights here), input: white
noise at speech-like level. The figure shows the size of the effect of padding through the group
norm, not the exact number a pretrained CNN gives on speech. A figure, not a test.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

SR = 16000


def relative_change(model: Wav2Vec2Model, clip_s: float, padded_s: float, seed: int) -> tuple[float, float]:
    """(after the first layer (conv + group norm + GELU), at the CNN output) relative L2 changes."""
    g = torch.Generator().manual_seed(seed)
    n = int(clip_s * SR)
    clip = 0.1 * torch.randn(n, generator=g)
    tight = torch.zeros(1, int(n * 1.02))  # a length bucket: ~2 % padding
    tight[0, :n] = clip
    long = torch.zeros(1, int(padded_s * SR))  # a random batch of 64: padded to the crop length
    long[0, :n] = clip
    first = model.feature_extractor.conv_layers[0]
    valid = int(model._get_feat_extract_output_lengths(n))
    valid0 = (n - 10) // 5 + 1
    with torch.no_grad():
        a0, b0 = first(tight[:, None])[0, :, :valid0], first(long[:, None])[0, :, :valid0]  # (C, T0)
        a = model.feature_extractor(tight)[0, :, :valid]  # (C, F)
        b = model.feature_extractor(long)[0, :, :valid]  # (C, F)
    return float((a0 - b0).norm() / a0.norm()), float((a - b).norm() / a.norm())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    # wav2vec2-base's CNN: 7 layers of 512 channels, group norm on the first, no conv bias, GELU.
    model = Wav2Vec2Model(Wav2Vec2Config(feat_extract_norm="group", conv_bias=False, num_hidden_layers=1)).eval()
    result = {}
    for c in (1.0, 2.0, 3.6, 6.0):
        first, out = relative_change(model, c, 10.0, args.seed)
        result[f"first_layer_{c}s"] = round(first, 4)
        result[f"cnn_output_{c}s"] = round(out, 4)
    result.update(seed=args.seed, weights="random (wav2vec2-base shape)")
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
