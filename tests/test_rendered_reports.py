"""What a collaborator sees: stage notebooks rendered to HTML (flare_utils.study.runner.render_html)
and figures that do not change when nnU-Net's logger has called ``seaborn.set(font_scale=2.5)``."""
from __future__ import annotations

import io
import re

import matplotlib
import nbformat
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from matplotlib.text import Text  # noqa: E402

from flare_utils.data.labels import ORGANS  # noqa: E402
from flare_utils.inference.figures import plot_window_map  # noqa: E402
from flare_utils.study import report  # noqa: E402
from flare_utils.study.runner import render_html  # noqa: E402


# ----------------------------------------------------------------------------------------------
# figures isolated from the process's global (seaborn) style

def _curves() -> pd.DataFrame:
    return pd.DataFrame([{"fold": f, "epoch": e, "train_loss": 1.0 - 0.1 * e, "val_loss": 1.1 - 0.1 * e,
                          "pseudo_dice": 0.1 * e} for f in ("0", "1") for e in range(6)])


def _per_case(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    row = {"Name": [f"case_{i}.nii.gz" for i in range(4)]}
    for metric in ("DSC", "NSD"):
        for o in ORGANS:
            row[f"{o.flare_key}_{metric}"] = rng.uniform(0.5, 1.0, 4)
    return pd.DataFrame(row)


def _window_report() -> dict:
    windows = [{"start": (z, h, w), "evaluated": (h, w) == (6, 6) or z == 0, "role": "centre" if (h, w) == (6, 6)
                else "neighbour"} for z in (0, 6, 12) for h in (0, 6, 12) for w in (0, 6, 12)]
    return {"long_axis": 0, "patch_size": (8, 12, 12), "padded_shape": (20, 24, 24), "windows": windows}


def _phantom():
    gt = np.zeros((24, 20, 12), np.uint8)
    gt[4:14, 4:14, 2:10] = 1
    gt[16:20, 6:10, 5:8] = 2
    return np.where(gt > 0, 60.0, -500.0).astype(np.float32), gt


FIGURES = {
    "learning_curves": lambda: report.learning_curves_figure(_curves(), title="teacher"),
    "box_plots": lambda: report.box_plots({"a": _per_case(0), "b": _per_case(1)}, "DSC"),
    "quality_per_round": lambda: report.quality_per_round_figure(
        pd.DataFrame({"round": [1, 1, 2, 2], "mean_dsc": [0.6, 0.7, 0.8, 0.75]})),
    "overlay": lambda: report.overlay_figure(*_phantom(), _phantom()[1], spacing=(0.8, 0.8, 2.5), title="c"),
    "window_map": lambda: plot_window_map(np.zeros((16, 20, 20), np.float32), _window_report(), 1).figure,
}


def _look(fig) -> list[tuple]:
    """Every text's size, family and weight, tick lengths and the axes' face colours, read after a
    draw outside any style block (as when a notebook shows or saves the figure later)."""
    fig.savefig(io.BytesIO(), format="png", dpi=50)
    texts = [(t.get_text(), round(t.get_fontsize(), 3), tuple(t.get_fontfamily()), str(t.get_fontweight()))
             for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    axes = [(matplotlib.colors.to_hex(ax.get_facecolor()),
             round(ax.xaxis.majorTicks[0].tick1line.get_markersize(), 3)) for ax in fig.axes]
    return texts + axes


@pytest.fixture
def seaborn_global_style():
    """What nnU-Net's logger does while training: seaborn's theme for the whole process (undone after)."""
    sns = pytest.importorskip("seaborn")
    with matplotlib.rc_context():
        sns.set(font_scale=2.5)
        yield dict(matplotlib.rcParams)


@pytest.mark.parametrize("name", list(FIGURES))
def test_figures_look_the_same_after_seaborn_set(name, seaborn_global_style):
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        plain = _look(FIGURES[name]())
    after_seaborn = _look(FIGURES[name]())
    assert after_seaborn == plain
    assert dict(matplotlib.rcParams) == seaborn_global_style        # the caller's global style is left alone


def test_window_map_on_a_callers_axes_gets_our_tick_labels(seaborn_global_style):
    from matplotlib.figure import Figure
    ax = Figure().add_subplot()                                  # made by the caller, in seaborn's style
    plot_window_map(np.zeros((16, 20, 20), np.float32), _window_report(), 1, ax=ax)
    ax.figure.savefig(io.BytesIO(), format="png")
    assert ax.xaxis.get_ticklabels()[0].get_fontsize() == report.PLOT_STYLE["xtick.labelsize"]
    assert ax.xaxis.label.get_fontsize() == report.PLOT_STYLE["axes.labelsize"]


def test_learning_curves_fonts_ignore_seaborn_font_scale(seaborn_global_style):
    fig = report.learning_curves_figure(_curves())
    fig.savefig(io.BytesIO(), format="png")
    loss = fig.axes[0]
    assert loss.xaxis.get_ticklabels()[0].get_fontsize() == report.PLOT_STYLE["xtick.labelsize"]
    assert loss.yaxis.get_ticklabels()[0].get_fontsize() == report.PLOT_STYLE["ytick.labelsize"]
    assert loss.xaxis.label.get_fontsize() == report.PLOT_STYLE["axes.labelsize"]
    assert loss.title.get_fontsize() == report.PLOT_STYLE["axes.titlesize"]
    assert matplotlib.rcParams["xtick.labelsize"] > 20                # seaborn's 2.5x is still in force outside


# ----------------------------------------------------------------------------------------------
# stage notebooks as HTML

def _code(source: str, outputs=(), tags=()) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source, outputs=list(outputs))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _executed(path, *, failed: bool = False, injected: bool = True) -> nbformat.NotebookNode:
    long_models = {f"model_{i}": f"/runs/demo/nnUNet_results/Dataset990/Trainer__plans_{i}__3d_fullres"
                   for i in range(4)}
    cells = [
        nbformat.v4.new_markdown_cell("# 02 · Teacher training\n\nTrains the *teacher*."),
        _code('# Parameters (papermill overrides these)\nrun_dir = "runs/example"  # the run folder\n'
              'epochs = 50  # epochs per fold\nverbose = False  # nnU-Net console output\n', tags=["parameters"]),
    ]
    if injected:
        cells.append(_code(f'# Parameters\nrun_dir = "/tmp/study/run"\nepochs = 1\nmodels = {long_models!r}\n',
                           tags=["injected-parameters"]))
    cells += [
        nbformat.v4.new_markdown_cell("## Training"),
        _code("import warnings\nprint('trained fold 0')", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="trained fold 0\n"),
            nbformat.v4.new_output("stream", name="stderr", text="UserWarning: nnU-Net says something pink\n")]),
        _code("table", outputs=[nbformat.v4.new_output(
            "display_data", data={"text/html": "<table><tr><td>result 42</td></tr></table>", "text/plain": "42"})]),
    ]
    if failed:
        cells.append(_code("raise ValueError('no teacher')", outputs=[
            nbformat.v4.new_output("stream", name="stderr", text="context of the failure\n"),
            nbformat.v4.new_output("error", ename="ValueError", evalue="no teacher",
                                   traceback=["ValueError: no teacher"])]))
    nb = nbformat.v4.new_notebook(cells=cells)
    nbformat.write(nb, str(path))
    return nb


