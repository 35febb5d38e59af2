"""Stage records: what each pipeline stage ran on, kept in ``run_dir/stages/<stage>.json``.

A record holds the ids of the stages the stage depends on and a hash of its settings. :class:`Stages` runs a stage
unless its record says finished, its inputs and settings are unchanged and its outputs exist; it says why in one
line either way. Deleting a stage's output (or ``rerun=[stage]``) runs it again, and the stages that depend on it
follow because their input changed; an interrupted stage resumes from what it left. Records are written
atomically: a crash leaves the old record or the new one.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi1_ray import storage


def log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


@dataclass
class Stage:
    name: str
    deps: tuple[str, ...]
    outputs: list[str]
    """Directories or files (local or URIs) the stage writes; all must exist for it to count as done."""
    settings: Any
    """What the stage's result depends on besides its inputs (hashed; a change reruns it)."""
    run: Callable[[], dict[str, Any]]
    uses_ray: bool = False


def fingerprint(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Stages:
    """Runs stages in order, skipping the finished ones whose inputs and settings did not change."""

    run_dir: Path
    rerun: set[str] = field(default_factory=set)
    start_ray: Callable[[], None] | None = None
    """Called before the first stage that uses Ray runs (a pipeline whose stages are all done starts none)."""
    ids: dict[str, str] = field(default_factory=dict)
    report: dict[str, str] = field(default_factory=dict)

    def marker(self, name: str) -> Path:
        return self.run_dir / "stages" / f"{name}.json"

    def run(self, stage: Stage) -> dict[str, Any]:
        record = storage.read_json(self.marker(stage.name))
        inputs = {d: self.ids[d] for d in stage.deps if d in self.ids}
        settings = fingerprint(stage.settings)
        missing = [o for o in stage.outputs if not storage.exists(o)]
        if self._done(stage, record, inputs, settings, missing):
            where = ", ".join(stage.outputs) if stage.outputs else "nothing to write"
            log(f"{stage.name}: finished earlier ({where}), skipped")
            self.ids[stage.name] = record["id"]
            self.report[stage.name] = "skipped"
            return record["summary"]
        why, clear = self._why(stage, record, inputs, settings, missing)
        if clear:
            for out in stage.outputs:
                if storage.exists(out):
                    log(f"{stage.name}: removing {out} (stale)")
                    storage.remove(out)
        log(f"{stage.name}: running ({why})")
        return self._execute(stage, inputs, settings)

    def _done(
        self, stage: Stage, record: dict | None, inputs: dict[str, str], settings: str, missing: list[str]
    ) -> bool:
        return (
            record is not None
            and record["status"] == "finished"
            and record["inputs"] == inputs
            and record["settings"] == settings
            and not missing
            and stage.name not in self.rerun
        )

    def _why(
        self, stage: Stage, record: dict | None, inputs: dict[str, str], settings: str, missing: list[str]
    ) -> tuple[str, bool]:
        """Why a stage runs, and whether what it left earlier goes first (a resumed stage keeps it)."""
        if stage.name in self.rerun:
            return "rerun requested", True
        if record is None:  # a first run, or outputs of an earlier version: whatever is there is resumed
            return "not run yet", False
        if record["inputs"] != inputs:
            changed = sorted(k for k in set(record["inputs"]) | set(inputs) if record["inputs"].get(k) != inputs.get(k))
            return f"{', '.join(changed)} changed since it ran", True
        if record["settings"] != settings:
            return "its settings changed", True
        if record["status"] != "finished":
            return "interrupted last time, resuming", False
        return f"{', '.join(missing)} missing", True

    def _execute(self, stage: Stage, inputs: dict[str, str], settings: str) -> dict[str, Any]:
        path = self.marker(stage.name)
        base = {"stage": stage.name, "inputs": inputs, "settings": settings, "outputs": stage.outputs}
        storage.write_json(path, {**base, "status": "running", "started": time.time()})
        if stage.uses_ray and self.start_ray is not None:
            self.start_ray()
            self.start_ray = None
        start = time.perf_counter()
        summary = stage.run()
        seconds = time.perf_counter() - start
        record = {**base, "status": "finished", "id": uuid.uuid4().hex[:12], "seconds": round(seconds, 1)}
        record["summary"] = json.loads(json.dumps(summary, default=str))
        storage.write_json(path, record)
        self.ids[stage.name] = record["id"]
        self.report[stage.name] = f"ran in {seconds:.1f} s"
        return record["summary"]

    def skip(self, name: str, why: str) -> None:
        log(f"{name}: not run ({why})")
        self.report[name] = f"not run ({why})"
