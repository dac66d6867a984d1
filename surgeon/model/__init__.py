"""The model's shape: which tensors are linear weights to split (targets), per-module ranks and
alphas (PEFT's rank_pattern/alpha_pattern), and where a module sits in a live model (slots).

May import surgeon.format (tensor headers, dtypes) and surgeon.errors; never methods or anything above.
"""
