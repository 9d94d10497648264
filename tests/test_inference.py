"""EfficientPredictor with a real (tiny, session-trained) nnU-Net v2 model."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flare_utils.errors import FlareInputError
from flare_utils.inference.case_report import CaseReport
from flare_utils.inference.predictor import EfficientPredictor
from flare_utils.inference.resample import compute_new_shape
from flare_utils.inference.sliding_window import nnunet_steps

from test_inference_support import tiny_cases, tiny_model  # noqa: F401  (fixtures)

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a small shared CPU, spinning OpenMP threads make these tiny windows
    several times slower (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu")


def _stock_predictor(model, folds=(0,), mirroring=False):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                        perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(model), folds)
    return p


def _img(cases, i=0):
    return cases / "images" / f"case{i}_0000.nii.gz"


def _dsc(a, b):
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


# ----------------------------------------------------------------------------------------------
def test_full_mode_equals_nnunet_sliding_window(tiny_model, tiny_cases):
    ours = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), mode="full", device="cpu")
    pre = ours.preprocess(_img(tiny_cases, 1))                 # whole body: many windows
    assert pre.long_axis == 0
    _, res, grid = ours.predict_preprocessed(pre.data, pre.long_axis, keep_logits=True)
    stock = _stock_predictor(tiny_model)
    ref = stock.predict_sliding_window_return_logits(pre.data.cpu()).float()
    assert res.n_evaluated == grid.n_total == len(stock._internal_get_sliding_window_slicers(grid.shape))
    assert res.logits.shape == ref.shape
    _assert_logits_close(res.logits, ref)
    # nnU-Net's own entry point on our predictor (the seam) runs the same windows
    seam = ours.predict_logits_from_preprocessed_data(pre.data.cpu()).float()
    _assert_logits_close(seam, ref)


def _assert_logits_close(ours, ref):
    """nnU-Net accumulates logits and Gaussian weights in fp16, so where the weights are tiny (the
    outer corners of the outermost windows) its logits are quantised; elsewhere they agree to fp16
    precision, and the argmax agrees almost everywhere."""
    diff = (ours - ref).abs()
    assert (diff > 0.05 + 0.01 * ref.abs()).float().mean() < 0.002
    assert torch.quantile(diff.flatten()[::7], 0.99) < 0.02
    assert (ours.argmax(0) == ref.argmax(0)).float().mean() > 0.999


def test_preprocessing_matches_nnunet(tiny_model, tiny_cases):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    p = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu", crop="nonzero")
    pre = p.preprocess(_img(tiny_cases, 0))
    ref, _, props = DefaultPreprocessor(verbose=False).run_case([str(_img(tiny_cases, 0))], None, p.plans_manager,
                                                                 p.configuration_manager, p.dataset_json)
    ours = pre.data.numpy()
    assert ours.shape == ref.shape                               # same axes, same crop, same new shape
    # linear (ours) vs nnU-Net's cubic resampling: nearly the same image
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.97
    body = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu").preprocess(_img(tiny_cases, 0))
    assert all(b <= r for b, r in zip(body.data.shape, ref.shape))


def test_agrees_with_nnunet_predictor_end_to_end(tiny_model, tiny_cases, tmp_path):
    stock = _stock_predictor(tiny_model)
    stock.predict_from_files_sequential([[str(_img(tiny_cases, 0))]], [str(tmp_path / "ref")], False, True, None)
    ref = np.asarray(nib.load(tmp_path / "ref.nii.gz").dataobj)
    # same crop as nnU-Net (its nonzero crop), full tiling: only the resampling differs (linear vs
    # cubic for the image; nearest on labels vs linear on logits back), so the labels nearly agree
    ours_p = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu", mode="full", crop="nonzero")
    ours, rep = ours_p.predict_case(_img(tiny_cases, 0))
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    assert (ours == ref).mean() > 0.99
    assert _dsc(ours, ref) > 0.75


def _oblique_input(src: Path, dst: Path, gz: bool) -> Path:
    img = nib.load(src)
    data = np.asarray(img.dataobj).astype(np.int16)
    stored = ((data.astype(np.int32) + 1024)).astype(np.uint16)      # scaled storage: HU = v - 1024
    a = img.affine.copy()
    th = np.deg2rad(7)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    a[:3, :3] = rot @ np.diag([-1, -1, 1]) @ a[:3, :3]               # LPS-like and slightly oblique
    a[:3, 3] += [12.3, -4.5, 101.0]
    out = nib.Nifti1Image(stored, a)
    out.header.set_slope_inter(1.0, -1024.0)
    out.set_qform(a, code=1)
    out.set_sform(a, code=2)
    out.header.set_xyzt_units("mm", "sec")
    out.header["descrip"] = b"oblique test"
    path = dst / ("oblique_0000.nii.gz" if gz else "oblique_0000.nii")
    nib.save(out, path)
    return path


@pytest.mark.parametrize("gz", [True, False])
def test_written_geometry_equals_input_exactly(predictor, tiny_cases, tmp_path, gz):
    path = _oblique_input(_img(tiny_cases, 0), tmp_path, gz)
    out = tmp_path / "pred" / "oblique.nii.gz"
    label, rep = predictor.predict_case(path, out)
    streamed, rep2 = predictor.predict_case(path, tmp_path / "pred" / "streamed.nii.gz", return_label=False)
    assert streamed is None and rep2.output.endswith("streamed.nii.gz")
    s = nib.load(tmp_path / "pred" / "streamed.nii.gz")
    assert np.array_equal(np.asarray(s.dataobj), label) and s.header.binaryblock == nib.load(out).header.binaryblock
    a, b = nib.load(path), nib.load(out)
    assert b.shape == a.shape and np.asarray(b.dataobj).dtype == np.uint8
    assert np.array_equal(b.affine, a.affine)
    assert np.array_equal(b.header.get_qform(), a.header.get_qform())
    assert np.array_equal(b.header.get_sform(), a.header.get_sform())
    assert (int(b.header["qform_code"]), int(b.header["sform_code"])) == (1, 2)
    assert b.header.get_zooms() == a.header.get_zooms()
    assert b.header.get_xyzt_units() == a.header.get_xyzt_units()
    np.testing.assert_array_equal(np.asarray(b.dataobj), label)
    assert label.max() > 0                                          # the scaled HU were read correctly
    assert label.flags.f_contiguous     # NIfTI's voxel order: written without a transposed copy
    assert rep.output == str(out) and not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_array_input_equals_file_input(predictor, tiny_cases):
    img = nib.load(_img(tiny_cases, 0))
    a, _ = predictor.predict_case(_img(tiny_cases, 0))
    b, rep = predictor.predict_case(np.asarray(img.dataobj), spacing=img.header.get_zooms(), affine=img.affine,
                                    case_id="mem")
    np.testing.assert_array_equal(a, b)
    assert rep.case_id == "mem" and rep.input is None


def test_efficient_vs_full_reports(tiny_model, tiny_cases):
    eff = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu")
    full = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu", mode="full")
    gt = np.asarray(nib.load(tiny_cases / "labels" / "case1.nii.gz").dataobj)
    le, re_ = eff.predict_case(_img(tiny_cases, 1))
    lf, rf = full.predict_case(_img(tiny_cases, 1))
    for r in (re_, rf):
        assert r.windows_paper_eq2 == 9 * r.z_steps
        assert r.z_steps == len(nnunet_steps(r.padded_shape[0], r.patch_size[0]))
        assert r.windows_evaluated + r.windows_skipped == r.windows_grid
        assert set(r.to_row()) >= {"windows_evaluated", "time_read_s", "time_preprocess_s", "time_network_s",
                                   "time_resample_s", "time_write_s", "network_forward_s", "peak_rss_mib"}
        assert r.peak_rss_mib and r.peak_rss_mib > 0 and r.efficiency["samples"] >= 1
        json.dumps(r.to_dict())
    assert rf.windows_evaluated == rf.windows_nnunet_full == re_.windows_nnunet_full
    assert re_.windows_evaluated <= re_.windows_grid <= re_.windows_paper_eq2
    assert re_.windows_grid < rf.windows_evaluated
    # the real model's centre windows decide: a high threshold skips neighbours on the whole-body scan
    eff.centre_threshold = 200
    lt, rt = eff.predict_case(_img(tiny_cases, 1))
    assert rt.windows_skipped > 0 and rt.windows_evaluated < re_.windows_evaluated
    centres = [w for w in rt.windows if w["role"] == "centre"]
    assert len(centres) == rt.z_steps and all(w["evaluated"] for w in centres)
    assert abs(_dsc(le, gt) - _dsc(lf, gt)) < 0.1


def test_folds_ensemble_and_all(tiny_model, tiny_cases):
    ens = EfficientPredictor.from_results_folder(tiny_model, folds=(0, 1), device="cpu")
    assert len(ens.networks) == 2 and ens.folds == (0, 1)
    pre = ens.preprocess(_img(tiny_cases, 0))
    x = pre.data[None, :, :16, :32, :32].contiguous()
    with torch.inference_mode():
        got = ens._forward_with(ens.networks)(x)
        want = sum(torch.softmax(n(x).float(), 1) for n in ens.networks) / 2
        one = ens._forward_with(ens.networks[:1])(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(one, ens.networks[0](x).float())       # one fold: plain logits
    assert not torch.allclose(ens.networks[0](x), ens.networks[1](x))
    lab, rep = ens.predict_case(_img(tiny_cases, 0))
    assert rep.folds == [0, 1] and lab.max() > 0
    allp = EfficientPredictor.from_results_folder(tiny_model, folds="all", device="cpu")
    assert allp.folds == ("all",)
    auto = EfficientPredictor.from_results_folder(tiny_model, folds=None, device="cpu")
    assert auto.folds == (0, 1)


def test_tta_flag(tiny_model, tiny_cases):
    tta = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu", tta=True)
    plain = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu")
    stock = _stock_predictor(tiny_model, mirroring=True)
    assert tta.allowed_mirroring_axes == stock.allowed_mirroring_axes and len(stock.allowed_mirroring_axes) == 3
    pre = plain.preprocess(_img(tiny_cases, 0))
    x = pre.data[None, :, :16, :32, :32].contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(tta._forward_with(tta.networks)(x),                 # oneDNN vs native conv
                                   stock._internal_maybe_mirror_and_predict(x).float(), atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(plain._forward_with(plain.networks)(x), plain.networks[0](x).float())
    lt, rt = tta.predict_case(_img(tiny_cases, 0))
    lp, rp = plain.predict_case(_img(tiny_cases, 0))
    assert rt.tta and not rp.tta
    assert rt.windows_evaluated > 0 and lt.shape == lp.shape


def test_enforced_spacing(tiny_model, tiny_cases, tmp_path):
    p = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu", spacing=(12.0, 9.0, 9.0))
    assert p.plans_manager.transpose_forward == [0, 1, 2]
    pre = p.preprocess(_img(tiny_cases, 0))
    cropped = tuple(s.stop - s.start for s in pre.crop)
    want = compute_new_shape(tuple(cropped[a] for a in pre.perm), pre.input_spacing, (12.0, 9.0, 9.0))
    assert tuple(pre.data.shape[1:]) == want and pre.network_spacing == (12.0, 9.0, 9.0)
    out = tmp_path / "s.nii.gz"
    lab, rep = p.predict_case(_img(tiny_cases, 0), out)
    assert rep.network_spacing == [12.0, 9.0, 9.0]
    a, b = nib.load(_img(tiny_cases, 0)), nib.load(out)
    assert b.shape == a.shape and np.array_equal(b.affine, a.affine)
    default = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu").preprocess(_img(tiny_cases, 0))
    assert np.prod(pre.data.shape) < np.prod(default.data.shape)


# ----------------------------------------------------------------------------------------------
def test_predict_folder_reports_and_resume(predictor, tiny_cases, tmp_path):
    out = tmp_path / "pred"
    df = predictor.predict_folder(tiny_cases / "images", out)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert len(df) == 3 and not df["skipped_existing"].any() and df["error"].isna().all()
    assert (df["windows_evaluated"] > 0).all() and (df["time_network_s"] > 0).all()
    for cid in ("case0", "case1", "case2"):
        rep = CaseReport.from_dict(json.loads((out / "efficiency" / f"{cid}.json").read_text()))
        assert rep.output == str(out / f"{cid}.nii.gz") and rep.windows
    assert (out / "efficiency" / "summary.csv").is_file() and (out / "efficiency" / "run.json").is_file()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    df2 = predictor.predict_folder(tiny_cases / "images", out)
    assert df2["skipped_existing"].all() and len(df2) == 3
    assert (df2["windows_evaluated"] == df["windows_evaluated"]).all()        # reports read back
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == mtimes
    df3 = predictor.predict_folder(tiny_cases / "images", out, overwrite=True)
    assert not df3["skipped_existing"].any()


def test_resume_keeps_only_outputs_this_model_made_from_these_inputs(predictor, tiny_model, tiny_cases, tmp_path):
    """Outputs of another model (or of other settings), truncated outputs and outputs of a changed
    input are not "already done": they are predicted again."""
    src, out = tmp_path / "in", tmp_path / "pred"
    shutil.copytree(tiny_cases / "images", src)
    predictor.predict_folder(src, out)                                  # fold 0
    other = EfficientPredictor.from_results_folder(tiny_model, folds=(1,), device="cpu")
    assert other.producer_key() != predictor.producer_key()
    df = other.predict_folder(src, out)                                 # fold 1 into the same folder
    assert not df["skipped_existing"].any()
    full = EfficientPredictor.from_results_folder(tiny_model, folds=(1,), device="cpu", mode="full")
    assert full.producer_key() != other.producer_key()                   # settings count too
    assert other.predict_folder(src, out)["skipped_existing"].all()      # unchanged: all kept
    with open(out / "case1.nii.gz", "r+b") as f:                         # a truncated output
        f.truncate(100)
    os.utime(src / "case2_0000.nii.gz", ns=(0, 10**9))                   # a changed input
    df = other.predict_folder(src, out).set_index("case_id")
    assert bool(df.at["case0", "skipped_existing"]) and not df.loc[["case1", "case2"], "skipped_existing"].any()
    assert nib.load(str(out / "case1.nii.gz")).get_fdata().shape == nib.load(str(src / "case1_0000.nii.gz")).shape


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(PROJECT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "flare_utils", *map(str, args)], cwd=PROJECT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_interrupted_run_leaves_no_partial_output_and_resumes(tiny_model, tiny_cases, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(8):
        shutil.copy(_img(tiny_cases, k % 3), src / f"c{k}_0000.nii.gz")
    out = tmp_path / "out"
    proc = _cli("predict", tiny_model, src, out, "--device", "cpu", "--mode", "full")
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None:
        if len(list(out.glob("c*.nii.gz"))) >= 1:
            break
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("c*.nii.gz"))
    assert 1 <= len(done) < 8, "the run was not interrupted in the middle"
    for p in done:                                           # everything visible is complete
        assert np.asarray(nib.load(p).dataobj).shape == nib.load(src / p.name.replace(".nii.gz", "_0000.nii.gz")).shape
    visible = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert all(p.name.endswith(".nii.gz") or p.name == "efficiency" for p in visible)
    proc = _cli("predict", tiny_model, src, out, "--device", "cpu", "--mode", "full")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"{len(done)} already done" in stdout
    assert len(list(out.glob("c*.nii.gz"))) == 8
    assert not [p for p in out.iterdir() if p.name.startswith(".")]        # stale temporaries removed


def test_cli_predict_file_and_folder(tiny_model, tiny_cases, tmp_path, capsys):
    from flare_utils.study.cli import main
    out = tmp_path / "one.nii.gz"
    assert main(["predict", str(tiny_model), str(_img(tiny_cases, 0)), str(out), "--device", "cpu"]) == 0
    assert out.is_file() and (tmp_path / "efficiency" / "case0.json").is_file()
    assert "windows" in capsys.readouterr().out
    assert main(["predict", str(tiny_model), str(_img(tiny_cases, 0)), str(tmp_path / "dir"), "--device", "cpu",
                 "--folds", "0", "1", "--mode", "full", "--spacing", "10", "8", "8", "--tta"]) == 0
    rep = json.loads((tmp_path / "dir" / "efficiency" / "case0.json").read_text())
    assert rep["folds"] == [0, 1] and rep["mode"] == "full" and rep["tta"] and rep["network_spacing"] == [10, 8, 8]
    assert main(["predict", str(tiny_model), str(tiny_cases / "images"), str(tmp_path / "f"), "--device", "cpu",
                 "--folds", "all"]) == 0
    assert len(list((tmp_path / "f").glob("*.nii.gz"))) == 3
    assert "3 case(s) predicted" in capsys.readouterr().out


def test_cli_predict_inplane_step(tiny_model, tiny_cases, tmp_path, capsys):
    """--inplane-step reaches the grid: the 8 neighbours sit that many patches from the centre window."""
    from flare_utils.study.cli import main
    reps = {}
    for step in (0.5, 0.25):
        out = tmp_path / str(step)
        assert main(["predict", str(tiny_model), str(_img(tiny_cases, 1)), str(out), "--device", "cpu",
                     "--centre-threshold", "0", "--inplane-step", str(step)]) == 0
        reps[step] = json.loads((out / "efficiency" / "case1.json").read_text())
    for step, rep in reps.items():
        assert rep["inplane_step"] == step
        plane = [a for a in range(3) if a != rep["long_axis"]]
        centres = {w["z_index"]: w["start"] for w in rep["windows"] if w["role"] == "centre"}
        for a in plane:
            offsets = {abs(w["start"][a] - centres[w["z_index"]][a]) for w in rep["windows"]}
            h, c = round(rep["patch_size"][a] * step), next(iter(centres.values()))[a]
            if c - h >= 0 and c + h <= rep["padded_shape"][a] - rep["patch_size"][a]:
                assert offsets == {0, h}
            else:                                                   # clamped at the image border
                assert max(offsets) <= h
    starts = {step: sorted(tuple(w["start"]) for w in rep["windows"]) for step, rep in reps.items()}
    assert starts[0.5] != starts[0.25]
    assert main(["predict", str(tiny_model), str(_img(tiny_cases, 1)), str(tmp_path / "bad"), "--device", "cpu",
                 "--inplane-step", "0"]) == 2
    assert "inplane_step" in capsys.readouterr().err


def test_bad_inputs(tiny_model, tiny_cases, tmp_path, capsys):
    from flare_utils.study.cli import main
    with pytest.raises(FlareInputError, match="model folder not found"):
        EfficientPredictor.from_results_folder(tmp_path / "nope")
    with pytest.raises(FlareInputError, match="plans.json is missing"):
        EfficientPredictor.from_results_folder(tmp_path)
    with pytest.raises(FlareInputError, match="fold_3"):
        EfficientPredictor.from_results_folder(tiny_model, folds=(3,))
    with pytest.raises(FlareInputError, match="mode"):
        EfficientPredictor.from_results_folder(tiny_model, mode="fast")
    with pytest.raises(FlareInputError, match="spacing"):
        EfficientPredictor.from_results_folder(tiny_model, spacing=(1, 2))
    assert main(["predict", str(tmp_path / "nope"), str(_img(tiny_cases, 0)), str(tmp_path / "o.nii.gz")]) == 2
    assert "model folder not found" in capsys.readouterr().err

    p = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu")
    bad = tmp_path / "in"
    bad.mkdir()
    shutil.copy(_img(tiny_cases, 0), bad / "good_0000.nii.gz")
    raw = _img(tiny_cases, 1).read_bytes()
    (bad / "broken_0000.nii.gz").write_bytes(raw[: len(raw) // 2])            # truncated
    with pytest.raises(FlareInputError, match="broken_0000.nii.gz"):
        p.predict_case(bad / "broken_0000.nii.gz")
    with pytest.raises(FlareInputError, match="missing"):
        p.predict_case(bad / "absent.nii.gz")
    with pytest.raises(FlareInputError, match="broken_0000.nii.gz"):
        p.predict_folder(bad, tmp_path / "o1")
    df = p.predict_folder(bad, tmp_path / "o2", on_error="skip")
    assert (tmp_path / "o2" / "good.nii.gz").is_file() and not (tmp_path / "o2" / "broken.nii.gz").exists()
    assert df.set_index("case_id").loc["broken", "error"].startswith("FlareInputError")
    with pytest.raises(FlareInputError, match="no NIfTI"):
        p.predict_folder(tmp_path / "o2" / "efficiency", tmp_path / "o3")
    assert main(["predict", str(tiny_model), str(bad), str(tmp_path / "o4"), "--device", "cpu", "--keep-going"]) == 1


def test_onednn_convolutions_match_native(tiny_model, tiny_cases):
    from flare_utils.inference.onednn import use_onednn_convolutions
    native = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu", onednn=False)
    fast = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu")
    assert fast.onednn and not native.onednn
    x = native.preprocess(_img(tiny_cases, 0)).data[None, :, :16, :32, :32].contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(fast.networks[0](x), native.networks[0](x), atol=2e-3, rtol=1e-4)
    conv = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 2)))
    ref = conv(torch.ones(1, 2, 6, 8, 8))
    assert use_onednn_convolutions(conv) == 1
    with torch.inference_mode():
        torch.testing.assert_close(conv(torch.ones(1, 2, 6, 8, 8)), ref.detach(), atol=1e-5, rtol=1e-5)
