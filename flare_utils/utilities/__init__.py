"""Small shared helpers: progress reporting and worker processes."""
