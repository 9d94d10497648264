from flare_utils.data import labels
def test_table_matches_flare22_order_and_tolerances():
    expected = [(1, "liver", 5), (2, "right_kidney", 3), (3, "spleen", 3), (4, "pancreas", 5),
                (5, "aorta", 2), (6, "inferior_vena_cava", 2), (7, "right_adrenal_gland", 2),
                (8, "left_adrenal_gland", 2), (9, "gallbladder", 2), (10, "esophagus", 3),
                (11, "stomach", 5), (12, "duodenum", 7), (13, "left_kidney", 3)]
    assert [(o.label, o.name, o.nsd_tolerance_mm) for o in labels.ORGANS] == expected
    assert labels.NUM_CLASSES == 14
    assert labels.Z_CUT_LABELS == (5, 6, 10)
    assert labels.dataset_json_labels()["background"] == 0
    assert labels.dataset_json_labels()["left_kidney"] == 13


def test_totalsegmentator_names_map_to_flare_labels():
    ts = {"liver": 1, "kidney_right": 2, "spleen": 3, "pancreas": 4, "aorta": 5,
          "inferior_vena_cava": 6, "adrenal_gland_right": 7, "adrenal_gland_left": 8,
          "gallbladder": 9, "esophagus": 10, "stomach": 11, "duodenum": 12, "kidney_left": 13}
    for name, lab in ts.items():
        assert labels.label_for(name) == lab, name
        assert labels.label_for(name + ".nii.gz") == lab, name


def test_btcv_amos_and_flare_spellings():
    assert labels.label_for("Right Kidney") == 2
    assert labels.label_for("postcava") == 6          # AMOS
    assert labels.label_for("IVC") == 6
    assert labels.label_for("Right adrenal gland") == 7
    assert labels.label_for("left-adrenal-gland") == 8
    assert labels.label_for("Gall Bladder") == 9
    assert labels.label_for("oesophagus") == 10
    assert labels.label_for("RK") == 2 and labels.label_for("LK") == 13


def test_non_flare_structures_are_not_mapped():
    for name in ["colon", "small_bowel", "portal_vein_and_splenic_vein", "urinary_bladder",
                 "vertebrae_L1", "rib_left_11", "GTV-1"]:
        assert labels.label_for(name) is None


def test_organ_lookup_errors_name_the_input():
    import pytest
    with pytest.raises(KeyError, match="14"):
        labels.organ(14)
    with pytest.raises(KeyError, match="colon"):
        labels.organ("colon")
    assert labels.organ("kidney_left").label == 13
