"""flare_utils: FLARE22 semi-supervised abdominal organ segmentation on nnU-Net v2."""
__version__ = "0.1.0"
