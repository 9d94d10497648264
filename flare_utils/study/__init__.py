"""A whole study: params, the runner, provenance, reports and the command line."""
