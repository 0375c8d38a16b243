#!/usr/bin/env bash
# The multimodal ablation grid on the real IEMOCAP (issue: multimodal extension), each cell through
# `mmser cv`, then one comparison table. Every command is resumable: re-running skips finished runs.
#
#   {V-FT, TAPT, P-TAPT audio} x {gold, ASR text} x {late (concat, decision), cross-attention}
#   + audio-only and text-only (gold, ASR), improvised-only results beside the full ones.
#
# Needs: the prepared manifest (mmser prepare iemocap ... --out Dataset/IEMOCAP), facebook/wav2vec2-base
# (hub name or a local dir: set W2V2=DIR), for P-TAPT fairseq's wav2vec_large.pt (set W2V1=PATH),
# and a GPU. Usage: bash experiments/ablation_grid.sh [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${1:-5}"
M="${MANIFEST:-Dataset/IEMOCAP/manifest.jsonl}"
W2V2="${W2V2:-facebook/wav2vec2-base}"
W2V1="${W2V1:-}"
OUT="${OUT:-runs}"
MMSER="${MMSER:-.venv/bin/mmser}"
common=(data.manifest="$M" encoder.name="$W2V2" output_dir="$OUT")

# 1. Audio-only: the paper's three methods (Table 11).
$MMSER cv -c configs/base.yaml -c configs/vft.yaml --sessions 1-5 --seeds "$SEEDS" "${common[@]}" experiment=vft
$MMSER cv -c configs/base.yaml -c configs/vft.yaml -c configs/tapt.yaml --sessions 1-5 --seeds "$SEEDS" \
  "${common[@]}" experiment=tapt
if [[ -n "$W2V1" ]]; then
  $MMSER cv -c configs/base.yaml -c configs/vft.yaml -c configs/ptapt.yaml --sessions 1-5 --seeds "$SEEDS" \
    "${common[@]}" ptapt.wav2vec1_checkpoint="$W2V1" experiment=ptapt
fi

# 2. ASR transcripts (Whisper; any openai-whisper name / .pt or faster-whisper model / dir).
ASR="$OUT/asr/whisper.jsonl"
$MMSER transcribe "$M" --backend faster-whisper --model "${ASR_MODEL:-offline-tiny.en}" --out "$ASR" \
  --audio-features "$OUT/cache/audio"   # + the Whisper encoder frames of the same pass (section 4b)

# 3. Text-only, gold and ASR.
$MMSER cv -c configs/base.yaml -c configs/vft.yaml -c configs/text.yaml --sessions 1-5 --seeds "$SEEDS" \
  "${common[@]}" experiment=text-gold
$MMSER cv -c configs/base.yaml -c configs/vft.yaml -c configs/text.yaml --sessions 1-5 --seeds "$SEEDS" \
  "${common[@]}" text.source="$ASR" experiment=text-asr

# 4. Fusion: each audio method's fine-tuned fold/seed models x text source x head.
audios=(vft tapt)
[[ -n "$W2V1" ]] && audios+=(ptapt)
for audio in "${audios[@]}"; do
  for src in gold asr; do
    srcarg=()
    [[ "$src" == asr ]] && srcarg=(text.source="$ASR")
    for head in concat decision xattn; do
      $MMSER cv -c configs/base.yaml -c configs/vft.yaml -c "configs/fusion_${head}.yaml" --sessions 1-5 \
        --seeds "$SEEDS" "${common[@]}" "${srcarg[@]}" fusion.audio_runs="$OUT/$audio" \
        experiment="fusion-${head}-${audio}-${src}"
    done
  done
done

# 4b. Whisper as the audio branch (README "Whisper as the audio branch"): frozen Whisper frames
#     (WHISPER_AUDIO: offline-tiny.en, or a CTranslate2 folder / faster-whisper name such as large-v3),
#     cached per utterance; alone, with text through each head, and beside V-FT's wav2vec 2.0.
WA="${WHISPER_AUDIO:-offline-tiny.en}"
wcommon=("${common[@]}" encoder.name="$WA" encoder.feature_cache_dir="$OUT/cache/audio")
$MMSER cv -c configs/base.yaml -c configs/vft.yaml -c configs/whisper_audio.yaml --sessions 1-5 --seeds "$SEEDS" \
  "${wcommon[@]}" experiment=whisper-audio
for src in gold asr; do
  srcarg=()
  [[ "$src" == asr ]] && srcarg=(text.source="$ASR")
  for head in concat decision xattn; do
    $MMSER cv -c configs/base.yaml -c configs/vft.yaml -c configs/whisper_audio.yaml -c "configs/fusion_${head}.yaml" \
      --sessions 1-5 --seeds "$SEEDS" "${wcommon[@]}" "${srcarg[@]}" experiment="fusion-${head}-whisper-${src}"
  done
  $MMSER cv -c configs/base.yaml -c configs/vft.yaml -c configs/fusion_concat.yaml --sessions 1-5 --seeds "$SEEDS" \
    "${common[@]}" "${srcarg[@]}" fusion.audio_runs="$OUT/vft" fusion.whisper_audio="$WA" \
    encoder.feature_cache_dir="$OUT/cache/audio" experiment="fusion-concat-vft+whisper-${src}"
done

# 5. One table (UA, WA, macro-F1, UA on improvised dialogs) and a plot over every variant.
$MMSER compare "$OUT"/vft "$OUT"/tapt $( [[ -n "$W2V1" ]] && echo "$OUT/ptapt" ) "$OUT"/text-gold "$OUT"/text-asr \
  "$OUT"/whisper-audio "$OUT"/fusion-* --out "$OUT/compare"
