"""Synthetic textbook sections from a teacher LLM (any OpenAI-compatible endpoint), validated, as Parquet shards.

    python jobs/generate_textbooks.py --config configs/datagen/textbooks.yaml [--out DIR] [key=value ...]

Resumable: a finished output is skipped; an interrupted one is run again and pays only for replies its teacher
cache lacks.
"""

from phi1_ray.cli import run_main
from phi1_ray.datagen.cli import generate_main

if __name__ == "__main__":
    run_main(lambda: generate_main("textbooks", __doc__))
