"""Benchmarks: scripts that time ours against a baseline in one run and print ratios."""
