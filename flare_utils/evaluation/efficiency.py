"""Resource monitor in the manner of the FLARE22 efficiency harness, plus a per-phase timer.

The FLARE22 challenge measured each case's inference by wall time, CPU and GPU-memory areas under
the curve and peak RAM, sampled every 0.1 s; `ResourceMonitor` measures the same around a block of
code, from a daemon thread, so that our numbers compare with the challenge's. Usage::

    with ResourceMonitor(interval=0.1, gpu_tolerance_mib=2048) as mon:
        run_inference(...)
    mon.save(out_dir / "timing.json")      # timing.json + timing.timeseries.csv, atomically

Without a usable CUDA GPU every GPU figure is ``None`` (``"not measured"`` in JSON), never 0.

Details: docs/reference/efficiency_monitor.md
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import psutil

from flare_utils.data.io import atomic_write_text
from flare_utils.utilities.memory import peak_rss_mib

try:
    import resource
except ImportError:  # Windows
    resource = None

NOT_MEASURED = "not measured"
MIB = 1024.0 * 1024.0
DEFAULT_INTERVAL_S = 0.1
DEFAULT_GPU_TOLERANCE_MIB = 2048.0
# Fields of EfficiencyReport that describe the GPU: None in Python, NOT_MEASURED in reports.
GPU_FIELDS = ("gpu_mem_peak_mib", "gpu_mem_mean_mib", "gpu_auc")


@dataclass
class EfficiencyReport:
    """What a ResourceMonitor measured over one ``with`` block.

    Units: seconds, MiB, % (0-100 of all CPUs), %·s for the CPU AUC, MiB·s for the GPU AUC.
    """
    wall_s: float
    peak_rss_mib: float                  # max over samples of the RSS summed over the process tree
    cpu_util_mean: float | None          # mean of (100 - idle %) over the samples
    cpu_auc: float | None                # sum((100 - idle %) * dt), dt = interval when on time
    gpu_mem_peak_mib: float | None       # device-wide used memory, unclipped; None: not measured
    gpu_auc: float | None                # sum(max(0, mem - tolerance) * dt)
    samples: int
    device: str                          # "cpu" or e.g. "cuda:0 (NVIDIA H100 80GB HBM3)"
    interval_s: float = DEFAULT_INTERVAL_S
    gpu_tolerance_mib: float = DEFAULT_GPU_TOLERANCE_MIB
    gpu_mem_mean_mib: float | None = None
    cpu_util_peak: float | None = None
    baseline_rss_mib: float = 0.0        # process-tree RSS when the block was entered
    maxrss_self_mib: float | None = None      # ru_maxrss of this process (lifetime peak)
    maxrss_children_mib: float | None = None  # ru_maxrss of the largest waited-for descendant
    cpu_count: int = 0
    monitor_cpu_s: float = 0.0           # CPU time the sampler thread itself used
    missed_slots: int = 0                # sample slots skipped because the sampler was late
    gpu_backend: str | None = None       # "nvml", "torch" or None
    exception: str | None = None         # type name of an exception raised in the block, if any

    @property
    def peak_rss_increase_mib(self) -> float:
        """Peak process-tree RSS above the RSS at entry."""
        return max(0.0, self.peak_rss_mib - self.baseline_rss_mib)

    @property
    def gpu_measured(self) -> bool:
        return self.gpu_mem_peak_mib is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; GPU figures that were not measured are the string "not measured"."""
        d = asdict(self)
        for k in GPU_FIELDS:
            if d[k] is None:
                d[k] = NOT_MEASURED
        d["peak_rss_increase_mib"] = self.peak_rss_increase_mib
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EfficiencyReport":
        """Inverse of to_dict (unknown keys are ignored, "not measured" becomes None)."""
        names = {f.name for f in fields(cls)}
        kw = {k: (None if v == NOT_MEASURED else v) for k, v in d.items() if k in names}
        return cls(**kw)

    def to_row(self) -> dict[str, Any]:
        """One flat, display-friendly row (rounded, units in the keys) for tables."""
        def num(v, nd):
            return NOT_MEASURED if v is None else round(float(v), nd)
        return {
            "device": self.device,
            "time (s)": round(self.wall_s, 3),
            "peak RAM (MiB)": round(self.peak_rss_mib, 1),
            "CPU util mean (%)": num(self.cpu_util_mean, 1),
            "CPU AUC (%·s)": num(self.cpu_auc, 1),
            "GPU peak (MiB)": num(self.gpu_mem_peak_mib, 1),
            "GPU AUC (MiB·s)": num(self.gpu_auc, 1),
            "samples": self.samples,
        }


