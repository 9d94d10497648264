"""Per-case work on a Dask cluster: in-process (the default), a LocalCluster, an existing scheduler or SLURM.

- `cluster`: the `cluster:` params section (`ClusterParams`), its checks, and `open_cluster`, which
  starts or joins the cluster and yields a `distributed.Client` (None: in-process, today's behaviour).
- `cases`: one task per case (`map_cases`), results as they complete, and the worker-side cache
  that lets each worker build its model once (`cached`).
- `workers`: what each worker process is set up with: torch threads, one GPU per worker.

Nothing here imports dask until a cluster is opened, so the package costs nothing in-process.
Rules (exactly-once writes, faults, params): docs/reference/distributed.md
"""
from __future__ import annotations

from flare_utils.distributed.cluster import CLUSTER_TYPES, ClusterParams, cluster_problems, open_cluster

__all__ = ["CLUSTER_TYPES", "ClusterParams", "cluster_problems", "open_cluster"]
