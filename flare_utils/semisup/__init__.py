"""Semi-supervision: iterative pseudo-label rounds, stability selection and the selection-file format."""
