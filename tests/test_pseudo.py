"""Pseudo-label rounds: layout, resume at case level (injected failure and a killed process), no
duplicate work, rounds with retraining, and flat memory over 200 cases with the real predictor."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from flare_utils.semisup import rounds as pseudo
from flare_utils.errors import FlareInputError
from flare_utils.data.io import save_nifti_like

PROJECT = Path(__file__).resolve().parents[1]
# One small real nnU-Net model shared by this file and tests/test_notebook_03.py (same request ->
# tests/demo_model.py reuses it within a pytest session). Coarse grid: one 16^3 window per tiny
# case, so 200 cases take seconds. Its labels are meaningless; the machinery is what is tested.
DEMO_MODEL = dict(dataset_id=957, name="PseudoSmoke", n_cases=5, fov="abdomen", patch_zyx=(16, 16, 16),
                  spacing_zyx=(24.0, 24.0, 24.0), epochs=1, iterations=4, extra_folds=(1,))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine torch's thread pool is many times slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------- fakes

class FakePredictor:
    """Deterministic stand-in for the predictor: thresholds the image, writes like the real one
    (atomically, on the image's header). Counts calls; can fail after `fail_after` cases."""

    def __init__(self, model_dir, folds, tta, device, fail_after=None, log=None):
        self.model_dir, self.folds, self.tta, self.device = Path(model_dir), list(folds), tta, device
        self.fail_after = fail_after
        self.calls: list[str] = [] if log is None else log

    def predict_case(self, image, output=None, case_id=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("injected failure")
        img = nib.load(str(image))
        a = np.asanyarray(img.dataobj)
        shift = len(self.model_dir.name) % 3        # different models -> slightly different labels
        lab = ((a > 0 + 10 * shift).astype(np.uint8) + (a > 150).astype(np.uint8)).astype(np.uint8)
        save_nifti_like(lab, img, output)
        self.calls.append(case_id)
        return lab, None


def _factory(log, fail_after=None, made=None):
    def make(model_dir, folds, tta, device):
        p = FakePredictor(model_dir, folds, tta, device, fail_after, log)
        if made is not None:
            made.append(p)
        return p
    return make


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = rng.normal(0, 100, (12, 10, 8)).astype(np.int16)
        nib.save(nib.Nifti1Image(a, np.diag([1.5, 1.5, 3.0, 1.0])), str(folder / f"Case_{i:05d}_0000.nii.gz"))
    return folder


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


@pytest.fixture()
def unlabelled(tmp_path) -> Path:
    return _images(tmp_path / "imagesUnlabelled", 8)


@pytest.fixture()
def teacher(tmp_path) -> Path:
    d = tmp_path / "teacher" / "nnUNetTrainer__Plans__3d_fullres"
    for f in (0, 1):
        (d / f"fold_{f}").mkdir(parents=True)
        (d / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"x")
    (d / "plans.json").write_text(json.dumps({"plans_name": "PlansX"}))
    return d


# ---------------------------------------------------------------------------------- one round

def test_round_layout_manifest_and_skip(tmp_path, unlabelled, teacher):
    run = tmp_path / "run"
    log: list[str] = []
    made: list[FakePredictor] = []
    info = pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=_factory(log, made=made))
    folder = pseudo.round_dir(run, 1)
    assert folder == run / "pseudo_labels" / "round_01"
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == [f"Case_{i:05d}.nii.gz" for i in range(8)]
    assert made[0].folds == [0, 1] and made[0].tta is False          # every trained fold by default
    assert info.n_predicted == 8 and info.n_reused == 0 and not info.skipped
    manifest = json.loads((folder / "round.json").read_text())
    assert manifest["cases"] == [f"Case_{i:05d}" for i in range(8)] and manifest["folds"] == ["0", "1"]
    assert manifest["model"] == str(teacher.resolve()) and manifest["mode"] == "full"
    csv = pd.read_csv(folder / "cases.csv")
    assert list(csv["case"]) == manifest["cases"]
    assert csv["rss_mib"].gt(0).all() and csv["peak_rss_mib"].gt(0).all()
    lab = nib.load(str(folder / "Case_00000.nii.gz"))
    assert lab.get_data_dtype() == np.uint8
    assert np.allclose(lab.affine, nib.load(str(unlabelled / "Case_00000_0000.nii.gz")).affine)
    vox_ml = 1.5 * 1.5 * 3.0 / 1000
    assert csv.loc[0, "ml_liver"] == pytest.approx(np.count_nonzero(np.asarray(lab.dataobj) == 1) * vox_ml)
    # complete: skipped, the predictor is not even built
    log.clear()
    made.clear()
    again = pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=_factory(log, made=made))
    assert again.skipped and log == [] and made == []
    assert pseudo.completed_rounds(run) == [1]
    # the round belongs to that model: another one is refused, nothing is overwritten
    with pytest.raises(FlareInputError, match="another model"):
        pseudo.predict_round(run, 1, tmp_path / "other_model", unlabelled, folds=[0, 1],
                             predictor_factory=_factory(log))


