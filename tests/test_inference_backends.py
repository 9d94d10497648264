"""Optional CPU inference backends (OpenVINO, ONNX Runtime) against torch, on the tiny trained model.
Each backend's tests skip when its package is not installed."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from flare_utils.errors import FlareInputError
from flare_utils.inference.backends import ExportedNetwork
from flare_utils.inference.predictor import EfficientPredictor

from test_inference_support import tiny_cases, tiny_model  # noqa: F401  (fixtures)

_PACKAGE = {"openvino": "openvino", "onnx": "onnxruntime"}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def torch_predictor(tiny_model):
    return EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu", monitor=False)


def _needs(backend):
    pytest.importorskip(_PACKAGE[backend])
    if backend == "onnx":
        pytest.importorskip("onnx")


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_backend_logits_and_labels_match_torch(backend, tiny_model, tiny_cases, torch_predictor):
    _needs(backend)
    p = EfficientPredictor.from_results_folder(tiny_model, folds=(0,), device="cpu", monitor=False, backend=backend)
    assert all(isinstance(n, ExportedNetwork) for n in p.networks)
    assert not isinstance(p.network, ExportedNetwork)          # nnU-Net's seam keeps the torch network
    pre = torch_predictor.preprocess(tiny_cases / "images" / "case1_0000.nii.gz")
    lab_t, res_t, _ = torch_predictor.predict_preprocessed(pre.data, pre.long_axis, keep_logits=True)
    lab_b, res_b, _ = p.predict_preprocessed(pre.data, pre.long_axis, keep_logits=True)
    assert res_b.n_evaluated == res_t.n_evaluated
    scale = float(res_t.logits.abs().max())
    assert float((res_b.logits - res_t.logits).abs().max()) < 1e-3 * scale
    assert float((lab_b == lab_t).float().mean()) > 0.999
    assert p.producer_key() != torch_predictor.producer_key()


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_backend_predict_case_file_to_file(backend, tiny_model, tiny_cases, torch_predictor, tmp_path):
    _needs(backend)
    import nibabel as nib
    img = tiny_cases / "images" / "case0_0000.nii.gz"
    p = EfficientPredictor.from_results_folder(tiny_model, folds=(0, 1), device="cpu", monitor=False,
                                               backend=backend)
    ref = EfficientPredictor.from_results_folder(tiny_model, folds=(0, 1), device="cpu", monitor=False)
    _, rep = p.predict_case(img, tmp_path / "b.nii.gz", return_label=False)
    ref.predict_case(img, tmp_path / "t.nii.gz", return_label=False)
    b = np.asarray(nib.load(tmp_path / "b.nii.gz").dataobj)
    t = np.asarray(nib.load(tmp_path / "t.nii.gz").dataobj)
    assert b.shape == t.shape and np.mean(b == t) > 0.999
    assert rep.windows_evaluated > 0


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_exported_network_batches_and_checks_shape(backend, torch_predictor):
    _needs(backend)
    net = torch_predictor.networks[0]
    e = ExportedNetwork(net, torch_predictor.patch_size, backend, threads=1)
    x = torch.randn(2, 1, *torch_predictor.patch_size)
    with torch.inference_mode():
        y, ref = e(x), net(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert float((y - ref).abs().max()) < 1e-3 * float(ref.abs().max())
    with pytest.raises(ValueError, match="exported patch"):
        e(torch.zeros(1, 1, *(s * 2 for s in torch_predictor.patch_size)))


def test_unknown_backend_is_refused():
    with pytest.raises(FlareInputError, match="backend"):
        EfficientPredictor(device="cpu", backend="tensorrt")


def test_missing_package_says_how_to_install(torch_predictor, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)          # import openvino -> ImportError
    with pytest.raises(FlareInputError, match="pip install openvino"):
        ExportedNetwork(torch_predictor.networks[0], torch_predictor.patch_size, "openvino")


def test_cli_backend_option(tiny_model, tiny_cases, tmp_path):
    _needs("openvino")
    from flare_utils.study.cli import main
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", str(tiny_model), str(tiny_cases / "images" / "case0_0000.nii.gz"), str(out),
                 "--device", "cpu", "--backend", "openvino"]) in (0, None)
    assert out.is_file()
