"""The adaptive in-plane grid of the efficient sliding window (geometry, centre-first skip, plumbing);
stub networks, no trained model."""
from __future__ import annotations

import pytest
import torch

from flare_utils.errors import FlareInputError
from flare_utils.inference.defaults import ADAPTIVE_MAX_STEP, DEFAULT_INPLANE_GRID, INPLANE_GRIDS
from flare_utils.inference.sliding_window import (adaptive_positions, centred_positions, make_grid,
                                                  paper_eq2_count, run_sliding_window)

# the benchmark's plan (efficient_demo: patch 24 x 48 x 64) and the body-cropped network shapes of its
# cases (docs/benchmarks.md): two bodies wider than the paper's band, three that fit, the abdomen
PATCH = (24, 48, 64)
WIDE = [(125, 106, 131), (125, 101, 134)]
NARROW = [(125, 87, 108), (125, 86, 126), (125, 83, 122), (68, 76, 120)]


def _covered(starts, patch, size):
    cov = [False] * size
    for s in starts:
        cov[s:s + patch] = [True] * patch
    return all(cov)


def test_defaults_keep_the_paper():
    assert INPLANE_GRIDS == ("paper", "adaptive") and DEFAULT_INPLANE_GRID == "paper"
    assert 0.5 < ADAPTIVE_MAX_STEP <= 1


@pytest.mark.parametrize("patch", [32, 48, 64])
def test_axis_the_paper_band_covers_keeps_the_paper_positions(patch):
    h = round(patch * 0.5)
    for size in range(patch, patch + 2 * h + 1):
        assert adaptive_positions(size, patch) == centred_positions(size, patch)
    assert adaptive_positions(patch, patch) == ([0], 0)
    # a smaller step: the paper's positions as long as they reach both ends
    h = round(patch * 0.33)
    for size in range(patch, patch + 2 * h + 1):
        assert adaptive_positions(size, patch, 0.33) == centred_positions(size, patch, 0.33)


@pytest.mark.parametrize("patch", [32, 48, 64])
@pytest.mark.parametrize("max_step", [0.5, ADAPTIVE_MAX_STEP, 0.8])
def test_wide_axis_covered_to_its_ends_with_bounded_spacing(patch, max_step):
    for size in range(2 * patch + 1, 8 * patch, 7):
        pos, c = adaptive_positions(size, patch, 0.5, max_step)
        span = size - patch
        assert pos[0] == 0 and pos[-1] == span and c == span // 2 and c in pos
        assert pos == sorted(set(pos)) and len(pos) % 2 == 1 and len(pos) >= 3
        assert pos.index(c) == len(pos) // 2                     # as many windows on each side of the centre
        gaps = [b - a for a, b in zip(pos, pos[1:])]
        assert max(gaps) <= max_step * patch + 1         # (+ 1: starts are rounded to voxels)
        assert _covered(pos, patch, size)
        # the fewest windows that keep that spacing: one ring less would not
        m = len(pos) // 2
        if m > 1:
            assert (span - c) / (m - 1) > max_step * patch
        # and never closer than the paper's step
        assert min(gaps) >= min(round(patch * 0.5), span // (2 * m)) - 1


def test_adaptive_positions_bad_inputs():
    with pytest.raises(ValueError):
        adaptive_positions(47, 48)
    with pytest.raises(ValueError):
        adaptive_positions(100, 48, max_step=0)
    with pytest.raises(ValueError):
        make_grid("efficient", (64, 64, 64), (32, 32, 32), inplane_grid="ring")


def test_paper_option_unchanged():
    for shape in [*WIDE, *NARROW, (200, 400, 400), (100, 80, 64), (64, 300, 300)]:
        default = make_grid("efficient", shape, PATCH)
        paper = make_grid("efficient", shape, PATCH, inplane_grid="paper")
        assert default == paper and paper.inplane_grid == "paper"
        assert paper.plane_starts == tuple(tuple(centred_positions(shape[a], PATCH[a])[0]) for a in (1, 2))
        assert paper.groups() == make_grid("efficient", shape, PATCH, inplane_grid="paper", max_step=0.3).groups()
    # the paper's wide-axis geometry (as before the option existed)
    g = make_grid("efficient", (200, 300, 300), (32, 64, 64), inplane_grid="paper")
    assert g.plane_starts == ((86, 118, 150), (86, 118, 150)) and g.centre == (118, 118)


def test_benchmark_bodies_windows_and_coverage():
    for shape in NARROW:
        paper = make_grid("efficient", shape, PATCH)
        ada = make_grid("efficient", shape, PATCH, inplane_grid="adaptive")
        assert ada.plane_starts == paper.plane_starts and ada.groups() == paper.groups()
    for shape in WIDE:
        paper = make_grid("efficient", shape, PATCH)
        ada = make_grid("efficient", shape, PATCH, inplane_grid="adaptive")
        assert not all(_covered(paper.plane_starts[i], PATCH[a], shape[a]) for i, a in enumerate((1, 2)))
        assert all(_covered(ada.plane_starts[i], PATCH[a], shape[a]) for i, a in enumerate((1, 2)))
        assert ada.centre == paper.centre and ada.long_starts == paper.long_starts
        assert ada.n_total == paper.n_total == paper_eq2_count(shape, PATCH) == 90   # within the 1.2x budget
        # at most 0.5 patch apart: 5 windows per axis there (a denser, costlier grid)
        dense = make_grid("efficient", shape, PATCH, inplane_grid="adaptive", max_step=0.5)
        assert dense.n_plane == 25 and all(_covered(s, PATCH[a], shape[a])
                                           for s, a in zip(dense.plane_starts, (1, 2)))


def test_very_wide_body_grows_rings_and_windows_scale_with_width():
    patch = (32, 64, 64)
    counts = []
    for width in (128, 192, 256, 384, 512):
        g = make_grid("efficient", (96, width, width), patch, inplane_grid="adaptive")
        assert all(_covered(s, 64, width) for s in g.plane_starts)
        counts.append(g.n_plane)
        for grp in g.groups():
            assert grp[0][1:] == g.centre and len(grp) == len(set(grp)) == g.n_plane
    assert counts == sorted(counts) and counts[0] == 9 and counts[-1] > 9


def _threshold_net(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(x), 10 * (x - 0.5)], 1)


