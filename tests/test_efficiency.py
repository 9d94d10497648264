"""ResourceMonitor and PhaseTimer on workloads of known shape.

Machines running the tests are shared and noisy: tolerances are generous and nothing asserts a
tight timing. The whole file takes about six seconds.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from flare_utils.evaluation import efficiency
from flare_utils.evaluation.efficiency import (NOT_MEASURED, EfficiencyReport, PhaseTimer, ResourceMonitor,
                                    load_report)

NCPU = psutil.cpu_count() or 1


def _has_gpu() -> bool:
    probe = efficiency._open_gpu_probe(None, None)
    if probe is not None:
        probe.close()
        return True
    return False


HAS_GPU = _has_gpu()


@pytest.fixture(scope="module")
def sleep_report():
    with ResourceMonitor(interval=0.1) as mon:
        time.sleep(1.0)
    return mon


def test_sleep_one_second(sleep_report):
    r = sleep_report.result
    assert 0.95 <= r.wall_s < 3.0
    assert 5 <= r.samples <= 12                    # one sample every 0.1 s
    assert len(sleep_report.timeseries) == r.samples
    ts = [s[0] for s in sleep_report.timeseries]
    assert ts == sorted(ts) and ts[0] >= 0.09       # first sample after one interval
    # utilisation is a percentage; samples on time cover 0.1 s each, so the AUC is about
    # sum * 0.1 (the harness definition) and never more than 100 % * wall
    assert 0.0 <= r.cpu_util_mean <= 100.0
    assert r.cpu_auc == pytest.approx(r.cpu_util_mean * r.samples * 0.1, rel=0.3, abs=5.0)
    assert r.cpu_auc <= 100.0 * r.wall_s + 1e-6
    assert r.peak_rss_mib > 10 and r.peak_rss_increase_mib < 50
    # the sampler itself is cheap: well under 10 % of one core while the block sleeps
    assert r.monitor_cpu_s < 0.1 * r.wall_s


def test_large_array_raises_peak_rss():
    n = 500 * 1024 * 1024
    with ResourceMonitor(interval=0.1) as mon:
        a = np.ones(n, dtype=np.uint8)               # ones: every page is written and resident
        time.sleep(0.3)
        assert a[-1] == 1
        del a
    r = mon.result
    assert 400 <= r.peak_rss_increase_mib <= 700, r
    # cross-check with getrusage: the lifetime peak of this process is at least what we saw
    assert r.maxrss_self_mib >= r.peak_rss_mib - 20


def test_array_freed_just_before_exit_is_caught_by_closing_sample():
    # shorter than one interval: only the closing reading can see it
    with ResourceMonitor(interval=5.0) as mon:
        a = np.ones(200 * 1024 * 1024, dtype=np.uint8)
    del a
    assert mon.result.samples == 1
    assert mon.result.peak_rss_increase_mib >= 150


def test_busy_loop_uses_about_one_core(sleep_report):
    with ResourceMonitor(interval=0.1) as mon:
        end = time.perf_counter() + 1.0
        x = 0
        while time.perf_counter() < end:
            x += 1
    r = mon.result
    one_core = 100.0 / NCPU                          # 50 % on a 2-core machine
    # system-wide utilisation: our own saturated core is a floor (others can only add to it)
    assert r.cpu_util_mean >= 0.6 * one_core, r
    assert r.cpu_util_peak <= 100.0
    assert r.cpu_auc >= 0.6 * one_core * 0.9        # about 50 %·s for one second on 2 cores
    # the sampler kept (roughly) its schedule although the main thread held the GIL
    assert r.samples >= 5 and r.missed_slots <= 5


def test_child_process_memory_is_counted():
    child = textwrap.dedent("""
        import time
        b = b"x" * (300 * 1024 * 1024)   # written, so resident
        time.sleep(1.0)
    """)
    with ResourceMonitor(interval=0.1) as mon:
        subprocess.run([sys.executable, "-c", child], check=True)
    r = mon.result
    assert r.peak_rss_increase_mib >= 250, r
    # the child was waited for: getrusage(RUSAGE_CHILDREN) saw its peak too
    assert r.maxrss_children_mib >= 250


def test_child_excluded_when_asked():
    child = "b = b'x' * (300 * 1024 * 1024); import time; time.sleep(0.6)"
    with ResourceMonitor(interval=0.1, include_children=False) as mon:
        subprocess.run([sys.executable, "-c", child], check=True)
    assert mon.result.peak_rss_increase_mib < 150


def _hold(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc/<pid>/smaps_rollup")
def test_pss_counts_pages_shared_by_forked_workers_once():
    """Three forked workers share the parent's 200 MiB: RSS summed over the tree counts them four
    times, proportional set size once (the stage table's peak RAM)."""
    import multiprocessing as mp
    shared = np.ones(200 * 1024 * 1024 // 8)                 # written, so resident, before the fork
    peaks = {}
    for pss in (False, True):
        with ResourceMonitor(interval=0.1, pss=pss, gpu=False) as mon:
            workers = [mp.get_context("fork").Process(target=_hold, args=(1.0,)) for _ in range(3)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        peaks[pss] = mon.result.peak_rss_mib
    assert peaks[False] > 3.5 * 200                          # the parent's pages once per process
    assert 200 <= peaks[True] < peaks[False] - 400           # ... and once in all
    del shared


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")
def test_gpu_fields_not_measured_without_gpu(sleep_report, tmp_path):
    r = sleep_report.result
    assert r.gpu_mem_peak_mib is None and r.gpu_auc is None and r.gpu_mem_mean_mib is None
    assert r.device == "cpu" and r.gpu_backend is None and not r.gpu_measured
    d = r.to_dict()
    assert d["gpu_mem_peak_mib"] == NOT_MEASURED and d["gpu_auc"] == NOT_MEASURED
    row = r.to_row()
    assert row["GPU peak (MiB)"] == NOT_MEASURED and row["GPU AUC (MiB·s)"] == NOT_MEASURED
    assert all(s[3] is None for s in sleep_report.timeseries)
    json_path, csv_path = sleep_report.save(tmp_path / "t.json")
    assert json.loads(json_path.read_text())["gpu_auc"] == NOT_MEASURED
    rows = list(csv.DictReader(csv_path.open()))
    assert {r_["gpu_mib"] for r_ in rows} == {NOT_MEASURED}
    with pytest.raises(RuntimeError, match="no GPU"):
        with ResourceMonitor(gpu=True):
            pass


class _FakeGpu(efficiency._GpuProbe):
    backend, name, index = "fake", "Fake GPU", 0

    def __init__(self, values):
        self.values = list(values)
        self.i = 0

    def read_mib(self):
        v = self.values[min(self.i, len(self.values) - 1)]
        self.i += 1
        return v


@pytest.mark.parametrize("mem, expected_per_sample", [(3048.0, 1000.0), (1500.0, 0.0)])
def test_gpu_auc_subtracts_tolerance_per_sample(monkeypatch, mem, expected_per_sample):
    monkeypatch.setattr(efficiency, "_open_gpu_probe", lambda gpu, index: _FakeGpu([mem]))
    with ResourceMonitor(interval=0.05, gpu_tolerance_mib=2048) as mon:
        time.sleep(0.3)
    r = mon.result
    assert r.gpu_mem_peak_mib == mem                   # the peak is reported unclipped
    covered = sum(mon._dts)                            # sum of dt = time up to the last sample
    assert 0.2 <= covered <= r.wall_s + 1e-9
    assert r.gpu_auc == pytest.approx(expected_per_sample * covered)
    assert r.gpu_auc is not None                       # 0 when below tolerance, not "not measured"
    assert r.device == "cuda:0 (Fake GPU)" and r.to_dict()["gpu_backend"] == "fake"


def test_exception_inside_block_propagates_and_report_survives():
    mon = ResourceMonitor(interval=0.05)
    with pytest.raises(ZeroDivisionError):
        with mon:
            time.sleep(0.2)
            1 / 0
    assert mon.result is not None
    assert mon.result.exception == "ZeroDivisionError"
    assert mon.result.samples >= 1 and mon.result.wall_s >= 0.15
    assert not mon._thread.is_alive()
    with pytest.raises(RuntimeError):                  # single use
        with mon:
            pass


def test_save_is_atomic_and_round_trips(sleep_report, tmp_path):
    json_path, csv_path = sleep_report.save(tmp_path / "sub" / "timing.json")
    assert json_path.name == "timing.json" and csv_path.name == "timing.timeseries.csv"
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["timing.json", "timing.timeseries.csv"]
    back = load_report(json_path)
    assert isinstance(back, EfficiencyReport)
    assert back == sleep_report.result
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == sleep_report.result.samples
    assert list(rows[0]) == ["t_s", "dt_s", "rss_mib", "cpu_util", "gpu_mib"]
    assert sum(float(r_["dt_s"]) for r_ in rows) == pytest.approx(
        float(rows[-1]["t_s"]), abs=1e-3 * len(rows))


def test_save_before_exit_and_bad_arguments():
    with pytest.raises(RuntimeError):
        ResourceMonitor().save("x.json")
    with pytest.raises(ValueError):
        ResourceMonitor(interval=0)
    with pytest.raises(ValueError):
        ResourceMonitor(gpu_tolerance_mib=-1)


def test_phase_timer_accumulates_and_times_failures():
    timer = PhaseTimer()
    with timer.phase("read"):
        time.sleep(0.05)
    with timer.phase("predict"):
        time.sleep(0.02)
    with timer.phase("read"):
        time.sleep(0.05)
    with pytest.raises(KeyError):
        with timer.phase("write"):
            raise KeyError("x")
    d = timer.to_dict()
    assert list(d) == ["read", "predict", "write"]
    assert d["read"] >= 0.09 and d["predict"] >= 0.015 and d["write"] >= 0.0
    assert timer.counts == {"read": 2, "predict": 1, "write": 1}
    assert timer.total == pytest.approx(sum(d.values()))
