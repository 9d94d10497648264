"""Tests of the synthetic FLARE22-like CT generator (flare_utils.synthetic.phantom).

All but one test use the `tiny` preset (well under a second per case); one generates a
`realistic` 512x512x200 case and prints how long it took.
"""
from __future__ import annotations

import dataclasses
import json
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from flare_utils.synthetic import phantom
from flare_utils.errors import FlareInputError
from flare_utils.data.labels import BY_NAME, LABELS
from flare_utils.synthetic.phantom import PRESETS, PhantomPreset, generate_case, write_cohort

L = {name: o.label for name, o in BY_NAME.items()}
NON_CONTRAST = dataclasses.replace(PRESETS["tiny"], name="tiny_nc",
                                   contrast_weights={"non_contrast": 1.0})


def world_centroid(case, label: int) -> np.ndarray:
    """Centroid of a label in world (RAS+ mm) coordinates, from the case's affine."""
    ijk = np.argwhere(case.label == label)
    assert len(ijk), f"label {label} absent"
    return (case.affine[:3, :3] @ ijk.mean(0)) + case.affine[:3, 3]


def body_centre(case) -> np.ndarray:
    ijk = np.argwhere(case.image > -500)
    return (case.affine[:3, :3] @ ijk.mean(0)) + case.affine[:3, 3]


@pytest.fixture(scope="module")
def full_case():
    """A tiny case whose field of view holds every organ."""
    return generate_case(3, "tiny", fov="chest_abdomen_pelvis", missing=())


# ------------------------------------------------------------------------------------------
def test_presets_are_data():
    assert {"realistic", "demo", "tiny"} <= set(PRESETS)
    assert PRESETS["realistic"].matrix == (512, 512)
    for p in PRESETS.values():
        assert isinstance(p, PhantomPreset)
        assert PhantomPreset.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_tiny_is_fast_and_typed():
    t = time.perf_counter()
    c = generate_case(0, "tiny")
    dt = time.perf_counter() - t
    print(f"tiny case {c.shape} in {dt:.3f} s")
    assert dt < 5  # well under a second normally; generous for loaded CI machines
    assert c.image.dtype == np.int16 and c.label.dtype == np.uint8
    assert c.image.shape == c.label.shape and c.image.ndim == 3
    assert c.image.shape[:2] == PRESETS["tiny"].matrix
    assert int(c.label.max()) <= 13
    assert c.fov in phantom.FOVS


def test_deterministic_by_seed():
    a = generate_case(11, "tiny")
    b = generate_case(11, "tiny")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine) and a.fov == b.fov and a.missing == b.missing
    c = generate_case(12, "tiny", fov=a.fov)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)
    assert c.label.shape != a.label.shape or not np.array_equal(c.label, a.label)


def test_all_organs_present(full_case):
    assert full_case.present_labels == tuple(range(1, 14))
    for lab in range(1, 14):
        assert (full_case.label == lab).any(), LABELS[lab].name
    for seed in range(4):
        c = generate_case(seed, "tiny", fov="abdomen_pelvis", missing=())
        # only the lower esophagus may fall outside an abdominal field of view
        assert set(range(1, 14)) - set(c.present_labels) <= {L["esophagus"]}
        assert set(c.present_labels) == set(np.unique(c.label)) - {0}


def test_missing_organs_are_absent():
    c = generate_case(3, "tiny", fov="chest_abdomen_pelvis", missing=("gallbladder", "kidney_left"))
    assert c.missing == ("gallbladder", "left_kidney")
    assert not (c.label == L["gallbladder"]).any() and not (c.label == L["left_kidney"]).any()
    assert L["gallbladder"] not in c.present_labels and L["left_kidney"] not in c.present_labels
    assert L["right_kidney"] in c.present_labels
    # missing drawn from the preset's probabilities
    always = dataclasses.replace(PRESETS["tiny"], missing_prob={"gallbladder": 1.0})
    d = generate_case(5, always, fov="abdomen")
    assert d.missing == ("gallbladder",) and not (d.label == L["gallbladder"]).any()
    with pytest.raises(FlareInputError):
        generate_case(0, "tiny", missing=("appendix",))
    with pytest.raises(FlareInputError):
        generate_case(0, "tiny", fov="knee")
    with pytest.raises(FlareInputError):
        generate_case(0, "no_such_preset")


