#!/usr/bin/env bash
# Set up mmser in ./.venv on a fresh machine (idempotent: a second run with an unchanged
# pyproject.toml does nothing).
#   bash scripts/setup.sh          # runtime + offline demo weights
#   bash scripts/setup.sh --dev    # + test tools
# torch is installed first (scripts/install_torch.sh): without a GPU the CPU build from PyTorch's
# CPU index, so that pip never resolves PyPI's multi-GB CUDA build on a CPU machine; with nvidia-smi
# the default (CUDA) build. Override with MMSER_TORCH_SPEC="torch==X".
set -euo pipefail
cd "$(dirname "$0")/.."
extra="demo"
[[ "${1:-}" == "--dev" ]] && extra="dev"
PY="${PYTHON:-python3}"
VENV=".venv"

# espeak-ng synthesises the synthetic corpus (mmser synth). Best effort: apt as root.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing espeak-ng (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
      || echo "[setup] WARNING: could not install espeak-ng; 'mmser synth' will say what to install"
  else
    echo "[setup] WARNING: espeak-ng not found; install it (e.g. 'sudo apt-get install espeak-ng') for 'mmser synth'"
  fi
fi

stamp="$VENV/.mmser-setup-$extra"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "[setup] $VENV is up to date ($extra)"; exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # No GPU: PyTorch's CPU index first, then the default index (local wheel dir here). See the script.
  source scripts/install_torch.sh
  mmser_install_torch "${pip[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
fi
# (the filter hides a local pip config's noise about missing mirror folders)
"${pip[@]}" install -e ".[$extra]" 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -c "import mmser, torch; print('[setup] mmser', mmser.__version__, 'torch', torch.__version__)"
echo "$want" > "$stamp"
