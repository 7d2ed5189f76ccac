"""The rules lane: fraud rules evaluated in memory on every decoded batch, beside the writer."""
