"""Stability score (equation (1)) and pseudo-label selection, on hand-made label sequences."""
from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from flare_utils.errors import FlareInputError
from flare_utils.semisup.selection import (SCORES_CSV, SELECTION_FILE, SUMMARY_FILE, compare_labels, pair_term,
                                   select_cases, select_pseudo_labels, selection_quality, stability_score,
                                   stability_scores)

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def vol(*values) -> np.ndarray:
    """A 2x2x2 label map from 8 values (C order)."""
    return np.array(values, dtype=np.uint8).reshape(2, 2, 2)


# y1: 3 foreground voxels; y2 changes voxel 2 (1->2) and voxel 4 (0->1): 2 changed, 4 foreground
Y1 = vol(0, 1, 1, 2, 0, 0, 0, 0)
Y2 = vol(0, 1, 2, 2, 1, 0, 0, 0)
# y3: voxel 4 back to background: 1 changed, 3 foreground
Y3 = vol(0, 1, 2, 2, 0, 0, 0, 0)
EMPTY = vol(0, 0, 0, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------------------------- equation (1)

def test_two_rounds_by_hand():
    # u = SUM(y2 != y1) / SUM(y2 > 0) = 2 / 4
    assert stability_score([Y1, Y2]) == pytest.approx(0.5)
    assert pair_term(Y1, Y2) == (pytest.approx(0.5), 2, 4)


def test_three_rounds_by_hand():
    # u = 1/2 * (2/4 + 1/3) = 5/12
    assert stability_score([Y1, Y2, Y3]) == pytest.approx(5 / 12)
    # identical rounds never change: u = 0
    assert stability_score([Y2, Y2, Y2, Y2]) == 0.0
    # the denominator is the LATER round's foreground: y3 -> y2 is 1 changed / 4 foreground
    assert stability_score([Y3, Y2]) == pytest.approx(0.25)


def test_four_rounds_by_hand():
    # terms: y1->y2 2/4, y2->y2 0/4, y2->y3 1/3 ; u = (1/2 + 0 + 1/3) / 3 = 5/18
    assert stability_score([Y1, Y2, Y2, Y3]) == pytest.approx(5 / 18)


def test_empty_prediction_rules():
    # both empty: nothing changed, 0/0 := 0
    assert stability_score([EMPTY, EMPTY]) == 0.0
    assert stability_score([EMPTY, EMPTY, EMPTY]) == 0.0
    # changed TO empty: c/0 = inf, the case is never selected
    assert math.isinf(stability_score([Y1, EMPTY]))
    assert math.isinf(stability_score([Y1, Y2, EMPTY]))
    # changed FROM empty: every foreground voxel of y2 is new: 4 / 4
    assert stability_score([EMPTY, Y2]) == pytest.approx(1.0)
    # empty, empty, y2: (0 + 4/4) / 2
    assert stability_score([EMPTY, EMPTY, Y2]) == pytest.approx(0.5)


def test_fewer_than_two_rounds_and_shape_mismatch_are_errors():
    with pytest.raises(FlareInputError, match="at least two rounds"):
        stability_score([Y1])
    with pytest.raises(FlareInputError, match="at least two rounds"):
        stability_score([])
    with pytest.raises(FlareInputError, match="shape"):
        stability_score([Y1, np.zeros((2, 2, 3), np.uint8)])


def test_compare_labels_per_organ_dice_by_hand():
    c = compare_labels(Y1, Y2)
    assert c["changed"] == 2 and c["fg_prev"] == 3 and c["fg_cur"] == 4
    assert c["changed_fraction"] == pytest.approx(2 / 8)
    assert c["term"] == pytest.approx(0.5)
    # liver (1): y1 {1,2}, y2 {1,4}: 2*1/(2+2); right kidney (2): y1 {3}, y2 {2,3}: 2*1/(1+2)
    assert c["dsc"][1] == pytest.approx(0.5)
    assert c["dsc"][2] == pytest.approx(2 / 3)
    assert c["dsc"][3] == 1.0                          # absent from both
    assert compare_labels(EMPTY, Y1)["dsc"][1] == 0.0  # absent from one
    assert math.isinf(compare_labels(Y1, EMPTY)["term"])


# ---------------------------------------------------------------------------------- files

def _save(arr: np.ndarray, path: Path, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), str(path))


