"""Pseudo-label rounds on a Dask LocalCluster (2 worker processes, 1 thread each): the same files as
the serial round, a worker killed mid-round (before and after writing a case) loses nothing and
writes nothing twice, an interrupted round resumes; the `cluster:` params, an unreachable scheduler,
the SLURM job script dask-jobqueue makes, the GPU pinning rules. CPU only, a few seconds each
(one cluster for the whole file)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("distributed")

from flare_utils.data.io import save_nifti_like  # noqa: E402
from flare_utils.distributed.cluster import (ClusterParams, as_cluster_params, cluster_problems,  # noqa: E402
                                             open_cluster, slurm_job_script, slurm_options)
from flare_utils.errors import FlareInputError  # noqa: E402
from flare_utils.semisup import rounds as pseudo  # noqa: E402
from test_pseudo import _images, teacher, unlabelled  # noqa: E402,F401  (the rounds tests' tiny inputs and fixtures)

# Same request as tests/test_pseudo.py (one training per pytest session serves both files).
DEMO_MODEL = dict(dataset_id=957, name="PseudoSmoke", n_cases=5, fov="abdomen", patch_zyx=(16, 16, 16),
                  spacing_zyx=(24.0, 24.0, 24.0), epochs=1, iterations=4, extra_folds=(1,))


# ---------------------------------------------------------------------------------- picklable predictors
# Module-level, so that the workers import them by reference. Each one logs every label it writes
# (one line "<case> <pid>") to <model folder's parent>/writes.log: how often a case was written.

class CheapPredictor:
    """Deterministic, like tests/test_pseudo.py's FakePredictor; `sleep` s per case; `busy`: a file
    <pid>.busy exists while it sleeps (a case in flight, nothing written yet); `kill_after_write`:
    the worker SIGKILLs itself once, right after writing that case (before its task returns)."""

    def __init__(self, model_dir, folds, tta, device, sleep=0.0, busy=False, kill_after_write=None):
        self.model_dir, self.device = Path(model_dir), "cpu"
        self.sleep, self.busy, self.kill_after_write = sleep, busy, kill_after_write
        self.side = self.model_dir.parent

    def predict_case(self, image, output=None, case_id=None):
        img = nib.load(str(image))
        a = np.asanyarray(img.dataobj)
        lab = ((a > 0).astype(np.uint8) + (a > 150).astype(np.uint8)).astype(np.uint8)
        if self.sleep:
            busy = self.side / f"{os.getpid()}.busy"
            if self.busy:
                busy.write_text(case_id)
            time.sleep(self.sleep)
            busy.unlink(missing_ok=True)
        save_nifti_like(lab, img, output)
        with open(self.side / "writes.log", "a") as f:
            f.write(f"{case_id} {os.getpid()}\n")
        marker = self.side / "killed_once"
        if case_id == self.kill_after_write and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return lab, None


def cheap_factory(model_dir, folds, tta, device):
    return CheapPredictor(model_dir, folds, tta, device)


def slow_factory(model_dir, folds, tta, device):
    return CheapPredictor(model_dir, folds, tta, device, sleep=0.4, busy=True)


def suicidal_factory(model_dir, folds, tta, device):
    return CheapPredictor(model_dir, folds, tta, device, kill_after_write="Case_00002")


class Failing(CheapPredictor):
    def predict_case(self, image, output=None, case_id=None):
        if case_id == "Case_00005":
            raise RuntimeError("injected failure")
        return super().predict_case(image, output, case_id)


def failing_factory(model_dir, folds, tta, device):
    return Failing(model_dir, folds, tta, device)


# ---------------------------------------------------------------------------------- fixtures

def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("Case_*.nii.gz"))}


def _writes(teacher: Path) -> list[str]:
    log = teacher.parent / "writes.log"
    return [line.split()[0] for line in log.read_text().splitlines()] if log.is_file() else []




@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster for the file, opened as a study would (`open_cluster`): 2 processes x 1 thread."""
    lines: list[str] = []
    params = ClusterParams(type="local_cluster", workers=2, threads_per_worker=1, dashboard_address=":0")
    with open_cluster(params, device="cpu", say=lines.append) as client:
        client.wait_for_workers(2, timeout=60)
        yield client, lines