def test_geometry_spacing_and_affine():
    p = PRESETS["tiny"]
    for seed in range(6):
        c = generate_case(seed, p)
        sx, sy, sz = c.spacing
        assert p.inplane_spacing[0] - 1e-6 <= sx <= p.inplane_spacing[1] + 1e-6 and sx == sy
        assert p.slice_spacing[0] - 1e-6 <= sz <= p.slice_spacing[1] + 1e-6
        assert np.allclose(np.sqrt((c.affine[:3, :3] ** 2).sum(0)), c.spacing)
        assert nib.aff2axcodes(c.affine) == ("R", "A", "S")
        assert c.shape[2] <= p.max_slices
    # realistic preset: clinical spacings (checked on the drawn geometry only via a tiny matrix)
    r = dataclasses.replace(PRESETS["realistic"], matrix=(64, 64), name="r64")
    for seed in range(4):
        c = generate_case(seed, r, fov="abdomen")
        assert 0.6 - 1e-6 <= c.spacing[0] <= 1.0 + 1e-6
        assert c.spacing[2] in PRESETS["realistic"].slice_choices


def test_fixed_slice_count_and_other_orientation():
    p = dataclasses.replace(PRESETS["tiny"], n_slices=40, axcodes="LPS", name="tiny_lps")
    c = generate_case(3, p, fov="abdomen", missing=())
    assert nib.aff2axcodes(c.affine) == ("L", "P", "S")
    assert c.shape[2] == 40
    ras = generate_case(3, dataclasses.replace(p, axcodes="RAS"), fov="abdomen", missing=())
    # same anatomy in world coordinates whatever the array orientation
    for lab in (L["liver"], L["spleen"], L["aorta"]):
        assert np.allclose(world_centroid(c, lab), world_centroid(ras, lab), atol=1e-3)


def test_anatomy_in_world_coordinates(full_case):
    """RAS+ world: +x = patient's right, +y = anterior, +z = superior (NIfTI / nibabel)."""
    for case in (full_case, generate_case(7, "tiny", fov="abdomen", missing=())):
        c = {name: world_centroid(case, lab) for name, lab in L.items() if lab in case.present_labels}
        body = body_centre(case)
        x, y, z = 0, 1, 2
        assert c["liver"][x] > body[x] + 20          # liver on the patient's right
        assert c["gallbladder"][x] > body[x]
        assert c["spleen"][x] < body[x] - 50          # spleen on the patient's left ...
        assert c["spleen"][y] < c["stomach"][y]       # ... and posterior to the stomach
        assert c["stomach"][x] < body[x]
        assert c["right_kidney"][x] > c["inferior_vena_cava"][x] > c["aorta"][x] > c["left_kidney"][x]
        assert c["right_adrenal_gland"][x] > body[x] > c["left_adrenal_gland"][x]
        for side in ("right", "left"):
            assert c[f"{side}_kidney"][y] < c["aorta"][y] - 10      # kidneys posterior to the aorta
            assert c[f"{side}_adrenal_gland"][z] > c[f"{side}_kidney"][z] + 10  # adrenals on top
        assert c["pancreas"][y] > c["aorta"][y] + 10                # pancreas in front of the aorta
        assert c["gallbladder"][y] > c["right_kidney"][y] + 20      # under the liver, anterior
        assert c["duodenum"][z] < c["pancreas"][z]
        assert c["liver"][z] > c["right_kidney"][z]
        if "esophagus" in c:
            assert c["esophagus"][z] > c["stomach"][z]
        # pancreatic head (right part) near the duodenum, tail towards the spleen
        pan = np.argwhere(case.label == L["pancreas"])
        wx = case.affine[0, 0] * pan[:, 0] + case.affine[0, 3]
        assert wx.max() > body[x] and wx.min() < c["left_kidney"][x] + 30


