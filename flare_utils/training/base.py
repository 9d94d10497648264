"""`FlareTrainer`: the base of every FLARE trainer, a thin subclass of nnU-Net v2's `nnUNetTrainer`.

Network, augmentation, poly lr, deep supervision, checkpoints and final validation stay nnU-Net's
own code. What it adds - budget, device, seed, CPU settings, loss, mirroring, transfer init and
encoder freezing - comes from a `TrainingConfig` read from the JSON file named by
`FLARE_TRAINING_CONFIG`, because nnU-Net's constructor signature `(plans, configuration, fold,
dataset_json, device)` cannot carry it; so the identical trainer runs from
`flare_utils.training.train()` and from `nnUNetv2_train ... -tr NAME`. Mirroring off also turns off
test-time mirroring (the checkpoint carries it). Subclasses (pseudo-label, noisy-student, CPS)
extend it through a few hooks (`config_class`, `apply_config`, `after_network_built`, ...).

Details: docs/reference/training.md
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from flare_utils.utilities.progress import report as report_progress
from flare_utils.errors import FlareInputError
from flare_utils.training.config import (
    CONFIG_FILE_NAME,
    DETERMINISTIC_ENV,
    TrainingConfig,
    deterministic_requested,
)
from flare_utils.training.transfer import freeze_encoder_stages, load_transfer_weights, unwrap
from flare_utils.utilities.device import resolve_device

__all__ = ["FlareTrainer", "resolve_device", "seed_everything", "deterministic_requested", "configure_determinism",
           "disable_timed_choices", "DETERMINISTIC_ENV"]

_stock_trainer_module = importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")

LOSS_WEIGHTS = {"dice_ce": (1.0, 1.0), "dice": (0.0, 1.0), "ce": (1.0, 0.0)}  # (ce, dice)
TRANSFER_REPORT_NAME = "flare_transfer_init.json"


def seed_everything(seed: int | None) -> None:
    """Seed python `random`, numpy's global RNG and torch (CPU and all CUDA devices)."""
    if seed is None:
        return
    seed = int(seed) % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool, device: torch.device) -> str:
    """Deterministic GPU kernels where torch has them (docs/reference/determinism.md); returns what
    was done, for the log. On CPU nothing is switched: the CPU kernels used in training give
    bit-identical results for the same seed, thread count and CPU type, and torch's deterministic
    mode would only add its memory filling there. On CUDA/MPS with `deterministic`:
    `torch.use_deterministic_algorithms(True, warn_only=True)` (ops without a deterministic
    implementation warn instead of failing), cuDNN deterministic and not benchmarking, and
    CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set (it must be set before cuBLAS starts; set it in the
    environment to be sure). These are process-wide and stay on after training."""
    if not deterministic:
        return "off"
    if device.type == "cpu":
        return "on (CPU: nothing to switch)"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return (f"on ({device.type}: torch deterministic algorithms (warn only), cuDNN deterministic, no cuDNN "
            f"benchmark, CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']})")


def disable_timed_choices(transform) -> int:
    """Switch off the stopwatch in an augmentation pipeline: nnU-Net's `GaussianBlurTransform(...,
    benchmark=True)` times FFT against direct convolution for each (size, kernel) and keeps the
    faster, so which (numerically different) path a run takes depends on machine and load. With
    benchmark off it always convolves directly, the path the stopwatch picks at the demo's patch
    sizes. Returns the number of transforms changed."""
    n, stack, seen = 0, [transform], set()
    while stack:
        t = stack.pop()
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, GaussianBlurTransform) and t.benchmark:
            t.benchmark = False
            n += 1
        for attr in ("transforms", "list_of_transforms"):
            children = getattr(t, attr, None)
            if isinstance(children, (list, tuple)):
                stack.extend(children)
        stack.append(getattr(t, "transform", None))
    return n


