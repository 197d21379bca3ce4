"""A study task for tests/test_studies.py: the built-in linreg task with planted faults.

- ``IA_TEST_KILL_AT=<epoch>:<marker file>`` in the environment: the process training epoch
  <epoch> SIGKILLs itself after the epoch's first step, once (the marker file says it happened).
- an lr of exactly `RAISING_LR` makes `train_epoch` raise (a branch whose training raises).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from instrumented_adam.demo.study_tasks import DemoStudyTask

RAISING_LR = 0.0123
KILL_ENV = "IA_TEST_KILL_AT"


class FaultyTask(DemoStudyTask):
    def train_epoch(self, model, optimizer, epoch, seed):
        if optimizer.param_groups[0]["lr"] == RAISING_LR:
            raise RuntimeError(f"planted failure at lr={RAISING_LR}")
        plan = os.environ.get(KILL_ENV)
        if plan:
            at, marker = plan.split(":", 1)
            if int(at) == epoch and not Path(marker).exists():
                original = optimizer.step

                def step_then_die(*args, **kwargs):
                    out = original(*args, **kwargs)
                    Path(marker).write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)
                    return out

                optimizer.step = step_then_die
                try:
                    return super().train_epoch(model, optimizer, epoch, seed)
                finally:
                    optimizer.step = original
        return super().train_epoch(model, optimizer, epoch, seed)


def make_task(**kwargs):
    return FaultyTask("linreg", **kwargs)