def load_report(path: str | Path) -> EfficiencyReport:
    """Read a JSON file written by ResourceMonitor.save / EfficiencyReport.to_dict."""
    with open(path, encoding="utf-8") as f:
        return EfficiencyReport.from_dict(json.load(f))


# ----------------------------------------------------------------------------------------------
# GPU probes

def _nvidia_driver_present() -> bool:
    """Cheap check that avoids importing torch on machines without an NVIDIA driver (Linux)."""
    if sys.platform.startswith("linux"):
        return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
    return True  # elsewhere we cannot tell cheaply: let the probes decide


class _GpuProbe:
    """Reads device-wide used GPU memory (MiB) of one GPU."""
    backend: str = ""
    name: str = ""
    index: int = 0

    def read_mib(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _NvmlProbe(_GpuProbe):
    backend = "nvml"

    def __init__(self, index: int):
        import pynvml  # type: ignore
        pynvml.nvmlInit()
        try:
            self._nvml = pynvml
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
            visible = [v.strip() for v in visible if v.strip()]
            if visible and index < len(visible) and not visible[index].isdigit():
                handle = pynvml.nvmlDeviceGetHandleByUUID(visible[index])
            else:
                phys = int(visible[index]) if visible and index < len(visible) else index
                handle = pynvml.nvmlDeviceGetHandleByIndex(phys)
            self._handle = handle
            name = pynvml.nvmlDeviceGetName(handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self.index = index
            self.read_mib()
        except BaseException:
            pynvml.nvmlShutdown()
            raise

    def read_mib(self) -> float:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / MIB

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


class _TorchProbe(_GpuProbe):
    """Device-wide used memory (total - free) once this process has initialised CUDA.

    Before that it reports torch's reserved memory (0) rather than create a CUDA context from
    the sampler thread, which would itself cost hundreds of MiB.
    """
    backend = "torch"

    def __init__(self, index: int):
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA not available")
        self._torch = torch
        self.index = index
        self.name = torch.cuda.get_device_name(index)

    def read_mib(self) -> float:
        cuda = self._torch.cuda
        if cuda.is_initialized():
            free, total = cuda.mem_get_info(self.index)
            return (total - free) / MIB
        return cuda.memory_reserved(self.index) / MIB


def _open_gpu_probe(gpu: bool | None, index: int | None) -> _GpuProbe | None:
    """NVML first, torch.cuda second; None when there is no usable GPU (or gpu=False)."""
    if gpu is False or (gpu is None and not _nvidia_driver_present()):
        return None
    if index is None:
        index = 0
        torch = sys.modules.get("torch")
        if torch is not None:
            with contextlib.suppress(Exception):
                if torch.cuda.is_initialized():
                    index = torch.cuda.current_device()
    errors = []
    for cls in (_NvmlProbe, _TorchProbe):
        try:
            return cls(index)
        except Exception as e:  # ImportError, NVMLError, RuntimeError ...
            errors.append(f"{cls.backend}: {type(e).__name__}: {e}")
    if gpu:
        raise RuntimeError("GPU measurement requested but no GPU could be read (" + "; ".join(errors) + ")")
    return None


# ----------------------------------------------------------------------------------------------
# CPU and memory readings
#
# The sampler is a Python thread, so every system call that releases the GIL costs it up to one
# GIL switch interval (5 ms) to get the GIL back while the main thread runs Python code. psutil's
# process-tree walk reads /proc/<pid>/stat of every process on the machine (hundreds of
# ms under contention), so on Linux the readings below keep /proc files open and re-read them
# with a single pread each, and find descendants through /proc/<pid>/task/<tid>/children.
# Elsewhere (or when those files are missing) they fall back on psutil.

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _Readings:
    """System CPU tick totals and process-tree RSS, cheap enough to take ten times a second.

    With `pss` each process counts its proportional set size (/proc/<pid>/smaps_rollup) instead of
    its RSS: pages shared by forked workers are then counted once over the tree, not once per
    process (about 0.2 ms per process and reading; RSS where the file is missing).
    """

    def __init__(self, pid: int, include_children: bool, pss: bool = False):
        self.pid = pid
        self.include_children = include_children
        self.pss = pss and os.path.exists(f"/proc/{pid}/smaps_rollup")
        self._proc = psutil.Process(pid)
        self._statm: dict[int, int] = {}           # pid -> open fd of /proc/<pid>/statm
        self._stat_fd: int | None = None
        self._fast_tree = False
        if sys.platform.startswith("linux"):
            try:
                self._stat_fd = os.open("/proc/stat", os.O_RDONLY)
                self._fast_tree = os.path.exists(f"/proc/{pid}/task/{pid}/children")
            except OSError:
                self._stat_fd = None

    def close(self) -> None:
        for fd in [*self._statm.values(), self._stat_fd]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._statm.clear()
        self._stat_fd = None

    # CPU ----------------------------------------------------------------------------------------
    def cpu_totals(self) -> tuple[float, float]:
        """(total, idle) system-wide CPU time since boot (any unit); guest time is inside user."""
        if self._stat_fd is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                line = os.pread(self._stat_fd, 512, 0).split(b"\n", 1)[0].split()
                if line[0] == b"cpu":
                    v = [int(x) for x in line[1:9]]   # user nice system idle iowait irq softirq steal
                    return float(sum(v)), float(v[3])
        t = psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total, t.idle

    # memory ------------------------------------------------------------------------------------
    def _children_of(self, pid: int) -> list[int]:
        out: list[int] = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    out.extend(int(x) for x in f.read().split())
        return out

    def tree_pids(self) -> list[int]:
        if not self.include_children:
            return [self.pid]
        if self._fast_tree:
            pids, todo = [self.pid], [self.pid]
            while todo:
                p = todo.pop()
                try:
                    kids = self._children_of(p)
                except OSError:                      # exited meanwhile
                    continue
                pids.extend(kids)
                todo.extend(kids)
            return pids
        try:
            return [self.pid, *(c.pid for c in self._proc.children(recursive=True))]
        except psutil.Error:
            return [self.pid]

    def _rss_of(self, pid: int) -> int | None:
        if self._stat_fd is None:                   # not Linux: psutil
            try:
                return psutil.Process(pid).memory_info().rss
            except psutil.Error:
                return None
        fd = self._statm.get(pid)
        try:
            if fd is None:
                fd = os.open(f"/proc/{pid}/smaps_rollup" if self.pss else f"/proc/{pid}/statm", os.O_RDONLY)
                self._statm[pid] = fd
            if self.pss:
                text = os.pread(fd, 4096, 0)
                return int(text[text.index(b"\nPss:") + 5:].split(None, 1)[0]) * 1024
            return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):   # the process has gone (ESRCH/ENOENT)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                self._statm.pop(pid, None)
            return None

    def tree_rss_bytes(self) -> int:
        pids = self.tree_pids()
        total = 0
        for pid in pids:
            rss = self._rss_of(pid)
            if rss is not None:
                total += rss
        for gone in set(self._statm) - set(pids):   # forget exited descendants
            with contextlib.suppress(OSError):
                os.close(self._statm.pop(gone))
        return total


class ResourceMonitor:
    """Samples wall time, process-tree RSS, system CPU utilisation and GPU memory in a thread.

    Parameters
    ----------
    interval: seconds between samples (FLARE22: 0.1).
    gpu_tolerance_mib: GPU memory tolerated per sample before it counts towards the GPU AUC.
    gpu: True (required; error when no GPU can be read), False (never), None (when available).
    gpu_index: which CUDA device (in CUDA_VISIBLE_DEVICES numbering); default the current one.
    include_children: sum RSS over all descendants of this process as well.
    pss: count each process's proportional set size instead of its RSS (pages that forked workers
        share are counted once; see _Readings).

    Samples are due on a fixed schedule t0 + k*interval. Each sample's CPU utilisation is the
    system-wide average since the previous sample (from /proc/stat tick counts), and each sample
    carries the time dt since the previous one. The AUCs are sum(value * dt): with samples on
    time that is exactly the harness's sum(value) * interval, and when a sample is late (the
    main thread held the GIL inside a C extension) the missed slots are skipped, counted in
    ``missed_slots``, and the late sample stands for the whole gap, so the CPU AUC stays the
    true integral. One more reading is taken at exit, for the peak RSS only, so an allocation
    freed just as the block ends is not missed; when the block was shorter than one interval
    that closing reading is the single sample.
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL_S,
                 gpu_tolerance_mib: float = DEFAULT_GPU_TOLERANCE_MIB, *,
                 gpu: bool | None = None, gpu_index: int | None = None,
                 include_children: bool = True, pss: bool = False):
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        if not gpu_tolerance_mib >= 0:
            raise ValueError(f"gpu_tolerance_mib must be >= 0, got {gpu_tolerance_mib!r}")
        self.interval = float(interval)
        self.gpu_tolerance_mib = float(gpu_tolerance_mib)
        self.include_children = include_children
        self.pss = pss
        self._gpu_request = gpu
        self._gpu_index = gpu_index
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # (t, rss_mib, cpu_util, gpu_mib); t in seconds since entry
        self.timeseries: list[tuple[float, float, float | None, float | None]] = []
        self._dts: list[float] = []                 # time covered by each sample
        self.result: EfficiencyReport | None = None
        self._closing_rss = 0.0
        self._monitor_cpu_s = 0.0
        self._missed = 0
        self._sampler_error: str | None = None

    # -- context manager -----------------------------------------------------------------------
    def __enter__(self) -> "ResourceMonitor":
        if self._thread is not None:
            raise RuntimeError("a ResourceMonitor can be entered only once; make a new one")
        self._gpu = _open_gpu_probe(self._gpu_request, self._gpu_index)
        self._readings = _Readings(os.getpid(), self.include_children, self.pss)
        self._baseline_rss = self._readings.tree_rss_bytes() / MIB
        self._last_cpu = self._readings.cpu_totals()
        self._t0 = self._t_last = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="flare-resource-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        t_exit = time.perf_counter()
        self._stop.set()
        self._thread.join(timeout=max(5.0, 10 * self.interval))
        try:
            with self._lock:
                closing = self._sample(time.perf_counter())
                self._closing_rss = closing[0][1]
                if not self.timeseries:
                    self.timeseries.append(closing[0])
                    self._dts.append(closing[1])
        except Exception as e:
            self._sampler_error = f"{type(e).__name__}: {e}"
        finally:
            self._readings.close()
            if self._gpu is not None:
                self._gpu.close()
        self.result = self._build(t_exit - self._t0, exc_type.__name__ if exc_type else None)
        return False  # never swallow the block's exception

    # -- sampling ------------------------------------------------------------------------------
    def _sample(self, now: float):
        """One reading and the time it covers since the previous one."""
        rss = self._readings.tree_rss_bytes() / MIB
        total, idle = self._readings.cpu_totals()
        d_total, d_idle = total - self._last_cpu[0], idle - self._last_cpu[1]
        util = None if d_total <= 0 else min(100.0, max(0.0, 100.0 * (1.0 - d_idle / d_total)))
        if util is not None:
            self._last_cpu = (total, idle)
        gpu = self._gpu.read_mib() if self._gpu is not None else None
        dt = now - self._t_last
        self._t_last = now
        return (now - self._t0, rss, util, gpu), dt

    def _run(self) -> None:
        k = 1
        try:
            while True:
                due = self._t0 + k * self.interval
                if self._stop.wait(max(0.0, due - time.perf_counter())):
                    break
                now = time.perf_counter()
                with self._lock:
                    if self._stop.is_set():
                        break
                    try:
                        s, dt = self._sample(now)
                    except Exception as e:  # never let the sampler die silently
                        self._sampler_error = f"{type(e).__name__}: {e}"
                    else:
                        self.timeseries.append(s)
                        self._dts.append(dt)
                # the next slot strictly after now: a late sample does not cause a burst
                nxt = int((time.perf_counter() - self._t0) / self.interval) + 1
                self._missed += max(0, nxt - k - 1)
                k = max(k + 1, nxt)
        finally:
            self._monitor_cpu_s = time.thread_time()

    # -- results -------------------------------------------------------------------------------
    def _build(self, wall: float, exception: str | None) -> EfficiencyReport:
        with self._lock:
            ts, dts = list(self.timeseries), list(self._dts)
        rss = [s[1] for s in ts]
        cpu = [(s[2], dt) for s, dt in zip(ts, dts) if s[2] is not None]
        gpu = [(s[3], dt) for s, dt in zip(ts, dts) if s[3] is not None]
        measured = self._gpu is not None and bool(gpu)
        tol = self.gpu_tolerance_mib
        return EfficiencyReport(
            wall_s=wall,
            peak_rss_mib=max([*rss, self._closing_rss, self._baseline_rss]),
            cpu_util_mean=(sum(u for u, _ in cpu) / len(cpu)) if cpu else None,
            cpu_auc=sum(u * dt for u, dt in cpu) if cpu else None,
            gpu_mem_peak_mib=max(g for g, _ in gpu) if measured else None,
            gpu_auc=sum(max(0.0, g - tol) * dt for g, dt in gpu) if measured else None,
            samples=len(ts),
            device=(f"cuda:{self._gpu.index} ({self._gpu.name})" if self._gpu is not None else "cpu"),
            interval_s=self.interval,
            gpu_tolerance_mib=tol,
            gpu_mem_mean_mib=(sum(g for g, _ in gpu) / len(gpu)) if measured else None,
            cpu_util_peak=max(u for u, _ in cpu) if cpu else None,
            baseline_rss_mib=self._baseline_rss,
            maxrss_self_mib=peak_rss_mib("RUSAGE_SELF"),
            maxrss_children_mib=peak_rss_mib("RUSAGE_CHILDREN"),
            cpu_count=psutil.cpu_count() or 0,
            monitor_cpu_s=self._monitor_cpu_s,
            missed_slots=self._missed,
            gpu_backend=self._gpu.backend if self._gpu is not None else None,
            exception=exception,
        )

    @property
    def sampler_error(self) -> str | None:
        """The last error the sampler thread caught (that sample was dropped), if any."""
        return self._sampler_error

    def timeseries_csv(self) -> str:
        """The samples as CSV: t_s, dt_s, rss_mib, cpu_util, gpu_mib ("not measured" without GPU)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["t_s", "dt_s", "rss_mib", "cpu_util", "gpu_mib"])
        for (t, rss, util, gpu), dt in zip(self.timeseries, self._dts):
            w.writerow([f"{t:.4f}", f"{dt:.4f}", f"{rss:.2f}", "" if util is None else f"{util:.2f}",
                        NOT_MEASURED if gpu is None else f"{gpu:.1f}"])
        return buf.getvalue()

    def save(self, path: str | Path, *, timeseries: bool = True) -> tuple[Path, Path | None]:
        """Write the report as JSON at `path` and the samples beside it as `<stem>.timeseries.csv`.

        Both files are written atomically (temporary sibling, then rename). Returns their paths.
        """
        if self.result is None:
            raise RuntimeError("the monitor has not finished: call save() after the with block")
        path = Path(path)
        if path.suffix.lower() != ".json":
            path = path.with_name(path.name + ".json")
        atomic_write_text(path, json.dumps(self.result.to_dict(), indent=2) + "\n")
        csv_path = None
        if timeseries:
            csv_path = path.with_name(path.stem + ".timeseries.csv")
            atomic_write_text(csv_path, self.timeseries_csv())
        return path, csv_path



@dataclass
class PhaseTimer:
    """Wall time of named phases: ``with timer.phase("read"): ...``; repeated names add up.

    ``timer.seconds`` is a dict name -> seconds in first-use order; a phase that raised is still
    timed. ``timer.total`` is the sum.
    """
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            self.counts[name] = self.counts.get(name, 0) + 1

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def to_dict(self) -> dict[str, float]:
        return dict(self.seconds)
