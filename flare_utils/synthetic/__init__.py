"""The embedded synthetic CT cohort (FLARE22-like phantoms, deterministic by seed)."""
