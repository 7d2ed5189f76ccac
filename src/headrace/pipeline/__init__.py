"""The pipeline definition: ``headrace.yaml`` as typed models, loading and validation."""
