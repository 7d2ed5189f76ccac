"""Analytical stores: the contract (:mod:`headrace.store.base`) and its backends."""
