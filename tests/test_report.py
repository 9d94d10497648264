"""Tables and pictures of flare_utils.study.report on small hand-made per-case tables and volumes."""
from __future__ import annotations

import json

import matplotlib
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from flare_utils.study import report  # noqa: E402
from flare_utils.evaluation.efficiency import EfficiencyReport  # noqa: E402
from flare_utils.errors import FlareInputError  # noqa: E402
from flare_utils.data.labels import ORGANS  # noqa: E402


def per_case(dsc: dict[str, list[float]], nsd: dict[str, list[float]] | None = None,
             names=("case_0001.nii.gz", "case_0002.nii.gz", "case_0003.nii.gz")) -> pd.DataFrame:
    """A table in the official layout: every organ 1.0 unless given."""
    n = len(names)
    row = {"Name": list(names)}
    for o in ORGANS:
        row[f"{o.flare_key}_DSC"] = dsc.get(o.flare_key, [1.0] * n)
    for o in ORGANS:
        row[f"{o.flare_key}_NSD"] = (nsd or {}).get(o.flare_key, [1.0] * n)
    return pd.DataFrame(row)


PERFECT = per_case({})
PERTURBED = per_case({"Liver": [0.9, 0.8, 0.7], "RK": [0.5, 0.5, 0.5]},
                     {"Liver": [1.0, 0.5, 0.0]})


def test_label_colormap_is_fixed_and_distinct():
    cmap = report.label_colormap()
    assert cmap.N == 14
    assert cmap(0)[3] == 0.0                                   # background transparent
    colors = {tuple(np.round(cmap(i), 4)) for i in range(1, 14)}
    assert len(colors) == 13 and all(c[3] == 1.0 for c in colors)
    norm = report.label_norm()
    assert [int(norm(v)) for v in range(14)] == list(range(14))  # label v -> colour index v
    assert report.label_colormap().colors == cmap.colors         # same every time


def test_organ_table_strings_and_numbers():
    frames = {"labelled only": PERTURBED, "with pseudo labels": PERFECT}
    t = report.organ_table(frames, "DSC")
    assert list(t.columns) == ["labelled only", "with pseudo labels"]
    assert list(t.index) == [o.title for o in ORGANS] + ["Mean"]
    assert t.index.name == "Organ"
    std = np.std([0.9, 0.8, 0.7])                               # population std (ddof=0)
    assert t.loc["Liver", "labelled only"] == f"0.8000 ± {std:.4f}"
    assert t.loc["Right kidney", "labelled only"] == "0.5000 ± 0.0000"
    assert t.loc["Spleen", "with pseudo labels"] == "1.0000 ± 0.0000"
    assert t.loc["Mean", "with pseudo labels"] == "1.0000 ± 0.0000"

    num = report.organ_table(frames, "DSC", numeric=True)
    assert num.loc["Liver", ("labelled only", "mean")] == pytest.approx(0.8)
    assert num.loc["Liver", ("labelled only", "std")] == pytest.approx(std)
    organ_means = [0.8, 0.5] + [1.0] * 11
    assert num.loc["Mean", ("labelled only", "mean")] == pytest.approx(np.mean(organ_means))
    case_means = [(0.9 + 0.5 + 11) / 13, (0.8 + 0.5 + 11) / 13, (0.7 + 0.5 + 11) / 13]
    assert num.loc["Mean", ("labelled only", "std")] == pytest.approx(np.std(case_means))

    nsd = report.organ_table(frames, "NSD", numeric=True)
    assert nsd.loc["Liver", ("labelled only", "mean")] == pytest.approx(0.5)
    pct = report.organ_table(frames, "DSC", percent=True, decimals=2)
    assert pct.loc["Liver", "labelled only"] == f"80.00 ± {100 * std:.2f}"


def test_organ_table_missing_organ_and_bad_input():
    partial = PERFECT.drop(columns=["Liver_DSC"])
    t = report.organ_table({"a": partial, "b": PERTURBED})
    assert t.loc["Liver", "a"] == "n/a" and t.loc["Liver", "b"].startswith("0.8000")
    with pytest.raises(FlareInputError, match="no '<organ>_HD95' columns"):
        report.organ_table({"a": PERFECT}, "HD95")
    with pytest.raises(FlareInputError):
        report.organ_table({}, "DSC")
    with pytest.raises(FlareInputError):
        report.organ_table({"a": PERFECT}, "IoU")


