"""Training: the LR schedule, DeepSpeed settings and (next) the step loop that Ray Train workers run."""
