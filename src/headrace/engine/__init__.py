"""The incremental engine: mirrors, history and rollups maintained from change batches."""