@pytest.fixture()
def client(cluster):
    c, _ = cluster
    c.wait_for_workers(2, timeout=60)          # a worker killed by the test before has been restarted
    yield c


def _serial_reference(tmp_path, teacher, images) -> dict[str, str]:
    ref = tmp_path / "ref"
    pseudo.predict_round(ref, 1, teacher, images, predictor_factory=cheap_factory)
    (teacher.parent / "writes.log").unlink()
    return _hashes(pseudo.round_dir(ref, 1))


# ---------------------------------------------------------------------------------- rounds on the cluster

def test_cluster_round_equals_serial_round(tmp_path, unlabelled, teacher, cluster, client):
    from flare_utils.distributed.cases import cache_info
    _, opened = cluster
    assert any("Dask LocalCluster: 2 worker process(es) x 1 thread(s), CPU; dashboard http" in s for s in opened)
    assert set(client.run(lambda: os.environ["OMP_NUM_THREADS"]).values()) == {"1"}     # torch_threads
    # glibc's default allocator settings, not Dask's MALLOC_TRIM_THRESHOLD_ (a case twice as slow)
    assert set(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()) == {None}
    ref = _serial_reference(tmp_path, teacher, unlabelled)
    run = tmp_path / "run"
    said: list[str] = []
    info = pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=cheap_factory, client=client,
                                progress=said.append)
    folder = pseudo.round_dir(run, 1)
    assert _hashes(folder) == ref and len(ref) == 8
    assert sorted(_writes(teacher)) == sorted(c[:-len(".nii.gz")] for c in ref)        # each case written once
    assert info.n_predicted == 8 and info.n_reused == 0 and info.device == "cpu"
    assert "round 1: 8 case(s) sent to the Dask cluster (2 worker(s) now)" in said and said[-1].startswith(
        "round 1: 8/8 predicted (RSS")
    csv = pd.read_csv(folder / "cases.csv")
    assert list(csv["case"]) == [f"Case_{i:05d}" for i in range(8)] and not csv["recovered"].any()
    assert csv["rss_mib"].gt(0).all() and csv["worker"].notna().all()
    for _, g in csv.groupby("pid"):                     # each worker's cases numbered 1, 2, ... in its order
        assert sorted(g["index"]) == list(range(1, len(g) + 1))
    records = [json.loads(line) for line in (folder / "cases.jsonl").read_text().splitlines()]
    assert sorted(r["case"] for r in records) == list(csv["case"])        # one record per case, by the client
    assert info.memory["cases_in_session"] >= 1
    # each worker built the predictor once, however many cases it ran
    builds = [n for i in client.run(cache_info).values() for k, n in i["builds"].items() if "pseudo-round" in k]
    assert builds and all(n == 1 for n in builds)
    # a factory that cannot be sent to the workers is a clear error before any case is sent
    lock = threading.Lock()
    with pytest.raises(FlareInputError, match="cannot be sent to Dask workers"):
        pseudo.predict_round(tmp_path / "run2", 1, teacher, unlabelled, client=client,
                             predictor_factory=lambda *a: (lock, cheap_factory(*a))[1])
    # complete: skipped as in serial, nothing sent
    again = pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=cheap_factory, client=client)
    assert again.skipped and len(_writes(teacher)) == 8


def _kill_a_busy_worker(side: Path, killed: list[int], stop: threading.Event) -> None:
    """Kill (SIGKILL) the first worker seen in the middle of a case, after 2 cases are written."""
    while not stop.is_set():
        log = side / "writes.log"
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            busy = sorted(side.glob("*.busy"))
            if busy:
                pid = int(busy[0].stem)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.01)


@contextlib.contextmanager
def a_busy_worker_killed(side: Path):
    """While the block runs, a thread kills the first worker seen mid-case (_kill_a_busy_worker);
    yields the list that receives its pid."""
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_busy_worker, args=(side, killed, stop), daemon=True)
    killer.start()
    try:
        yield killed
    finally:
        stop.set()
        killer.join()


