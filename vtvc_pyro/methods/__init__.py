"""The baselines: training-free merges (merges), learned shared coefficients (learned) and their registry (baselines)."""
