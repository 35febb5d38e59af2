"""The unbiased pass@k estimator (Chen et al., 2021) per problem and overall."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n-c, k) / C(n, k)``: the chance that at least one of k samples drawn from n (c correct) passes."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n} c={c}")
    if k < 1 or k > n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def ks_for(n: int, ks: Sequence[int] = (1, 10, 100)) -> list[int]:
    """The ks that every problem has enough samples for."""
    return [k for k in ks if k <= n]


def score(passed: Mapping[str, Iterable[bool]], ks: Sequence[int] = (1, 10, 100)) -> dict[str, object]:
    """Per-problem and mean pass@k for each k that every problem can support."""
    counts = {task: [bool(p) for p in results] for task, results in passed.items()}
    if not counts:
        raise ValueError("no results to score")
    fewest = min(len(results) for results in counts.values())
    usable = ks_for(fewest, ks) or [1]
    per_problem = {
        task: {f"pass@{k}": pass_at_k(len(results), sum(results), k) for k in usable}
        for task, results in counts.items()
    }
    overall = {f"pass@{k}": float(np.mean([scores[f"pass@{k}"] for scores in per_problem.values()])) for k in usable}
    return {"overall": overall, "per_problem": per_problem, "n_min": fewest}