def test_hu_values_near_calibration():
    vals = {k: [] for k in ("liver", "spleen", "aorta", "air", "fat")}
    for seed in range(3):
        c = generate_case(seed, NON_CONTRAST, fov="abdomen", missing=())
        img = c.image.astype(np.float32)
        for name in ("liver", "spleen", "aorta"):
            m = ndi.binary_erosion(c.label == L[name])
            if m.sum() < 5:
                m = c.label == L[name]
            vals[name].append(float(np.median(img[m])))
        body = ndi.binary_dilation(img > -500, iterations=3)
        vals["air"].append(float(img[~body].mean()))
        fat = (img > -190) & (img < -30) & (c.label == 0)
        vals["fat"].append(float(img[fat].mean()))
    assert abs(np.mean(vals["air"]) + 1000) < 25
    assert abs(np.mean(vals["liver"]) - 46.4) < 15
    assert abs(np.mean(vals["spleen"]) - 34.8) < 15
    assert abs(np.mean(vals["aorta"]) - 43.8) < 20
    assert -120 < np.mean(vals["fat"]) < -60
    # contrast: the aorta is much brighter in an arterial-phase case
    art = dataclasses.replace(PRESETS["tiny"], contrast_weights={"arterial": 1.0}, name="tiny_art")
    c = generate_case(0, art, fov="abdomen", missing=())
    assert np.median(c.image[c.label == L["aorta"]]) > 150
    # bone is bright, the lungs dark
    t = generate_case(0, NON_CONTRAST, fov="chest_abdomen", missing=())
    assert t.image.max() > 300 and (t.image < -700).sum() > (t.image < -500).sum() * 0.5


def test_whole_body_has_air_around_head_and_legs():
    long = dataclasses.replace(PRESETS["tiny"], max_slices=400, name="tiny_long")
    c = generate_case(2, long, fov="whole_body")
    body = c.image > -500
    per_slice = body.mean(axis=(0, 1))
    assert per_slice[-1] == 0                                  # air above the head
    top = np.nonzero(per_slice)[0].max()
    assert per_slice[top - 3] < 0.5 * per_slice.max()           # the head is small
    n_parts = ndi.label(body[:, :, 0])[1]
    assert n_parts >= 2                                        # two legs, air between them


def test_realistic_512_case_is_generated():
    p = dataclasses.replace(PRESETS["realistic"], n_slices=200, name="realistic200")
    t = time.perf_counter()
    c = generate_case(0, p, fov="abdomen")
    dt = time.perf_counter() - t
    print(f"\nrealistic case {c.shape} spacing {c.spacing} generated in {dt:.2f} s")
    assert c.shape == (512, 512, 200)
    assert c.image.dtype == np.int16 and len(c.present_labels) >= 11


# ------------------------------------------------------------------------------------------
def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_write_cohort_layout_and_json(tmp_path):
    root = tmp_path / "flare"
    info = write_cohort(root, 2, 3, 1, seed=7, preset="tiny")
    assert _files(root) == sorted([
        "Training/FLARE22_LabeledCase50/images/FLARE22_Tr_0001_0000.nii.gz",
        "Training/FLARE22_LabeledCase50/images/FLARE22_Tr_0002_0000.nii.gz",
        "Training/FLARE22_LabeledCase50/labels/FLARE22_Tr_0001.nii.gz",
        "Training/FLARE22_LabeledCase50/labels/FLARE22_Tr_0002.nii.gz",
        "Training/FLARE22_UnlabeledCase/Case_00001_0000.nii.gz",
        "Training/FLARE22_UnlabeledCase/Case_00002_0000.nii.gz",
        "Training/FLARE22_UnlabeledCase/Case_00003_0000.nii.gz",
        "Validation/images/FLARE22_Ts_0001_0000.nii.gz",
        "Validation/labels/FLARE22_Ts_0001.nii.gz",
        "SyntheticTruth/unlabelled_labels/Case_00001.nii.gz",
        "SyntheticTruth/unlabelled_labels/Case_00002.nii.gz",
        "SyntheticTruth/unlabelled_labels/Case_00003.nii.gz",
        "cohort.json",
    ])
    doc = json.loads((root / "cohort.json").read_text())
    assert doc["request"]["seed"] == 7 and doc["request"]["preset"]["name"] == "tiny"
    assert len(doc["cases"]) == 6
    for case in doc["cases"]:
        assert {"case_id", "split", "seed", "fov", "spacing", "shape", "missing"} <= set(case)
    assert [c["case_id"] for c in info.split("labelled")] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]
    assert len(info.unlabelled_images) == 3 and all(p.exists() for p in info.labelled_labels)
    # files agree with generate_case and carry the geometry
    tr1 = info.split("labelled")[0]
    ref = generate_case(tr1["seed"], "tiny")
    img = nib.load(str(root / tr1["image"]))
    lab = nib.load(str(root / tr1["label"]))
    assert np.array_equal(np.asanyarray(img.dataobj), ref.image)
    assert np.array_equal(np.asanyarray(lab.dataobj), ref.label)
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, ref.affine) and np.allclose(lab.affine, ref.affine)
    assert list(tr1["shape"]) == list(ref.shape) and tr1["fov"] == ref.fov


