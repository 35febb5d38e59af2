"""Exercises mined from real code: every top-level function with a docstring becomes a (prompt, completion) pair.

The prompt is the signature plus the docstring, the completion the body after it: the CodeExercises format of the
paper, available offline from any code tree (the standard library included), so finetuning needs no teacher.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    line: int
    """1-based line of the ``def`` in its file."""
    prompt: str
    completion: str


def _trivial(body: str) -> bool:
    lines = [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return not lines or all(
        ln in ("pass", "...", "raise NotImplementedError", "raise NotImplementedError()") for ln in lines
    )


def mine_exercises(source: str) -> Iterator[Exercise]:
    """The exercises of one Python file; a file that does not parse yields none."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc = node.body[0]
        if len(node.body) < 2 or doc.end_lineno is None or node.end_lineno is None:
            continue
        prompt = "\n".join(lines[node.lineno - 1 : doc.end_lineno]) + "\n"
        completion = "\n".join(lines[doc.end_lineno : node.end_lineno]) + "\n"
        if _trivial(completion):
            continue
        yield Exercise(node.lineno, textwrap.dedent(prompt), completion)
