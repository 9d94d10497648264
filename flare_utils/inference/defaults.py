"""The efficient sliding window's defaults, in one place that does not import torch, so parameter
files, the command line and the predictor all start from the same values."""

MODES = ("efficient", "full")       # the FLARE22 winner's 3x3 windows per z step, or nnU-Net's full tiling
DEFAULT_CENTRE_THRESHOLD = 1        # neighbours run when the centre window has >= this many foreground voxels
DEFAULT_INPLANE_STEP = 0.5          # the paper's 3x3 grid: neighbours half a patch from the centre
# efficient mode's in-plane grid: "paper" (3x3 windows `inplane_step` apart, a band of 1 + 2 * step
# patches around the centre) or "adaptive" (the same where the body fits in that band; on a wider
# body the windows spread to its edges, more of them when one spacing would exceed
# ADAPTIVE_MAX_STEP patches)
INPLANE_GRIDS = ("paper", "adaptive")
DEFAULT_INPLANE_GRID = "paper"
ADAPTIVE_MAX_STEP = 2 / 3           # adaptive: largest spacing of neighbouring windows, in patches