def test_case_seeds_do_not_depend_on_cohort_size(tmp_path):
    a = write_cohort(tmp_path / "a", 1, 2, 0, seed=3, preset="tiny")
    b = write_cohort(tmp_path / "b", 1, 4, 1, seed=3, preset="tiny")
    assert [c["seed"] for c in a.split("unlabelled")] == [c["seed"] for c in b.split("unlabelled")][:2]
    assert a.split("labelled")[0]["seed"] == b.split("labelled")[0]["seed"]
    for pa, pb in zip(a.unlabelled_images, b.unlabelled_images):
        assert pa.read_bytes() == pb.read_bytes()
    seeds = [c["seed"] for c in b.cases]
    assert len(set(seeds)) == len(seeds)


def test_write_cohort_is_idempotent_and_checks_the_request(tmp_path):
    root = tmp_path / "c"
    write_cohort(root, 1, 1, 1, seed=1, preset="tiny")
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    again = write_cohort(root, 1, 1, 1, seed=1, preset="tiny")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")} == stamp
    assert again.n_labelled == 1 and len(again.cases) == 3
    with pytest.raises(FlareInputError, match="different request"):
        write_cohort(root, 2, 1, 1, seed=1, preset="tiny")
    with pytest.raises(FlareInputError, match="different request"):
        write_cohort(root, 1, 1, 1, seed=2, preset="tiny")
    info = write_cohort(root, 2, 1, 1, seed=1, preset="tiny", overwrite=True)
    assert len(info.labelled_images) == 2 and all(p.exists() for p in info.labelled_images)
    # a folder that is not a cohort is never replaced silently
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FlareInputError, match="not a synthetic cohort"):
        write_cohort(other, 1, 0, 0, preset="tiny")
    assert (other / "keep.txt").exists()


def test_write_cohort_failure_leaves_nothing(tmp_path, monkeypatch):
    real = phantom.generate_case
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom, "generate_case", flaky)
    root = tmp_path / "cohort"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_cohort(root, 2, 2, 0, preset="tiny")
    assert calls["n"] == 3
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either


def test_fov_mix_and_processes(tmp_path):
    mix = {"labelled": "abdomen", "unlabelled": {"whole_body": 1.0}, "validation": "abdomen"}
    info = write_cohort(tmp_path / "m", 1, 2, 1, seed=4, preset="tiny", fov_mix=mix, processes=2)
    assert [c["fov"] for c in info.split("unlabelled")] == ["whole_body", "whole_body"]
    assert {c["fov"] for c in info.split("labelled") + info.split("validation")} == {"abdomen"}
    seq = write_cohort(tmp_path / "s", 1, 2, 1, seed=4, preset="tiny", fov_mix=mix, processes=1)
    for a, b in zip(info.cases, seq.cases):
        assert (info.root / a["image"]).read_bytes() == (seq.root / b["image"]).read_bytes()
    with pytest.raises(FlareInputError, match="unknown field"):
        write_cohort(tmp_path / "x", 1, 0, 0, preset="tiny", fov_mix={"pelvis_only": 1})