def test_worker_killed_mid_case_loses_nothing(tmp_path, unlabelled, teacher, client):
    ref = _serial_reference(tmp_path, teacher, unlabelled)
    pids = set(client.run(os.getpid).values())
    with a_busy_worker_killed(teacher.parent) as killed:
        run = tmp_path / "run"
        info = pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=slow_factory, client=client)
    assert killed and killed[0] in pids                            # a worker died with a case in flight
    writes = _writes(teacher)
    assert sorted(writes) == sorted(set(writes)) and len(writes) == 8      # every case written exactly once
    assert _hashes(pseudo.round_dir(run, 1)) == ref and info.n_predicted == 8
    csv = pd.read_csv(pseudo.round_dir(run, 1) / "cases.csv")
    assert len(csv) == 8 and csv["case"].is_unique
    assert not [p for p in pseudo.round_dir(run, 1).iterdir() if p.name.startswith(".")]   # no temporaries


def test_worker_killed_after_writing_is_not_written_twice(tmp_path, unlabelled, teacher, client):
    """The worker dies after the label is written, before its task returns: the task runs again on
    another worker, finds the label written and only reports it."""
    ref = _serial_reference(tmp_path, teacher, unlabelled)
    run = tmp_path / "run"
    info = pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=suicidal_factory, client=client)
    assert (teacher.parent / "killed_once").is_file()
    writes = _writes(teacher)
    assert sorted(writes) == [f"Case_{i:05d}" for i in range(8)]           # Case_00002 too: once
    assert _hashes(pseudo.round_dir(run, 1)) == ref and info.n_predicted == 8
    # its record is made from the file; so is that of any case the dead worker had finished but whose
    # result the client had not fetched yet (Dask runs such a task again: it finds the label written)
    csv = pd.read_csv(pseudo.round_dir(run, 1) / "cases.csv").set_index("case")
    assert bool(csv.loc["Case_00002", "recovered"]) and len(csv) == 8


def test_interrupted_round_resumes_on_the_cluster(tmp_path, unlabelled, teacher, client):
    ref = _serial_reference(tmp_path, teacher, unlabelled)
    run = tmp_path / "run"
    folder = pseudo.round_dir(run, 1)
    # a distributed round stopped by a case that fails (after its retries): the others stay written
    with pytest.raises(RuntimeError, match="injected failure"):
        pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=failing_factory, client=client)
    assert pseudo.read_round(run, 1) is None and not (folder / "Case_00005.nii.gz").exists()
    client.run(lambda: None)          # no task is running any more (cancelled ones have finished)
    time.sleep(0.5)
    written = sorted(p.name for p in folder.glob("Case_*.nii.gz"))
    assert 1 <= len(written) < 8
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in written}
    before = len(_writes(teacher))
    info = pseudo.predict_round(run, 1, teacher, unlabelled, predictor_factory=cheap_factory, client=client)
    again = _writes(teacher)[before:]
    assert sorted(again) == sorted(f"Case_{i:05d}" for i in range(8) if f"Case_{i:05d}.nii.gz" not in written)
    assert info.n_reused == len(written) and info.n_predicted == 8 - len(written)
    assert {n: (folder / n).stat().st_mtime_ns for n in written} == mtimes
    assert _hashes(folder) == ref
    # a serial round interrupted the same way resumes on the cluster too
    run2 = tmp_path / "run2"
    with pytest.raises(RuntimeError, match="injected failure"):
        pseudo.predict_round(run2, 1, teacher, unlabelled, predictor_factory=failing_factory)
    assert len(list(pseudo.round_dir(run2, 1).glob("Case_*.nii.gz"))) == 5       # serial: in order, 0-4
    info2 = pseudo.predict_round(run2, 1, teacher, unlabelled, predictor_factory=cheap_factory, client=client)
    assert info2.n_reused == 5 and info2.n_predicted == 3 and _hashes(pseudo.round_dir(run2, 1)) == ref


