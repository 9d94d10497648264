"""The `cluster:` params section and the cluster it opens.

    type: local          in-process, one case after the other (today's behaviour, the default)
    type: local_cluster  a Dask LocalCluster on this machine: `workers` processes (default: one per
                         visible GPU, else 2), `threads_per_worker` each
    type: address        an existing Dask scheduler at `address` (tcp://host:8786)
    type: slurm          workers submitted as SLURM jobs through dask-jobqueue (queue, cores, memory, ...)

`open_cluster(params)` is a context manager yielding a `distributed.Client` (None for "local"); the
cluster it started is closed (its SLURM jobs cancelled) when the block ends. The dashboard address
is printed when a cluster starts. A scheduler that does not answer within `connect_timeout`
seconds is a FlareInputError naming the address, never a hang. Dask is imported only here, when a
cluster is opened. Rules and examples: docs/reference/distributed.md
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Literal, Mapping

from flare_utils.errors import FlareInputError

__all__ = ["CLUSTER_TYPES", "ClusterParams", "cluster_problems", "as_cluster_params", "slurm_options",
           "slurm_job_script", "open_cluster"]

CLUSTER_TYPES = {"local": "in-process, one case after the other (the default)",
                 "local_cluster": "a Dask LocalCluster of worker processes on this machine",
                 "address": "an existing Dask scheduler (address: tcp://host:8786)",
                 "slurm": "Dask workers submitted as SLURM jobs (dask-jobqueue)"}
DEFAULT_LOCAL_WORKERS = 2


@dataclass
class ClusterParams:
    """Where per-case work runs (pseudo-label rounds, inference, evaluation). Options not used by the
    chosen `type` must stay unset (null), so a misplaced option is an error rather than silently ignored."""
    type: Literal["local", "local_cluster", "address", "slurm"] = "local"
    # every type but local
    torch_threads: int = 1               # torch threads of each worker (Dask starts workers with 1)
    dashboard_address: str | None = None  # local_cluster / slurm: None = Dask's (:8787, another port if taken)
    # local_cluster
    workers: int | None = None           # worker processes (None: one per visible GPU, else 2)
    threads_per_worker: int | None = None  # cases in flight per worker (None: 1; a worker's model serves one at a time)
    memory_limit: str | None = None      # per worker, e.g. "6GiB" (None: Dask's share of the RAM; "0": no limit)
    # address
    address: str | None = None           # tcp://host:8786 of a running scheduler
    connect_timeout: float = 10.0        # seconds to wait for it (also for a new cluster's scheduler)
    # slurm (dask_jobqueue.SLURMCluster)
    queue: str | None = None             # partition (#SBATCH -p)
    account: str | None = None           # #SBATCH -A
    cores: int | None = None             # CPU cores per job (--cpus-per-task)
    memory: str | None = None            # memory per job, e.g. "32GB" (--mem)
    walltime: str | None = None          # per job, e.g. "04:00:00" (-t)
    gpus_per_job: int | None = None      # GPUs per job (--gres=gpu:N); one worker process per GPU
    jobs: int | None = None              # jobs submitted (workers = jobs x max(1, gpus_per_job))
    job_extra_directives: list[str] | None = None   # more #SBATCH lines, e.g. ["--constraint=a100"]
    job_script_prologue: list[str] | None = None    # shell lines before the worker starts (module load, ...)
    local_directory: str | None = None   # workers' scratch folder on the node, e.g. "$TMPDIR"
    log_directory: str | None = None     # the jobs' stdout/stderr
    python: str | None = None            # the interpreter on the nodes (None: this one, sys.executable)
    interface: str | None = None         # network interface of scheduler and workers, e.g. "ib0"


# which options each type uses (the common ones are allowed everywhere but local)
_COMMON = ("torch_threads", "connect_timeout")
_OPTIONS = {
    "local": (),
    "local_cluster": ("workers", "threads_per_worker", "memory_limit", "dashboard_address"),
    "address": ("address",),
    "slurm": ("queue", "account", "cores", "memory", "walltime", "gpus_per_job", "jobs", "job_extra_directives",
              "job_script_prologue", "local_directory", "log_directory", "python", "interface", "dashboard_address"),
}
_ADDRESS = re.compile(r"^(?:(?:tcp|tls|ucx|ws|wss)://)?(?:[^\s/:\[\]]+|\[[0-9a-fA-F:]+\])(?::\d{1,5})?$")
_WALLTIME = re.compile(r"^(?:\d+-)?\d{1,3}(?::\d{2}){0,2}$")


def _bytes_problem(value: str) -> str | None:
    try:
        _parse_bytes(value)
    except ValueError:
        return "not a size (give e.g. \"8GB\", \"6GiB\", \"8000MB\")"
    return None


def _parse_bytes(value: str) -> int:
    """Dask's size syntax ("8GB", "6 GiB", "8000MB"), without importing dask."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtTpP]?i?[bB]?)\s*", str(value))
    if not m:
        raise ValueError(value)
    unit = m.group(2).lower().rstrip("b")
    factor = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15,
              "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40, "pi": 2 ** 50}.get(unit)
    if factor is None:
        raise ValueError(value)
    return int(float(m.group(1)) * factor)


