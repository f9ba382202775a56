"""The composition engine: image-tower forward passes with per-sample or batch-shared task-vector coefficients."""
