"""The early-stopping scheduler's state across a sweep's interruption.

Tune's experiment checkpoint keeps the trials and the searcher but not the scheduler: a resumed sweep's ASHA would
start with empty rungs and compare the resumed trials only with each other, so whether a poor trial is stopped
would depend on which trial happens to report first. :class:`SchedulerState` writes ASHA's state (every trial's
value at each milestone) to a file at each result; :func:`restore_scheduler` loads it into the restored tuner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune


class SchedulerState(tune.Callback):
    def __init__(self, scheduler: Any, path: Path) -> None:
        self.scheduler = scheduler
        self.path = Path(path)

    def __getstate__(self) -> dict[str, Any]:  # pickled with the tuner; the live scheduler is attached on restore
        return {"scheduler": None, "path": self.path}

    def _save(self) -> None:
        if self.scheduler is not None and hasattr(self.scheduler, "_brackets"):  # ASHA (FIFO has no state)
            tmp = self.path.with_suffix(".tmp")
            self.scheduler.save(str(tmp))
            tmp.replace(self.path)

    def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
        self._save()

    def on_trial_complete(self, *args: Any, **kwargs: Any) -> None:
        self._save()


def restore_scheduler(tuner: Any, path: Path, log: Any) -> None:
    """Load the saved rungs into the restored tuner's scheduler and keep saving them."""
    try:
        internal = tuner._local_tuner  # Tuner.restore takes no scheduler: reach the one it unpickled
        scheduler = internal._tune_config.scheduler
        callbacks = internal._run_config.callbacks or []
    except AttributeError:
        log("resume: this Ray version hides the tuner's scheduler; early stopping restarts from empty rungs")
        return
    if Path(path).is_file() and hasattr(scheduler, "_brackets"):
        scheduler.restore(str(path))
        log("resume: the early-stopping scheduler's rungs restored (the ended trials' results count)")
    for callback in callbacks:
        if isinstance(callback, SchedulerState):
            callback.scheduler = scheduler
