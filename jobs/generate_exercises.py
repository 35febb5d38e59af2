"""CodeExercises: docstring exercises from a teacher LLM and/or mined from real code (no teacher), as Parquet shards
of (prompt, completion) records.

    python jobs/generate_exercises.py --config configs/datagen/exercises.yaml [--out DIR] [key=value ...]

Resumable: a finished output is skipped; an interrupted one is run again and pays only for replies its teacher
cache lacks.
"""

from phi1_ray.cli import run_main
from phi1_ray.datagen.cli import generate_main

if __name__ == "__main__":
    run_main(lambda: generate_main("exercises", __doc__))
