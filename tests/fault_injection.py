"""Fault injection for the tests that kill a training run: a training callback loaded by the launched run through
`$LPT_TRAINING_CALLBACKS` (read once at the start of `run_training`), so the training loop holds no test-only code."""

import os
from pathlib import Path

from lpt_peft.training.loop import CALLBACKS_ENV, TrainingCallback

STEP_ENV = "LPT_FAULT_INJECT_STEP"


class CrashAtStep(TrainingCallback):
    """Exit hard (`os._exit(17)`, no cleanup, as `kill -9` would) after the optimizer update `$LPT_FAULT_INJECT_STEP`
    (`<phase>:<global step>`), after that step's checkpoint if one was due."""

    def __init__(self) -> None:
        self.target = os.environ[STEP_ENV]

    def on_step_end(self, phase, state) -> None:
        if self.target == f"{phase}:{state.global_step}":
            os._exit(17)


def crash_at(step: str) -> dict[str, str]:
    """Environment for a launched run that crashes at `step` (`"<phase>:<global step>"`)."""
    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {CALLBACKS_ENV: "fault_injection:CrashAtStep", STEP_ENV: step, "PYTHONPATH": path}
