"""Keyed stream jobs hooked into the engine (see :mod:`headrace.jobs.base`)."""
