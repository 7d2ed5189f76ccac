"""The reference fintech deployment: schema, workload generator, history loader."""
