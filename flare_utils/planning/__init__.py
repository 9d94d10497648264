"""nnU-Net v2 planning and preprocessing of the FLARE22 plan variants."""
