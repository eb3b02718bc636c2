"""deepalign: align, merge and compare neural networks through their permutation symmetries."""
