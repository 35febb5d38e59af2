"""Checks on teacher output: what is kept, and why the rest is rejected (one reason per item, counted).

Textbook sections need Python code blocks that parse, a length within bounds and no refusal. Exercises need one
function that parses, with a docstring and a non-trivial body; they are split into ``prompt`` (signature +
docstring) and ``completion`` (body), the finetuning format.
"""

from __future__ import annotations

import ast
import re
import textwrap

from phi1_ray.data.exercises import mine_exercises

CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, (but )?i|i can(no|')t (help|assist|do|write|provide)|i am unable|"
    r"i'?m unable|as an ai( language model)?|i won'?t be able)",
    re.IGNORECASE,
)
BOILERPLATE = re.compile(
    r"^\s*(sure|certainly|of course|here(\s+is|'s)|absolutely)[^\n]{0,80}[:!.]\s*\n", re.IGNORECASE
)


def code_blocks(text: str) -> list[str]:
    return [block for block in CODE_BLOCK.findall(text)]


def _parses(code: str) -> bool:
    try:
        ast.parse(textwrap.dedent(code))
    except (SyntaxError, ValueError):
        return False
    return True


def strip_boilerplate(text: str) -> str:
    """Drop a chatty first line ("Sure! Here is ...:"), which is not textbook material."""
    return BOILERPLATE.sub("", text, count=1).strip() + "\n"


def check_textbook(reply: str | None, min_chars: int, max_chars: int, min_blocks: int) -> tuple[str | None, str]:
    """(rejection reason or None, cleaned text)."""
    if reply is None:
        return "request_failed", ""
    if REFUSAL.search(reply[:200]):
        return "refusal", ""
    text = strip_boilerplate(reply)
    blocks = code_blocks(text)
    if len(blocks) < min_blocks:
        return "no_code", ""
    if not all(_parses(block) for block in blocks):
        return "code_does_not_parse", ""
    if len(text) < min_chars:
        return "too_short", ""
    if len(text) > max_chars:
        return "too_long", ""
    return None, text


def check_exercise(reply: str | None, min_body_lines: int = 2) -> tuple[str | None, str, str]:
    """(rejection reason or None, prompt, completion) of the first function of the reply."""
    if reply is None:
        return "request_failed", "", ""
    if REFUSAL.search(reply[:200]):
        return "refusal", "", ""
    blocks = code_blocks(reply)
    code = textwrap.dedent(blocks[0]) if blocks else reply
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return ("code_does_not_parse" if blocks else "no_code"), "", ""
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not functions:
        return "no_function", "", ""
    if ast.get_docstring(functions[0]) is None:
        return "no_docstring", "", ""
    mined = next(iter(mine_exercises(code)), None)
    if mined is None:
        return "trivial_body", "", ""
    body = [ln for ln in mined.completion.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(body) < min_body_lines:
        return "trivial_body", "", ""
    return None, mined.prompt, mined.completion
