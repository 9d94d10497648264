"""`EfficientPredictor`: nnU-Net v2's predictor with the FLARE22 winner's efficient inference.

nnU-Net loads the results folder and builds the network; this subclass replaces the costly
parts around it (preprocessing, the sliding window, the way back to the original grid) so a case
runs in a fraction of nnU-Net's time and memory with the same model. The pieces live beside it:
`resample` (body crop, normalisation, torch resampling), `sliding_window` (the window grids and
loop), `images` (reading), `case_report` (what a case cost), `onednn` (fast CPU convolutions),
and `folder` (a whole folder with background I/O); `flare_utils.api.segment` (and `flare-study
predict`) is the one-call entry.

Axis conventions. Files are read with nibabel, voxel order (i, j, k). nnU-Net's readers for NIfTI
(SimpleITKIO, NibabelIO) give (k, j, i); the plans' `transpose_forward` then permutes that. The
network grid is the file array permuted accordingly (`PreprocessedCase.perm`), so the network sees
what it saw in training. `spacing=(z, y, x)` is in SimpleITK order (the reversed NIfTI zooms),
like nnU-Net's plans. The "long axis" (z of the windows) is the network axis of the voxel axis
most aligned with the patient's head-foot world axis.

Example::

    p = EfficientPredictor.from_results_folder(model_dir, folds=(0,), mode="efficient")
    label, report = p.predict_case("case_0000.nii.gz", output="pred/case.nii.gz")
    table = p.predict_folder("imagesTs", "pred")
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from flare_utils.data.io import (atomic_write_json, case_id_from_path, save_nifti, save_nifti_like,
                                 save_nifti_planes_like)
from flare_utils.errors import FlareInputError
from flare_utils.inference.case_report import EFFICIENCY_DIR, CaseReport, file_stat, resource_monitor
from flare_utils.inference.defaults import (ADAPTIVE_MAX_STEP, DEFAULT_CENTRE_THRESHOLD, DEFAULT_INPLANE_GRID,
                                            DEFAULT_INPLANE_STEP, INPLANE_GRIDS, MODES)
from flare_utils.inference.folder import predict_folder
from flare_utils.inference.folds import available_folds, model_identity, normalise_folds
from flare_utils.inference.images import StoredImage, long_axis_of_affine, read_image
from flare_utils.inference.backends import BACKENDS, wrap_networks
from flare_utils.inference.onednn import use_onednn_convolutions
from flare_utils.inference.resample import (CROP_MODES, DEFAULT_BODY_HU, CTNormalizer, body_bbox, compute_new_shape,
                                            label_planes, resample_to_grid, separate_z_axis)
from flare_utils.inference.sliding_window import (SlidingWindowResult, WindowGrid, make_grid, nnunet_window_count,
                                                  paper_eq2_count, run_sliding_window)
from flare_utils.utilities.device import resolve_device

# CaseReport (what predict_case returns) and EFFICIENCY_DIR (where reports go) are re-exported for callers
__all__ = ["EfficientPredictor", "PreprocessedCase", "CaseReport", "EFFICIENCY_DIR"]

_SITK_ORDER = (2, 1, 0)       # nnU-Net's NIfTI readers: array axis d = nibabel axis _SITK_ORDER[d]
_SUPPORTED_READERS = ("SimpleITKIO", "NibabelIO")


@dataclass
class PreprocessedCase:
    """A case on the network grid (cropped, normalised, resampled; not padded)."""
    case_id: str
    data: torch.Tensor                       # (1, *network_shape) float32 on the predictor's device
    perm: tuple[int, int, int]               # network axis d = file voxel axis perm[d]
    long_axis: int                           # network axis of the windows' z
    network_spacing: tuple[float, ...]
    input_spacing: tuple[float, ...]         # file spacing in network axis order
    shape: tuple[int, int, int]              # original file shape (i, j, k)
    zooms: tuple[float, float, float]
    crop: tuple[slice, slice, slice]         # in file axes
    header: Any = None
    affine: np.ndarray | None = None
    source: str | None = None
    read_s: float = 0.0
    preprocess_s: float = 0.0


def _timed(items, spent: list):
    """Yield from `items`, adding the time spent producing them to spent[0]."""
    it = iter(items)
    while True:
        t0 = time.perf_counter()
        try:
            x = next(it)
        except StopIteration:
            spent[0] += time.perf_counter() - t0
            return
        spent[0] += time.perf_counter() - t0
        yield x


class EfficientPredictor(nnUNetPredictor):
    """nnU-Net's `nnUNetPredictor` with the FLARE22 winner's efficient inference.

    nnU-Net loads the results folder, builds the network from the plans and the checkpoint's
    trainer, and supplies the Gaussian, the step rule, the padding and the mirroring axes. What
    this class changes:

    * preprocessing (`resample`): crop to the body (HU > `body_threshold_hu` bounding box), CT
      normalisation exactly as planned, torch linear resampling slab by slab on the device instead
      of nnU-Net's scipy cubic resampling;
    * sliding window (`sliding_window`): `mode="efficient"` runs 3x3 windows per z step, centre
      first, and skips the 8 neighbours when the centre window predicts fewer than
      `centre_threshold` foreground voxels (1 = the paper's "no foreground"; 0 = never skip);
      `inplane_grid="adaptive"` spreads the in-plane windows over a body wider than the paper's
      band (`sliding_window.adaptive_positions`), "paper" keeps the paper's 3x3;
      `mode="full"` is nnU-Net's regular tiling through the same code (the same logits as
      `nnUNetPredictor.predict_sliding_window_return_logits`);
    * several folds are evaluated window by window and their softmax probabilities averaged (the
      FLARE recipe's ensemble); one fold accumulates logits, as nnU-Net does;
    * no mirroring by default (`tta=True` adds nnU-Net's mirroring over the checkpoint's allowed
      axes); fp16 autocast on CUDA (`fp16`); on CPU the Conv3d layers call oneDNN directly
      (`onednn`, default on for CPU; see `use_onednn_convolutions`); `backend="openvino"` or
      `"onnx"` runs the windows' network in OpenVINO / ONNX Runtime instead (CPU only, optional
      packages; `flare_utils.inference.backends`);
    * argmax on the device while the windows stream along z, then nearest-neighbour resampling of
      the *label map* (not the probabilities) into the uncropped original grid, written as uint8
      NIfTI with exactly the input's header and affine, atomically; with an output file the map is
      streamed plane by plane into it (`resample.label_planes` -> `io.save_nifti_planes_like`).

    Other parameters: device "auto" | "cpu" | "cuda" | "cuda:N" | "mps"; step_size (z step and
    full-mode step, fraction of the patch, 0.5); inplane_step (3x3 grid spacing, 0.5; with the
    adaptive grid the smallest spacing); inplane_grid ("paper" or "adaptive"); adaptive_max_step
    (adaptive: largest spacing of neighbouring windows before another ring is added, 2/3); spacing
    (z, y, x) to predict at instead of the plans' (3D-CPS's test-time trick); crop "body" |
    "nonzero" | "none"; batch_size (neighbour windows per forward call; 1 on CPU, 4 on CUDA);
    monitor (a ResourceMonitor per case). Each case yields a `CaseReport`. On a CPU shared with
    other jobs, start Python with `OMP_WAIT_POLICY=PASSIVE` (docs/benchmarks.md).
    """

    def __init__(self, mode: str = "efficient", device: str | torch.device = "auto", tta: bool = False,
                 centre_threshold: int = DEFAULT_CENTRE_THRESHOLD, step_size: float = 0.5,
                 inplane_step: float = DEFAULT_INPLANE_STEP, spacing: Sequence[float] | None = None,
                 crop: str = "body", inplane_grid: str = DEFAULT_INPLANE_GRID,
                 adaptive_max_step: float = ADAPTIVE_MAX_STEP,
                 body_threshold_hu: float = DEFAULT_BODY_HU, batch_size: int | None = None,
                 fp16: bool = True, monitor: bool = True, onednn: bool | None = None,
                 backend: str = "torch", verbose: bool = False):
        if mode not in MODES:
            raise FlareInputError(None, f"mode must be one of {MODES}, got {mode!r}")
        if crop not in CROP_MODES:
            raise FlareInputError(None, f"crop must be one of {CROP_MODES}, got {crop!r}")
        if inplane_grid not in INPLANE_GRIDS:
            raise FlareInputError(None, f"inplane_grid must be one of {INPLANE_GRIDS}, got {inplane_grid!r}")
        if not 0 < step_size <= 1 or not 0 < inplane_step <= 1 or not 0 < adaptive_max_step <= 1:
            raise FlareInputError(None, "step_size, inplane_step and adaptive_max_step must be in (0, 1]")
        if int(centre_threshold) < 0:
            raise FlareInputError(None, f"centre_threshold must be >= 0, got {centre_threshold}")
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != 3 or any(not s > 0 for s in spacing):
                raise FlareInputError(None, f"spacing must be three positive numbers (z y x), got {spacing}")
        dev = resolve_device(device)
        with contextlib.redirect_stdout(io.StringIO()):
            super().__init__(tile_step_size=step_size, use_gaussian=True, use_mirroring=bool(tta),
                             perform_everything_on_device=dev.type == "cuda", device=dev,
                             verbose=verbose, verbose_preprocessing=False, allow_tqdm=False)
        self.mode, self.tta = mode, bool(tta)
        self.centre_threshold = int(centre_threshold)
        self.inplane_step = float(inplane_step)
        self.inplane_grid, self.adaptive_max_step = inplane_grid, float(adaptive_max_step)
        self.enforced_spacing = spacing
        self.crop, self.body_threshold_hu = crop, float(body_threshold_hu)
        self.batch_size = int(batch_size) if batch_size else (4 if dev.type == "cuda" else 1)
        self.fp16 = bool(fp16)
        self.monitor = bool(monitor)
        self.onednn = dev.type == "cpu" if onednn is None else bool(onednn) and dev.type == "cpu"
        if backend not in BACKENDS or (backend != "torch" and dev.type != "cpu"):
            raise FlareInputError(None, f"backend must be one of {BACKENDS} (other than torch: CPU only), "
                                        f"got {backend!r} on {dev.type}")
        self.backend = backend
        self.networks: list[torch.nn.Module] = []
        self.folds: tuple = ()
        self.model_dir: Path | None = None
        self.model_key = ""

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_results_folder(cls, model_dir: str | Path, folds=(0,), checkpoint: str = "checkpoint_final.pth",
                            **kwargs) -> "EfficientPredictor":
        """Load a trained nnU-Net v2 results folder (`.../Trainer__Plans__3d_fullres`).

        folds: one fold (0), several ((0, 1, 2): ensemble, softmax averaged), "all", or None
        (every fold_N with the checkpoint). Other keyword arguments go to the constructor.
        """
        p = cls(**kwargs)
        p.initialize_from_trained_model_folder(str(model_dir), folds, checkpoint)
        return p

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        model_dir = Path(model_training_output_dir)
        if not model_dir.is_dir():
            raise FlareInputError(model_dir, "model folder not found (expected an nnU-Net v2 results folder "
                                             "such as .../nnUNetTrainer__nnUNetPlans__3d_fullres)")
        for f in ("plans.json", "dataset.json"):
            if not (model_dir / f).is_file():
                raise FlareInputError(model_dir, f"not an nnU-Net v2 results folder: {f} is missing")
        use_folds = normalise_folds(use_folds)
        available = available_folds(model_dir, checkpoint_name)
        if use_folds is None:
            use_folds = tuple(f for f in available if isinstance(f, int))
            if not use_folds:
                raise FlareInputError(model_dir, f"no fold_N/{checkpoint_name} found")
        for f in use_folds:
            if not (model_dir / f"fold_{f}" / checkpoint_name).is_file():
                raise FlareInputError(model_dir / f"fold_{f}" / checkpoint_name,
                                      f"checkpoint missing (folds with {checkpoint_name}: "
                                      f"{', '.join(f'fold_{a}' for a in available) or 'none'})")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                super().initialize_from_trained_model_folder(str(model_dir), use_folds, checkpoint_name)
        except Exception as first:
            # nnU-Net could not find the checkpoint's trainer class by name (e.g. a project trainer
            # that was not registered with nnU-Net): build the network ourselves.
            try:
                self._load_without_trainer_lookup(model_dir, use_folds, checkpoint_name)
            except Exception as e:
                raise FlareInputError(model_dir, f"could not load the model ({type(first).__name__}: {first}; "
                                                 f"{type(e).__name__}: {e})") from e
        self._check_supported(model_dir)
        self.networks = []
        for params in self.list_of_parameters:
            net = copy.deepcopy(self.network)
            net.load_state_dict(params)
            self.networks.append(net.to(self.device).eval())
        self.network.load_state_dict(self.list_of_parameters[0])
        self.network = self.network.to(self.device).eval()
        if self.onednn:
            for net in (*self.networks, self.network):
                use_onednn_convolutions(net)
        if self.backend != "torch":     # the windows' networks; self.network (nnU-Net's seam) stays torch
            self.networks = wrap_networks(self.networks, self.patch_size, self.backend)
        self.folds = tuple(use_folds)
        self.model_dir = model_dir
        self.model_key = model_identity(model_dir, use_folds, checkpoint_name)

    def _load_without_trainer_lookup(self, model_dir: Path, folds, checkpoint_name: str) -> None:
        """Like nnU-Net's loader, but the trainer class comes from flare_utils.training (without
        registering anything) or, failing that, the stock nnUNetTrainer builds the plans' network."""
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        dataset_json = json.loads((model_dir / "dataset.json").read_text())
        plans_manager = PlansManager(json.loads((model_dir / "plans.json").read_text()))
        params, first = [], None
        for f in folds:
            ck = torch.load(model_dir / f"fold_{f}" / checkpoint_name, map_location="cpu", weights_only=False)
            first = first or ck
            params.append(ck["network_weights"])
        trainer_name = first["trainer_name"]
        trainer_cls = nnUNetTrainer
        try:
            from flare_utils.training.registry import trainer_classes
            trainer_cls = trainer_classes().get(trainer_name, nnUNetTrainer)
        except Exception:
            pass
        cm = plans_manager.get_configuration(first["init_args"]["configuration"])
        n_in = determine_num_input_channels(plans_manager, cm, dataset_json)
        n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        net = trainer_cls.build_network_architecture(plans_manager, cm, n_in, n_out, enable_deep_supervision=False)
        net.load_state_dict(params[0])
        self.manual_initialization(net, plans_manager, cm, params, dataset_json, trainer_name,
                                   first.get("inference_allowed_mirroring_axes"))

    def _check_supported(self, model_dir: Path) -> None:
        cm, pm = self.configuration_manager, self.plans_manager
        if len(cm.patch_size) != 3:
            raise FlareInputError(model_dir, f"only 3D configurations are supported (patch {cm.patch_size})")
        if cm.previous_stage_name is not None:
            raise FlareInputError(model_dir, "cascade (lowres -> fullres) models are not supported")
        if len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))) != 1:
            raise FlareInputError(model_dir, "only single-channel (CT) models are supported")
        if self.label_manager.has_regions:
            raise FlareInputError(model_dir, "region-based models are not supported")
        rw = pm.plans.get("image_reader_writer", "SimpleITKIO")
        if rw not in _SUPPORTED_READERS:
            raise FlareInputError(model_dir, f"image reader {rw} is not supported ({_SUPPORTED_READERS})")

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.configuration_manager.patch_size)

    @property
    def num_classes(self) -> int:
        return int(self.label_manager.num_segmentation_heads)

    def _require_model(self) -> None:
        if not self.networks:
            raise RuntimeError("no model loaded: use EfficientPredictor.from_results_folder(...)")

    # -- geometry --------------------------------------------------------------------------
    def _perm(self) -> tuple[int, int, int]:
        tf = list(self.plans_manager.transpose_forward)
        return tuple(_SITK_ORDER[t] for t in tf)

    def target_spacing(self) -> tuple[float, float, float]:
        """Network spacing in network axis order (plans' or the enforced one)."""
        if self.enforced_spacing is not None:
            return tuple(self.enforced_spacing[t] for t in self.plans_manager.transpose_forward)
        return tuple(float(s) for s in self.configuration_manager.spacing)

    # -- preprocessing ---------------------------------------------------------------------
    def preprocess(self, image: str | Path | np.ndarray, spacing: Sequence[float] | None = None,
                   affine: np.ndarray | None = None, case_id: str | None = None) -> PreprocessedCase:
        """Read (path) or take (array in file order (i, j, k) with `spacing` = its zooms) an image
        and put it on the network grid."""
        self._require_model()
        t0 = time.perf_counter()
        if isinstance(image, (str, Path)):
            img = read_image(image)
            source, cid = str(image), case_id or case_id_from_path(image, channel_suffix=True)
        else:
            arr = np.asarray(image)
            if arr.ndim != 3:
                raise FlareInputError(None, f"expected a 3D array, got shape {arr.shape}")
            if spacing is None:
                raise FlareInputError(None, "spacing is needed for an in-memory array")
            zooms = tuple(float(s) for s in spacing)
            aff = np.diag([*zooms, 1.0]) if affine is None else np.asarray(affine, float)
            img = StoredImage(arr, None, aff, zooms, (1.0, 0.0))
            source, cid = None, case_id or "array"
        read_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        perm = self._perm()
        crop = body_bbox(img.array, self.crop, self.body_threshold_hu, scale=img.scale)
        view = img.array[crop].transpose(perm)
        in_spacing = tuple(img.zooms[a] for a in perm)
        target = self.target_spacing()
        new_shape = compute_new_shape(view.shape, in_spacing, target)
        new_shape = tuple(max(1, s) for s in new_shape)
        long_axis = perm.index(long_axis_of_affine(img.affine))
        sep = separate_z_axis(in_spacing, target)
        slab_axis = sep if sep is not None else long_axis
        data = self._normalise_and_resample(view, new_shape, slab_axis, sep is not None, img.scale)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        pre_s = time.perf_counter() - t1
        return PreprocessedCase(cid, data[None], perm, long_axis, tuple(float(t) for t in target), in_spacing,
                                tuple(int(s) for s in img.array.shape), img.zooms, crop, img.header,
                                img.affine, source, read_s, pre_s)

    def _normalise_and_resample(self, view, new_shape, slab_axis, nearest_slab_axis, scale) -> torch.Tensor:
        schemes = list(self.configuration_manager.normalization_schemes)
        props = self.plans_manager.foreground_intensity_properties_per_channel
        if schemes == ["CTNormalization"]:
            norm = CTNormalizer(props.get("0", props.get(0)), scale)
            return resample_to_grid(view, new_shape, slab_axis=slab_axis,
                                    slab_axis_mode="nearest-exact" if nearest_slab_axis else "linear",
                                    normalize=norm, device=self.device)
        # other schemes (not pointwise, e.g. z-score): nnU-Net's class on the whole float32 crop
        from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import \
            get_normalization_scheme
        cls = get_normalization_scheme(schemes[0])
        data = np.asarray(view, dtype=np.float32) * scale[0] + scale[1]
        use_mask = bool(self.configuration_manager.use_mask_for_norm[0])
        seg = np.where(data != 0, 0, -1).astype(np.int8) if use_mask else None
        data = cls(use_mask_for_norm=use_mask, intensityproperties=props.get("0", props.get(0)) or {}).run(
            data, seg)
        return resample_to_grid(data, new_shape, slab_axis=slab_axis,
                                slab_axis_mode="nearest-exact" if nearest_slab_axis else "linear",
                                normalize=None, device=self.device)

    # -- network ---------------------------------------------------------------------------
    def _mirror_predict(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's mirroring TTA (`_internal_maybe_mirror_and_predict`) for one network."""
        y = net(x)
        axes = self.allowed_mirroring_axes if self.tta else None
        if axes:
            axes = [m + 2 for m in axes]
            combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
            for c in combos:
                y = y + torch.flip(net(torch.flip(x, c)), c)
            y = y / (len(combos) + 1)
        return y

    def _forward_with(self, networks: Sequence[torch.nn.Module]):
        use_amp = self.device.type == "cuda" and self.fp16

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext():
                out = None
                for net in networks:
                    y = self._mirror_predict(net, x).float()
                    if len(networks) > 1:
                        y = torch.softmax(y, 1)
                    out = y if out is None else out + y
                if len(networks) > 1:
                    out = out / len(networks)
            return out
        return forward

    def _gaussian(self) -> torch.Tensor:
        # nnU-Net's map (fp16, max 10), as float32
        return compute_gaussian(self.patch_size, sigma_scale=1. / 8, value_scaling_factor=10,
                                dtype=torch.float16, device=self.device).float()

    def make_grid(self, shape: Sequence[int], long_axis: int = 0, mode: str | None = None) -> WindowGrid:
        """Window grid of `mode` (default: the predictor's) for an unpadded network shape."""
        padded = tuple(max(int(s), p) for s, p in zip(shape, self.patch_size))
        return make_grid(mode or self.mode, padded, self.patch_size, long_axis, self.tile_step_size,
                         self.inplane_step, self.inplane_grid, self.adaptive_max_step)

    @torch.inference_mode()
    def predict_preprocessed(self, data: torch.Tensor, long_axis: int = 0, *, mode: str | None = None,
                             keep_logits: bool = False, networks: Sequence[torch.nn.Module] | None = None
                             ) -> tuple[torch.Tensor, SlidingWindowResult, WindowGrid]:
        """Sliding window on preprocessed data (1, *shape): (labels on the device, unpadded;
        the loop's result (records, times, logits when keep_logits, padded); the grid)."""
        self._require_model()
        data = data.to(self.device)
        padded, revert = pad_nd_image(data, self.patch_size, "constant", {"value": 0}, True, None)
        grid = make_grid(mode or self.mode, padded.shape[1:], self.patch_size, long_axis, self.tile_step_size,
                         self.inplane_step, self.inplane_grid, self.adaptive_max_step)
        res = run_sliding_window(padded, grid, self._forward_with(networks or self.networks), self.num_classes,
                                 self._gaussian(), self.centre_threshold, keep_logits=keep_logits,
                                 batch_size=self.batch_size)
        labels = res.labels[tuple(revert[1:])]
        if res.logits is not None:
            res.logits = res.logits[(slice(None), *revert[1:])]
        return labels, res, grid

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """nnU-Net's seam: logits of `self.network` with this predictor's windows (so nnU-Net's own
        pipelines, e.g. `predict_from_files`, run the efficient grid too)."""
        self.network = self.network.to(self.device).eval()
        _, res, _ = self.predict_preprocessed(input_image, 0, keep_logits=True, networks=[self.network])
        return res.logits

    # -- back to the original grid ---------------------------------------------------------
    def labels_to_original(self, labels: torch.Tensor, pre: PreprocessedCase) -> np.ndarray:
        """Nearest-neighbour resampling of network-grid labels into the uncropped file grid (uint8): the
        planes the streamed writer gets (`label_planes`), gathered into one array."""
        # Fortran order: NIfTI's voxel order, so the writer streams the array without a transposed copy
        out = np.empty(pre.shape, dtype=self._label_dtype(), order="F")
        for k, plane in enumerate(label_planes(labels, pre.shape, pre.crop, pre.perm, out.dtype)):
            out[:, :, k] = plane.T
        return out

    # -- one case --------------------------------------------------------------------------
    def _report(self, pre: PreprocessedCase, res: SlidingWindowResult, grid: WindowGrid, labels_shape) -> CaseReport:
        starts = grid.long_starts
        return CaseReport(
            case_id=pre.case_id, input=pre.source, mode=self.mode, folds=list(self.folds), tta=self.tta,
            device=str(self.device), centre_threshold=self.centre_threshold,
            inplane_step=self.inplane_step, inplane_grid=self.inplane_grid, crop=self.crop,
            original_shape=list(pre.shape), original_spacing=list(pre.zooms),
            crop_box=[[s.start, s.stop] for s in pre.crop], network_shape=list(labels_shape),
            padded_shape=list(grid.shape), network_spacing=list(pre.network_spacing),
            patch_size=list(self.patch_size), long_axis=pre.long_axis, z_steps=len(starts),
            windows_evaluated=res.n_evaluated, windows_skipped=res.n_skipped, windows_grid=grid.n_total,
            windows_paper_eq2=paper_eq2_count(grid.shape, grid.patch, grid.long_axis, self.tile_step_size),
            windows_nnunet_full=nnunet_window_count(grid.shape, grid.patch, self.tile_step_size),
            centres_with_foreground=sum(1 for r in res.records if r.role == "centre" and r.foreground
                                        and r.foreground >= max(1, self.centre_threshold)),
            time_read_s=pre.read_s, time_preprocess_s=pre.preprocess_s, time_network_s=res.loop_s,
            network_forward_s=res.forward_s, windows=res.records_as_dicts())

    def run_network(self, pre: PreprocessedCase) -> tuple[torch.Tensor, CaseReport]:
        """The network phase of a preprocessed case: (labels on the network grid, its report)."""
        labels, res, grid = self.predict_preprocessed(pre.data, pre.long_axis)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return labels, self._report(pre, res, grid, labels.shape)

    def _write(self, label: np.ndarray, pre: PreprocessedCase, output: Path) -> None:
        if pre.header is not None:
            ref = SimpleNamespace(header=pre.header)
            save_nifti_like(label, ref, output)
        else:
            save_nifti(label, pre.affine, output)

    def write_labels(self, labels: torch.Tensor, pre: PreprocessedCase, output: Path, rep: CaseReport,
                     label: np.ndarray | None = None) -> None:
        """Network-grid labels -> the original grid -> `output`, plane by plane (no original-size array:
        `label_planes` feeds `save_nifti_planes_like`). `label`: the original-grid map when the caller
        already has it; it, and in-memory inputs (no header), are written whole. Sets the report's
        resample and write times and output."""
        t_all = time.perf_counter()
        if label is None and pre.header is not None:
            spent = [0.0]
            planes = _timed(label_planes(labels, pre.shape, pre.crop, pre.perm, self._label_dtype()), spent)
            save_nifti_planes_like(planes, pre.shape, self._label_dtype(), SimpleNamespace(header=pre.header),
                                   output)
            rep.time_resample_s = spent[0]
            rep.time_write_s = time.perf_counter() - t_all - spent[0]
        else:
            if label is None:
                label = self.labels_to_original(labels, pre)
                rep.time_resample_s = time.perf_counter() - t_all
            t0 = time.perf_counter()
            self._write(label, pre, output)
            rep.time_write_s = time.perf_counter() - t0
        rep.output = str(output)
        rep.producer, rep.output_bytes = self.producer_key(), output.stat().st_size
        if rep.input and Path(rep.input).is_file():
            rep.input_stat = file_stat(rep.input)

    def producer_key(self) -> str:
        """A key of everything that decides this predictor's labels: the model's content (folds,
        checkpoints, plans) and the settings. An output made under another key is not reused."""
        self._require_model()
        settings = {"model": self.model_key, "mode": self.mode, "tta": self.tta, "step": self.tile_step_size,
                    "centre_threshold": self.centre_threshold, "inplane_step": self.inplane_step,
                    "spacing": self.enforced_spacing, "crop": self.crop, "body_hu": self.body_threshold_hu,
                    "fp16": self.fp16 and self.device.type == "cuda"}
        if self.backend != "torch":           # float32 rounding of another kernel order: labels may differ
            settings.update(backend=self.backend)
        if self.inplane_grid != "paper":      # the paper's grid keeps the keys made before the option existed
            settings.update(inplane_grid=self.inplane_grid, adaptive_max_step=self.adaptive_max_step)
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def _label_dtype(self):
        return np.uint8 if self.num_classes <= 255 else np.int16

    def predict_case(self, image: str | Path | np.ndarray, output: str | Path | None = None, *,
                     spacing: Sequence[float] | None = None, affine: np.ndarray | None = None,
                     case_id: str | None = None, report_dir: str | Path | None = None,
                     return_label: bool = True) -> tuple[np.ndarray | None, CaseReport]:
        """Segment one image (a NIfTI path, or an (i, j, k) array with `spacing`).

        Returns the uint8 label map on the input grid and the CaseReport. With `output` the label
        map is written there (NIfTI with the input's exact header/affine). With `report_dir` the
        report is written to `<report_dir>/<case>.json`. With `output` and `return_label=False`
        the label map is streamed to the file plane by plane and never held whole (less memory
        and time; None is returned in its place).
        """
        self._require_model()
        t_all = time.perf_counter()
        with resource_monitor(self.monitor) as mon:
            pre = self.preprocess(image, spacing, affine, case_id)
            labels, rep = self.run_network(pre)
            label = None
            if return_label or output is None:
                t0 = time.perf_counter()
                label = self.labels_to_original(labels, pre)
                rep.time_resample_s = time.perf_counter() - t0
            if output is not None:
                self.write_labels(labels, pre, Path(output), rep, label)
            del labels
        rep.total_s = time.perf_counter() - t_all
        rep.add_monitor(mon)
        if report_dir is not None:
            atomic_write_json(Path(report_dir) / f"{rep.case_id}.json", rep.to_dict())
        return label, rep

    # -- a folder --------------------------------------------------------------------------
    def predict_folder(self, in_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                       prefetch: int = 1, on_error: str = "raise", files: Sequence[str | Path] | None = None):
        """Segment every NIfTI of `in_dir` into `out_dir/<case>.nii.gz` (case id without _0000).

        Background threads read/preprocess the next case and resample/write the previous one.
        Cases whose output exists are skipped (unless `overwrite`), so an interrupted run resumes;
        outputs and reports are written atomically. on_error: "raise" (stop at the first bad
        case, after finishing the cases in flight) or "skip" (record the error and go on).
        Returns a pandas DataFrame (one row per case, `CaseReport.to_row()`); per-case JSON in
        `<out>/efficiency/<case>.json`, the table in `<out>/efficiency/summary.csv`, and the run's
        totals in `<out>/efficiency/run.json`.
        """
        self._require_model()
        return predict_folder(self, in_dir, out_dir, overwrite=overwrite, prefetch=prefetch, on_error=on_error,
                              files=files)
