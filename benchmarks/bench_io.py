"""Benchmark: .nii.gz reading and writing, flare_utils.data.io (ISA-L gzip) against nibabel's own (zlib).

Usage::

    .venv/bin/python benchmarks/bench_io.py            # writes benchmarks/results/io.json

On a whole-body synthetic CT (512 x 512 x ~400, int16) and its uint8 label map, each operation
`--repeats` times, best time kept: nibabel's `nib.save` / `nib.load` + array read (the reference)
and flare_utils.data.io's `write_nifti` / `read_nifti`. Checks that the outputs are the same data, that
nibabel reads our files, and reports sizes and the speed ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    import nibabel as nib
    import numpy as np

    from flare_utils.data import io
    from flare_utils.synthetic.phantom import generate_case

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "io.json")
    a = ap.parse_args()
    if io._igzip is None:
        print("isal is not installed: flare_utils.data.io falls back to nibabel's gzip", file=sys.stderr)
        return 1
    case = generate_case(3, "realistic", fov="whole_body")
    images = {"CT int16": nib.Nifti1Image(case.image.astype(np.int16), case.affine),
              "labels uint8": nib.Nifti1Image(case.label.astype(np.uint8), case.affine)}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, img in images.items():
            ref, ours = Path(d) / "ref.nii.gz", Path(d) / "ours.nii.gz"
            t_save_ref = best(lambda: nib.save(img, str(ref)), a.repeats)
            t_save_ours = best(lambda: io.write_nifti(img, ours), a.repeats)
            t_load_ref = best(lambda: np.asanyarray(nib.load(str(ref)).dataobj), a.repeats)
            t_load_ours = best(lambda: io.read_nifti(ref), a.repeats)
            same = np.array_equal(np.asanyarray(nib.load(str(ours)).dataobj), np.asanyarray(img.dataobj))
            rows.append({"image": name, "shape": list(img.shape), "raw_mb": img.dataobj.nbytes / 1e6,
                         "size_ref_mb": ref.stat().st_size / 1e6, "size_ours_mb": ours.stat().st_size / 1e6,
                         "save_ref_s": t_save_ref, "save_ours_s": t_save_ours, "save_speedup": t_save_ref / t_save_ours,
                         "load_ref_s": t_load_ref, "load_ours_s": t_load_ours, "load_speedup": t_load_ref / t_load_ours,
                         "nibabel_reads_ours_identically": bool(same)})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))
    print("| image | shape | file MB (nibabel / ours) | save s (nibabel / ours) | load s (nibabel / ours) | same data |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {'x'.join(map(str, r['shape']))} | {r['size_ref_mb']:.1f} / {r['size_ours_mb']:.1f} | "
              f"{r['save_ref_s']:.2f} / {r['save_ours_s']:.2f} ({r['save_speedup']:.1f}x) | "
              f"{r['load_ref_s']:.2f} / {r['load_ours_s']:.2f} ({r['load_speedup']:.1f}x) | "
              f"{r['nibabel_reads_ours_identically']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