def test_run_rounds_and_tables_on_the_cluster(tmp_path, unlabelled, teacher, client):
    def fake_train(dataset_id, plans_identifier, fold, trainer, config, run_dir):
        out = Path(run_dir) / "nnUNet_results" / f"{trainer}__{plans_identifier}__3d_fullres"
        (out / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
        (out / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"w")
        return out

    run = tmp_path / "run"
    infos = pseudo.run_rounds(run, 957, teacher, unlabelled, rounds=2, predictor_factory=cheap_factory,
                              train_fn=fake_train, progress=None, client=client)
    assert [i.n_predicted for i in infos] == [8, 8]
    for k in (1, 2):
        assert pd.read_csv(pseudo.round_dir(run, k) / "cases.csv")["worker"].notna().all()
    # the per-case tables: one task per case on the cluster, the same rows as in-process
    agree = pseudo.round_agreement(run, client=client)
    assert len(agree) == 8 and agree.equals(pseudo.round_agreement(run))
    truth = pseudo.round_dir(run, 1)                  # any label folder serves as "truth" here
    quality = pseudo.pseudo_label_quality(run, truth, client=client)
    assert len(quality) == 16 and quality.equals(pseudo.pseudo_label_quality(run, truth))


def test_pseudo_stage_opens_the_cluster_of_its_params(tmp_path, unlabelled, teacher, client, monkeypatch, capsys):
    """The stage's `cluster` (here: the address of this file's scheduler) reaches the rounds."""
    from tiny_data import preserved_environ

    from flare_utils.semisup import pseudo_stage
    seen = []
    real = pseudo.run_rounds

    def run_rounds(*args, **kw):
        seen.append(kw["client"].scheduler.address)
        return real(*args, **{**kw, "predictor_factory": cheap_factory})

    monkeypatch.setattr(pseudo_stage.R, "run_rounds", run_rounds)
    address = client.scheduler.address
    with preserved_environ():
        res = pseudo_stage.pseudo_label_stage(tmp_path / "run", 957, teacher_results=teacher, unlabelled_dir=unlabelled,
                                              rounds=1, device="cpu", cluster={"type": "address", "address": address})
    assert seen == [address]
    assert f"Dask scheduler {address} (2 worker(s) now)" in capsys.readouterr().out
    assert res.rounds[0].n_predicted == 8
    assert pd.read_csv(pseudo.round_dir(tmp_path / "run", 1) / "cases.csv")["worker"].notna().all()
    with pytest.raises(FlareInputError, match="cluster.workers: must be >= 1"):     # checked before anything runs
        pseudo_stage.pseudo_label_stage(tmp_path / "run2", 957, teacher_results=teacher,
                                        cluster={"type": "local_cluster", "workers": 0})
    assert not (tmp_path / "run2").exists()


def test_runner_passes_the_cluster_only_when_set(tmp_path):
    """An in-process study's pseudo parameters (and so its completion key) are those of before."""
    import dataclasses

    from flare_utils.layout import RunLayout
    from flare_utils.study.params import load_params
    from flare_utils.study.runner import _pseudo_parameters
    run = RunLayout(tmp_path / "r")
    assert "cluster" not in _pseudo_parameters(load_params({"run_dir": str(run.root)}), run)
    p = load_params({"run_dir": str(run.root), "cluster": {"type": "local_cluster", "workers": 2}})
    assert _pseudo_parameters(p, run)["cluster"] == dataclasses.asdict(p.cluster)
    assert as_cluster_params(_pseudo_parameters(p, run)["cluster"]) == p.cluster     # what the stage reads back


def tiny_model_and_images(tmp_path_factory, tmp_path: Path, first_seed: int) -> tuple[Path, Path]:
    """The rounds tests' tiny trained model (2 folds; trained once per session) and 3 tiny phantom
    images `Case_0000{i}_0000.nii.gz` of seeds first_seed + i in tmp_path/img."""
    from demo_model import train_demo_model
    from flare_utils.synthetic.phantom import generate_case
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        model = train_demo_model(tmp_path_factory.getbasetemp() / "flare_pseudo_demo_model", **DEMO_MODEL)
    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        c = generate_case(first_seed + i, "tiny", fov="abdomen")
        nib.save(nib.Nifti1Image(c.image, c.affine), str(images / f"Case_{i:05d}_0000.nii.gz"))
    return model, images


@pytest.mark.e2e
def test_real_model_round_on_the_cluster_equals_serial(tmp_path_factory, tmp_path, client):
    """The project's predictor (a tiny trained nnU-Net, 2-fold ensemble, full sliding window):
    serial and cluster rounds write the same label files."""
    model, images = tiny_model_and_images(tmp_path_factory, tmp_path, first_seed=200)
    serial = pseudo.predict_round(tmp_path / "serial", 1, model, images, device="cpu")
    dist = pseudo.predict_round(tmp_path / "dist", 1, model, images, device="cpu", client=client)
    got, ref = _hashes(pseudo.round_dir(tmp_path / "dist", 1)), _hashes(pseudo.round_dir(tmp_path / "serial", 1))
    assert got == ref and len(ref) == 3
    assert serial.folds == dist.folds == ["0", "1"] and dist.device == "cpu"


# ---------------------------------------------------------------------------------- params and cluster types

def test_cluster_section_of_the_params(tmp_path):
    from flare_utils.study.params import load_params

    def problems(section) -> str:
        with pytest.raises(FlareInputError) as e:
            load_params({"cluster": section})
        return str(e.value)

    assert load_params({}).cluster == ClusterParams()                       # default: in-process
    p = load_params({"cluster": {"type": "local_cluster", "workers": 2, "threads_per_worker": 1}})
    assert p.cluster.type == "local_cluster" and p.cluster.workers == 2
    assert "params.cluster.type: must be one of ['local', 'local_cluster', 'address', 'slurm'], got 'k8s'" \
        in problems({"type": "k8s"})
    assert "params.cluster.address: type address needs the scheduler's address" in problems({"type": "address"})
    assert "params.cluster.address: not a scheduler address" in problems({"type": "address", "address": "a b"})
    assert "params.cluster.workers: must be >= 1, got 0" in problems({"type": "local_cluster", "workers": 0})
    assert "params.cluster.workers: expected int or NoneType, got 'two'" in problems({"type": "local_cluster",
                                                                                      "workers": "two"})
    assert "params.cluster.workers: not used by type local (only by local_cluster)" in problems({"workers": 2})
    assert "params.cluster.queue: not used by type address (only by slurm)" in problems(
        {"type": "address", "address": "tcp://h:8786", "queue": "gpu"})
    slurm = problems({"type": "slurm", "memory": "lots", "walltime": "4h"})
    assert "params.cluster.cores: type slurm needs the CPU cores of each job" in slurm
    assert "params.cluster.memory: not a size" in slurm and "params.cluster.walltime: SLURM time limit" in slurm
    assert "params.cluster: unknown key(s) ['wrkers']" in problems({"type": "local_cluster", "wrkers": 2})
    # the same checks for a section given to a stage (a notebook parameter)
    with pytest.raises(FlareInputError, match=r"cluster\.type: unknown cluster type 'k8s'"):
        as_cluster_params(ClusterParams(type="k8s"))
    assert as_cluster_params(None) == ClusterParams() and cluster_problems(ClusterParams()) == []
    assert as_cluster_params({"type": "address", "address": "tcp://10.0.0.1:8786"}).address == "tcp://10.0.0.1:8786"


def test_unreachable_scheduler_is_a_clear_error_not_a_hang():
    with socket.socket() as s:                    # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(FlareInputError, match=rf"no Dask scheduler answered at tcp://127\.0\.0\.1:{port} within 2 s"):
        with open_cluster({"type": "address", "address": f"tcp://127.0.0.1:{port}", "connect_timeout": 2}):
            pass
    assert time.perf_counter() - t0 < 10


def test_local_type_opens_nothing():
    with open_cluster(None) as c:
        assert c is None
    with open_cluster({"type": "local"}) as c:
        assert c is None


def test_slurm_job_script():
    params = ClusterParams(type="slurm", queue="gpu", account="flare22", cores=8, memory="32GB", walltime="04:00:00",
                           gpus_per_job=2, jobs=3, job_extra_directives=["--constraint=a100"],
                           job_script_prologue=["module load cuda/12.4"], local_directory="/scratch/flare",
                           python="/opt/flare/.venv/bin/python", log_directory="/home/u/dask-logs")
    opts, jobs = slurm_options(params)
    assert jobs == 3 and opts["processes"] == 2 and opts["cores"] == 8 and opts["memory"] == "32GB"
    script = slurm_job_script(params)
    for line in ("#SBATCH -p gpu", "#SBATCH -A flare22", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G",
                 "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:2", "#SBATCH --constraint=a100",
                 "#SBATCH -e /home/u/dask-logs/", "module load cuda/12.4", "export FLARE_DASK_PIN_GPUS=1",
                 "export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=\"{'MALLOC_TRIM_THRESHOLD_': None}\""):
        assert line in script, line
    worker = next(line for line in script.splitlines() if "dask_worker" in line)
    assert worker.startswith("/opt/flare/.venv/bin/python -m distributed.cli.dask_worker")
    assert "--nworkers 2" in worker and "--nthreads 4" in worker and "--local-directory /scratch/flare" in worker
    cpu = slurm_job_script(ClusterParams(type="slurm", cores=4, memory="16GB"))    # no GPU: one worker per job
    assert "--gres" not in cpu and "FLARE_DASK_PIN_GPUS" not in cpu and "--nworkers" not in cpu
    assert "#SBATCH --cpus-per-task=4" in cpu


def test_gpu_pinning_rules():
    from flare_utils.distributed.workers import (gpu_environments, pinned_visible, setup_environment, visible_gpus,
                                                 worker_slot)
    assert gpu_environments(4, ["2", "3"]) == [{"CUDA_VISIBLE_DEVICES": v} for v in ("2", "3", "2", "3")]
    assert gpu_environments(2, []) == [{}, {}]                              # CPU workers
    assert visible_gpus("cpu") == [] and visible_gpus("mps") == []
    assert worker_slot(0) == 0 and worker_slot(3) == 3 and worker_slot("SLURMCluster-7-1") == 1
    assert worker_slot("tcp://10.0.0.1:4000") == 0 and worker_slot("1") == 1
    assert pinned_visible("0,1,2,3", 2) == "2" and pinned_visible("4,5", 3) == "5"
    assert pinned_visible("0", 1) is None and pinned_visible(None, 0) is None and pinned_visible("-1", 0) is None
    env = setup_environment({"CUDA_VISIBLE_DEVICES": "2,3"}, "SLURMCluster-0-1", pin_gpus=True, torch_threads=2,
                            torch_imported=False)
    assert env == {"CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                   "OPENBLAS_NUM_THREADS": "2"}
    job = {"CUDA_VISIBLE_DEVICES": "0,1", "FLARE_DASK_PIN_GPUS": "1"}          # set by the SLURM job script
    assert setup_environment(job, "J-0", pin_gpus=False, torch_threads=None, torch_imported=False) == \
        {"CUDA_VISIBLE_DEVICES": "0"}
    assert setup_environment(job, "J-0", pin_gpus=False, torch_threads=None, torch_imported=True) == {}


def test_the_documented_cluster_blocks_are_valid():
    """Every `cluster:` YAML block of the README and docs/reference/distributed.md loads as params, and
    the SLURM ones make a job script."""
    import re

    import yaml

    from flare_utils.study.params import load_params
    root = Path(__file__).resolve().parents[1]
    blocks = [b for doc in ("README.md", "docs/reference/distributed.md")
              for b in re.findall(r"```yaml\n(.*?)```", (root / doc).read_text(), flags=re.S)
              if b.startswith("cluster:")]
    assert len(blocks) >= 4
    types = set()
    for b in blocks:
        c = load_params(yaml.safe_load(b)).cluster
        types.add(c.type)
        if c.type == "slurm":
            script = slurm_job_script(c)
            assert f"#SBATCH --gres=gpu:{c.gpus_per_job}" in script and f"#SBATCH -p {c.queue}" in script
    assert {"local", "local_cluster", "slurm"} <= types


def test_local_cluster_on_a_gpu_machine_pins_one_gpu_per_worker(monkeypatch):
    """The GPU branch of `local_cluster` with two pretended GPUs (no CUDA is touched here): each worker
    process starts with its own CUDA_VISIBLE_DEVICES."""
    from flare_utils.distributed import workers
    monkeypatch.setattr(workers, "visible_gpus", lambda device: ["0", "1"] if device != "cpu" else [])
    lines: list[str] = []
    with open_cluster({"type": "local_cluster", "dashboard_address": ":0", "torch_threads": 2}, device="auto",
                      say=lines.append) as c:
        c.wait_for_workers(2, timeout=60)
        seen = c.run(lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")))
    assert sorted(seen.values()) == [("0", "2"), ("1", "2")]
    assert "Dask LocalCluster: 2 worker process(es) x 1 thread(s), pinned to GPU(s) 0, 1" in lines[0]