def test_rendered_stage_reads_as_text_tables_and_figures(tmp_path):
    folder = tmp_path / "run" / "notebooks"
    folder.mkdir(parents=True)
    source = folder / "02_teacher_training.ipynb"
    _executed(source)
    before = source.read_text()
    out = render_html(source)
    assert out == folder / "02_teacher_training.html"
    page = out.read_text(encoding="utf-8")

    assert "<title>02 · Teacher training</title>" in page
    assert '<a href="../index.html">' in page                    # back to <run>/index.html
    # code folded, prompts gone, results shown
    assert page.count('<details class="flare-code">') == 3      # injected parameters + 2 code cells
    assert "In&nbsp;[" not in page and 'class="jp-InputPrompt' not in page and 'class="jp-OutputPrompt' not in page
    assert "trained fold 0" in page and "result 42" in page
    # warnings (stderr) left out of the page
    assert "something pink" not in page
    # the defaults cell is gone; the parameters actually used are one table
    assert "runs/example" not in page and "papermill overrides these" not in page
    params = page[page.index('class="flare-params"'):]
    assert re.search(r'<code class="k">run_dir</code><code class="v">"/tmp/study/run"</code>', params)
    assert re.search(r'<code class="k">epochs</code><code class="v">1</code>', params)
    assert re.search(r'class="p default" title="nnU-Net console output"><code class="k">verbose</code>', params)
    assert "\n 'model_3': '/runs/demo/" in params               # the long dict one entry per line
    # the notebook itself keeps everything, and nothing else is left in the folder
    assert source.read_text() == before
    assert sorted(p.name for p in folder.iterdir()) == ["02_teacher_training.html", "02_teacher_training.ipynb"]


def test_failed_stage_page_keeps_the_error_and_its_code(tmp_path):
    source = tmp_path / "03_pseudo_labels.partial.ipynb"
    _executed(source, failed=True)
    page = render_html(source).read_text(encoding="utf-8")
    assert (tmp_path / "03_pseudo_labels.partial.html").is_file()
    assert "<title>02 · Teacher training (stopped with an error)</title>" in page
    assert re.search(r'<details class="flare-code" open(="")?>', page)   # the failing cell's code is shown
    assert "no teacher" in page and "context of the failure" in page
    assert "something pink" not in page


def test_notebook_run_by_hand_shows_its_own_parameters(tmp_path):
    source = tmp_path / "02_teacher_training.ipynb"
    _executed(source, injected=False)
    page = render_html(source).read_text(encoding="utf-8")
    params = page[page.index('class="flare-params"'):]
    assert re.search(r'<code class="k">run_dir</code><code class="v">"runs/example"</code>', params)
    assert 'class="p default"' not in params                    # nothing was injected: no greyed defaults