def make_optimizer(params, name: str, initial_lr: float, weight_decay: float, num_epochs: int):
    """(optimizer, poly lr scheduler): nnU-Net's SGD (nesterov, momentum 0.99) or, for "adamw",
    AdamW with amsgrad as nnU-Net's own nnUNetTrainerAdam."""
    if name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=initial_lr, weight_decay=weight_decay, amsgrad=True)
    elif name != "sgd":
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")
    else:
        optimizer = torch.optim.SGD(params, initial_lr, weight_decay=weight_decay, momentum=0.99, nesterov=True)
    return optimizer, PolyLRScheduler(optimizer, initial_lr, num_epochs)


class _WorkerSeeding:
    """Wraps a batchgenerators data loader so that each augmentation worker seeds torch and
    `random` from (base seed, worker id) and uses one torch thread; numpy is seeded by the
    augmenter itself. Everything else is forwarded to the wrapped loader."""

    def __init__(self, loader, base_seed: int | None):
        self._loader = loader
        self._base_seed = base_seed

    def set_thread_id(self, thread_id: int) -> None:
        torch.set_num_threads(1)
        if self._base_seed is not None:
            s = (int(self._base_seed) * 1000 + 7919 * (int(thread_id) + 1)) % (2 ** 32)
            torch.manual_seed(s)
            random.seed(s)
        self._loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._loader)

    def next(self):
        return next(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class FlareTrainer(nnUNetTrainer):
    """nnU-Net v2 trainer configured by a `TrainingConfig` (see module docstring)."""

    config_class: type[TrainingConfig] = TrainingConfig
    default_mirroring: bool = True
    supports_ddp: bool = True           # multi-GPU training (flare_utils.training.ddp)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        cfg = self.load_training_config()
        device = resolve_device(cfg.device, device)
        if cfg.num_threads is not None and device.type == "cpu":
            torch.set_num_threads(int(cfg.num_threads))
        determinism = configure_determinism(deterministic_requested(cfg.deterministic), device)
        seed_everything(cfg.seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # CPU ranks over gloo (tests, debugging): nnU-Net's DDP trainer forces cuda:<rank>
            self.device = device
            self.grad_scaler = None
        self._train_steps = 0
        self.flare_config = cfg
        self.determinism = determinism
        self.transfer_report = None
        self.frozen_parameters: list[str] = []
        self.apply_config()

    # ------------------------------------------------------------------ configuration
    @classmethod
    def load_training_config(cls) -> TrainingConfig:
        """The config from FLARE_TRAINING_CONFIG (or defaults), as `cls.config_class`."""
        return cls.config_class.from_env()

    def apply_config(self) -> None:
        c = self.flare_config
        self.num_epochs = int(c.num_epochs)
        self.num_iterations_per_epoch = int(c.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = int(c.num_val_iterations_per_epoch)
        self.initial_lr = c.learning_rate
        self.weight_decay = float(c.weight_decay)
        self.oversample_foreground_percent = float(c.oversample_foreground_percent)
        self.save_every = int(c.save_every)
        if c.loss not in LOSS_WEIGHTS:
            raise FlareInputError(None, f"unknown loss {c.loss!r}; known: {sorted(LOSS_WEIGHTS)}")
        self.print_to_log_file(f"{type(self).__name__}: FLARE training configuration "
                               f"{json.dumps(c.to_dict())}", also_print_to_console=False)
        self.print_to_log_file(f"deterministic mode: {getattr(self, 'determinism', 'off')}; torch threads "
                               f"{torch.get_num_threads()}", also_print_to_console=False)

    @property
    def mirroring_enabled(self) -> bool:
        m = self.flare_config.mirroring
        return self.default_mirroring if m is None else bool(m)

    @property
    def n_proc_da(self) -> int:
        """Augmentation worker processes: config, else nnU-Net's (at most 1 on CPU)."""
        if self.flare_config.n_proc_da is not None:
            return int(self.flare_config.n_proc_da)
        n = get_allowed_n_proc_DA()
        return min(n, 1) if self.device.type == "cpu" else n

    @property
    def export_processes(self) -> int:
        if self.flare_config.export_processes is not None:
            return int(self.flare_config.export_processes)
        return max(1, min(2, os.cpu_count() or 1))

    def _do_i_compile(self):
        c = getattr(self, "flare_config", None)
        if c is not None and c.compile is None and deterministic_requested(c.deterministic):
            return False               # inductor may pick kernels by timing them
        if c is None or c.compile is None:
            return super()._do_i_compile()
        return bool(c.compile) and self.device.type == "cuda"

    # ------------------------------------------------------------------ DDP
    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.is_ddp else 1

    def rank_seed(self, offset: int) -> int | None:
        """Seed of this rank's data loading: `seed + offset` on rank 0 (and without DDP), shifted by
        1000 per rank, so that the ranks draw different patches and augmentations, reproducibly."""
        seed = self.flare_config.seed
        return None if seed is None else int(seed) + int(offset) + 1000 * int(self.local_rank)

    @contextlib.contextmanager
    def rank0_first(self):
        """In DDP: rank 0 runs the block first (e.g. preprocessing into a shared cache), the other
        ranks after it; without DDP just the block."""
        if self.is_ddp and self.local_rank != 0:
            dist.barrier()
        yield
        if self.is_ddp and self.local_rank == 0:
            dist.barrier()

    @contextlib.contextmanager
    def _ddp_wrapper(self):
        """Around nnU-Net's `initialize` in DDP (its module global `DDP` swapped for the block):
        `after_network_built` (transfer init, freezing) runs just before nnU-Net wraps the network,
        so DDP registers only the parameters that still train; and for CPU ranks the wrapper is made
        without device_ids (nnU-Net's DDP(device_ids=[local_rank]) is for CUDA modules only)."""
        if not self.is_ddp:
            yield
            return
        mod = _stock_trainer_module
        stock = mod.DDP
        cpu = self.device.type != "cuda"

        def wrap(module, *args, **kwargs):
            self.after_network_built()
            self._network_hooks_done = True
            if cpu:
                kwargs.pop("device_ids", None)
            return stock(module, *args, **kwargs)
        mod.DDP = wrap
        try:
            yield
        finally:
            mod.DDP = stock

    def ddp_rank_info(self) -> dict[str, Any]:
        """This rank's record (`flare_ddp_rank<r>.json` in the fold folder); subclasses add to it."""
        return {"rank": int(self.local_rank), "world_size": self.world_size,
                "backend": dist.get_backend() if self.is_ddp else None, "device": str(self.device),
                "batch_size": int(self.batch_size), "global_batch_size": int(self.global_batch_size),
                "oversample_foreground_percent": float(self.oversample_foreground_percent),
                "data_seed": self.rank_seed(1), "num_epochs": int(self.num_epochs),
                "num_iterations_per_epoch": int(self.num_iterations_per_epoch),
                "current_epoch": int(self.current_epoch), "train_steps": int(self._train_steps),
                "frozen_parameters": len(self.frozen_parameters),
                "config_file": os.environ.get("FLARE_TRAINING_CONFIG")}

    def _write_ddp_rank_info(self) -> None:
        if self.is_ddp:
            from flare_utils.data.io import atomic_write_text
            from flare_utils.training.ddp import RANK_INFO_NAME
            atomic_write_text(Path(self.output_folder) / RANK_INFO_NAME.format(rank=self.local_rank),
                              json.dumps(self.ddp_rank_info(), indent=2))

    @property
    def global_batch_size(self) -> int:
        """The batch size over all ranks (without DDP: `batch_size`)."""
        return int(self.configuration_manager.batch_size) if self.is_ddp else int(self.batch_size)

    def on_train_epoch_end(self, train_outputs):
        self._train_steps += len(train_outputs)
        super().on_train_epoch_end(train_outputs)

    def do_split(self):
        # DDP: nnU-Net lets every rank write a missing splits_final.json; rank 0 alone writes it first
        with self.rank0_first():
            return super().do_split()

    # ------------------------------------------------------------------ network / optimizer
    def initialize(self):
        seed_everything(self.flare_config.seed)
        self._network_hooks_done = False
        with self._ddp_wrapper():
            super().initialize()
        if not self._network_hooks_done:
            self.after_network_built()

    def after_network_built(self) -> None:
        """Transfer init and freezing, once nnU-Net has built the network and optimizer."""
        c = self.flare_config
        if c.init_checkpoint:
            self.transfer_report = load_transfer_weights(self.network, c.init_checkpoint, c.init_exclude)
            self.transfer_report.save(Path(self.output_folder) / TRANSFER_REPORT_NAME)
            self.print_to_log_file(self.transfer_report.summary())
        if c.freeze_encoder_stages:
            self.frozen_parameters = freeze_encoder_stages(self.network, c.freeze_encoder_stages)
            n = sum(p.numel() for p in unwrap(self.network).parameters() if not p.requires_grad)
            self.print_to_log_file(f"froze the first {c.freeze_encoder_stages} encoder stages "
                                   f"({len(self.frozen_parameters)} tensors, {n} parameters)")
            # rebuild the optimizer without the frozen parameters
            self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        return make_optimizer(params, self.flare_config.optimizer, self.initial_lr, self.weight_decay, self.num_epochs)

    # ------------------------------------------------------------------ loss
    def build_loss_module(self) -> torch.nn.Module:
        w_ce, w_dice = LOSS_WEIGHTS[self.flare_config.loss]
        return DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5,
                               "do_bg": False, "ddp": self.is_ddp}, {}, weight_ce=w_ce, weight_dice=w_dice,
                              ignore_label=self.label_manager.ignore_label,
                              dice_class=MemoryEfficientSoftDiceLoss)

    def _build_loss(self):
        if self.label_manager.has_regions:
            if self.flare_config.loss != "dice_ce":
                raise FlareInputError(None, "region-based training supports only loss 'dice_ce'")
            return super()._build_loss()
        loss = self.build_loss_module()
        if self._do_i_compile() and hasattr(loss, "dc"):
            loss.dc = torch.compile(loss.dc)
        if self.enable_deep_supervision:
            scales = self._get_deep_supervision_scales()
            weights = np.array([1 / (2 ** i) for i in range(len(scales))])
            weights[-1] = 1e-6 if (self.is_ddp and not self._do_i_compile()) else 0
            loss = DeepSupervisionWrapper(loss, weights / weights.sum())
        return loss

    # ------------------------------------------------------------------ augmentation / data
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rot, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.mirroring_enabled:
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        return rot, dummy_2d, initial_patch_size, mirror_axes

    def make_dataloader(self, dataset, patch_size, final_patch_size, transforms, train: bool):
        """nnU-Net's data loader for one split (override for custom sampling)."""
        return nnUNetDataLoader(dataset, self.batch_size, patch_size, final_patch_size, self.label_manager,
                                oversample_foreground_percent=self.oversample_foreground_percent,
                                sampling_probabilities=None, pad_sides=None, transforms=transforms,
                                probabilistic_oversampling=self.probabilistic_oversampling)

    def get_dataloaders(self):
        cm, lm = self.configuration_manager, self.label_manager
        ds_scales = self._get_deep_supervision_scales()
        rot, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = lm.foreground_regions if lm.has_regions else None
        tr_transforms = self.get_training_transforms(
            cm.patch_size, rot, ds_scales, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
            is_cascaded=self.is_cascaded, foreground_labels=lm.foreground_labels, regions=regions,
            ignore_label=lm.ignore_label)
        val_transforms = self.get_validation_transforms(ds_scales, is_cascaded=self.is_cascaded,
                                                        foreground_labels=lm.foreground_labels,
                                                        regions=regions, ignore_label=lm.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        seed = self.rank_seed(0)      # the config's seed on rank 0 / without DDP, see rank_seed
        if seed is not None and disable_timed_choices(tr_transforms):
            self.print_to_log_file("seeded run: Gaussian blur augmentation convolves directly (no FFT-vs-direct "
                                   "timing benchmark)", also_print_to_console=False)
        seed_everything(None if seed is None else seed + 1)
        dl_tr = self.make_dataloader(dataset_tr, initial_patch_size, cm.patch_size, tr_transforms, train=True)
        dl_val = self.make_dataloader(dataset_val, cm.patch_size, cm.patch_size, val_transforms, train=False)

        n = self.n_proc_da
        self.print_to_log_file(f"data augmentation processes: {n}", also_print_to_console=False)
        if n == 0:
            mt_train, mt_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            n_val = max(1, n // 2)
            if seed is not None:   # order-preserving, seeded workers
                mt_train = MultiThreadedAugmenter(_WorkerSeeding(dl_tr, seed + 11), None, n, max(2, n // 2),
                                                  seeds=[(seed + 11) * 100 + i for i in range(n)],
                                                  pin_memory=pin, wait_time=0.002)
                mt_val = MultiThreadedAugmenter(_WorkerSeeding(dl_val, seed + 23), None, n_val, 2,
                                                seeds=[(seed + 23) * 100 + i for i in range(n_val)],
                                                pin_memory=pin, wait_time=0.002)
            else:
                mt_train = NonDetMultiThreadedAugmenter(dl_tr, None, n, max(6, n // 2), seeds=None,
                                                        pin_memory=pin, wait_time=0.002)
                mt_val = NonDetMultiThreadedAugmenter(dl_val, None, n_val, max(3, n // 4), seeds=None,
                                                      pin_memory=pin, wait_time=0.002)
        _ = next(mt_train)
        _ = next(mt_val)
        return mt_train, mt_val

    # ------------------------------------------------------------------ run hooks
    def on_train_start(self):
        # again: the stock `nnUNetv2_train` switches cuDNN benchmarking on after building the trainer
        configure_determinism(deterministic_requested(self.flare_config.deterministic), self.device)
        super().on_train_start()
        if self.local_rank == 0:
            self.flare_config.save(Path(self.output_folder) / CONFIG_FILE_NAME)
        self._write_ddp_rank_info()

    def on_epoch_end(self):
        super().on_epoch_end()          # nnU-Net increments current_epoch here
        log = getattr(getattr(self.logger, "local_logger", self.logger), "my_fantastic_logging", {})
        dice = log["mean_fg_dice"][-1] if log.get("mean_fg_dice") else float("nan")
        loss = log["train_losses"][-1] if log.get("train_losses") else float("nan")
        report_progress(f"{type(self).__name__} fold {self.fold}: epochs", self.current_epoch, self.num_epochs,
                        train_loss=float(loss), pseudo_dice=float(dice))

    def on_train_end(self):
        super().on_train_end()
        self._write_ddp_rank_info()
        # nnU-Net shuts only multi-process augmenters down; drop references either way
        self.dataloader_train = self.dataloader_val = None

    @contextlib.contextmanager
    def _export_processes(self):
        """nnU-Net's final validation sizes its spawn pools by the module global
        `default_num_processes` (8 unless nnUNet_def_n_proc was set before import)."""
        mod = _stock_trainer_module
        old = mod.default_num_processes
        mod.default_num_processes = self.export_processes
        try:
            yield
        finally:
            mod.default_num_processes = old

    def perform_actual_validation(self, save_probabilities: bool = False):
        vm = self.flare_config.validation_mirroring
        saved_axes = self.inference_allowed_mirroring_axes
        if vm is False:
            self.inference_allowed_mirroring_axes = None
        try:
            with self._export_processes():
                super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = saved_axes

    # ------------------------------------------------------------------ helpers
    def flare_info(self) -> dict[str, Any]:
        """What this trainer is running with (for reports)."""
        return {"trainer": type(self).__name__, "device": str(self.device),
                "mirroring": self.mirroring_enabled, "n_proc_da": self.n_proc_da,
                "torch_threads": torch.get_num_threads(), "deterministic": getattr(self, "determinism", "off"),
                "frozen_parameters": len(self.frozen_parameters), "config": self.flare_config.to_dict()}