def test_resume_after_injected_failure_no_duplicate_work(tmp_path, unlabelled, teacher):
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    pseudo.predict_round(ref_run, 1, teacher, unlabelled, predictor_factory=_factory([]))
    log: list[str] = []
    with pytest.raises(RuntimeError, match="injected"):
        pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=_factory(log, fail_after=3))
    folder = pseudo.round_dir(run, 1)
    written = sorted(p.name for p in folder.glob("*.nii.gz"))
    assert written == [f"Case_{i:05d}.nii.gz" for i in range(3)]
    assert not (folder / "round.json").exists()                        # not complete
    assert pseudo.read_round(run, 1) is None and pseudo.completed_rounds(run) == []
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in written}
    log2: list[str] = []
    info = pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=_factory(log2))
    assert log2 == [f"Case_{i:05d}" for i in range(3, 8)]              # only the missing cases
    assert info.n_predicted == 5 and info.n_reused == 3
    assert {n: (folder / n).stat().st_mtime_ns for n in written} == mtimes
    ref, got = _labels(pseudo.round_dir(ref_run, 1)), _labels(folder)
    assert ref.keys() == got.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)
    csv = pd.read_csv(folder / "cases.csv")
    assert len(csv) == 8 and csv["case"].is_unique


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import nibabel as nib, numpy as np
    from flare_utils.semisup import rounds as pseudo
    from flare_utils.data.io import save_nifti_like

    class Slow:
        def predict_case(self, image, output=None, case_id=None):
            img = nib.load(str(image))
            lab = (np.asanyarray(img.dataobj) > 0).astype(np.uint8)
            time.sleep(0.6)
            save_nifti_like(lab, img, output)
            return lab, None

    run, teacher, images = sys.argv[1:4]
    pseudo.predict_round(run, 1, teacher, images, predictor_factory=lambda *a: Slow())
