"""flare_utils.study.index_report on small hand-made run folders (CSV/JSON files and tiny PNGs, no training)."""
from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path
from urllib.parse import unquote

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from flare_utils.study import index_report

from flare_utils.study import report  # noqa: E402
from flare_utils.data.labels import ORGANS  # noqa: E402

# Each case has the same score in every organ, so its organ mean is that number (checked by hand).
CASE_DSC = {
    "teacher": [0.80, 0.85, 0.90, 0.85],                 # mean 0.850
    "teacher_pseudo": [0.80, 0.80, 0.85, 0.85],          # mean 0.825
    "student_labelled_only": [0.60, 0.70, 0.80, 0.50],   # mean 0.650
    "student_selected": [0.70, 0.80, 0.90, 0.60],        # mean 0.750
}
NSD_OFFSET = 0.05                                          # NSD = DSC - 0.05 in every cell
STUDENT_ALL_OVERVIEW_DSC = 0.70                            # student_all: overview.csv only, no per-case CSV
TITLES = {
    "teacher": "Teacher, labelled only",
    "teacher_pseudo": "Teacher, labelled + pseudo",
    "student_labelled_only": "Student, labelled only",
    "student_selected": "Student, selected pseudo",
    "student_all": "Student, all pseudo",
}


@pytest.fixture(scope="module")
def png() -> bytes:
    fig = Figure(figsize=(0.5, 0.5))
    fig.subplots().plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=20)
    return buf.getvalue()


def per_case(values: list[float], offset: float = 0.0) -> pd.DataFrame:
    row: dict[str, list] = {"Name": [f"case_{i:04d}.nii.gz" for i in range(len(values))]}
    for metric, off in (("DSC", 0.0), ("NSD", offset)):
        for o in ORGANS:
            row[f"{o.flare_key}_{metric}"] = [v - off for v in values]
    row["Revision"] = ["2022"] * len(values)
    return pd.DataFrame(row)


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


PICTURES = ["evaluation/box_DSC.png", "evaluation/overlay_best_case_0002.png",
            "evaluation/overlay_worst_case_0003.png", "selection/u_histogram.png", "selection/u_vs_dsc.png",
            "teacher/learning_curves.png", "student_training/labelled_only/learning_curves.png",
            "student_training/selected/learning_curves.png", "student_training/all/learning_curves.png"]
UNITS = [("convert", "convert", "01_data_conversion"), ("teacher", "teacher", "02_teacher_training"),
         ("pseudo", "pseudo", "03_pseudo_labels"), ("select", "select", "04_selection"),
         ("student:labelled_only", "student", "05_student_training_labelled_only"),
         ("student:selected", "student", "05_student_training_selected"),
         ("student:all", "student", "05_student_training_all"), ("evaluate", "evaluate", "07_evaluation")]


