#!/usr/bin/env bash
# CI packaging checks (called by .ci/run; docs/deployment.md): build the sdist and wheel, check them with twine,
# install the wheel into a fresh venv with the core profile and run the inference smoke test there, then add the
# [train] profile and run a few training steps. Usage: bash scripts/ci_package.sh [WORK_DIR]
# PYTHON (default .venv/bin/python) must have `build` and `twine` (the [dev] profile).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON:-.venv/bin/python}
work=${1:-$(mktemp -d)}
mkdir -p "$work"
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*"; }
# --no-compile: byte-compiling all of torch and transformers at install time costs more than the imports need.
# A failing install fails the script (with pip's output); a passing one prints only what is not pip's index noise.
quiet_pip() {
  local log
  log=$("$work/venv/bin/pip" install -q --no-compile "$@" 2>&1) || { echo "$log" >&2; return 1; }
  grep -v "^WARNING: Location" <<<"$log" || true
}

step "build sdist and wheel"
rm -rf "$work/dist"
"$python" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
ls "$work/dist"
"$python" -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/lpt_peft-*.whl)
# The metric script is package data: a wheel without it cannot compute shot-group accuracy with `evaluate`.
"$python" -c "import sys, zipfile; name = 'lpt_peft/evaluation/metric_scripts/shot_accuracy/shot_accuracy.py'
assert name in zipfile.ZipFile(sys.argv[1]).namelist(), f'{name} is not in the wheel'" "$wheel"

step "fresh venv, core profile"
rm -rf "$work/venv"
python3 -m venv "$work/venv"
vpython="$work/venv/bin/python"
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
quiet_pip torch==2.13.0
quiet_pip "$wheel"
step "core smoke test"
"$vpython" - <<'EOF'
import importlib.util
present = [m for m in ("datasets", "evaluate", "matplotlib", "tensorboard", "onnx", "onnxruntime") if importlib.util.find_spec(m)]
assert not present, f"the core install brought training extras: {present}"
EOF
# -I: import lpt_peft from the venv, never from this checkout.
(cd "$work" && "$vpython" -I "$repo/scripts/smoke_core.py" "$work/core") >"$work/core.json"
"$vpython" - "$work/core.json" "$work/venv" <<'EOF'
import json, sys
report = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
assert report["lpt_peft_file"].startswith(sys.argv[2]), report["lpt_peft_file"]
assert "pip install 'lpt-peft[train]'" in report["training_import_error"], report["training_import_error"]
print("core smoke test passed:", report["lpt_peft_file"], "|", report["training_import_error"])
EOF

step "same venv, [train] profile: a tiny training run"
quiet_pip "$wheel[train]"
step "training run"
rm -rf "$work/train"
(cd "$work" && "$vpython" -I "$repo/examples/train_lpt.py" \
  --dataset synthetic --model_name_or_path tiny-random --image_size 32 --num_classes 6 --n_max 40 --imbalance 10 \
  --val_per_class 4 --batch_size 8 --num_groups 4 --shared_layers 2 --num_workers 0 --report_to none \
  --epochs_phase1 1 --epochs_phase2 1 --max_steps_per_epoch 2 --baselines none --output_dir "$work/train") \
  >"$work/train.log" 2>&1 || { tail -40 "$work/train.log"; exit 1; }
for f in phase1/adapter_model.safetensors phase2/adapter_model.safetensors phase2/README.md results.json; do
  [ -f "$work/train/$f" ] || { echo "the training run wrote no $f" >&2; tail -40 "$work/train.log"; exit 1; }
done
step "packaging checks passed"
