"""Benchmarks behind ``headrace bench``: each prints rates, ratios against peers, and a JSON line."""
