"""Benchmarks behind ``headrace bench``: rates, ratios against peers, one JSON line last."""
