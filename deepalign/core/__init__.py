"""The weight-space core: networks as WeightSpace, their permutation specs, forward passes,
assignment solvers, data sets and linear-mode-connectivity metrics."""