""")


def test_resume_after_killed_process(tmp_path, unlabelled, teacher):
    run = tmp_path / "run"
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    folder = pseudo.round_dir(run, 1)
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(teacher), str(unlabelled)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(folder.glob("Case_*.nii.gz"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    written = sorted(p.name for p in folder.glob("Case_*.nii.gz"))
    assert 3 <= len(written) < 8
    for n in written:                                  # every visible file is a whole one
        assert np.asarray(nib.load(str(folder / n)).dataobj).shape == (12, 10, 8)
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in written}
    log: list[str] = []
    info = pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=_factory(log))
    assert sorted(log) == sorted(f"Case_{i:05d}" for i in range(8) if f"Case_{i:05d}.nii.gz" not in written)
    assert info.n_reused == len(written) and info.n_predicted == 8 - len(written)
    assert {n: (folder / n).stat().st_mtime_ns for n in written} == mtimes
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]      # no temporaries left
    csv = pd.read_csv(folder / "cases.csv")
    assert len(csv) == 8 and csv["case"].is_unique


# ---------------------------------------------------------------------------------- K rounds

def test_run_rounds_retrains_on_all_previous_pseudo_labels(tmp_path, unlabelled, teacher):
    from flare_utils.semisup.selection_file import read_selection_file
    run = tmp_path / "run"
    trained: list[tuple] = []

    def fake_train(dataset_id, plans_identifier, fold, trainer, config, run_dir):
        sel = read_selection_file(config["selection_file"])
        trained.append((dataset_id, plans_identifier, fold, trainer, sel.labels_folder.name, len(sel.cases),
                        config.get("num_epochs"), config["final_validation"]))
        out = Path(run_dir) / "nnUNet_results" / f"{trainer}__{plans_identifier}__3d_fullres"
        (out / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
        (out / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"weights")
        (out / "plans.json").write_text("{}")
        (out / "dataset.json").write_text("{}")
        return out

    log: list[str] = []
    infos = pseudo.run_rounds(run, 957, teacher, unlabelled, rounds=3, training_config={"num_epochs": 2},
                              predictor_factory=_factory(log), train_fn=fake_train, progress=None)
    assert [i.round for i in infos] == [1, 2, 3]
    assert trained == [(957, "PlansX", "all", "FlarePseudoLabelTrainer", "round_01", 8, 2, False),
                       (957, "PlansX", "all", "FlarePseudoLabelTrainer", "round_02", 8, 2, False)]
    assert len(log) == 24
    for k in (1, 2, 3):
        assert len(list(pseudo.round_dir(run, k).glob("Case_*.nii.gz"))) == 8
    model = pseudo.round_dir(run, 2) / "model"
    assert (model / "fold_all" / "checkpoint_final.pth").read_bytes() == b"weights"
    assert infos[1].model == str(model.resolve()) and infos[1].folds == ["all"]
    assert infos[1].training["n_pseudo"] == 8 and infos[0].training == {"teacher": str(teacher)}
    assert pseudo.completed_rounds(run) == [1, 2, 3]
    summary = json.loads((run / "pseudo_labels" / "rounds.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    # everything complete: a rerun trains and predicts nothing
    log.clear()
    trained.clear()
    again = pseudo.run_rounds(run, 957, teacher, unlabelled, rounds=3, training_config={"num_epochs": 2},
                              predictor_factory=_factory(log), train_fn=fake_train, progress=None)
    assert log == [] and trained == [] and all(i.skipped for i in again)
    # a fourth round continues from round 3
    pseudo.run_rounds(run, 957, teacher, unlabelled, rounds=4, training_config={"num_epochs": 2},
                      predictor_factory=_factory(log), train_fn=fake_train, progress=None)
    assert len(log) == 8 and [t[4] for t in trained] == ["round_03"]
    # notebook tables
    agree = pseudo.round_agreement(run)
    assert sorted(agree["round"].unique()) == [2, 3, 4] and len(agree) == 24
    assert agree["changed_fraction"].between(0, 1).all()
    vols = pseudo.round_volumes(run)
    assert sorted(vols["round"].unique()) == [1, 2, 3, 4] and len(vols) == 4 * 8 * 13
    assert list(pseudo.round_table(run).index) == [1, 2, 3, 4]


def test_rounds_are_redone_when_what_made_them_changed(tmp_path, unlabelled, teacher):
    """A retrained teacher (same folder, new weights) makes every round stale; a changed retraining
    budget makes the retrained rounds stale; nothing else is redone."""
    run = tmp_path / "run"
    trained: list[str] = []

    def fake_train(dataset_id, plans_identifier, fold, trainer, config, run_dir):
        trained.append(Path(config["selection_file"]).parent.name)
        out = Path(run_dir) / "nnUNet_results" / f"{trainer}__{plans_identifier}__3d_fullres"
        (out / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
        (out / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(str(config).encode())
        return out

    def rounds(**config):
        log: list[str] = []
        infos = pseudo.run_rounds(run, 957, teacher, unlabelled, rounds=3, training_config=config or None,
                                  predictor_factory=_factory(log), train_fn=fake_train, progress=None)
        return infos, log

    rounds(num_epochs=2)
    trained.clear()
    infos, log = rounds(num_epochs=2)                     # unchanged: nothing redone
    assert log == [] and trained == [] and all(i.skipped for i in infos)
    infos, log = rounds(num_epochs=3)                     # another retraining budget: rounds 2-3 again
    assert trained == ["round_02", "round_03"] and len(log) == 16
    assert infos[0].skipped and not infos[1].skipped and not infos[2].skipped
    trained.clear()
    (teacher / "fold_0" / "checkpoint_final.pth").write_bytes(b"retrained")   # the teacher trained again
    infos, log = rounds(num_epochs=3)
    assert len(log) == 24 and trained == ["round_02", "round_03"] and not any(i.skipped for i in infos)
    request = json.loads((pseudo.round_dir(run, 1) / "request.json").read_text())
    from flare_utils.inference.folds import model_identity
    assert request["model_key"] == model_identity(teacher, [0, 1])


def test_a_moved_run_keeps_its_rounds(tmp_path, teacher):
    """Paths inside the run are recorded relative to it: a copied or moved run folder resumes with
    nothing redone and its selection files still point at its own labels."""
    from flare_utils.semisup.selection_file import read_selection_file
    run = tmp_path / "run"
    images = _images(run / "nnUNet_raw" / "imagesUnlabelled", 4)

    def fake_train(dataset_id, plans_identifier, fold, trainer, config, run_dir):
        out = Path(run_dir) / "nnUNet_results" / f"{trainer}__{plans_identifier}__3d_fullres"
        (out / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
        (out / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"w")
        return out

    pseudo.run_rounds(run, 957, teacher, images, rounds=2, predictor_factory=_factory([]), train_fn=fake_train,
                      progress=None)
    moved = tmp_path / "moved" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    log: list[str] = []
    infos = pseudo.run_rounds(moved, 957, teacher, moved / "nnUNet_raw" / "imagesUnlabelled", rounds=2,
                              predictor_factory=_factory(log), train_fn=fake_train, progress=None)
    assert log == [] and all(i.skipped for i in infos)
    assert pseudo.read_round(moved, 2).model == str((moved / "pseudo_labels" / "round_02" / "model").resolve())
    sel = read_selection_file(moved / "pseudo_labels" / "round_02" / "training_selection.json")
    assert sel.labels_folder == (moved / "pseudo_labels" / "round_01").resolve()
    assert sel.images_folder == (moved / "nnUNet_raw" / "imagesUnlabelled").resolve()


def test_input_errors(tmp_path, unlabelled, teacher):
    with pytest.raises(FlareInputError, match="rounds must be >= 1"):
        pseudo.run_rounds(tmp_path / "r", 1, teacher, unlabelled, rounds=0, progress=None)
    with pytest.raises(FlareInputError, match="not found"):
        pseudo.predict_round(tmp_path / "r", 1, teacher, tmp_path / "nowhere", predictor_factory=_factory([]))
    with pytest.raises(FlareInputError, match=r"Case_99999"):
        pseudo.predict_round(tmp_path / "r", 1, teacher, unlabelled, cases=["Case_99999"],
                             predictor_factory=_factory([]))
    with pytest.raises(FlareInputError, match="round 1 is not complete"):
        pseudo.retrain_round(tmp_path / "r", 2, 1, "P", unlabelled, train_fn=lambda *a: None)
    with pytest.raises(FlareInputError, match="numbered from 1"):
        pseudo.round_dir(tmp_path, 0)


# ---------------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    from demo_model import train_demo_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        return train_demo_model(tmp_path_factory.getbasetemp() / "flare_pseudo_demo_model", **DEMO_MODEL)


@pytest.mark.e2e
def test_memory_flat_over_200_cases_with_the_real_predictor(tmp_path, demo_model):
    """200 tiny synthetic cases, the project's predictor (full sliding window, 2-fold ensemble):
    RSS after case 200 vs after case 10 (recorded per case in cases.csv)."""
    from flare_utils.synthetic.phantom import write_cohort
    cohort = write_cohort(tmp_path / "cohort", 0, 200, 0, preset="tiny", fov_mix="abdomen", seed=3)
    images = cohort.root / "Training" / "FLARE22_UnlabeledCase"
    run = tmp_path / "run"
    info = pseudo.predict_round(run, 1, demo_model, images, folds=(0, 1), device="cpu")
    csv = pd.read_csv(pseudo.round_dir(run, 1) / "cases.csv")
    assert len(csv) == 200 and csv["index"].tolist() == list(range(1, 201))
    rss10, rss200 = csv.loc[9, "rss_mib"], csv.loc[199, "rss_mib"]
    peak10, peak200 = csv.loc[9, "peak_rss_mib"], csv.loc[199, "peak_rss_mib"]
    print(f"RSS after case 10: {rss10:.1f} MiB, after case 200: {rss200:.1f} MiB; "
          f"peak {peak10:.1f} -> {peak200:.1f} MiB; {info.predict_s:.1f} s")
    assert rss200 - rss10 < 50 and rss200 < 1.10 * rss10
    assert peak200 - peak10 < 50
    m = info.memory
    assert m["cases_in_session"] == 200 and m["rss_early_mib"] == rss10 and m["rss_last_mib"] == rss200
    # labels are the teacher ensemble's: uint8, on each image's grid
    lab = nib.load(str(pseudo.round_dir(run, 1) / "Case_00007.nii.gz"))
    img = nib.load(str(images / "Case_00007_0000.nii.gz"))
    assert lab.shape == img.shape and np.allclose(lab.affine, img.affine)
    assert lab.get_data_dtype() == np.uint8


@pytest.mark.e2e
def test_round_one_is_the_full_sliding_window_fold_ensemble(tmp_path, demo_model):
    """Round 1 labels == the project's predictor in full mode with both folds, softmax-averaged."""
    from flare_utils.inference.predictor import EfficientPredictor
    images = _images(tmp_path / "img", 0)
    from flare_utils.synthetic.phantom import generate_case
    for i in range(2):
        c = generate_case(100 + i, "tiny", fov="abdomen")
        nib.save(nib.Nifti1Image(c.image, c.affine), str(images / f"Case_{i:05d}_0000.nii.gz"))
    run = tmp_path / "run"
    pseudo.predict_round(run, 1, demo_model, images, device="cpu")          # folds: all trained (0, 1)
    p = EfficientPredictor.from_results_folder(demo_model, folds=(0, 1), mode="full", device="cpu", monitor=False)
    for i in range(2):
        ref, _ = p.predict_case(images / f"Case_{i:05d}_0000.nii.gz")
        got = np.asarray(nib.load(str(pseudo.round_dir(run, 1) / f"Case_{i:05d}.nii.gz")).dataobj)
        assert np.array_equal(ref, got)
    assert json.loads((pseudo.round_dir(run, 1) / "round.json").read_text())["folds"] == ["0", "1"]
