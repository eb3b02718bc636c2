"""DEEP-ALIGN (Navon et al., ICML 2024): a learned, permutation-equivariant aligner."""
