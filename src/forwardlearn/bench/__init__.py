"""Benchmarks: cost (time, memory, gradient quality) and accuracy of every rule, side by side."""
