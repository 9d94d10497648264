"""3D cross-pseudo supervision (CPS): two networks of one plan teach each other on unlabelled data.

`FlareCPSTrainer` (an nnU-Net v2 trainer class; student defaults: mirroring off) trains network A
(nnU-Net's own) and network B (same plan, another seed) on minibatches of labelled plus unlabelled
patches: each is supervised on the labelled patches and, with a weight ramped up over the first
epochs, on the other's argmax prediction of all patches. The checkpoints nnU-Net writes hold A, so
`nnUNetv2_predict` and the final validation use A; B is saved beside them as
`checkpoint_*_netB.pth`. Not supported: DDP (multi-GPU) training.

Details: docs/reference/cps.md
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from flare_utils.errors import FlareInputError
from flare_utils.layout import nnunet_folders
from flare_utils.semisup.selection_file import PseudoSelection, read_selection_file, unlabelled_selection
from flare_utils.training.base import FlareTrainer
from flare_utils.training.config import TrainingConfig
from flare_utils.training.with_pseudo_labels import (
    CombinedDataset,
    MixedBatchDataLoader,
    _BatchSizeMixin,
    preprocess_selection,
)
from flare_utils.training.transfer import freeze_encoder_stages, load_transfer_weights, unwrap

__all__ = ["CPSConfig", "FlareCPSTrainer", "cps_lambda", "netb_checkpoint_path"]

CPS_INFO_NAME = "flare_cps_data.json"


def cps_lambda(epoch: float, rampup_epochs: float, lambda_max: float = 0.5) -> float:
    """Weight of the CPS term: linear from 0 (epoch 0) to `lambda_max` (epoch >= rampup_epochs);
    `rampup_epochs` <= 0 means `lambda_max` from the start."""
    if rampup_epochs <= 0:
        return float(lambda_max)
    return float(lambda_max) * float(min(1.0, max(0.0, float(epoch) / float(rampup_epochs))))


def netb_checkpoint_path(checkpoint: str | Path) -> Path:
    """`.../checkpoint_final.pth` -> `.../checkpoint_final_netB.pth`."""
    p = Path(checkpoint)
    return p.with_name(f"{p.stem}_netB{p.suffix}")


@dataclass
class CPSConfig(TrainingConfig):
    """TrainingConfig + cross-pseudo-supervision options (see module docstring)."""
    cps_lambda_max: float = 0.5
    cps_rampup_epochs: int = 100
    unlabelled_folder: str | None = None
    unlabelled_cases: list[str] | None = None
    max_unlabelled_cases: int | None = None
    selection_file: str | None = None
    batch_size: int | None = None
    unlabelled_batch_size: int | None = None
    seed_b: int | None = None
    preprocess_processes: int = 1

    def validate(self, where=None):
        super().validate(where)

        def bad(msg):
            raise FlareInputError(where, msg)
        if self.cps_lambda_max < 0:
            bad(f"cps_lambda_max must be >= 0, got {self.cps_lambda_max}")
        if self.cps_rampup_epochs < 0:
            bad(f"cps_rampup_epochs must be >= 0, got {self.cps_rampup_epochs}")
        for k in ("batch_size", "unlabelled_batch_size", "max_unlabelled_cases"):
            v = getattr(self, k)
            if v is not None and v < 1:
                bad(f"{k} must be >= 1 or null, got {v}")
        if self.preprocess_processes < 1:
            bad("preprocess_processes must be >= 1")
        if self.selection_file is not None and not Path(self.selection_file).is_file():
            raise FlareInputError(self.selection_file, "selection_file not found")
        if self.unlabelled_folder is not None and not Path(self.unlabelled_folder).is_dir():
            raise FlareInputError(self.unlabelled_folder, "unlabelled_folder not found")
        return self


def _select(x, idx):
    return [t[idx] for t in x] if isinstance(x, (list, tuple)) else x[idx]


def _full_res(x):
    return x[0] if isinstance(x, (list, tuple)) else x


class FlareCPSTrainer(_BatchSizeMixin, FlareTrainer):
    """3D cross-pseudo supervision with two networks (see module docstring)."""
    config_class = CPSConfig
    supports_ddp = False          # two networks, one optimiser each: not under nnU-Net's DDP wrapping
    default_mirroring = False

    network_b = None
    optimizer_b = None
    lr_scheduler_b = None
    cps_loss_fn = None
    current_cps_lambda: float = 0.0
    unlabelled_folder: Path | None = None

    # ------------------------------------------------------------------ networks
    @property
    def seed_b(self) -> int | None:
        c = self.flare_config
        if c.seed_b is not None:
            return int(c.seed_b)
        return None if c.seed is None else int(c.seed) + 1

    def after_network_built(self) -> None:
        if self.is_ddp:
            raise FlareInputError(None, f"{type(self).__name__} does not support DDP training")
        super().after_network_built()
        c = self.flare_config
        with torch.random.fork_rng(devices=[]):
            if self.seed_b is not None:
                torch.manual_seed(self.seed_b)
            net = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                  self.num_input_channels, self.label_manager.num_segmentation_heads,
                                                  self.enable_deep_supervision).to(self.device)
        if c.init_checkpoint:
            load_transfer_weights(net, c.init_checkpoint, c.init_exclude)
        if c.freeze_encoder_stages:
            freeze_encoder_stages(net, c.freeze_encoder_stages)
        if self._do_i_compile():
            net = torch.compile(net)
        self.network_b = net
        net_a, self.network = self.network, net   # the trainer's own optimiser recipe, for network B
        try:
            self.optimizer_b, self.lr_scheduler_b = self.configure_optimizers()
        finally:
            self.network = net_a
        self.cps_loss_fn = self.build_loss_module()
        n = sum(p.numel() for p in unwrap(self.network_b).parameters())
        self.print_to_log_file(f"CPS: network B built with seed {self.seed_b} ({n} parameters)")

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(enabled)
        if self.network_b is not None:
            unwrap(self.network_b).decoder.deep_supervision = enabled

    # ------------------------------------------------------------------ data
    @property
    def unlabelled_batch_size(self) -> int:
        n = self.flare_config.unlabelled_batch_size
        return int(n) if n is not None else self.flare_batch_size

    def unlabelled_selection(self):
        c = self.flare_config
        labelled = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
        if c.selection_file:
            sel = read_selection_file(c.selection_file, require_labels=False, labelled_cases=labelled).without_labels()
            cases = list(sel.cases)
            if c.unlabelled_cases is not None:
                unknown = [x for x in c.unlabelled_cases if x not in set(cases)]
                if unknown:
                    raise FlareInputError(c.selection_file, f"unlabelled_cases {unknown[:10]} are not in the selection")
                cases = list(c.unlabelled_cases)
            if c.max_unlabelled_cases is not None:
                cases = cases[:int(c.max_unlabelled_cases)]
            return PseudoSelection(tuple(cases), sel.images_folder, None, sel.file_ending, sel.num_channels,
                                   dict(sel.meta), sel.path)
        if c.unlabelled_folder is None:
            raw = nnunet_folders().raw / self.plans_manager.dataset_name
        else:                                  # the folder's raw dataset, for its dataset.json
            raw = Path(c.unlabelled_folder).parent
        sel = unlabelled_selection(raw, c.unlabelled_cases, c.max_unlabelled_cases, c.unlabelled_folder,
                                   self.dataset_json)
        clash = sorted(set(sel.cases) & set(labelled))
        if clash:
            raise FlareInputError(sel.images_folder, f"unlabelled case id(s) {clash[:10]} are also labelled cases")
        return sel

    def get_tr_and_val_datasets(self):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        sel = self.unlabelled_selection()
        folder = preprocess_selection(sel, self.plans_manager.plans, self.configuration_name, self.dataset_json,
                                      self.preprocessed_dataset_folder_base, False,
                                      self.flare_config.preprocess_processes)
        ds_cls = infer_dataset_class(str(folder))
        ds_cls.unpack_dataset(str(folder), overwrite_existing=False, num_processes=1, verify=True)
        unl = ds_cls(str(folder), list(sel.cases))
        self.unlabelled_folder = folder
        self.print_to_log_file(f"CPS: {len(dataset_tr.identifiers)} labelled + {len(unl.identifiers)} unlabelled "
                               f"training cases ({folder}); per step {self.flare_batch_size} labelled + "
                               f"{self.unlabelled_batch_size} unlabelled patches")
        info = {"preprocessed_folder": str(folder), "unlabelled_cases": list(unl.identifiers),
                "labelled_training_cases": list(dataset_tr.identifiers),
                "validation_cases": list(dataset_val.identifiers), "batch_size": self.flare_batch_size,
                "unlabelled_batch_size": self.unlabelled_batch_size, "seed_b": self.seed_b}
        Path(self.output_folder).mkdir(parents=True, exist_ok=True)
        (Path(self.output_folder) / CPS_INFO_NAME).write_text(json.dumps(info, indent=2))
        return CombinedDataset({"labelled": dataset_tr, "unlabelled": unl}), dataset_val

    def make_dataloader(self, dataset, patch_size, final_patch_size, transforms, train: bool):
        if train and isinstance(dataset, CombinedDataset):
            n_u = self.unlabelled_batch_size
            return MixedBatchDataLoader(dataset.parts["labelled"], dataset.parts["unlabelled"],
                                        self.flare_batch_size + n_u,
                                        n_u, patch_size, final_patch_size, self.label_manager,
                                        self.oversample_foreground_percent, transforms,
                                        self.probabilistic_oversampling, layout="secondary_first")
        return super().make_dataloader(dataset, patch_size, final_patch_size, transforms, train)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.network_b.train()
        self.lr_scheduler_b.step(self.current_epoch)
        c = self.flare_config
        self.current_cps_lambda = cps_lambda(self.current_epoch, c.cps_rampup_epochs, c.cps_lambda_max)
        self.print_to_log_file(f"CPS lambda: {self.current_cps_lambda:.4f}; network B lr: "
                               f"{np.round(self.optimizer_b.param_groups[0]['lr'], decimals=5)}")

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        secondary = torch.as_tensor(np.asarray(batch.get("secondary", np.zeros(len(data), bool)), dtype=bool))
        lab_idx = torch.nonzero(~secondary).flatten().to(self.device)
        lam = float(self.current_cps_lambda)

        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_b.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out_a = self.network(data)
            out_b = self.network_b(data)
            sup = self.loss(_select(out_a, lab_idx), _select(target, lab_idx)) + \
                self.loss(_select(out_b, lab_idx), _select(target, lab_idx))
            if lam > 0:
                fa, fb = _full_res(out_a), _full_res(out_b)
                with torch.no_grad():
                    ya = fa.argmax(1, keepdim=True)
                    yb = fb.argmax(1, keepdim=True)
                cps = self.cps_loss_fn(fa, yb) + self.cps_loss_fn(fb, ya)
                total = sup + lam * cps
            else:
                cps = None
                total = sup

        params_a = [p for p in self.network.parameters() if p.requires_grad]
        params_b = [p for p in self.network_b.parameters() if p.requires_grad]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            self.grad_scaler.unscale_(self.optimizer_b)
            torch.nn.utils.clip_grad_norm_(params_a, 12)
            torch.nn.utils.clip_grad_norm_(params_b, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.step(self.optimizer_b)
            self.grad_scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(params_a, 12)
            torch.nn.utils.clip_grad_norm_(params_b, 12)
            self.optimizer.step()
            self.optimizer_b.step()
        return {"loss": total.detach().cpu().numpy(), "supervised_loss": sup.detach().cpu().numpy(),
                "cps_loss": np.array(np.nan) if cps is None else cps.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        sup = float(np.mean([o["supervised_loss"] for o in train_outputs]))
        cps = [float(o["cps_loss"]) for o in train_outputs if np.isfinite(o["cps_loss"])]
        self.print_to_log_file(f"CPS: supervised loss (A+B) {sup:.4f}, cross-pseudo loss "
                               f"{np.mean(cps) if cps else float('nan'):.4f}, lambda {self.current_cps_lambda:.4f}")

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        if self.network_b is not None:
            self.network_b.eval()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank != 0 or self.disable_checkpointing or self.network_b is None:
            return
        checkpoint = {
            "network_weights": unwrap(self.network_b).state_dict(),
            "optimizer_state": self.optimizer_b.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "cps_network": "B",
            "cps_seed_b": self.seed_b,
        }
        torch.save(checkpoint, netb_checkpoint_path(filename))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if not isinstance(filename_or_checkpoint, (str, Path)):
            return
        fb = netb_checkpoint_path(filename_or_checkpoint)
        if not fb.is_file():
            self.print_to_log_file(f"CPS: {fb.name} not found; network B keeps its initial weights")
            return
        ck = torch.load(fb, map_location=self.device, weights_only=False)
        unwrap(self.network_b).load_state_dict(ck["network_weights"])
        self.optimizer_b.load_state_dict(ck["optimizer_state"])

    def on_train_end(self):
        super().on_train_end()
        latest = netb_checkpoint_path(Path(self.output_folder) / "checkpoint_latest.pth")
        if self.local_rank == 0 and latest.is_file():
            latest.unlink()
