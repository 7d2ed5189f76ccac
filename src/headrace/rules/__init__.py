"""Fraud rules: one module per rule, each a keyed stream job (:mod:`headrace.rules.registry`).

See ``docs/alerts.md`` for what each rule detects, its state and thresholds.
"""
