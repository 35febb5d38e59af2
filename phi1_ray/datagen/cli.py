"""The data-generation jobs' shared main: ``jobs/generate_textbooks.py`` and ``jobs/generate_exercises.py`` take the
command line of every job (:func:`phi1_ray.cli.config_from_argv`: ``--config FILE``, ``--out DIR``, dotted
overrides) and differ only in ``kind``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from phi1_ray.cli import config_from_argv
from phi1_ray.runtime import init_ray


def generate_main(kind: str, description: str | None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Generate ``kind`` (textbooks or exercises) from the command line; prints the summary as the last line."""
    from phi1_ray.datagen.config import GenerateConfig
    from phi1_ray.datagen.generate import run_generation

    cfg = config_from_argv(GenerateConfig, description, argv, fixed=[f"kind={kind}"])
    init_ray(cfg.ray)
    manifest = run_generation(cfg)
    summary = {"out": cfg.out, "rows": manifest["rows"], "rejected": manifest["rejected"], "usage": manifest["usage"]}
    print(json.dumps(summary), flush=True)
    return manifest
