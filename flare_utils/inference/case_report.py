"""What predicting one case cost: the `CaseReport`, and where the reports of a folder go.

Per case: windows evaluated / skipped against the grid's full count, equation (2) of the paper
(9 per z step) and nnU-Net's full sliding-window count; time per phase (read, preprocess, network,
resample, write); the summed time of the network forward calls; peak RAM; and the
`flare_utils.evaluation.efficiency.ResourceMonitor` figures. `predict_folder` writes one JSON per
case to `<out>/efficiency/<case>.json` and the table to `<out>/efficiency/summary.csv`.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flare_utils.data.io import json_default
from flare_utils.utilities.memory import peak_rss_mib
from flare_utils.inference.defaults import DEFAULT_CENTRE_THRESHOLD, DEFAULT_INPLANE_GRID, DEFAULT_INPLANE_STEP

try:  # the project's resource monitor (FLARE22-style sampling); optional
    from flare_utils.evaluation.efficiency import ResourceMonitor
except ImportError:  # pragma: no cover
    ResourceMonitor = None

__all__ = ["CaseReport", "EFFICIENCY_DIR", "SUMMARY_CSV", "RUN_JSON", "resource_monitor"]

EFFICIENCY_DIR = "efficiency"      # <output folder>/efficiency/<case>.json
SUMMARY_CSV = "summary.csv"        # <output folder>/efficiency/summary.csv: one CaseReport row per case
RUN_JSON = "run.json"              # <output folder>/efficiency/run.json: the folder run's totals


@dataclass
class CaseReport:
    """What one case cost. Times in s, memory in MiB."""
    case_id: str
    input: str | None = None
    output: str | None = None
    mode: str = "efficient"
    folds: list = field(default_factory=list)
    tta: bool = False
    device: str = "cpu"
    centre_threshold: int = DEFAULT_CENTRE_THRESHOLD
    inplane_step: float = DEFAULT_INPLANE_STEP
    inplane_grid: str = DEFAULT_INPLANE_GRID
    crop: str = "body"
    original_shape: list = field(default_factory=list)
    original_spacing: list = field(default_factory=list)
    crop_box: list = field(default_factory=list)          # [[lo, hi]] per file axis
    network_shape: list = field(default_factory=list)
    padded_shape: list = field(default_factory=list)
    network_spacing: list = field(default_factory=list)
    patch_size: list = field(default_factory=list)
    long_axis: int = 0
    z_steps: int = 0
    windows_evaluated: int = 0
    windows_skipped: int = 0
    windows_grid: int = 0              # distinct windows of this mode's grid (3x3 per z step, deduplicated)
    windows_paper_eq2: int = 0         # 9 per z step (the paper's equation (2))
    windows_nnunet_full: int = 0       # nnU-Net's full sliding window (step 0.5) on the same grid
    centres_with_foreground: int = 0
    time_read_s: float = 0.0
    time_preprocess_s: float = 0.0
    time_network_s: float = 0.0        # the whole sliding-window loop
    network_forward_s: float = 0.0     # summed forward calls of the evaluated windows
    time_resample_s: float = 0.0
    time_write_s: float = 0.0
    total_s: float = 0.0
    peak_rss_mib: float | None = None
    maxrss_mib: float | None = None    # ru_maxrss of the process (lifetime peak)
    efficiency: dict | None = None     # ResourceMonitor.result.to_dict()
    windows: list = field(default_factory=list)   # WindowRecord dicts (for pictures)
    skipped_existing: bool = False
    error: str | None = None
    producer: str = ""                 # the predictor's key (model content + settings) that wrote the output
    input_stat: list | None = None     # [size, mtime_ns] of the input image when it was predicted
    output_bytes: int | None = None    # size of the written label file

    def made(self, producer: str, image: str | Path, output: str | Path) -> bool:
        """Whether this report's output is the one `producer` would make of `image` now: same key,
        same input file (size and time), and the complete output file it wrote."""
        out, img = Path(output), Path(image)
        return (self.error is None and self.producer == producer and out.is_file() and img.is_file()
                and self.output_bytes == out.stat().st_size and self.input_stat == file_stat(img))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=json_default))

    def to_row(self) -> dict[str, Any]:
        d = self.to_dict()
        d.pop("windows")
        eff = d.pop("efficiency") or {}
        for k in ("cpu_util_mean", "cpu_auc", "gpu_mem_peak_mib", "gpu_auc", "wall_s"):
            if k in eff:
                d[f"monitor_{k}"] = eff[k]
        for k in ("original_shape", "original_spacing", "crop_box", "network_shape", "padded_shape",
                  "network_spacing", "patch_size", "folds", "input_stat"):
            d[k] = json.dumps(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CaseReport":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def add_monitor(self, monitor) -> None:
        """Take the figures of a finished `resource_monitor` block, and the process's peak RSS."""
        res = getattr(monitor, "result", None)
        if res is not None:
            self.efficiency = res.to_dict()
            self.peak_rss_mib = float(res.peak_rss_mib)
        self.maxrss_mib = peak_rss_mib()


def file_stat(path: str | Path) -> list[int]:
    """[size, mtime_ns] of a file: what tells an input that changed since its output was made."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


@contextlib.contextmanager
def resource_monitor(enabled: bool):
    """ResourceMonitor when available (and enabled), else a stand-in with result None."""
    if enabled and ResourceMonitor is not None:
        with ResourceMonitor(interval=0.1) as mon:
            yield mon
    else:
        yield SimpleNamespace(result=None)
