"""Benchmarks (`make bench`): side-by-side with a reference in the same run, printed as ratios."""
