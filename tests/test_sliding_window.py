"""Window-grid geometry and the sliding-window loop with stub networks (no trained model)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flare_utils.inference.sliding_window import (WindowGrid, argmax0, centred_positions, foreground_count, make_grid,
                                        nnunet_steps,
                                        nnunet_window_count, paper_eq2_count, run_sliding_window)


def _nnunet_steps_reference(size, patch, step):
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    return compute_steps_for_sliding_window((size,), (patch,), step)[0]


@pytest.mark.parametrize("size,patch", [(32, 32), (33, 32), (48, 32), (64, 32), (65, 32), (100, 24), (1000, 48),
                                        (137, 64), (250, 128)])
def test_nnunet_steps_match_nnunet(size, patch):
    assert nnunet_steps(size, patch, 0.5) == _nnunet_steps_reference(size, patch, 0.5)
    assert nnunet_steps(size, patch, 1.0) == _nnunet_steps_reference(size, patch, 1.0)


def test_centred_positions_wide_narrow_exact():
    # wide axis: 3 windows, half a patch apart, centred
    pos, c = centred_positions(300, 64)
    assert c == (300 - 64) // 2 == 118 and pos == [86, 118, 150]
    assert pos[-1] + 64 - pos[0] == 2 * 64            # covers two patch widths
    # exactly one patch: one position
    assert centred_positions(64, 64) == ([0], 0)
    # narrower than two patches: clamped to the borders, deduplicated
    assert centred_positions(80, 64) == ([0, 8, 16], 8)
    assert centred_positions(65, 64) == ([0, 1], 0)
    assert centred_positions(96, 64)[0] == [0, 16, 32]
    with pytest.raises(ValueError):
        centred_positions(63, 64)


def test_grid_counts_small_large_narrow_long():
    patch = (32, 64, 64)
    # small image (already padded to the patch): one window in either mode
    for mode in ("efficient", "full"):
        g = make_grid(mode, patch, patch)
        assert g.n_total == 1 and len(g.groups()) == 1
    assert paper_eq2_count(patch, patch) == 9 and nnunet_window_count(patch, patch) == 1

    # large image: 3x3 per z step, nnU-Net tiles much more in-plane
    shape = (200, 400, 400)
    g = make_grid("efficient", shape, patch)
    nz = len(nnunet_steps(200, 32))
    assert g.n_long == nz == 12 and g.n_plane == 9 and g.n_total == 9 * nz == paper_eq2_count(shape, patch)
    full = make_grid("full", shape, patch)
    assert full.n_total == nnunet_window_count(shape, patch) == nz * len(nnunet_steps(400, 64)) ** 2 == 12 * 144

    # narrow in-plane (one patch wide in x, 1.25 patches in y): fewer in-plane positions
    g = make_grid("efficient", (100, 80, 64), patch)
    assert g.plane_starts == ((0, 8, 16), (0,)) and g.n_plane == 3
    assert g.n_total < paper_eq2_count((100, 80, 64), patch)

    # very long scan: windows grow linearly with z only
    g = make_grid("efficient", (1000, 300, 300), patch)
    assert g.n_total == 9 * len(nnunet_steps(1000, 32)) == 9 * 62


def test_groups_order_centre_first_and_full_order_matches_nnunet():
    g = make_grid("efficient", (70, 200, 180), (32, 64, 64))
    groups = g.groups()
    zs = [grp[0][0] for grp in groups]
    assert zs == sorted(zs) and len(set(zs)) == len(zs)
    for grp in groups:
        assert grp[0][1:] == g.centre and len(grp) == 9 and len(set(grp)) == 9
        assert all(w[0] == grp[0][0] for w in grp)

    # full mode: exactly nnU-Net's slicers, in nnU-Net's order
    from types import SimpleNamespace
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    shape, patch = (70, 200, 180), (32, 64, 64)
    stub = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=list(patch)), tile_step_size=0.5,
                           verbose=False)
    slicers = nnUNetPredictor._internal_get_sliding_window_slicers(stub, shape)
    theirs = [tuple(s.start for s in sl[1:]) for sl in slicers]
    ours = [w for grp in make_grid("full", shape, patch).groups() for w in grp]
    assert ours == theirs


def test_other_long_axis():
    g = make_grid("efficient", (200, 300, 90), (64, 64, 32), long_axis=2)
    assert g.long_starts == tuple(nnunet_steps(90, 32)) and g.plane_axes == (0, 1)
    for grp in g.groups():
        assert all(w[2] == grp[0][2] for w in grp) and grp[0][:2] == g.centre


# ----------------------------------------------------------------------------------------------
# Loop with stub networks

def _threshold_net(x: torch.Tensor) -> torch.Tensor:
    """Class 1 wherever the input is > 0.5 (logits: background 0, class 1 = 10 * (x - 0.5))."""
    return torch.cat([torch.zeros_like(x), 10 * (x - 0.5)], 1)


def _run(data, mode, thr=1, **kw):
    patch = (16, 32, 32)
    grid = make_grid(mode, data.shape[1:], patch)
    return run_sliding_window(data, grid, _threshold_net, 2, None, thr, **kw), grid


def test_centre_first_skipping_with_stub():
    data = torch.zeros((1, 64, 96, 96))
    data[0, 36:44, 40:56, 40:56] = 1            # an organ in the centre, z 36..43
    res, grid = _run(data, "efficient")
    by_z = {}
    for r in res.records:
        by_z.setdefault(r.z_index, []).append(r)
    for zi, z in enumerate(grid.long_starts):
        recs = by_z[zi]
        assert recs[0].role == "centre" and recs[0].evaluated
        has = z <= 43 and z + 16 > 36
        assert (recs[0].foreground > 0) == has
        assert all(r.evaluated == has for r in recs[1:])
    assert res.n_evaluated + res.n_skipped == grid.n_total
    assert res.n_skipped > 0
    assert torch.equal(res.labels.bool(), data[0] > 0.5)


def test_threshold_zero_never_skips_and_threshold_large_skips_all():
    data = torch.zeros((1, 48, 96, 96))
    data[0, 20:30, 40:56, 40:56] = 1
    res0, grid = _run(data, "efficient", thr=0)
    assert res0.n_evaluated == grid.n_total
    big, _ = _run(data, "efficient", thr=10 ** 9)
    assert big.n_evaluated == grid.n_long                      # centres only


def test_off_centre_organ_missed_by_design_full_mode_finds_it():
    data = torch.zeros((1, 32, 64, 256))
    data[0, 8:24, 24:40, 2:14] = 1      # far left: outside the 2-patch band centred in x
    data[0, 8:24, 24:40, 120:136] = 1   # centre
    eff, grid = _run(data, "efficient")
    lo = min(grid.plane_starts[1])
    assert lo > 14                                              # not covered by any window
    assert eff.labels[8:24, 24:40, 2:14].sum() == 0            # missed by design
    assert eff.labels[8:24, 24:40, 120:136].all()
    full, _ = _run(data, "full")
    assert full.labels[8:24, 24:40, 2:14].all()


def test_neighbour_organ_missed_when_centre_empty():
    data = torch.zeros((1, 16, 96, 96))
    data[0, 4:12, 18:26, 18:26] = 1     # only in a corner (neighbour) window: starts 16, 32, 48
    eff, _ = _run(data, "efficient")
    assert eff.n_evaluated == 1 and eff.labels.sum() == 0
    eff0, _ = _run(data, "efficient", thr=0)
    assert eff0.labels[4:12, 18:26, 18:26].all()


def test_streaming_equals_full_accumulators_and_uncovered_is_background():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 4, 3, padding=1)

    def net(x):
        return conv(x)
    data = torch.randn((1, 80, 96, 100))
    patch = (16, 32, 32)
    g = torch.rand(patch) + 0.1
    for mode in ("efficient", "full"):
        grid = make_grid(mode, data.shape[1:], patch)
        s = run_sliding_window(data, grid, net, 4, g, 0, stream=True)
        k = run_sliding_window(data, grid, net, 4, g, 0, keep_logits=True)
        ref = torch.argmax(k.logits, 0).to(torch.uint8)
        covered = k.logits.abs().sum(0) > 0
        ref[~covered] = 0
        assert torch.equal(s.labels, ref)
        if mode == "efficient":
            assert not covered.all()                                 # corners outside the 3x3 band
            assert (s.labels[~covered] == 0).all()


def test_batched_neighbours_give_same_result():
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    data = torch.randn((1, 40, 100, 100))
    grid = make_grid("efficient", data.shape[1:], (16, 32, 32))
    a = run_sliding_window(data, grid, conv, 3, None, 0, keep_logits=True, batch_size=1)
    b = run_sliding_window(data, grid, conv, 3, None, 0, keep_logits=True, batch_size=8)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert a.n_evaluated == b.n_evaluated == grid.n_total


def test_bad_inputs():
    with pytest.raises(ValueError):
        make_grid("fast", (64, 64, 64), (32, 32, 32))
    with pytest.raises(ValueError):
        make_grid("full", (16, 64, 64), (32, 32, 32))       # not padded
    grid = make_grid("full", (32, 32, 32), (32, 32, 32))
    with pytest.raises(ValueError):
        run_sliding_window(torch.zeros((1, 40, 32, 32)), grid, _threshold_net, 2, None)
    assert isinstance(grid, WindowGrid)
    assert np.isfinite(nnunet_window_count((32, 32, 32), (32, 32, 32)))


def test_argmax0_and_foreground_count_match_torch():
    torch.manual_seed(3)
    a = torch.randn(14, 9, 10, 11)
    a[:, 0, 0, 0] = 1.0                                   # ties: the first maximum wins, as in torch.argmax
    assert torch.equal(argmax0(a), torch.argmax(a, 0).to(torch.uint8))
    assert argmax0(a)[0, 0, 0] == 0
    a[3:7, 1] = a[:, 1].max() + 1.0                       # a tie between later classes: the first (3) wins
    assert torch.equal(argmax0(a), torch.argmax(a, 0).to(torch.uint8))
    assert (argmax0(a)[1] == 3).all()
    many = torch.randn(300, 3, 4, 5)                       # > 255 classes: int16 labels
    assert torch.equal(argmax0(many, torch.int16), torch.argmax(many, 0).to(torch.int16))
    assert foreground_count(a) == int((torch.argmax(a, 0) != 0).sum())
    assert foreground_count(a[:1]) == 0
