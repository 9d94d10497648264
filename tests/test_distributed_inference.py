"""Inference and evaluation on a Dask LocalCluster (2 worker processes, 1 thread each): a folder
predicted on the cluster gives the serial run's files, resumes sending only the missing cases, loses
nothing when a worker dies, never predicts a case twice; evaluation on the cluster equals local; the
stages and `flare-study predict` / `evaluate` open the cluster of their `cluster` parameter / options.
CPU only; one cluster for the file (tests/test_distributed.py's fixture)."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("distributed")

from flare_utils.data.io import save_nifti_like  # noqa: E402
from flare_utils.distributed.cluster import ClusterParams  # noqa: E402
from flare_utils.errors import FlareInputError  # noqa: E402
from flare_utils.inference import cluster_folder  # noqa: E402
from flare_utils.inference.case_report import EFFICIENCY_DIR, RUN_JSON, SUMMARY_CSV, CaseReport, file_stat  # noqa: E402
from flare_utils.inference.folder import predict_folder  # noqa: E402
from test_distributed import (_hashes, a_busy_worker_killed, _writes, client, cluster,  # noqa: E402,F401
                              tiny_model_and_images)
from test_pseudo import _images, teacher  # noqa: E402,F401

# The report fields that depend on when and where a case ran (times, memory, the worker).
_VOLATILE = {"time_read_s", "time_preprocess_s", "time_network_s", "network_forward_s", "time_resample_s",
             "time_write_s", "total_s", "peak_rss_mib", "maxrss_mib", "efficiency", "windows", "input_stat",
             "device"}


# ---------------------------------------------------------------------------------- a picklable predictor
# What `folder.predict_folder` and `cluster_folder.predict_one` call of an EfficientPredictor, on a cheap
# deterministic "network"; every label written is logged ("<case> <pid>") to <model's parent>/writes.log.

class CheapFolderPredictor:
    mode, tta, monitor = "efficient", False, False

    def __init__(self, model_dir, folds, options):
        self.folds, self.device, self.side = tuple(folds), "cpu", Path(model_dir).parent
        self.sleep = float(options.get("sleep", 0.0))

    def producer_key(self) -> str:
        return f"cheap-{'-'.join(map(str, self.folds))}"

    def preprocess(self, image, case_id=None):
        img = nib.load(str(image))
        return SimpleNamespace(data=np.asanyarray(img.dataobj), img=img, case_id=case_id, image=str(image))

    def run_network(self, pre):
        a = pre.data
        lab = ((a > 0).astype(np.uint8) + (a > 150).astype(np.uint8)).astype(np.uint8)
        if self.sleep:
            busy = self.side / f"{os.getpid()}.busy"
            busy.write_text(pre.case_id)
            time.sleep(self.sleep)
            busy.unlink(missing_ok=True)
        return lab, CaseReport(pre.case_id, pre.image, folds=list(self.folds), z_steps=1, windows_evaluated=1,
                               windows_grid=9, windows_nnunet_full=4, time_network_s=0.001)

    def write_labels(self, labels, pre, output, rep):
        save_nifti_like(labels, pre.img, output)
        with open(self.side / "writes.log", "a") as f:
            f.write(f"{pre.case_id} {os.getpid()}\n")
        rep.output, rep.producer = str(output), self.producer_key()
        rep.output_bytes, rep.input_stat = Path(output).stat().st_size, file_stat(pre.image)


def cheap_folder_factory(model_dir, folds, options):
    return CheapFolderPredictor(model_dir, folds, options)


def _stable(report_file: Path) -> dict:
    return {k: v for k, v in json.loads(report_file.read_text()).items() if k not in _VOLATILE}


def _serial(images: Path, out: Path, teacher: Path) -> pd.DataFrame:
    df = predict_folder(CheapFolderPredictor(teacher, (0,), {}), images, out)
    (teacher.parent / "writes.log").unlink()
    return df


# ---------------------------------------------------------------------------------- inference of a folder

def test_cluster_folder_equals_serial_and_resumes_with_the_missing_cases(tmp_path, teacher, client):
    images = _images(tmp_path / "imagesTs", 8)
    ref = tmp_path / "serial"
    serial = _serial(images, ref, teacher)
    out = tmp_path / "dist"
    df = cluster_folder.predict_folder_on_cluster(client, teacher, images, out, folds=[0], factory=cheap_folder_factory)
    assert _hashes(out) == _hashes(ref) and len(_hashes(ref)) == 8                 # byte-identical labels
    assert sorted(_writes(teacher)) == [f"Case_{i:05d}" for i in range(8)]        # each case once
    for case in serial["case_id"]:                                                 # the same per-case reports
        assert _stable(out / EFFICIENCY_DIR / f"{case}.json") == {
            **_stable(ref / EFFICIENCY_DIR / f"{case}.json"), "output": str(out / f"{case}.nii.gz")}
    assert list(df["case_id"]) == list(serial["case_id"]) and list(df.columns) == list(serial.columns)
    assert list(pd.read_csv(out / EFFICIENCY_DIR / SUMMARY_CSV)["case_id"]) == list(serial["case_id"])
    run = json.loads((out / EFFICIENCY_DIR / RUN_JSON).read_text())
    assert run["predicted"] == 8 and run["skipped_existing"] == 0 and run["folds"] == [0]
    assert set(run["dask_workers"]) <= {str(w["name"]) for w in client.scheduler_info()["workers"].values()}
    assert not [p for p in out.rglob(".*")]                                        # no temporaries

    # resume: 3 labels lost and 1 report lost -> only those 4 cases are sent and predicted again
    lost = ["Case_00001", "Case_00004", "Case_00006"]
    for c in lost:
        (out / f"{c}.nii.gz").unlink()
    (out / EFFICIENCY_DIR / "Case_00007.json").unlink()
    before = len(_writes(teacher))
    df2 = cluster_folder.predict_folder_on_cluster(client, teacher, images, out, folds=[0],
                                                   factory=cheap_folder_factory)
    assert sorted(_writes(teacher)[before:]) == sorted([*lost, "Case_00007"])
    assert int(df2["skipped_existing"].sum()) == 4 and _hashes(out) == _hashes(ref)
    # a finished folder: nothing is sent
    before = len(_writes(teacher))
    df3 = cluster_folder.predict_folder_on_cluster(client, teacher, images, out, folds=[0],
                                                   factory=cheap_folder_factory)
    assert len(_writes(teacher)) == before and bool(df3["skipped_existing"].all())
    # a serial run resumes the cluster's folder (the same producer key): nothing to do either
    again = predict_folder(CheapFolderPredictor(teacher, (0,), {}), images, out)
    assert bool(again["skipped_existing"].all()) and len(_writes(teacher)) == before


def test_a_task_run_twice_does_not_predict_again(tmp_path, teacher, client):
    """A task whose worker died after writing runs again elsewhere: it finds the case complete
    (label and report, same producer) and only returns the report."""
    images = _images(tmp_path / "imagesTs", 1)
    out = tmp_path / "out"
    (out / EFFICIENCY_DIR).mkdir(parents=True)
    job = {"model_dir": str(teacher), "folds": [0], "options": {}, "factory": cheap_folder_factory,
           "factory_token": "t", "image": str(images / "Case_00000_0000.nii.gz"), "case_id": "Case_00000",
           "output": str(out / "Case_00000.nii.gz"), "producer": "cheap-0"}
    first = client.submit(cluster_folder._case_task, job, pure=False).result()
    second = client.submit(cluster_folder._case_task, job, pure=False).result()
    assert not first["recovered"] and second["recovered"] and first["report"]["error"] is None
    assert _writes(teacher) == ["Case_00000"]
    assert second["report"]["output_bytes"] == (out / "Case_00000.nii.gz").stat().st_size


def test_worker_killed_mid_case_loses_nothing(tmp_path, teacher, client):
    images = _images(tmp_path / "imagesTs", 8)
    ref = tmp_path / "serial"
    _serial(images, ref, teacher)
    pids = set(client.run(os.getpid).values())
    with a_busy_worker_killed(teacher.parent) as killed:
        out = tmp_path / "dist"
        df = cluster_folder.predict_folder_on_cluster(client, teacher, images, out, folds=[0],
                                                      options={"sleep": 0.3}, factory=cheap_folder_factory)
    assert killed and killed[0] in pids                                   # a worker died with a case in flight
    writes = _writes(teacher)
    assert sorted(writes) == [f"Case_{i:05d}" for i in range(8)]           # every case written exactly once
    assert _hashes(out) == _hashes(ref) and len(df) == 8 and df["error"].isna().all()
    assert not [p for p in out.rglob(".*")]


def test_a_failing_case_stops_the_folder_or_is_skipped(tmp_path, teacher, client):
    images = _images(tmp_path / "imagesTs", 4)
    (images / "Case_00002_0000.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(RuntimeError, match="case Case_00002: "):
        cluster_folder.predict_folder_on_cluster(client, teacher, images, tmp_path / "a", folds=[0],
                                                 factory=cheap_folder_factory)
    df = cluster_folder.predict_folder_on_cluster(client, teacher, images, tmp_path / "b", folds=[0],
                                                  factory=cheap_folder_factory, on_error="skip")
    assert list(df["error"].notna()) == [False, False, True, False]
    assert json.loads((tmp_path / "b" / EFFICIENCY_DIR / RUN_JSON).read_text())["errors"].keys() == {"Case_00002"}
    lock = threading.Lock()
    with pytest.raises(FlareInputError, match="cannot be sent to Dask workers"):      # a closure over a lock
        cluster_folder.predict_folder_on_cluster(client, teacher, images, tmp_path / "c", factory=lambda *a: lock)


# ---------------------------------------------------------------------------------- evaluation

def _label_folders(root: Path, n: int = 3) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    gt, pred = root / "gt", root / "pred"
    gt.mkdir(parents=True)
    pred.mkdir()
    aff = np.diag([1.5, 1.5, 2.5, 1.0])
    for i in range(n):
        g = np.zeros((24, 22, 16), np.uint8)
        for organ in (1, 2, 6):
            c = rng.integers(5, 15, 3)
            g[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 4, c[2] - 2:c[2] + 2] = organ
        p = np.roll(g, int(rng.integers(0, 2)), axis=0)
        nib.save(nib.Nifti1Image(g, aff), str(gt / f"Case_{i:05d}.nii.gz"))
        nib.save(nib.Nifti1Image(p, aff), str(pred / f"Case_{i:05d}.nii.gz"))
    return gt, pred


def test_evaluation_on_the_cluster_equals_local(tmp_path, client):
    from flare_utils.evaluation.evaluate import evaluate_folders
    gt, pred = _label_folders(tmp_path)
    local = evaluate_folders(pred, gt, tmp_path / "local", processes=1, hd95=True)
    dist = evaluate_folders(pred, gt, tmp_path / "dist", hd95=True, client=client)
    pd.testing.assert_frame_equal(local.per_case, dist.per_case)
    assert json.dumps(local.summary, default=str) == json.dumps(dist.summary, default=str)
    assert (tmp_path / "local" / "metrics_per_case.csv").read_bytes() == \
        (tmp_path / "dist" / "metrics_per_case.csv").read_bytes()


# ---------------------------------------------------------------------------------- stages, runner, CLI

def test_the_stages_open_the_cluster_of_their_params(tmp_path, client, monkeypatch):
    from flare_utils.evaluation.stage import evaluate_stage
    from flare_utils.inference import runs
    from flare_utils.inference.stage import run_inference_stage
    address = client.scheduler.address
    gt, pred = _label_folders(tmp_path)
    lines: list[str] = []
    res = evaluate_stage(tmp_path / "run", gt, prediction_sets={"a": pred}, processes=1,
                         cluster={"type": "address", "address": address}, log=lines.append)
    assert f"Dask scheduler {address} (2 worker(s) now)" in lines[0]
    from flare_utils.evaluation.evaluate import evaluate_folders
    pd.testing.assert_frame_equal(res.per_case["a"], evaluate_folders(pred, gt, processes=1).per_case)
    seen = []

    class Stop(Exception):
        pass

    def predict_models(*args, client=None, **kw):
        seen.append(client.scheduler.address)
        raise Stop("stop here")

    monkeypatch.setattr(runs, "predict_models", predict_models)
    with pytest.raises(Stop, match="stop here"):
        run_inference_stage(tmp_path / "run", models={"m": {"path": str(tmp_path), "folds": [0]}},
                            input_dir=str(tmp_path), device="cpu", cluster={"type": "address", "address": address},
                            log=lines.append)
    assert seen == [address]
    with pytest.raises(FlareInputError, match="cluster.workers: must be >= 1"):       # checked before anything runs
        run_inference_stage(tmp_path / "run3", models={"m": {"path": "x", "folds": [0]}}, input_dir="x",
                            cluster={"type": "local_cluster", "workers": 0})


def test_runner_passes_the_cluster_to_infer_and_evaluate_only_when_set(tmp_path, monkeypatch):
    import dataclasses

    from flare_utils.layout import RunLayout
    from flare_utils.study import models as study_models
    from flare_utils.study.params import load_params
    from flare_utils.study.runner import _evaluate_parameters, _infer_parameters
    monkeypatch.setattr(study_models, "select_models", lambda root, names: {"m": {"path": "p", "folds": [0]}})
    run = RunLayout(tmp_path / "r")
    local = load_params({"run_dir": str(run.root)})
    dist = load_params({"run_dir": str(run.root), "cluster": {"type": "local_cluster", "workers": 2}})
    for parameters in (_infer_parameters, _evaluate_parameters):
        assert "cluster" not in parameters(local, run)
        assert parameters(dist, run)["cluster"] == dataclasses.asdict(dist.cluster)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_cluster_options(tmp_path, client, capsys):
    from flare_utils.study.cli import build_parser, cluster_params_from_args, main

    def params(*argv) -> ClusterParams:
        return cluster_params_from_args(build_parser().parse_args(["evaluate", "p", "g", *argv]))

    assert params() == ClusterParams()
    assert params("--workers", "3") == ClusterParams(type="local_cluster", workers=3)
    assert params("--address", "tcp://h:8786").type == "address"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster:\n  type: local_cluster\n  workers: 2\n  memory_limit: 2GiB\n")
    assert params("--cluster-config", str(cfg), "--workers", "4") == ClusterParams(
        type="local_cluster", workers=4, memory_limit="2GiB")
    cfg.write_text("type: slurm\ncores: 8\nmemory: 32GB\njobs: 2\n")                  # the block itself
    assert params("--cluster-config", str(cfg)).cores == 8
    with pytest.raises(FlareInputError, match="cluster.workers: not used by type address"):
        params("--cluster", "address", "--address", "tcp://h:1", "--workers", "2")
    with pytest.raises(FlareInputError, match="cluster.type: must be one of"):
        cfg.write_text("cluster: {type: k8s}\n")
        params("--cluster-config", str(cfg))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "m", "i", "o", "--cluster", "k8s"])
    assert "invalid choice: 'k8s'" in capsys.readouterr().err

    gt, pred = _label_folders(tmp_path / "labels")
    # an unreachable scheduler: a one-line error within its connect_timeout, not a hang
    cfg.write_text("cluster:\n  type: address\n  address: tcp://127.0.0.1:1\n  connect_timeout: 2\n")
    port = _free_port()
    t0 = time.perf_counter()
    assert main(["evaluate", str(pred), str(gt), "--cluster-config", str(cfg),
                 "--address", f"tcp://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - t0 < 10 and len(err.splitlines()) == 1
    assert f"no Dask scheduler answered at tcp://127.0.0.1:{port} within 2 s" in err
    # the file's cluster, by address: the same scores as in-process
    assert main(["evaluate", str(pred), str(gt), "--out", str(tmp_path / "d"), "--address",
                 client.scheduler.address]) == 0
    assert main(["evaluate", str(pred), str(gt), "--out", str(tmp_path / "l"), "--processes", "1"]) == 0
    csv = "metrics_per_case.csv"
    assert (tmp_path / "d" / csv).read_bytes() == (tmp_path / "l" / csv).read_bytes()


# ---------------------------------------------------------------------------------- the real predictor

@pytest.mark.slow          # beyond CI's budget; the cheap predictor's tests above run the same cluster path in CI
@pytest.mark.e2e
def test_real_model_inference_on_the_cluster_equals_serial(tmp_path_factory, tmp_path, client, capsys):
    """The project's EfficientPredictor (a tiny trained nnU-Net, 2-fold ensemble): `predict_models`
    and `flare-study predict --address` on the cluster write the serial run's label files and reports."""
    from flare_utils.inference.runs import SUMMARY_JSON, predict_models
    from flare_utils.study.cli import main
    model, images = tiny_model_and_images(tmp_path_factory, tmp_path, first_seed=300)
    models = {"m": {"path": str(model), "folds": [0, 1]}}
    kw = dict(mode="efficient", device="cpu", log=lambda s: None)
    serial, _ = predict_models(models, images, {"m": tmp_path / "serial" / "m"}, summary_dir=tmp_path / "serial", **kw)
    dist, tables = predict_models(models, images, {"m": tmp_path / "dist" / "m"}, summary_dir=tmp_path / "dist",
                                  client=client, **kw)
    ref, got = tmp_path / "serial" / "m", tmp_path / "dist" / "m"
    assert _hashes(got) == _hashes(ref) and len(_hashes(ref)) == 3
    for c in tables["m"]["case_id"]:
        assert _stable(got / EFFICIENCY_DIR / f"{c}.json") == {**_stable(ref / EFFICIENCY_DIR / f"{c}.json"),
                                                               "output": str(got / f"{c}.nii.gz")}
    assert serial["windows_evaluated"].equals(dist["windows_evaluated"]) and int(dist["predicted now"].iloc[0]) == 3
    summary = json.loads((tmp_path / "dist" / SUMMARY_JSON).read_text())["models"]["m"]
    assert summary == json.loads((tmp_path / "serial" / SUMMARY_JSON).read_text())["models"]["m"]  # incl. timing file
    assert json.loads((got / EFFICIENCY_DIR / RUN_JSON).read_text())["folds"] == [0, 1]
    # the command line on the cluster: the same files; run again, everything is skipped
    cli = tmp_path / "cli"
    argv = ["predict", str(model), str(images), str(cli), "--folds", "0", "1", "--device", "cpu",
            "--address", client.scheduler.address]
    assert main(argv) == 0 and _hashes(cli) == _hashes(ref)
    assert main(argv) == 0 and "0 case(s) predicted, 3 already done" in capsys.readouterr().out
