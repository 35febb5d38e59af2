"""Data generation: teacher calls, synthetic textbooks and exercises, quality filter, dedup, decontamination."""
