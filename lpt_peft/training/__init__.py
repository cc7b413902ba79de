"""LPT's two-phase training recipe (paper Sec. 3.3-3.4) on top of accelerate.

`arguments` (every option of `examples/train_lpt.py`), `losses` (A-GCL and the phase-2 objective), `samplers`
(instance-balanced, class-balanced and dual sampling), `baselines` (linear probes), and `run` (loaders, checkpoints,
the loop and the whole run with results, plots and the Hub push).
"""

from lpt_peft.training.arguments import LPTTrainingArguments, parse_training_args
from lpt_peft.training.run import evaluate_adapter, run_training, train_phase

__all__ = ["LPTTrainingArguments", "evaluate_adapter", "parse_training_args", "run_training", "train_phase"]
