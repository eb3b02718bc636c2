"""Model zoos: training many networks at once, resumably, and reading them back."""