SEQUENCES = {                      # case -> labels of rounds 1..3, and u by hand
    "case_a": ([Y1, Y2, Y3], 5 / 12),
    "case_b": ([Y2, Y2, Y2], 0.0),
    "case_c": ([EMPTY, EMPTY, EMPTY], 0.0),
    "case_d": ([Y1, Y2, EMPTY], math.inf),
    "case_e": ([Y3, Y2, Y2], 0.125),             # (1/4 + 0) / 2
    "case_f": ([Y2, Y2, Y3], 1 / 6),             # (0 + 1/3) / 2
}


@pytest.fixture()
def rounds(tmp_path) -> list[Path]:
    dirs = [tmp_path / "pseudo_labels" / f"round_{k:02d}" for k in (1, 2, 3)]
    for case, (seq, _) in SEQUENCES.items():
        for d, y in zip(dirs, seq):
            _save(y, d / f"{case}.nii.gz")
    images = tmp_path / "images"
    for case in SEQUENCES:
        _save(np.zeros((2, 2, 2)), images / f"{case}_0000.nii.gz")
    # files that are not label maps of the round, and an unfinished atomic write: ignored
    (dirs[0] / "round.json").write_text("{}")
    _save(Y1, dirs[1] / ".case_z.nii.gz.1234abcd.tmp.nii.gz")
    return dirs


def test_scores_from_round_folders(rounds):
    df = stability_scores(rounds)
    assert sorted(df.index) == sorted(SEQUENCES)
    for case, (_, u) in SEQUENCES.items():
        assert df.at[case, "u"] == pytest.approx(u), case
    assert df.at["case_a", "changed_2"] == 2 and df.at["case_a", "fg_2"] == 4
    assert df.at["case_a", "changed_3"] == 1 and df.at["case_a", "fg_3"] == 3
    assert bool(df.at["case_c", "empty_last"]) and bool(df.at["case_d", "empty_last"])
    assert df.at["case_a", "voxel_ml"] == pytest.approx(2 * 2 * 3 / 1000)
    # only two rounds: u of the first pair
    df2 = stability_scores(rounds[:2])
    assert df2.at["case_a", "u"] == pytest.approx(0.5)


def test_round_missing_a_case_is_an_error(rounds):
    (rounds[1] / "case_e.nii.gz").unlink()
    with pytest.raises(FlareInputError, match=r"round_02.*misses case\(s\) \['case_e'\]"):
        stability_scores(rounds)
    with pytest.raises(FlareInputError, match="at least two rounds"):
        stability_scores(rounds[:1])


def test_geometry_disagreement_is_an_error(rounds):
    _save(Y2, rounds[2] / "case_b.nii.gz", affine=np.diag([2.0, 2.0, 4.0, 1.0]))
    with pytest.raises(FlareInputError, match=r"round_03/case_b.nii.gz.*geometry differs.*spacing"):
        stability_scores(rounds)
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    _save(Y2, rounds[2] / "case_b.nii.gz", affine=shifted)
    with pytest.raises(FlareInputError, match="origin"):
        stability_scores(rounds)


# ---------------------------------------------------------------------------------- selection

U = {"c01": 0.05, "c02": 0.1, "c03": 0.02, "c04": math.inf, "c05": 0.05, "c06": 0.3, "c07": 0.0}


def test_threshold_is_strict_and_never_keeps_inf():
    df = select_cases(U, threshold=0.1)
    assert sorted(df.index[df["selected"]]) == ["c01", "c03", "c05", "c07"]     # 0.1 itself is not < 0.1
    assert not df.at["c04", "selected"]
    assert list(df.index) == ["c07", "c03", "c01", "c05", "c02", "c06", "c04"]  # rank order: u, then id
    assert list(df["rank"]) == list(range(1, 8))
    huge = select_cases(U, threshold=1e300)
    assert huge["selected"].sum() == 6 and not huge.at["c04", "selected"]


def test_fraction_lowest_first_ties_by_case_id():
    # round(0.5 * 7) = round half up of 3.5 = 4: c07, c03, then the tie at 0.05 broken by id: c01, c05
    df = select_cases(U, threshold=None, fraction=0.5)
    assert sorted(df.index[df["selected"]]) == ["c01", "c03", "c05", "c07"]
    # 3 cases: the tie c01/c05 is cut by case id
    df = select_cases(U, threshold=None, fraction=3 / 7)
    assert sorted(df.index[df["selected"]]) == ["c01", "c03", "c07"]
    # a tiny fraction keeps at least one case; 0 keeps none; 1 keeps every finite one
    assert list(select_cases(U, threshold=None, fraction=0.01).query("selected").index) == ["c07"]
    assert select_cases(U, threshold=None, fraction=0.0)["selected"].sum() == 0
    everything = select_cases(U, threshold=None, fraction=1.0)
    assert everything["selected"].sum() == 6 and not everything.at["c04", "selected"]
    # ties are broken by id whatever the input order
    rev = select_cases(dict(reversed(list(U.items()))), threshold=None, fraction=3 / 7)
    assert sorted(rev.index[rev["selected"]]) == ["c01", "c03", "c07"]


