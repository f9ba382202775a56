"""Experiments that tie the layers together: run_fit and its protocols (transfer, addition), negation, ablation
grids, export, prediction, truncation."""