def test_best_and_worst():
    bw = report.best_and_worst(PERTURBED, "DSC", n=1)
    assert list(bw["which"]) == ["best", "worst"]
    assert list(bw["Name"]) == ["case_0001.nii.gz", "case_0003.nii.gz"]
    assert list(bw["case_id"]) == ["case_0001", "case_0003"]
    assert bw["mean_DSC"].iloc[0] > bw["mean_DSC"].iloc[1]
    two = report.best_and_worst(PERTURBED, "NSD", n=2)
    assert len(two) == 4 and list(two["which"]) == ["best", "best", "worst", "worst"]
    assert two["Name"].iloc[-1] == "case_0003.nii.gz"           # the worst is last
    # ties break by name
    assert list(report.best_and_worst(PERFECT)["Name"]) == ["case_0001.nii.gz", "case_0003.nii.gz"]


def _report(**kw) -> EfficiencyReport:
    base = dict(wall_s=10.0, peak_rss_mib=2000.0, cpu_util_mean=50.0, cpu_auc=500.0,
                gpu_mem_peak_mib=None, gpu_auc=None, samples=100, device="cpu")
    base.update(kw)
    return EfficiencyReport(**base)


def test_efficiency_table(tmp_path):
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps(_report().to_dict()))
    gpu = tmp_path / "gpu.json"                                 # one report per case
    gpu.write_text(json.dumps({
        "case_0001": _report(wall_s=2.0, gpu_mem_peak_mib=4000.0, gpu_auc=100.0, device="cuda:0 (X)").to_dict(),
        "case_0002": _report(wall_s=4.0, gpu_mem_peak_mib=6000.0, gpu_auc=300.0, device="cuda:0 (X)").to_dict(),
    }))
    t = report.efficiency_table({"efficient": cpu, "accurate": gpu})
    assert list(t.index) == ["efficient", "accurate"]
    assert t.loc["efficient", "GPU AUC (MiB·s)"] == "not measured"
    assert t.loc["efficient", "GPU peak (MiB)"] == "not measured"
    assert t.loc["efficient", "time (s)"] == 10.0 and t.loc["efficient", "CPU AUC (%·s)"] == 500.0
    assert t.loc["efficient", "peak RAM (MiB)"] == 2000.0 and t.loc["efficient", "cases"] == 1
    assert t.loc["accurate", "cases"] == 2 and t.loc["accurate", "time (s)"] == 3.0
    assert t.loc["accurate", "GPU AUC (MiB·s)"] == 200.0
    assert t.loc["accurate", "device"] == "cuda:0 (X)"
    # a list of file paths: names from the file stems
    assert list(report.efficiency_table([cpu]).index) == ["cpu"]
    with pytest.raises(FlareInputError, match="missing"):
        report.efficiency_table({"x": tmp_path / "nope.json"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(FlareInputError, match="not an efficiency report"):
        report.efficiency_table([bad])


def test_box_plots_one_panel_per_organ_one_box_per_set(tmp_path):
    fig = report.box_plots({"a": PERFECT, "b": PERTURBED}, "DSC")
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == [o.title for o in ORGANS]
    assert all(len(ax.patches) == 2 for ax in panels)            # one box per set (patch_artist)
    assert all(ax.get_ylim() == pytest.approx((-0.02, 1.02)) for ax in panels)
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b"]
    out = report.save_figure(fig, tmp_path / "box.png")
    assert out.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["box.png"]


def test_box_plots_fit_the_page_with_many_sets(tmp_path):
    """Five models x 13 organs: at most ~1400 px wide at save_figure's 110 dpi (was 2395 px)."""
    frames = {f"model {i}": PERTURBED for i in range(5)}
    path = report.save_figure(report.box_plots(frames, "NSD"), tmp_path / "box.png")
    from PIL import Image
    width, height = Image.open(path).size
    assert 900 <= width <= 1400 and height <= 1100


def _phantom(shape=(24, 20, 12)):
    gt = np.zeros(shape, np.uint8)
    gt[4:14, 4:14, 2:10] = 1          # liver
    gt[16:20, 6:10, 5:8] = 2          # right kidney
    gt[3:20, 2:18, 7] = 3             # a large spleen patch on axial slice 7: the largest area
    image = np.full(shape, -500.0, np.float32)
    image[gt > 0] = 60.0
    return image, gt


def test_overlay_figure_layout_slice_and_aspect():
    image, gt = _phantom()
    pred = gt.copy()
    pred[pred == 2] = 0
    fig = report.overlay_figure(image, gt, pred, spacing=(0.8, 0.8, 2.5), title="case_0001")
    axes = fig.axes
    assert len(axes) == 4
    assert axes[0].get_title() == "ground truth" and axes[1].get_title() == "prediction"
    assert axes[0].get_ylabel() == "axial (k=7)"                # the largest labelled axial area
    assert axes[0].get_aspect() == pytest.approx(1.0)
    assert axes[2].get_aspect() == pytest.approx(2.5 / 0.8)     # coronal: z spacing / x spacing
    img0 = axes[0].get_images()
    assert len(img0) == 2                                       # CT + overlay
    assert img0[0].get_clim() == (-160.0, 240.0)                # the CT window
    assert img0[0].get_array().shape == (gt.shape[1], gt.shape[0])
    assert axes[0].xaxis_inverted()                             # radiological convention
    assert fig.get_suptitle() == "case_0001"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["Liver", "Right kidney", "Spleen"]
    # without prediction: one column; with explicit slices
    fig2 = report.overlay_figure(image, gt, None, spacing=(1, 1, 1), slices=(3, 5))
    assert len(fig2.axes) == 2 and fig2.axes[0].get_ylabel() == "axial (k=3)"
    with pytest.raises(FlareInputError):
        report.overlay_figure(image, gt[:, :, :5], None, spacing=(1, 1, 1))
    with pytest.raises(FlareInputError):
        report.overlay_figure(image, gt, None, spacing=(1, 0, 1))


def _save(arr, path, spacing=(0.8, 0.8, 2.5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))


def test_overlay_case_and_case_gallery_read_files(tmp_path):
    image, gt = _phantom()
    _save(image, tmp_path / "images" / "case_0001_0000.nii.gz")
    _save(gt, tmp_path / "gt" / "case_0001.nii.gz")
    _save(gt, tmp_path / "pred" / "case_0001.nii.gz")
    fig = report.overlay_case("case_0001.nii.gz", tmp_path / "gt", tmp_path / "pred", tmp_path / "images")
    assert len(fig.axes) == 4 and fig.get_suptitle() == "case_0001"
    assert fig.axes[2].get_aspect() == pytest.approx(2.5 / 0.8)
    no_image = report.overlay_case("case_0001", tmp_path / "gt", tmp_path / "pred", None)
    assert len(no_image.axes) == 4
    with pytest.raises(FlareInputError, match="no prediction"):
        report.overlay_case("case_0001", tmp_path / "gt", tmp_path / "images")

    ds = tmp_path / "Dataset990_X"
    for i in range(3):
        _save(image, ds / "imagesTr" / f"c{i}_0000.nii.gz")
        _save(gt, ds / "labelsTr" / f"c{i}.nii.gz")
    g = report.case_gallery(ds, n=2)
    assert len(g.axes) == 4 and g.axes[0].get_ylabel() == "c0" and g.axes[2].get_ylabel() == "c1"


def test_volume_table():
    summary = pd.DataFrame({"case": ["a", "b", "u"], "split": ["train", "train", "unlabelled"],
                            "liver": [1500.0, 1700.0, np.nan], "spleen": [200.0, 0.0, np.nan]})
    t = report.volume_table(summary)
    assert list(t.index) == ["Liver", "Spleen"]
    assert t.loc["Liver", "mean (ml)"] == 1600.0 and t.loc["Liver", "cases"] == 2
    assert t.loc["Spleen", "absent"] == 1 and t.loc["Spleen", "max (ml)"] == 200.0


def test_slugs_tables_and_csv_reading(tmp_path):
    assert report.slug("With pseudo labels (round 2)") == "with-pseudo-labels-round-2"
    assert report.slug("***") == "set"
    assert report.set_slugs(["A b", "c"]) == {"A b": "a-b", "c": "c"}
    with pytest.raises(FlareInputError, match="same folder name"):
        report.set_slugs(["A b", "a-b"])
    PERTURBED.to_csv(tmp_path / "metrics_per_case.csv", index=False)
    back = report.read_per_case(tmp_path)
    pd.testing.assert_frame_equal(back, PERTURBED)
    with pytest.raises(FlareInputError, match="missing"):
        report.read_per_case(tmp_path / "nothing")
    t = report.organ_table({"x": back})
    path = report.save_table(t, tmp_path / "out" / "dsc.csv")
    again = pd.read_csv(path, index_col=0)
    assert list(again.index) == list(t.index) and again.loc["Liver", "x"] == t.loc["Liver", "x"]


def test_learning_curves_figure_one_colour_per_fold(tmp_path):
    rows = [{"fold": f, "epoch": e, "train_loss": 1.0 - 0.1 * e, "val_loss": 1.1 - 0.1 * e, "pseudo_dice": 0.2 * e}
            for f in ("0", "1") for e in range(3)]
    fig = report.learning_curves_figure(pd.DataFrame(rows), title="teacher")
    assert isinstance(fig, Figure)
    loss_ax, dice_ax = fig.axes[:2]
    assert len(loss_ax.lines) == 4 and len(dice_ax.lines) == 2          # train + val per fold; Dice per fold
    assert [ln.get_label() for ln in dice_ax.lines] == ["fold 0", "fold 1"]
    assert dice_ax.lines[0].get_color() != dice_ax.lines[1].get_color()
    assert report.save_figure(fig, tmp_path / "curves.png").stat().st_size > 1000
    with pytest.raises(FlareInputError, match="missing"):
        report.learning_curves_figure(pd.DataFrame(rows).drop(columns="val_loss"))


def test_learning_curves_figure_fits_the_page(tmp_path):
    rows = [{"fold": f, "epoch": e, "train_loss": 1.0 - 0.1 * e, "val_loss": 1.1 - 0.1 * e, "pseudo_dice": 0.1 * e}
            for f in range(5) for e in range(40)]
    path = report.save_figure(report.learning_curves_figure(pd.DataFrame(rows)), tmp_path / "c.png")
    from PIL import Image
    width, _ = Image.open(path).size
    assert 900 <= width <= 1300
    one = report.learning_curves_figure(pd.DataFrame(rows[:1]))   # a single epoch: one tick, no -0.05 ... 0.05
    assert list(one.axes[0].get_xticks()) == [0]


QUALITY = pd.DataFrame({"round": [1, 1, 1, 2, 2, 2, 10, 10, 10],
                        "mean_dsc": [0.5, 0.6, 0.7, 0.80, 0.82, 0.84, 0.80, 0.81, 0.82]})


def test_round_statistics_mean_and_t_interval():
    st = report.round_statistics(QUALITY)
    assert list(st.index) == [1, 2, 10]                          # numeric order, not text order
    assert st.loc[1, "n"] == 3 and st.loc[1, "mean"] == pytest.approx(0.6)
    assert st.loc[1, "std"] == pytest.approx(0.1)                # ddof=1
    half = 4.302653 * 0.1 / np.sqrt(3)                           # t(0.975, 2) * s / sqrt(n), by hand
    assert st.loc[1, "ci_low"] == pytest.approx(0.6 - half, abs=1e-5)
    assert st.loc[1, "ci_high"] == pytest.approx(0.6 + half, abs=1e-5)
    single = report.round_statistics(pd.DataFrame({"round": ["round 1"], "mean_dsc": [0.5]}))
    assert single.loc["round 1", "n"] == 1 and np.isnan(single.loc["round 1", "ci_low"])
    with pytest.raises(FlareInputError, match="mean_dsc"):
        report.round_statistics(pd.DataFrame({"round": [1]}))


def test_quality_per_round_figure_shows_the_spread_on_the_whole_dsc_range(tmp_path):
    fig = report.quality_per_round_figure(QUALITY)
    (ax,) = fig.axes
    lo, hi = ax.get_ylim()
    assert lo <= 0.0 and hi >= 1.0                               # no zoom onto 0.6-0.84
    assert [t.get_text() for t in ax.get_xticklabels()] == ["round 1", "round 2", "round 10"]
    (bars,) = ax.containers                                      # the mean with its error bars
    means = bars.lines[0].get_ydata()
    assert list(means) == pytest.approx([0.6, 0.82, 0.81])
    assert len(ax.collections) >= 3                              # the cases as dots, one cloud per round
    assert report.save_figure(fig, tmp_path / "q.png").stat().st_size > 1000