def full_run(root: Path, png: bytes) -> Path:
    """A run folder holding every input of the contract."""
    params = {"name": "demo study", "run_dir": str(root), "seed": 0, "device": "auto",
              "stages": ["convert", "teacher", "pseudo", "select", "student", "evaluate"],
              "data": {"dataset_id": 501}, "teacher": {"epochs": 8}}
    write(root / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    write(root / "provenance.json", json.dumps({
        "started": "2024-05-01T10:00:00+00:00", "command": "flare-study run params/demo.yaml",
        "python": "3.11.8", "platform": "Linux-x86_64", "hostname": "box",
        "packages": {"torch": "2.3.0", "nnunetv2": "2.8.1"}, "git": {"commit": "abc1234", "dirty": True},
        "device": {"requested": "auto", "resolved": "cpu", "cpu": "2 cores", "gpu": None, "torch_threads": 2},
        "seeds": {"global": 0}}))
    stages = []
    for unit, stage, stem in UNITS:
        write(root / "notebooks" / f"{stem}.html", "<html>report</html>")
        stages.append({"unit": unit, "stage": stage, "notebook": f"notebooks/{stem}.ipynb",
                       "html": f"notebooks/{stem}.html", "status": "done", "seconds": 12.5, "message": None,
                       "peak_ram_mib": 3072.0})
    write(root / "stages.json", json.dumps(stages))
    write(root / "models.json", json.dumps({
        name: {"title": TITLES[name], "role": name.split("_")[0], "path": f"nnUNet_results/{name}",
               "folds": ["0"], "plans": "p", "trainer": "t",
               "training_data": "labelled only" if "labelled_only" in name or name == "teacher"
               else "labelled + pseudo"}
        for name in ["student_all", "student_selected", "teacher", "student_labelled_only", "teacher_pseudo"]}))
    ev = root / "evaluation"
    frames = {name: per_case(v, NSD_OFFSET) for name, v in CASE_DSC.items()}
    frames["student_selected"].loc[0, "Liver_DSC"] = np.nan     # skipped: case 0 still averages 0.70
    rows = []
    for name, df in frames.items():
        write(ev / report.slug(name) / "metrics_per_case.csv", df.to_csv(index=False))
        rows.append({"set": name, "cases": len(df), "mean DSC": float(np.mean(CASE_DSC[name])),
                     "mean NSD": float(np.mean(CASE_DSC[name])) - NSD_OFFSET, "revision": "2022",
                     "folder": report.slug(name)})
    rows.append({"set": "student_all", "cases": 4, "mean DSC": STUDENT_ALL_OVERVIEW_DSC, "mean NSD": 0.65,
                 "revision": "2022", "folder": "student-all"})
    write(ev / "overview.csv", pd.DataFrame(rows).to_csv(index=False))
    for metric in ("DSC", "NSD"):
        report.save_table(report.organ_table(frames, metric), ev / f"organ_table_{metric}.csv")
    write(ev / "efficiency_table.csv", "set,device,cases,time (s),peak RAM (MiB)\nstudent_selected,cpu,4,3.5,900\n")
    write(root / "inference" / "summary.csv",
          "model,cases,predicted now,windows_evaluated,windows_nnunet_full,mean_total_s,mean_network_s,peak_rss_mib\n"
          "student_selected,4,4,10,40,8.0,7.5,950\n")
    write(root / "selection" / "selection_summary.json", json.dumps({
        "rule": {"rule": "threshold", "threshold": 0.1, "exclude_empty": False}, "n_cases": 24,
        "n_selected": 12, "n_rejected": 12, "n_infinite": 1, "n_empty_last": 0,
        "u_min": 0.01, "u_median": 0.1, "u_max_finite": 0.5}))
    write(root / "selection" / "selection_vs_truth.json", json.dumps({
        "n_cases": 24, "quality_column": "mean_dsc", "spearman_rho": 0.61, "spearman_p": 0.002,
        "n_selected": 12, "n_rejected": 12, "mean_quality_selected": 0.81, "mean_quality_rejected": 0.64}))
    write(root / "pseudo_labels" / "report" / "quality_per_round.csv",
          "round,mean,std,count\nround 1,0.70,0.05,24\nround 2,0.74,0.04,24\n")
    for rel in PICTURES:
        write(root / rel, png)
    return root


def hand_stats(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def hrefs(page: str) -> list[str]:
    return [h for h in re.findall(r'href="([^"]*)"', page) if not h.startswith("#")]


# ----------------------------------------------------------------------------------------------

def test_comparison_table_matches_hand_computed_numbers(tmp_path, png):
    run = full_run(tmp_path / "run", png)
    table = index_report.comparison_table(run)
    assert list(table.index) == list(index_report.CANONICAL_MODELS)
    assert list(table.columns) == index_report.COMPARISON_COLUMNS
    for name, values in CASE_DSC.items():
        mean, std = hand_stats(values)
        row = table.loc[name]
        assert row["title"] == TITLES[name]
        assert row["cases"] == 4
        assert row["DSC mean"] == pytest.approx(mean)
        assert row["DSC std"] == pytest.approx(std)
        assert row["NSD mean"] == pytest.approx(mean - NSD_OFFSET)
        assert row["NSD std"] == pytest.approx(std)
    assert table.loc["teacher", "training data"] == "labelled only"
    # student_all has no per-case CSV: the mean comes from overview.csv and the std is unknown.
    assert table.loc["student_all", "DSC mean"] == pytest.approx(STUDENT_ALL_OVERVIEW_DSC)
    assert math.isnan(table.loc["student_all", "DSC std"])


def test_findings_state_the_signed_differences(tmp_path, png):
    table = index_report.comparison_table(full_run(tmp_path / "run", png))
    findings = index_report.comparison_findings(table)
    assert len(findings) == 3
    sel_vs_lab, tp_vs_t, sel_vs_all = findings
    assert sel_vs_lab.startswith("Student with selected pseudo labels vs student labelled only: "
                                 "DSC +0.100 (0.750 vs 0.650), NSD +0.100 (0.700 vs 0.600); 4 held-out cases")
    # The selected student's cases spread by 0.112 (std), more than the 0.100 gain: said so.
    assert "smaller than the spread over cases (std up to 0.112)" in sel_vs_lab
    assert tp_vs_t.startswith("Teacher with pseudo labels vs teacher labelled only: DSC -0.025 (0.825 vs 0.850)")
    assert "DSC +0.050 (0.750 vs 0.700)" in sel_vs_all


def test_findings_only_for_present_pairs_and_equal_scores():
    cols = index_report.COMPARISON_COLUMNS
    table = pd.DataFrame([["T", "l", 5, 0.8, 0.01, 0.7, 0.01], ["TP", "l+p", 3, 0.8, 0.01, math.nan, math.nan]],
                         index=["teacher", "teacher_pseudo"], columns=cols)
    (only,) = index_report.comparison_findings(table)
    assert only == ("Teacher with pseudo labels vs teacher labelled only: DSC ±0.000 (0.800 vs 0.800); "
                    "3 vs 5 held-out cases (not the same test set); the DSC difference is smaller than the "
                    "spread over cases (std up to 0.010).")
    assert index_report.comparison_findings(table.iloc[:1]) == []
    assert index_report.comparison_findings(pd.DataFrame(columns=cols)) == []


def test_full_page_embeds_pictures_and_links_relative_existing_reports(tmp_path, png):
    run = full_run(tmp_path / "run", png)
    out = index_report.write_index(run)
    assert out == run / "index.html"
    page = out.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(PICTURES)
    first = re.search(r'data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1)
    assert base64.b64decode(first) == png
    links = hrefs(page)
    assert sorted(links) == sorted(f"notebooks/{stem}.html" for _, _, stem in UNITS)
    for h in links:
        assert not h.startswith(("/", "file:", "http")) and ":" not in h
        assert (run / unquote(h)).is_file()
    assert "<script" not in page
    # Sections with their numbers and titles.
    assert "Student with selected pseudo labels vs student labelled only: DSC +0.100" in page
    assert "0.750 ± 0.112" in page and "0.700 (std n/a)" in page
    organs = page[page.index('id="organs"'):page.index('id="efficiency"')]
    assert TITLES["student_selected"] in organs and "Right kidney" in organs
    assert "student_selected" not in organs            # columns renamed to the models' titles
    assert "Spearman rho(u, 1 - DSC) = 0.610" in page and "u &lt; 0.1" in page
    assert "round 2" in page and "windows of nnU-Net's full tiling" in page and "peak RAM (GiB)" in page
    assert "windows_nnunet_full" not in page and "peak_rss_mib" not in page     # human column names
    assert "abc1234 (uncommitted changes)" in page
    packages = r"<td>packages</td>\s*<td>torch 2.3.0</td>\s*</tr>\s*<tr>\s*<td></td>\s*<td>nnunetv2 2.8.1</td>"
    assert re.search(packages, page)                   # one line per package
    assert "<details><summary>params.yaml</summary>" in page and "<h1>demo study</h1>" in page
    assert "not run in this study" not in page and "stage failed" not in page
    stages_table = page[page.index('<table class="stages">'):]
    assert "<th>peak RAM</th>" in stages_table and "<td>3.00 GiB</td>" in stages_table
    assert "peak GPU memory" not in stages_table       # no stage read a GPU


def test_partial_run_says_what_is_missing(tmp_path):
    run = tmp_path / "partial"
    write(run / "params.yaml", yaml.safe_dump({"name": "half", "stages": ["convert", "teacher", "pseudo"]}))
    write(run / "notebooks" / "01_data_conversion.html", "<html/>")
    write(run / "notebooks" / "03_pseudo_labels.partial.html", "<html/>")
    write(run / "stages.json", json.dumps([
        {"unit": "convert", "stage": "convert", "notebook": "notebooks/01_data_conversion.ipynb",
         "html": "notebooks/01_data_conversion.html", "status": "done", "seconds": 75.0, "message": None},
        {"unit": "teacher", "stage": "teacher", "notebook": "notebooks/02_teacher_training.ipynb",
         "html": None, "status": "done", "seconds": 4000.0, "message": None},
        {"unit": "pseudo", "stage": "pseudo", "notebook": "notebooks/03_pseudo_labels.ipynb",
         "html": "notebooks/03_pseudo_labels.partial.html", "status": "failed", "seconds": 3.0,
         "message": "cell 4 raised ValueError: no teacher"},
        {"unit": "select", "stage": "select", "notebook": "notebooks/04_selection.ipynb", "html": None,
         "status": "pending", "seconds": None, "message": None}]))
    table = index_report.comparison_table(run)
    assert table.empty and list(table.columns) == index_report.COMPARISON_COLUMNS
    page = index_report.write_index(run).read_text()
    assert 'stage failed: see <a href="notebooks/03_pseudo_labels.partial.html">' in page
    assert "Pseudo-label DSC against the truth per round: stage failed" in page
    assert "Held-out scores of the models: not run in this study" in page
    assert "Pseudo-label selection: not run yet (stage pending)" in page
    assert "Teacher learning curves: not produced, although the stage ran" in page
    assert "provenance.json: not written" in page
    assert "1 min 15 s" in page and "1 h 06 min" in page
    assert sorted(hrefs(page)) == ["notebooks/01_data_conversion.html", "notebooks/03_pseudo_labels.partial.html",
                                   "notebooks/03_pseudo_labels.partial.html"]
    assert 'class="badge failed"' in page and "no report" in page
    assert "data:image/png" not in page


def test_empty_folder_renders():
    page = index_report.build_index_html(Path("/nonexistent/run"))
    assert "not run in this study" in page and "params.yaml: not written" in page


def test_text_from_files_is_escaped(tmp_path):
    run = tmp_path / "run"
    write(run / "params.yaml", yaml.safe_dump({"name": "<script>alert(1)</script>"}))
    write(run / "stages.json", json.dumps([{"unit": "teacher", "stage": "teacher", "notebook": None, "html": None,
                                            "status": "failed", "seconds": 1.0, "message": "<b>boom</b> & more"}]))
    write(run / "models.json", json.dumps({"teacher": {"title": "Teacher <big>", "training_data": "a&b"}}))
    write(run / "evaluation" / "overview.csv",
          "set,cases,mean DSC,mean NSD,revision,folder\nteacher,3,0.5,0.4,2022,teacher\n")
    write(run / "pseudo_labels" / "report" / "quality_per_round.csv", "round,mean\n<i>round 1</i>,0.5\n")
    page = index_report.build_index_html(run)
    for raw in ("<script>alert", "<b>boom", "Teacher <big>", "<i>round"):
        assert raw not in page
    for escaped in ("&lt;script&gt;alert(1)&lt;/script&gt;", "&lt;b&gt;boom&lt;/b&gt; &amp; more",
                    "Teacher &lt;big&gt;", "a&amp;b", "&lt;i&gt;round 1&lt;/i&gt;"):
        assert escaped in page


def test_absolute_paths_of_older_runners_become_relative_links(tmp_path):
    run = tmp_path / "run"
    nb = write(run / "notebooks" / "02_teacher_training.ipynb", "{}")
    write(nb.with_suffix(".html"), "<html/>")
    outside = write(tmp_path / "elsewhere.html", "<html/>")
    write(run / "stages.json", json.dumps([
        {"stage": "teacher", "status": "done", "seconds": 2.0, "notebook": str(nb),
         "html": str(nb.with_suffix(".html"))},
        {"stage": "evaluate", "status": "done", "seconds": 2.0, "notebook": None, "html": str(outside)}]))
    units = index_report.read_stages(run)
    assert [u.unit for u in units] == ["teacher", "evaluate"]
    assert units[0].report == "notebooks/02_teacher_training.html"
    assert units[0].notebook == "notebooks/02_teacher_training.ipynb"
    assert units[1].report is None                 # outside the run folder: no link that breaks when mailed
    assert hrefs(index_report.build_index_html(run)) == ["notebooks/02_teacher_training.html"]


def test_unreadable_input_costs_only_its_section(tmp_path, png):
    run = full_run(tmp_path / "run", png)
    write(run / "provenance.json", "{not json")
    write(run / "selection" / "selection_summary.json", "[1, 2")
    page = index_report.build_index_html(run)
    assert "Study: could not read its inputs (JSONDecodeError" in page
    assert "Pseudo-label selection: could not read its inputs" in page
    assert "DSC +0.100 (0.750 vs 0.650)" in page      # the other sections are intact


def test_write_is_atomic(tmp_path, png, monkeypatch):
    run = full_run(tmp_path / "run", png)
    write(run / "index.html", "old page")
    before = sorted(p.name for p in run.iterdir())
    index_report.write_index(run)
    assert sorted(p.name for p in run.iterdir()) == before       # replaced in place, no temp file left
    assert (run / "index.html").read_text().startswith("<!DOCTYPE html>")

    write(run / "index.html", "old page")
    real_write_text = Path.write_text

    def half_then_fail(self, text, *a, **kw):                    # a crash in the middle of writing
        real_write_text(self, text[:100], *a, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        index_report.write_index(run)
    monkeypatch.undo()
    assert (run / "index.html").read_text() == "old page"
    assert sorted(p.name for p in run.iterdir()) == before


def test_inference_and_efficiency_tables_read_without_help(tmp_path, png):
    run = full_run(tmp_path / "run", png)
    page = index_report.build_index_html(run)
    eff = page[page.index('id="efficiency"'):page.index('id="selection"')]
    for column in ("windows run", "windows of nnU-Net's full tiling", "windows run / full tiling (%)",
                   "time per case (s)", "network time per case (s)", "peak RAM (GiB)"):
        assert f"<th>{column}</th>" in eff
    assert TITLES["student_selected"] in eff and "student_selected" not in eff
    assert "<td>25</td>" in eff                      # 10 of 40 windows
    assert "<td>0.93</td>" in eff                    # 950 MiB
    assert "predicted now" not in eff                # every case predicted in this run: column left out
    assert "grows with the body&#x27;s width" in eff  # fewer windows than the full tiling (escaped quote)

    # The demo's case: more windows than nnU-Net's tiling, and the caption says why.
    write(run / "inference" / "summary.csv", "model,cases,predicted now,windows_evaluated,windows_nnunet_full,"
          "mean_total_s,mean_network_s,peak_rss_mib\nstudent_selected,2,1,228,163,3.5866,3.55,721.4\n")
    eff = index_report.build_index_html(run)
    eff = eff[eff.index('id="efficiency"'):eff.index('id="selection"')]
    assert "<td>140</td>" in eff and "<td>3.59</td>" in eff and "<th>predicted in this run</th>" in eff
    assert "narrower than two patches" in eff and "full-resolution scans" in eff


def test_quality_per_round_is_drawn_from_the_per_case_qualities(tmp_path, png):
    run = full_run(tmp_path / "run", png)
    write(run / "pseudo_labels" / "report" / "quality_per_case.csv",
          "round,case,mean_dsc\n1,a,0.6\n1,b,0.7\n2,a,0.75\n2,b,0.8\n")
    page = index_report.build_index_html(run)
    assert page.count("data:image/png;base64,") == len(PICTURES) + 1
    pseudo = page[page.index('id="pseudo"'):page.index('id="overlays"')]
    assert "data:image/png;base64," in pseudo and "95 % confidence interval" in pseudo
    assert "<th>mean DSC</th>" in pseudo and "round 2" in pseudo


# ----------------------------------------------------------------------------------------------
# paired differences with bootstrap intervals (flare_utils.evaluation.compare)

PAIRED_NAMES = [f"case_{i:04d}.nii.gz" for i in range(10)]
PAIRED_BASE = np.array([0.70 + 0.02 * i for i in range(10)])
# Per-case shifts over the base. Two-valued differences have binomial bootstrap intervals: with
# values x (5 cases) and y (5 cases) a resampled mean is y + (x - y) k / 10, k ~ Bin(10, 1/2), whose
# 2.5 % and 97.5 % quantiles are k = 2 and k = 8 (P(k <= 1) = 1.1 %, P(k <= 2) = 5.5 %).
PAIRED_SHIFTS = {
    "teacher": np.zeros(10),
    "teacher_pseudo": np.tile([0.04, -0.02], 5),      # +0.010 [-0.014, +0.034]: noise only
    "student_labelled_only": np.zeros(10),
    "student_selected": np.tile([0.03, 0.05], 5),     # +0.040 [+0.032, +0.048] over labelled only
    "student_all": -np.tile([0.03, 0.05], 5),         # -0.040 [-0.048, -0.032] over labelled only
}


def paired_run(root: Path, models: dict[str, np.ndarray] = PAIRED_SHIFTS) -> Path:
    """A run folder with models.json and the evaluate stage's overview.csv and per-case CSVs only."""
    write(root / "models.json", json.dumps({name: {"title": TITLES[name]} for name in models}))
    ev = root / "evaluation"
    rows = []
    for name, shift in models.items():
        scores = list(PAIRED_BASE + shift)
        df = per_case(scores, NSD_OFFSET)
        df["Name"] = PAIRED_NAMES
        write(ev / report.slug(name) / "metrics_per_case.csv", df.to_csv(index=False))
        rows.append({"set": name, "cases": 10, "mean DSC": float(np.mean(scores)),
                     "mean NSD": float(np.mean(scores)) - NSD_OFFSET, "revision": "2022",
                     "folder": report.slug(name)})
    write(ev / "overview.csv", pd.DataFrame(rows).set_index("set").to_csv())
    return root


def paired_row(comparison: str, metric: str, difference: str, cases: int, verdict: str) -> str:
    """A regular expression for one row of the paired-difference table as the page shows it."""
    cells = [comparison, metric, difference, str(cases), verdict]
    return r"<tr>\s*<td>" + r"</td>\s*<td>".join(re.escape(c) for c in cells) + r"</td>\s*</tr>"


def comparison_section(page: str) -> str:
    return page[page.index('id="comparison"'):page.index('id="organs"')]


def test_paired_differences_with_intervals_and_verdicts(tmp_path):
    run = paired_run(tmp_path / "run")
    table = index_report.paired_difference_table(run)
    assert list(table.columns) == index_report.PAIRED_COLUMNS
    assert len(table) == 8                               # 4 comparisons x (DSC, NSD), in COMPARISONS order
    assert list(table["metric"]) == ["DSC", "NSD"] * 4
    assert list(table["cases"]) == [10] * 8

    section = comparison_section(index_report.build_index_html(run))
    assert "<h3>Paired differences over held-out cases</h3>" in section
    assert ("bootstrap over cases (expanded percentiles) (10\u00a0000 draws, seed 0); a difference whose interval holds 0 "
            "is not distinguishable from zero at this scale.") in section
    teacher = f"pseudo labels improve the teacher ({TITLES['teacher_pseudo']} vs {TITLES['teacher']})"
    selected = (f"selected pseudo labels improve the student ({TITLES['student_selected']} vs "
                f"{TITLES['student_labelled_only']})")
    sel_all = (f"selecting pseudo labels beats using all of them ({TITLES['student_selected']} vs "
               f"{TITLES['student_all']})")
    all_lab = (f"all pseudo labels improve the student ({TITLES['student_all']} vs "
               f"{TITLES['student_labelled_only']})")
    for metric in ("DSC", "NSD"):      # NSD = DSC - 0.05 in every cell: the same differences
        # (ii) noise only: the interval holds 0
        assert re.search(paired_row(teacher, metric, "+0.010 [-0.014, +0.034]", 10,
                                    "not distinguishable from zero"), section)
        # (i) clear differences, in and against the papers' direction
        assert re.search(paired_row(selected, metric, "+0.040 [+0.032, +0.048]", 10,
                                    "above zero, as in the papers"), section)
        assert re.search(paired_row(sel_all, metric, "+0.080 [+0.064, +0.096]", 10,
                                    "above zero, as in the papers"), section)
        assert re.search(paired_row(all_lab, metric, "-0.040 [-0.048, -0.032]", 10,
                                    "below zero, opposite to the papers"), section)


def test_paired_differences_of_the_full_run(tmp_path, png):
    # Teacher with pseudo labels minus teacher: 0, -0.05, -0.05, 0 on the 4 cases; selected student
    # minus labelled-only student: +0.10 on every case (case 0 without its liver). Four cases are
    # too few for an interval (compare.MIN_CASES): the mean only, and no verdict.
    # student_all has no per-case CSV, so its comparisons are not made.
    section = comparison_section(index_report.build_index_html(full_run(tmp_path / "run", png)))
    assert re.search(paired_row(f"pseudo labels improve the teacher ({TITLES['teacher_pseudo']} vs "
                                f"{TITLES['teacher']})", "DSC", "-0.025 [no interval from fewer than 5 cases]", 4,
                                "too few cases to tell (fewer than 5)"), section)
    assert re.search(paired_row(f"selected pseudo labels improve the student ({TITLES['student_selected']} vs "
                                f"{TITLES['student_labelled_only']})", "DSC",
                                "+0.100 [no interval from fewer than 5 cases]", 4,
                                "too few cases to tell (fewer than 5)"), section)
    paired = section[section.index("Paired differences"):]
    assert paired.count("<tr>") == 4 and "using all of them" not in paired    # body rows: 2 comparisons x 2


def test_paired_differences_need_two_compared_models(tmp_path):
    run = paired_run(tmp_path / "run", {"teacher": PAIRED_SHIFTS["teacher"],
                                         "student_selected": PAIRED_SHIFTS["student_selected"]})
    assert index_report.paired_difference_table(run).empty
    section = comparison_section(index_report.build_index_html(run))
    assert "No pair of models to compare" in section and "Paired differences" not in section


def _raise_key_error(*a, **kw):
    raise KeyError("folder")


def test_unreadable_paired_input_costs_only_the_paired_table(tmp_path, monkeypatch):
    run = paired_run(tmp_path / "run")
    monkeypatch.setattr(index_report, "run_comparisons", _raise_key_error)
    section = comparison_section(index_report.build_index_html(run))
    assert "0.790 ± 0.057" in section                 # the Table-5 comparison is still there
    assert "Paired differences over held-out cases: could not be computed (KeyError" in section
