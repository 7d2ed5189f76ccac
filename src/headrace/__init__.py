"""headrace: real-time analytics on PostgreSQL, from the write-ahead log to live dashboards."""

__version__ = "0.1.0"
