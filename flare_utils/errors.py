"""Errors that name the offending file and what is wrong with it."""
from __future__ import annotations

from pathlib import Path


class FlareInputError(ValueError):
    """Bad user input: an unreadable, inconsistent or missing file, or a wrong parameter.

    The message always starts with the path (when there is one) so users can find the culprit.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)

    def __reduce__(self):
        # Rebuild from (path, problem) so the error survives the trip back from worker processes.
        return (type(self), (self.path, self.problem))
