"""Two "nodes" on one machine: `accelerate launch --num_machines 2`, one CPU process per node joined over gloo.

Both ranks are launched as separate `accelerate launch` commands, exactly as on two machines (node 1 reaching node 0
at --main_process_ip); the run trains both phases, is killed in phase 1, resumes from its checkpoint, and writes one
loadable adapter. The output folder is shared by the two nodes, as a multi-node run needs (see docs/training.md).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_injection import crash_at
from peft import PeftModel

from lpt_peft.backbones import tiny_random_vit

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--dataset", "synthetic", "--model_name_or_path", "tiny-random", "--image_size", "32",
    "--num_classes", "6", "--n_max", "40", "--imbalance", "10", "--val_per_class", "4",
    "--batch_size", "8", "--num_groups", "4", "--shared_layers", "2", "--num_workers", "0",
    "--report_to", "none", "--learning_rate", "0.5", "--epochs_phase1", "2", "--epochs_phase2", "1",
    "--max_steps_per_epoch", "3", "--checkpointing_steps", "2", "--lr_trial_steps", "2",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(output_dir: Path, extra=(), env=None, timeout=300):
    """Start node 0 and node 1 (one process each) and wait for both; returns their CompletedProcess-like results."""
    port = free_port()
    # --multi_gpu makes accelerate start torchrun (rendezvous, RANK/WORLD_SIZE); without a visible GPU the training
    # code joins the processes into a gloo group. `--cpu` would start one lone process per node instead.
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    procs = []
    for rank in (0, 1):
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
            str(ROOT / "examples" / "train_lpt.py"), *COMMON, "--output_dir", str(output_dir), *extra,
        ]  # fmt: skip
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs.append(subprocess.Popen(command, env=full_env, cwd=ROOT, text=True, **pipes))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_nodes_train_both_phases_resume_after_a_kill_and_write_one_adapter(tmp_path):
    out = tmp_path / "two_nodes"
    crashed = launch_two_nodes(out, env=crash_at("1:5"))
    assert all(code != 0 for code, _, _ in crashed), [err[-2000:] for _, _, err in crashed]
    assert not (out / "phase1").exists() and (out / "checkpoints" / "latest").is_file()
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert (state["phase"], state["global_step"]) == (1, 4)  # the state of step 4 survived the kill at step 5
    assert state["run"]["num_processes"] == 2 and state["run"]["global_batch"] == 16

    resumed = launch_two_nodes(out, extra=["--resume_from_checkpoint", "latest"])
    for code, _, stderr in resumed:
        assert code == 0, stderr[-4000:]
    log = resumed[0][2]
    assert "Training with 2 process(es)" in log and "global batch 16" in log
    assert "Resumed phase 1" in log
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("phase")) == ["phase1", "phase2"]
    model = PeftModel.from_pretrained(tiny_random_vit(32), out / "phase2").eval()
    logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 6) and torch.isfinite(logits).all()
    rows = json.loads((out / "results.json").read_text())
    assert set(rows) == {"LPT phase 1", "LPT phase 2", "LPT (best phase by val)"}
