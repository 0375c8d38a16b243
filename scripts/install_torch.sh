# Sourced by scripts/setup.sh (and by tests/test_setup_script.py with stubbed commands):
#   mmser_install_torch PIP_COMMAND...
# installs torch with the given pip command (e.g. `.venv/bin/python -m pip -q`):
#   MMSER_TORCH_SPEC set  -> exactly that spec, from pip's configured index
#   nvidia-smi on PATH    -> a CUDA 12 build from PyTorch's cu12x index (short timeout, no retries),
#                            then the default index with a warning. Why CUDA 12: faster-whisper's
#                            CTranslate2 wheels need cuBLAS 12 and cuDNN 9 ("libcublas.so.12 is not
#                            found" otherwise), and a torch built for CUDA 12 brings exactly those
#                            (nvidia-cublas-cu12, nvidia-cudnn-cu12 9.x), loaded before CTranslate2;
#                            PyPI's default torch may be built for another CUDA major.
#   otherwise (no GPU)    -> the CPU build from PyTorch's CPU index first (short timeout, no retries),
#                            then the default index (where a local wheel dir / mirror has a CPU wheel).
# PyPI's default Linux torch wheel is the multi-GB CUDA build, so a machine without a GPU must not
# start there. Uses bash builtins only, besides the pip command it is given.
MMSER_TORCH_CPU_INDEX="${MMSER_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
MMSER_TORCH_CPU_SPEC="${MMSER_TORCH_CPU_SPEC:-torch==2.13.0}"
MMSER_TORCH_CUDA_INDEX="${MMSER_TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}"
MMSER_TORCH_GPU_SPEC="${MMSER_TORCH_GPU_SPEC:-torch>=2.6}"

mmser_install_torch() {
  if [[ -n "${MMSER_TORCH_SPEC:-}" ]]; then
    echo "[setup] torch: $MMSER_TORCH_SPEC (MMSER_TORCH_SPEC)"
    "$@" install "$MMSER_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] torch: GPU found (nvidia-smi), CUDA 12 build from $MMSER_TORCH_CUDA_INDEX (CTranslate2 needs cuBLAS 12 / cuDNN 9)"
    if ! "$@" install --index-url "$MMSER_TORCH_CUDA_INDEX" --timeout 15 --retries 0 "$MMSER_TORCH_GPU_SPEC"; then
      echo "[setup] torch: CUDA 12 index not reachable; trying the default index. WARNING: if its torch is not" \
           "built for CUDA 12, faster-whisper on the GPU needs nvidia-cublas-cu12 and nvidia-cudnn-cu12==9.*" \
           "(mmser falls back to the CPU for Whisper under device=auto)"
      "$@" install "$MMSER_TORCH_GPU_SPEC"
    fi
  else
    echo "[setup] torch: no GPU, CPU build from $MMSER_TORCH_CPU_INDEX"
    if ! "$@" install --index-url "$MMSER_TORCH_CPU_INDEX" --timeout 15 --retries 0 "$MMSER_TORCH_CPU_SPEC"; then
      echo "[setup] torch: CPU index not reachable; trying the default index (a local wheel dir or mirror)"
      "$@" install "$MMSER_TORCH_CPU_SPEC"
    fi
  fi
}