def cluster_problems(c: ClusterParams, where: str = "params.cluster") -> list[str]:
    """Every problem of a cluster section, as "<where>.<key>: what is allowed, got what" (empty: none)."""
    out: list[str] = []
    if c.type not in CLUSTER_TYPES:
        return [f"{where}.type: unknown cluster type {c.type!r}; allowed: "
                + "; ".join(f"{k} ({v})" for k, v in CLUSTER_TYPES.items())]
    used = set(_OPTIONS[c.type]) | (set(_COMMON) if c.type != "local" else set())
    defaults = ClusterParams()
    for f in fields(ClusterParams):
        if f.name == "type" or f.name in used:
            continue
        if getattr(c, f.name) != getattr(defaults, f.name):
            users = [t for t, opts in _OPTIONS.items() if f.name in opts] or \
                [t for t in CLUSTER_TYPES if t != "local"]
            out.append(f"{where}.{f.name}: not used by type {c.type} (only by {', '.join(users)}): remove it "
                       f"or set type")
    for key, low in (("torch_threads", 1), ("workers", 1), ("threads_per_worker", 1),
                     ("cores", 1), ("jobs", 1), ("gpus_per_job", 0)):
        v = getattr(c, key)
        if key in used and v is not None and v < low:
            out.append(f"{where}.{key}: must be >= {low}, got {v}")
    if not c.connect_timeout > 0:
        out.append(f"{where}.connect_timeout: must be > 0 (seconds), got {c.connect_timeout}")
    if c.type == "local_cluster" and c.memory_limit not in (None, "0", "auto"):
        p = _bytes_problem(c.memory_limit)
        if p:
            out.append(f"{where}.memory_limit: {p}, \"auto\" or \"0\" (no limit), got {c.memory_limit!r}")
    if c.type == "address":
        if not c.address:
            out.append(f"{where}.address: type address needs the scheduler's address, e.g. tcp://host:8786")
        elif not _ADDRESS.match(c.address):
            out.append(f"{where}.address: not a scheduler address (tcp://host:port), got {c.address!r}")
    if c.type == "slurm":
        if c.cores is None:
            out.append(f"{where}.cores: type slurm needs the CPU cores of each job, e.g. cores: 8")
        if c.memory is None:
            out.append(f"{where}.memory: type slurm needs the memory of each job, e.g. memory: \"32GB\"")
        else:
            p = _bytes_problem(c.memory)
            if p:
                out.append(f"{where}.memory: {p}, got {c.memory!r}")
        if c.walltime is not None and not _WALLTIME.match(c.walltime):
            out.append(f"{where}.walltime: SLURM time limit as [D-]HH:MM:SS (e.g. \"04:00:00\"), got {c.walltime!r}")
        if c.cores is not None and c.gpus_per_job and c.cores < c.gpus_per_job:
            out.append(f"{where}.cores: each of the {c.gpus_per_job} worker processes of a job needs a core: "
                       f"cores >= gpus_per_job, got {c.cores}")
        for key in ("job_extra_directives", "job_script_prologue"):
            v = getattr(c, key)
            if v and any(not isinstance(s, str) or "\n" in s for s in v):
                out.append(f"{where}.{key}: one line per entry (strings without line breaks)")
    return out


