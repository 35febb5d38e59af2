"""Prompt templates of the synthetic data, with the per-item seeds that make the outputs diverse.

Textbooks (the paper: constraints on topic and target audience, plus random words): topic x subtopic x audience x
style x words. Exercises (the paper: diversity mainly from constrained function names): a verb_noun function name,
a topic and an audience. Every draw comes from ``random.Random((seed, index))``: the same config gives the same
prompts, so a rerun finds its replies in the cache.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from phi1_ray.errors import ConfigError

TEXTBOOK_TEMPLATE = (
    "Write a section of a Python programming textbook on {topic}, about {subtopic}, for {audience}, in the form "
    "of {style}. Explain the concept in clear prose, then show it with Python code in ```python blocks that run "
    "as written, and end with one short practice question. Use the words {words} somewhere in the text."
)

EXERCISE_TEMPLATE = (
    "Write one Python exercise for {audience} practising {topic}: a function named `{name}` with type hints and "
    "a docstring that states the task and gives one example, followed by a correct, complete implementation. "
    "Reply with the function only, in one ```python block."
)

ANNOTATION_TEMPLATE = (
    "Rate the educational value of the following code for a student whose goal is to learn basic coding "
    "concepts, on a scale from 0 (none) to 10 (excellent). Reply with 'Score: N' and one sentence.\n\n"
    "```python\n{code}\n```"
)


def load_topics(path: str | Path, needed: tuple[str, ...]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"topics file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    for key in needed:
        values = data.get(key)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: {key!r} must be a non-empty list")
    for i, topic in enumerate(data.get("topics", [])):
        if not isinstance(topic, dict) or not topic.get("name") or not topic.get("subtopics"):
            raise ConfigError(f"{path}: topics[{i}] needs a name and a non-empty subtopics list")
    return data


def textbook_items(topics: dict[str, Any], num_items: int, seed: int, random_words: int) -> list[dict[str, Any]]:
    items = []
    for index in range(num_items):
        rng = random.Random(f"textbook:{seed}:{index}")
        topic = rng.choice(topics["topics"])
        seeds = {
            "topic": topic["name"],
            "subtopic": rng.choice(topic["subtopics"]),
            "audience": rng.choice(topics["audiences"]),
            "style": rng.choice(topics["styles"]),
            "words": ", ".join(rng.sample(topics["words"], min(random_words, len(topics["words"])))),
        }
        items.append({"id": f"textbook-{seed}-{index}", **seeds, "prompt": TEXTBOOK_TEMPLATE.format(**seeds)})
    return items


def exercise_items(topics: dict[str, Any], num_items: int, seed: int) -> list[dict[str, Any]]:
    items = []
    for index in range(num_items):
        rng = random.Random(f"exercise:{seed}:{index}")
        name = f"{rng.choice(topics['function_verbs'])}_{rng.choice(topics['function_nouns'])}"
        seeds = {
            "function_name": name,
            "topic": rng.choice(topics["topics"])["name"],
            "audience": rng.choice(topics["audiences"]),
        }
        prompt = EXERCISE_TEMPLATE.format(name=name, topic=seeds["topic"], audience=seeds["audience"])
        items.append({"id": f"exercise-{seed}-{index}", **seeds, "prompt": prompt})
    return items


def annotation_prompt(code: str, max_chars: int) -> str:
    return ANNOTATION_TEMPLATE.format(code=code[:max_chars])
