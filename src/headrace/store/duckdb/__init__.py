"""The DuckDB store: one embedded database file."""
