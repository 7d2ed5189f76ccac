"""Scores kept per key by stream jobs (the account health score)."""
