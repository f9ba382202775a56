"""Experiments that tie the layers together: held-out transfer (run_fit), negation, ablation grids, export, truncation."""
