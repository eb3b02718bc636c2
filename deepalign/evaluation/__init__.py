"""Evaluation: many pairs aligned and scored, curves, convergence, the scaling study,
benchmarks, statistics and the report."""
