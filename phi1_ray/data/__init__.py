"""Reading, cleaning, tokenizing and packing corpora. Plain functions here; Ray Data only in ``ray_pipeline``."""
