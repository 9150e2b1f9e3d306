"""recipes/train.py with every optimizer step slowed by $SLOW_STEP_S seconds (test tooling: leaves time to kill or
signal a rank in the middle of a multi-process run)."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

import train  # noqa: E402

from neuclip_hf.trainer import NeuCLIPTrainer  # noqa: E402

_step = NeuCLIPTrainer.training_step


def slow_step(self, *args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_STEP_S", "0")))
    return _step(self, *args, **kwargs)


NeuCLIPTrainer.training_step = slow_step

if __name__ == "__main__":
    train.main()
    train.end_process_group()
