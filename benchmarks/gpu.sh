#!/usr/bin/env bash
# Issue 11's GPU measurements in one command: the GPU benchmark preset (batch 128 and 32), a torch.profiler table of
# each configuration, eager and compiled side by side (ratios to the faster frozen ViT), the training loop's
# throughput over the pure step (benchmarks/loop_throughput.py), and scripts/gpu_smoke.sh. Results go to
# benchmarks/results/<UTC time>/ (or $RESULTS), which is then pasted into docs/benchmarks.md. Refuses to run without
# a CUDA GPU.
#
#   benchmarks/gpu.sh                       # uses `python` (or $PYTHON)
#   PYTHON=.venv/bin/python RESULTS=/tmp/gpu benchmarks/gpu.sh
# On an offline GPU machine without the pinned peft/datasets/evaluate, install them first from wheels
# (../shared/tools/gpu-wheels.sh).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
RESULTS=${RESULTS:-benchmarks/results/$(date -u +%Y%m%dT%H%M%SZ)}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA GPU visible to torch; these measurements need one (see docs/benchmarks.md)." >&2
    exit 1
fi
mkdir -p "$RESULTS"
echo "gpu.sh: results in $RESULTS"
"$PYTHON" - > "$RESULTS/machine.txt" <<'PY'
import platform, torch, transformers, peft
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| transformers", transformers.__version__, "| peft", peft.__version__, "| python", platform.python_version())
PY
cat "$RESULTS/machine.txt"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true

BENCH=("$PYTHON" benchmarks/benchmark_lpt.py --preset gpu)
# 1. The preset at B = 128 with the profile of every configuration (CUDA self time, 3 inference calls; train too).
PROFILES=()
for config in frozen vpt_deep lpt_reference lpt_phase1 lpt_phase2; do
    PROFILES+=(--profile "$config:infer")
done
PROFILES+=(--profile lpt_phase1:train --profile lpt_phase2:train)
echo "gpu.sh: [1/3] preset, batch 128, with profiles"
"${BENCH[@]}" --batch-size 128 "${PROFILES[@]}" --json-out "$RESULTS/b128.json" --markdown-out "$RESULTS/b128.md" \
    2>&1 | tee "$RESULTS/b128.log"
# 2. B = 32 and B = 1 (launch-bound), inference ratios; memory as a side product.
echo "gpu.sh: [2/3] preset, batch sweep 32,1"
"${BENCH[@]}" --batch_sizes 32,1 --configs frozen lpt_phase1 lpt_phase2 --json-out "$RESULTS/sweep.json" \
    --markdown-out "$RESULTS/sweep.md" 2>&1 | tee "$RESULTS/sweep.log"
# 2b. Compiled beside eager (--compile both): frozen, phase 1 and phase 2 eager and torch.compile'd (default mode) in
#     the same rounds, B = 128 and 32; ratios of each to the per-round floor min(eager, compiled frozen), and compiled
#     over eager frozen. Compiled training steps: `--compile replace` (every configuration compiled) if wanted.
echo "gpu.sh: [2b/3] compiled beside eager, batch sweep 128,32"
"${BENCH[@]}" --batch_sizes 128,32 --compile both --configs frozen lpt_phase1 lpt_phase2 --no-memory \
    --json-out "$RESULTS/sweep-compiled.json" --markdown-out "$RESULTS/sweep-compiled.md" \
    2>&1 | tee "$RESULTS/sweep-compiled.log"
# 2c. End to end: images/s of train_phase (DataLoader with 8 workers, dual sampler, objective, SGD) over the pure
#     step on pre-collated device batches; ViT-B/16 random weights at 224 px, synthetic 100-class LT (~5,900
#     training images: 46 dual steps of 2 x 128), bf16. Target loop / pure >= 0.90.
LOOP=("$PYTHON" benchmarks/loop_throughput.py --device cuda --model_name_or_path random-vit-b16 --image_size 224
      --dataset synthetic --num_classes 100 --n_max 150 --batch_size 128 --num_workers 8 --mixed_precision bf16
      --warmup_steps 5 --steps 30 --repeats 3)
for phase in 1 2; do
    echo "gpu.sh: [2c/3] loop throughput, phase $phase"
    "${LOOP[@]}" --phase "$phase" --json-out "$RESULTS/loop-phase$phase.json" 2>&1 | tee "$RESULTS/loop-phase$phase.log"
done
# 3. The GPU smoke tests (written by another change; run when present).
if [[ -x scripts/gpu_smoke.sh ]]; then
    echo "gpu.sh: [3/3] scripts/gpu_smoke.sh"
    PYTHON="$PYTHON" OUT="$RESULTS/smoke" scripts/gpu_smoke.sh 2>&1 | tee "$RESULTS/smoke.log"
else
    echo "gpu.sh: [3/3] scripts/gpu_smoke.sh not present, skipped" | tee "$RESULTS/smoke.log"
fi
echo "gpu.sh: done; results in $RESULTS"