def test_exclude_empty_and_rule_errors(rounds):
    df = stability_scores(rounds)
    keep = select_cases(df, threshold=0.2)
    assert sorted(keep.index[keep["selected"]]) == ["case_b", "case_c", "case_e", "case_f"]
    no_empty = select_cases(df, threshold=0.2, exclude_empty=True)
    assert sorted(no_empty.index[no_empty["selected"]]) == ["case_b", "case_e", "case_f"]
    with pytest.raises(FlareInputError, match="exactly one"):
        select_cases(U, threshold=0.1, fraction=0.5)
    with pytest.raises(FlareInputError, match="exactly one"):
        select_cases(U, threshold=None)
    with pytest.raises(FlareInputError, match="fraction"):
        select_cases(U, threshold=None, fraction=1.5)
    with pytest.raises(FlareInputError, match="threshold"):
        select_cases(U, threshold=0)
    with pytest.raises(FlareInputError, match=">= 0"):
        select_cases({"a": -1.0}, threshold=0.1)
    with pytest.raises(FlareInputError, match="empty_last"):
        select_cases(U, threshold=0.1, exclude_empty=True)


def test_select_pseudo_labels_writes_trainer_selection_and_scores(rounds, tmp_path):
    from flare_utils.semisup.selection_file import read_selection_file
    images = tmp_path / "images"
    out = tmp_path / "selection"
    res = select_pseudo_labels(rounds, images, out, threshold=0.2)
    assert res.selected == ["case_b", "case_c", "case_e", "case_f"]
    sel = read_selection_file(out / SELECTION_FILE)
    assert list(sel.cases) == res.selected
    assert sel.labels_folder == rounds[-1].resolve() and sel.images_folder == images.resolve()
    assert sel.meta["rule"] == "threshold" and sel.meta["threshold"] == 0.2
    assert sel.meta["scores"]["case_e"] == pytest.approx(0.125)
    csv = pd.read_csv(out / SCORES_CSV, index_col="case")
    assert len(csv) == len(SEQUENCES) and math.isinf(csv.at["case_d", "u"])
    assert csv["selected"].sum() == 4 and csv.at["case_a", "u"] == pytest.approx(5 / 12)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["n_selected"] == 4 and summary["n_infinite"] == 1 and summary["n_empty_last"] == 2
    # labels of another round, and a fraction
    res2 = select_pseudo_labels(rounds, images, out, threshold=None, fraction=0.5, labels_round=1)
    assert res2.selected == ["case_b", "case_c", "case_e"]
    assert read_selection_file(out / SELECTION_FILE).labels_folder == rounds[1].resolve()


def test_nothing_selected(rounds, tmp_path):
    out = tmp_path / "selection"
    select_pseudo_labels(rounds, tmp_path / "images", out, threshold=0.2)
    with pytest.raises(FlareInputError, match="no case selected"):
        select_pseudo_labels(rounds, tmp_path / "images", out, threshold=None, fraction=0.0)
    assert (out / SCORES_CSV).is_file()
    res = select_pseudo_labels(rounds, tmp_path / "images", out, threshold=None, fraction=0.0,
                               allow_empty_selection=True)
    assert res.selection_file is None and not (out / SELECTION_FILE).exists()   # no stale selection left


def test_selection_quality_summary():
    scores = select_cases({"a": 0.0, "b": 0.05, "c": 0.2, "d": math.inf}, threshold=0.1)
    quality = pd.DataFrame({"mean_dsc": [0.9, 0.8, 0.5, 0.1]}, index=["a", "b", "c", "d"])
    df, s = selection_quality(scores, quality)
    assert s["n_cases"] == 4 and s["spearman_rho"] == pytest.approx(1.0)
    assert s["mean_quality_selected"] == pytest.approx(0.85)
    assert s["mean_quality_rejected"] == pytest.approx(0.3)
    assert df.at["d", "error"] == pytest.approx(0.9)
