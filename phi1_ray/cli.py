"""What every job's command line shares: ``--config FILE``, ``--run-dir DIR``, dotted overrides, the resolved
config printed at start, and user errors printed as one line (exit status 2) instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from pydantic import BaseModel

from phi1_ray.config import load_config, to_yaml
from phi1_ray.errors import Phi1Error

C = TypeVar("C", bound=BaseModel)


def run_main(main: Callable[[], object]) -> None:
    """Run a job's main; a :class:`Phi1Error` becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        main()
    except Phi1Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def config_from_argv(cls: type[C], description: str, argv: Sequence[str] | None = None, fixed: Sequence[str] = ()) -> C:
    """Parse ``--config FILE [--run-dir DIR] [key.path=value ...]`` into a validated, printed config.

    ``fixed`` overrides apply last (``job=finetune`` for the finetuning job, whatever the file says)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under configs/")
    parser.add_argument("--run-dir", help="where outputs and the MLflow store go (overrides run_dir)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layer=4")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = load_config(cls, args.config, overrides + list(fixed))
    print("# resolved config\n" + to_yaml(cfg), flush=True)
    return cfg
