"""The README's demo numbers are not typed by hand: they are the tables `flare_utils.study.repeat`
makes from the committed results file of the repeated demo (issue 16 §2)."""
from __future__ import annotations

import json
from pathlib import Path

from flare_utils.study.repeat import readme_tables

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "docs" / "results" / "demo_seeds.json"


def test_readme_shows_the_committed_demo_results():
    results = json.loads(RESULTS.read_text())
    assert results["seeds"] == [0, 1, 2, 3, 4]            # every seed fixed before the run is reported
    readme = (PROJECT / "README.md").read_text()
    assert readme_tables(RESULTS) in readme, "README's demo tables differ from docs/results/demo_seeds.json: " \
        "paste the output of `python -m flare_utils.study.repeat docs/results/demo_seeds.json`"