def as_cluster_params(value: ClusterParams | Mapping[str, Any] | None, where: str = "cluster") -> ClusterParams:
    """A checked ClusterParams from a ClusterParams, a mapping (a notebook parameter, a YAML section)
    or None ("local"); every problem in one FlareInputError."""
    if value is None:
        c = ClusterParams()
    elif isinstance(value, ClusterParams):
        c = value
    else:
        from flare_utils.utilities.typed import from_dict
        c = from_dict(ClusterParams, dict(value), where)
    problems = cluster_problems(c, where)
    if problems:
        raise FlareInputError(None, problems[0] if len(problems) == 1 else
                              f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return c


# ----------------------------------------------------------------------------------------------
# SLURM

# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (`distributed.nanny.pre-spawn-environ`).
# Setting it switches off glibc's dynamic mmap threshold, so every large temporary array of a case
# is a fresh mmap with its page faults: a pseudo-label case took 0.65 s instead of 0.31 s (docs/
# benchmarks.md, "Per-case work on Dask"). Our workers keep glibc's default (the variable unset).
KEEP_MALLOC = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
KEEP_MALLOC_ENV = "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON"   # a dict value: its keys keep their case


def slurm_options(c: ClusterParams) -> tuple[dict[str, Any], int]:
    """(keyword arguments of dask_jobqueue.SLURMCluster, jobs to submit) for a slurm section.

    One job = one `dask worker` command with `processes` worker processes: one per GPU
    (`gpus_per_job`, each narrowed to its GPU by `WorkerSetup`), else one; `cores` and `memory` are
    the job's and are shared among its processes."""
    from flare_utils.distributed.workers import PIN_GPUS_ENV
    gpus = int(c.gpus_per_job or 0)
    extra = [*(c.job_extra_directives or [])]
    prologue = [*(c.job_script_prologue or [])]
    if gpus:
        extra.append(f"--gres=gpu:{gpus}")
        if gpus > 1:
            prologue.append(f"export {PIN_GPUS_ENV}=1")
    prologue.append(f"export {KEEP_MALLOC_ENV}=\"{{'MALLOC_TRIM_THRESHOLD_': None}}\"")   # see KEEP_MALLOC
    opts: dict[str, Any] = {"cores": int(c.cores), "memory": c.memory, "processes": max(1, gpus),
                            "job_extra_directives": extra, "job_script_prologue": prologue}
    for key in ("queue", "account", "walltime", "local_directory", "log_directory", "python", "interface"):
        v = getattr(c, key)
        if v is not None:
            opts[key] = v
    if c.dashboard_address is not None:
        opts["scheduler_options"] = {"dashboard_address": c.dashboard_address}
    return opts, int(c.jobs or 1)


def slurm_job_script(c: ClusterParams) -> str:
    """The batch script dask-jobqueue would submit for a slurm section (nothing is submitted; a
    scheduler is started and closed here)."""
    from dask_jobqueue import SLURMCluster
    opts, _ = slurm_options(as_cluster_params(c))
    with SLURMCluster(**opts) as cluster:
        return cluster.job_script()


# ----------------------------------------------------------------------------------------------
# Opening

def _connect(address: str, timeout: float):
    from distributed import Client
    try:
        return Client(address, timeout=f"{float(timeout)}s")
    except (OSError, TimeoutError) as e:
        raise FlareInputError(None, f"params.cluster.address: no Dask scheduler answered at {address} within "
                                    f"{float(timeout):g} s ({type(e).__name__}: {e}); start one (`dask scheduler`) "
                                    "or check the address, or set cluster type local") from None


def _dashboard(client) -> str:
    try:
        link = client.dashboard_link
    except Exception:                 # noqa: BLE001 - a missing dashboard is never fatal
        link = None
    services = {}
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:                 # noqa: BLE001
        pass
    if not link or "dashboard" not in services:
        return "dashboard off (install bokeh >= 3.1 to have it)"
    return f"dashboard {link}"


def _local_cluster(c: ClusterParams, device: str):
    """A LocalCluster; on a GPU machine (and device not cpu/mps) one worker per visible GPU, each
    pinned to it, unless `workers` says otherwise (then round robin)."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    from flare_utils.distributed.workers import gpu_environments, visible_gpus
    gpus = visible_gpus(device)
    n = int(c.workers or len(gpus) or DEFAULT_LOCAL_WORKERS)
    threads = int(c.threads_per_worker or 1)
    common: dict[str, Any] = {"dashboard_address": c.dashboard_address or ":8787"}
    memory = {} if c.memory_limit is None else {"memory_limit": c.memory_limit}
    if not gpus:
        return LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, **memory, **common), n, []
    if not memory:                    # as LocalCluster does: the RAM shared among the workers
        from distributed.system import MEMORY_LIMIT
        memory = {"memory_limit": int(MEMORY_LIMIT // n)}
    workers = {i: {"cls": Nanny, "options": {"nthreads": threads, "env": env, "host": "127.0.0.1", **memory}}
               for i, env in enumerate(gpu_environments(n, gpus))}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", **common}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="flare-gpu"), n, gpus


@contextlib.contextmanager
def open_cluster(params: ClusterParams | Mapping[str, Any] | None, *, device: str = "auto",
                 say: Callable[[str], None] | None = print) -> Iterator[Any]:
    """Yield a `distributed.Client` on the cluster of `params` (None for type local), and close what
    was started when the block ends: a LocalCluster's workers, SLURM jobs; a scheduler given by
    address is only disconnected from. `device`: the stage's device ("cpu" keeps local workers off
    the GPUs)."""
    c = as_cluster_params(params)
    tell = say or (lambda s: None)
    if c.type == "local":
        yield None
        return
    from distributed import Client

    from flare_utils.distributed.workers import WorkerSetup
    with contextlib.ExitStack() as stack:
        if c.type == "address":
            client = stack.enter_context(_connect(c.address, c.connect_timeout))
            what = f"Dask scheduler {c.address} ({len(client.scheduler_info().get('workers', {}))} worker(s) now)"
        elif c.type == "local_cluster":
            import dask
            with dask.config.set(KEEP_MALLOC):       # read by each nanny when it is made
                cluster, n, gpus = _local_cluster(c, device)
            stack.enter_context(cluster)
            client = stack.enter_context(Client(cluster, timeout=f"{float(c.connect_timeout)}s"))
            what = (f"Dask LocalCluster: {n} worker process(es) x {int(c.threads_per_worker or 1)} thread(s)"
                    + (f", pinned to GPU(s) {', '.join(gpus)}" if gpus else ", CPU"))
        else:
            from dask_jobqueue import SLURMCluster
            opts, jobs = slurm_options(c)
            cluster = stack.enter_context(SLURMCluster(**opts))
            cluster.scale(jobs=jobs)
            client = stack.enter_context(Client(cluster, timeout=f"{float(c.connect_timeout)}s"))
            what = (f"Dask SLURMCluster: {jobs} job(s) submitted ({opts['processes']} worker(s), {c.cores} cores, "
                    f"{c.memory} each); workers join as the queue starts them")
        client.register_plugin(WorkerSetup(torch_threads=c.torch_threads, pin_gpus=c.type == "slurm"
                                           and bool(c.gpus_per_job and c.gpus_per_job > 1)))
        tell(f"{what}; {_dashboard(client)}")
        yield client
