"""Stage 1, data: FLARE22 labels, NIfTI I/O, conversion of FLARE22 folders, DICOM series and per-structure masks."""
