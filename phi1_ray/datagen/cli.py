"""Command lines of the data-generation jobs: ``--config FILE``, ``--out DIR``, dotted overrides."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from phi1_ray.config import load_config, to_yaml
from phi1_ray.runtime import init_ray


def parse(cls: type, description: str, argv: Sequence[str] | None = None, fixed: Sequence[str] = ()) -> Any:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under configs/datagen/")
    parser.add_argument("--out", help="output directory (local, s3://, gs://)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.concurrency=32")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else []) + list(fixed)
    cfg = load_config(cls, args.config, overrides)
    print("# resolved config\n" + to_yaml(cfg), flush=True)
    return cfg


def generate_main(kind: str, description: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    from phi1_ray.datagen.config import GenerateConfig
    from phi1_ray.datagen.generate import run_generation

    cfg = parse(GenerateConfig, description, argv, fixed=[f"kind={kind}"])
    init_ray(cfg.ray)
    manifest = run_generation(cfg)
    summary = {"out": cfg.out, "rows": manifest["rows"], "rejected": manifest["rejected"], "usage": manifest["usage"]}
    print(json.dumps(summary), flush=True)
    return manifest