def test_edge_organ_found_by_adaptive_missed_by_paper():
    patch = (16, 32, 32)
    data = torch.zeros((1, 32, 64, 256))
    data[0, 8:24, 24:40, 2:14] = 1      # far left: outside the paper's 2-patch band
    data[0, 8:24, 24:40, 120:136] = 1   # centre: the centre window sees foreground, so its neighbours run
    res = {}
    for grid_name in INPLANE_GRIDS:
        grid = make_grid("efficient", data.shape[1:], patch, inplane_grid=grid_name)
        res[grid_name] = run_sliding_window(data, grid, _threshold_net, 2, None, 1)
        assert res[grid_name].n_evaluated == grid.n_total
    assert res["paper"].labels[8:24, 24:40, 2:14].sum() == 0
    assert res["adaptive"].labels[8:24, 24:40, 2:14].all()
    assert torch.equal(res["adaptive"].labels.bool(), data[0] > 0.5)


def test_centre_first_skip_kept():
    patch = (16, 32, 32)
    data = torch.zeros((1, 48, 64, 256))
    data[0, 20:28, 24:40, 120:136] = 1          # an organ in the centre, z 20..27
    data[0, 40:48, 24:40, 2:14] = 1             # and one at the edge where the centre is empty: skipped
    grid = make_grid("efficient", data.shape[1:], patch, inplane_grid="adaptive")
    assert grid.n_plane > 9                      # 256 wide: more than 3 windows along x
    res = run_sliding_window(data, grid, _threshold_net, 2, None, 1)
    by_z = {}
    for r in res.records:
        by_z.setdefault(r.z_index, []).append(r)
    for zi, z in enumerate(grid.long_starts):
        recs = by_z[zi]
        assert recs[0].role == "centre" and recs[0].evaluated and recs[0].start[1:] == grid.centre
        has = z <= 27 and z + 16 > 20
        assert all(r.evaluated == has for r in recs[1:]) and len(recs) == grid.n_plane
    assert res.n_skipped > 0 and res.labels[40:48, 24:40, 2:14].sum() == 0
    assert res.labels[20:28, 24:40, 120:136].all()


def test_predictor_and_cli_take_the_option(tmp_path, monkeypatch):
    from flare_utils.inference.predictor import EfficientPredictor
    p = EfficientPredictor(device="cpu", inplane_grid="adaptive", adaptive_max_step=0.6, monitor=False)
    assert p.inplane_grid == "adaptive" and p.adaptive_max_step == 0.6
    assert EfficientPredictor(device="cpu", monitor=False).inplane_grid == "paper"
    with pytest.raises(FlareInputError):
        EfficientPredictor(device="cpu", inplane_grid="ring")
    with pytest.raises(FlareInputError):
        EfficientPredictor(device="cpu", adaptive_max_step=1.5)

    # api.segment passes it to the predictor; the CLI to api.segment
    import flare_utils.api as api
    seen = {}

    class Stop(Exception):
        pass

    def fake_from_results_folder(model, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(EfficientPredictor, "from_results_folder", staticmethod(fake_from_results_folder))
    img = tmp_path / "ct_0000.nii.gz"
    img.write_bytes(b"")
    with pytest.raises(Stop):
        api.segment(img, tmp_path / "out.nii.gz", tmp_path, inplane_grid="adaptive")
    assert seen["inplane_grid"] == "adaptive"

    def fake_segment(*args, **kw):
        seen["cli"] = kw.get("inplane_grid")
        raise Stop

    monkeypatch.setattr(api, "segment", fake_segment)
    from flare_utils.study.cli import build_parser, main
    for argv, want in ((["--inplane-grid", "adaptive"], "adaptive"), ([], "paper")):
        with pytest.raises(Stop):
            main(["predict", str(tmp_path), str(img), str(tmp_path / "o"), "--device", "cpu", *argv])
        assert seen["cli"] == want
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "m", "i", "o", "--inplane-grid", "ring"])
