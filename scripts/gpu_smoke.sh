#!/usr/bin/env bash
# GPU smoke check, one command: the tests whose code paths differ on a GPU, then a short bf16 training run on the GPU
# whose adapter is reloaded and checked. The default test suite runs on CPU-only and one-GPU machines; this script is
# what covers CUDA itself. Exits 0 with a message when no CUDA GPU is visible.
#
#   scripts/gpu_smoke.sh                 # uses `python` (or $PYTHON), writes to a temporary folder
#   PYTHON=.venv/bin/python OUT=/tmp/smoke scripts/gpu_smoke.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing to check here."
    exit 0
fi
"$PYTHON" - <<'EOF'
import torch
print(f"gpu_smoke: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
EOF
PRECISION=$("$PYTHON" -c "import torch; print('bf16' if torch.cuda.is_bf16_supported() else 'fp16')")
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
echo "gpu_smoke: outputs in $OUT, mixed precision $PRECISION"

# 1. Tests with GPU-dependent paths: device placement and autocast (inference, model, losses), in-process training,
#    resume and options on the GPU (the library picks cuda when it is visible). Multi-process tests force CPU/gloo
#    by design and are left to the default suite.
echo "gpu_smoke: [1/2] tests"
"$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_inference.py tests/test_lpt_model.py tests/test_losses.py tests/test_resume.py tests/test_options.py

# 2. A short mixed-precision training run on one GPU, killed hard mid-phase 1 (tests/fault_injection.py, loaded by the
#    run through $LPT_TRAINING_CALLBACKS) after a step checkpoint, resumed, and compared with an uninterrupted run:
#    both phases' adapters must be identical. Then a reload of the adapter on the GPU.
echo "gpu_smoke: [2/2] $PRECISION training run on the GPU: uninterrupted, and killed + resumed"
# cuBLAS picks its algorithms per call unless told to be deterministic; the two runs must compute the same.
export CUBLAS_WORKSPACE_CONFIG=:4096:8
LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision "$PRECISION"
        --dynamo_backend no)
RUN=(
    examples/train_lpt.py --dataset synthetic --model_name_or_path tiny-random --image_size 32 --num_classes 6
    --n_max 40 --imbalance 10 --val_per_class 4 --batch_size 8 --num_groups 4 --shared_layers 2 --num_workers 0
    --report_to none --epochs_phase1 2 --epochs_phase2 1 --max_steps_per_epoch 4 --checkpointing_steps 2
    --mixed_precision "$PRECISION"
)
"${LAUNCH[@]}" "${RUN[@]}" --output_dir "$OUT/straight" 2>&1 | tee "$OUT/straight.log"
grep -q "on cuda" "$OUT/straight.log" || { echo "gpu_smoke: FAILED, the run did not train on cuda"; exit 1; }
# Killed (os._exit(17), as kill -9) after update 5 of phase 1: the last checkpoint is from update 4.
set +e
LPT_TRAINING_CALLBACKS=fault_injection:CrashAtStep LPT_FAULT_INJECT_STEP=1:5 PYTHONPATH="$PWD/tests:$PYTHONPATH" \
    "${LAUNCH[@]}" "${RUN[@]}" --output_dir "$OUT/run" > "$OUT/killed.log" 2>&1
KILLED=$?
set -e
if [ "$KILLED" -eq 0 ] || [ -e "$OUT/run/phase1" ]; then
    echo "gpu_smoke: FAILED, the run to be killed was not interrupted in phase 1 (exit $KILLED)"; exit 1
fi
"${LAUNCH[@]}" "${RUN[@]}" --output_dir "$OUT/run" --resume_from_checkpoint latest 2>&1 | tee "$OUT/resume.log"
grep -q "on cuda" "$OUT/resume.log" || { echo "gpu_smoke: FAILED, the resumed run did not train on cuda"; exit 1; }
grep -q "Resumed phase 1 from .*phase1-epoch0001-step00000004" "$OUT/resume.log" \
    || { echo "gpu_smoke: FAILED, the resume did not continue from the step-4 checkpoint of phase 1"; exit 1; }
"$PYTHON" - "$OUT/straight" "$OUT/run" <<'EOF'
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file

import lpt_peft  # noqa: F401  (registers LPT with peft)
from lpt_peft.backbones import tiny_random_vit

straight, run = Path(sys.argv[1]), Path(sys.argv[2])
for phase in ("phase1", "phase2"):
    expected, resumed = (load_file(d / phase / "adapter_model.safetensors") for d in (straight, run))
    assert expected.keys() == resumed.keys(), f"{phase}: other tensors after resume"
    differ = {k: float((expected[k].float() - resumed[k].float()).abs().max()) for k in expected
              if not torch.equal(expected[k], resumed[k])}
    assert not differ, f"{phase}: the killed and resumed run differs from the uninterrupted one: {differ}"
print("gpu_smoke: killed + resumed run == uninterrupted run (both phases, bit-identical adapters)")
weights = load_file(run / "phase2" / "adapter_model.safetensors")
assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values()), "bad adapter weights"
model = PeftModel.from_pretrained(tiny_random_vit(32), run / "phase2").to("cuda").eval()
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
    logits = model(pixel_values=torch.randn(4, 3, 32, 32, device="cuda")).logits
assert logits.shape == (4, 6) and torch.isfinite(logits).all(), logits
print("gpu_smoke: adapter reloaded on", logits.device, "logits", tuple(logits.shape), "finite")
EOF
echo "gpu_smoke: OK"
