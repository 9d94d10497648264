"""Helpers for the notebook tests: run a notebook as JupyterLab would, read its outputs, and see
whether a run folder changed."""
from __future__ import annotations

import hashlib
from pathlib import Path

import nbformat

PROJECT = Path(__file__).resolve().parents[1]


def execute_as_jupyterlab(notebook: Path, run_dir: Path | None = None):
    """Run a stored notebook the way "Run All" in JupyterLab does: its own parameters cell (with at
    most `run_dir` edited in it), no papermill injection, the notebooks folder as working directory."""
    from nbclient import NotebookClient
    nb = nbformat.read(str(notebook), as_version=4)
    if run_dir is not None:
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        lines = cell.source.splitlines()
        i = next(i for i, line in enumerate(lines) if line.startswith("run_dir ="))
        lines[i] = f"run_dir = {str(run_dir)!r}"
        cell.source = "\n".join(lines)
    NotebookClient(nb, kernel_name="python3", timeout=900,
                   resources={"metadata": {"path": str(PROJECT / "notebooks")}}).execute()
    return nb


def outputs(nb) -> list[dict]:
    """Every output of the code cells of an executed notebook (a node or a path)."""
    if not hasattr(nb, "cells"):
        nb = nbformat.read(str(nb), as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def printed_and_pictures(nb) -> tuple[str, int]:
    """(the text the code cells printed, the number of PNG images they showed)."""
    outs = outputs(nb)
    return "".join(o.get("text", "") for o in outs), sum("image/png" in o.get("data", {}) for o in outs)


def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under `root` with its content hash and modification time."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}
