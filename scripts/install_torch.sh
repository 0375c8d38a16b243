# Sourced by scripts/setup.sh (and by tests/test_setup_script.py with stubbed commands):
#   mmser_install_torch PIP_COMMAND...
# installs torch with the given pip command (e.g. `.venv/bin/python -m pip -q`):
#   MMSER_TORCH_SPEC set  -> exactly that spec, from pip's configured index
#   nvidia-smi on PATH    -> "torch>=2.6" from the default index (PyPI's build is the CUDA one)
#   otherwise (no GPU)    -> the CPU build from PyTorch's CPU index first (short timeout, no retries),
#                            then the default index (where a local wheel dir / mirror has a CPU wheel).
# PyPI's default Linux torch wheel is the multi-GB CUDA build, so a machine without a GPU must not
# start there. Uses bash builtins only, besides the pip command it is given.
MMSER_TORCH_CPU_INDEX="${MMSER_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
MMSER_TORCH_CPU_SPEC="${MMSER_TORCH_CPU_SPEC:-torch==2.13.0}"

mmser_install_torch() {
  if [[ -n "${MMSER_TORCH_SPEC:-}" ]]; then
    echo "[setup] torch: $MMSER_TORCH_SPEC (MMSER_TORCH_SPEC)"
    "$@" install "$MMSER_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] torch: GPU found (nvidia-smi), default index (CUDA build)"
    "$@" install "torch>=2.6"
  else
    echo "[setup] torch: no GPU, CPU build from $MMSER_TORCH_CPU_INDEX"
    if ! "$@" install --index-url "$MMSER_TORCH_CPU_INDEX" --timeout 15 --retries 0 "$MMSER_TORCH_CPU_SPEC"; then
      echo "[setup] torch: CPU index not reachable; trying the default index (a local wheel dir or mirror)"
      "$@" install "$MMSER_TORCH_CPU_SPEC"
    fi
  fi
}
