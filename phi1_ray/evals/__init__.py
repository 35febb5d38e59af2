"""Evaluation: benchmarks (HumanEval, MBPP, custom JSONL), completion generation, the execution sandbox, pass@k."""
