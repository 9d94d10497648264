"""A study repeated over seeds: each seed a normal run folder, then one aggregate of the comparisons.

`repeat_study(params, seeds)` runs the params' study once per seed into `<run_dir>/seed_<s>/`, with
the training seed (`seed`) and, for the synthetic cohort, the cohort seed (`data.phantom.seed`) set
to s (`vary` chooses). Each seed run is resumable like any run. It then writes into `<run_dir>/`:
`seeds.json` (per seed the Table-5 comparison; per comparison the paired difference over held-out
cases with its bootstrap interval per seed and pooled over seeds; how many seeds show the papers'
direction) and `index.html`, the same as a page linking each seed's own report.

Details: docs/reference/reports.md ("Repeated studies")
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import yaml

from flare_utils.data.io import atomic_write_text
from flare_utils.errors import FlareInputError
from flare_utils.evaluation.compare import (COMPARISONS, LEVEL, N_BOOT, over_seeds, paired_difference,
                                            paired_scores, pooled_difference, run_case_scores, verdict)
from flare_utils.study.params import StudyParams, load_params

__all__ = ["repeat_study", "seed_params", "aggregate_seeds", "write_aggregate", "markdown_table", "readme_tables",
           "SEEDS_JSON", "VARY"]

SEEDS_JSON = "seeds.json"
VARY = ("cohort", "training")
METRICS = ("DSC", "NSD")


def seed_dir(base: Path, seed: int) -> Path:
    return Path(base) / f"seed_{seed}"


def _check_seeds(seeds: Iterable[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise FlareInputError(None, "give at least one seed (--seeds 0 1 2)")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise FlareInputError(None, f"seeds must be non-negative integers, got {bad}")
    if len(set(seeds)) != len(seeds):
        raise FlareInputError(None, f"seeds repeat: {seeds}")
    return seeds


def seed_params(params: StudyParams, seed: int, base: Path, vary: Sequence[str] = VARY) -> dict[str, Any]:
    """The params of one seed's run: `params` with the varied seeds set to `seed`, its own run folder."""
    bad = [v for v in vary if v not in VARY]
    if bad or not vary:
        raise FlareInputError(None, f"vary: {list(vary)}; choose from {list(VARY)}")
    d = params.to_dict()
    if "training" in vary:
        d["seed"] = seed
    if "cohort" in vary and d["data"]["source"] == "phantom":
        d["data"]["phantom"]["seed"] = seed
    d["run_dir"] = str(seed_dir(base, seed))
    return d


def repeat_study(params_path: str | Path | Mapping[str, Any], seeds: Iterable[int], *,
                 run_dir: str | Path | None = None, vary: Sequence[str] = VARY,
                 log: Callable[[str], None] | None = print, progress_stream: TextIO | None = None,
                 command: str | None = None) -> dict[str, Any]:
    """Run the study once per seed (complete seeds are skipped unit by unit, as any run), then write
    and return the aggregate (`seeds.json`, `index.html` in the base run folder)."""
    from flare_utils.study.lock import run_lock
    from flare_utils.study.runner import run_study

    seeds = _check_seeds(seeds)
    overrides = {"run_dir": str(run_dir)} if run_dir is not None else None
    params = load_params(params_path, overrides)
    base = Path(params.run_dir).resolve()
    runs = {s: seed_params(params, s, base, vary) for s in seeds}     # every seed checked before any runs
    for s, p in runs.items():
        load_params(p)
    with run_lock(base, command, log):
        atomic_write_text(base / "params.yaml", yaml.safe_dump(params.to_dict(), sort_keys=False))
        for s, p in runs.items():
            if log:
                log(f"== seed {s} ({', '.join(vary)}) -> {seed_dir(base, s)}")
            run_study(p, log=log, progress_stream=progress_stream, command=command)
        shared = "cohort" not in vary or params.data.source != "phantom"    # one cohort for every seed
        aggregate = aggregate_seeds(base, seeds, name=params.name, vary=vary, shared_cases=shared)
        write_aggregate(base, aggregate)
    if log:
        log(f"aggregate over seeds {seeds}: {base / SEEDS_JSON}, {base / 'index.html'}")
    return aggregate


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 6)


def aggregate_seeds(base: str | Path, seeds: Sequence[int], *, name: str = "", vary: Sequence[str] = VARY,
                    shared_cases: bool = False, n_boot: int = N_BOOT, bootstrap_seed: int = 0) -> dict[str, Any]:
    """The seeds' results side by side (reads each seed run's evaluation; computes, writes nothing).
    `shared_cases`: the seeds' held-out cases are the same cases (one cohort; pooled intervals then
    count each case once)."""
    from flare_utils.study.index_report import comparison_table
    base = Path(base)
    models: dict[str, dict[str, Any]] = {}
    scores = {}
    for s in seeds:
        run = seed_dir(base, s)
        if not (run / "evaluation" / "overview.csv").is_file():
            raise FlareInputError(run, f"seed {s}: this run has no evaluation yet (run it first)")
        table = comparison_table(run)
        for model, row in table.iterrows():
            m = models.setdefault(str(model), {"title": row["title"], "per_seed": {}})
            m["per_seed"][str(s)] = {"cases": int(row["cases"]),
                                     **{metric: _finite(row[f"{metric} mean"]) for metric in METRICS}}
        scores[s] = {metric: run_case_scores(run, metric) for metric in METRICS}
    for m in models.values():
        for metric in METRICS:
            values = [v[metric] for v in m["per_seed"].values() if v[metric] is not None]
            mean = sum(values) / len(values) if values else None
            sd = (math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
                  if len(values) > 1 else None)
            m[f"{metric} mean over seeds"], m[f"{metric} sd over seeds"] = _finite(mean), _finite(sd)
    comparisons = []
    for c in COMPARISONS:
        for metric in METRICS:
            pairs = {s: paired_scores(scores[s][metric], c) for s in seeds}
            pairs = {s: p for s, p in pairs.items() if p is not None}
            if not pairs:
                continue
            per_seed = {s: paired_difference(*p, n_boot=n_boot, seed=bootstrap_seed) for s, p in pairs.items()}
            shared = shared_cases and len({len(p[0]) for p in pairs.values()}) == 1
            pooled = pooled_difference(list(pairs.values()), n_boot=n_boot, seed=bootstrap_seed, shared_cases=shared)
            comparisons.append({
                "model": c.model, "baseline": c.baseline, "question": c.question, "metric": metric,
                "per_seed": {str(s): {**_rounded(d.to_dict()), "verdict": verdict(d, c)} for s, d in per_seed.items()},
                "pooled": {**_rounded(pooled.to_dict()), "verdict": verdict(pooled, c), "summary": pooled.describe()},
                "over_seeds": _rounded(over_seeds([d.mean for d in per_seed.values()], c.direction)),
                "seeds": len(per_seed),
                "seeds_in_papers_direction": sum(d.mean * c.direction > 0 for d in per_seed.values()),
                "seeds_above_zero_in_papers_direction": sum(d.sign() * c.direction > 0 for d in per_seed.values()),
                "seeds_opposite_and_distinguishable": sum(d.sign() * c.direction < 0 for d in per_seed.values()),
            })
    return {"study": name, "seeds": list(seeds), "vary": list(vary), "shared_cases": shared_cases,
            "metrics": list(METRICS),
            "bootstrap": {"draws": n_boot, "seed": bootstrap_seed, "level": LEVEL,
                          "method": "bootstrap over held-out cases, expanded percentiles (Hesterberg 2015); pooled: "
                                    + ("one draw of the shared cases for every seed" if shared_cases else
                                       "cases resampled within each seed")},
            "written": _dt.datetime.now().isoformat(timespec="seconds"),
            "runs": {str(s): seed_dir(base, s).name for s in seeds},
            "models": models, "comparisons": comparisons}


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in d.items()}


def write_aggregate(base: str | Path, aggregate: Mapping[str, Any]) -> None:
    """`seeds.json` and `index.html` of a repeated study (atomic writes)."""
    base = Path(base)
    atomic_write_text(base / SEEDS_JSON, json.dumps(aggregate, indent=1) + "\n")
    atomic_write_text(base / "index.html", aggregate_html(aggregate))


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def markdown_table(aggregate: Mapping[str, Any], metric: str = "DSC") -> str:
    """Per model its held-out mean `metric` per seed and over seeds (mean ± sd): the README's table."""
    seeds = [str(s) for s in aggregate["seeds"]]
    head = f"| model | {' | '.join(f'seed {s}' for s in seeds)} | mean ± sd over seeds |"
    lines = [head, "|" + "---|" * (len(seeds) + 2)]
    for m in aggregate["models"].values():
        cells = [_num(m["per_seed"].get(s, {}).get(metric)) for s in seeds]
        mean, sd = m.get(f"{metric} mean over seeds"), m.get(f"{metric} sd over seeds")
        lines.append(f"| {m['title']} | {' | '.join(cells)} | {_num(mean)} ± {_num(sd)} |")
    return "\n".join(lines)


def markdown_comparisons(aggregate: Mapping[str, Any], metric: str = "DSC") -> str:
    """Per comparison the pooled paired difference with its interval, how many seeds agree, and the
    difference over seeds (seed as the unit) with its t interval."""
    lines = ["| comparison | pooled difference [95 % CI] | cases | seeds in the papers' direction "
             "(of them above zero) | verdict | over seeds [95 % t-CI] | verdict over seeds |",
             "|---|---|---|---|---|---|---|"]
    for c in aggregate["comparisons"]:
        if c["metric"] != metric:
            continue
        p = c["pooled"]
        lines.append(f"| {c['question']} ({c['model']} − {c['baseline']}) | {_num(p['mean'], True)} "
                     f"[{_num(p['low'], True)}, {_num(p['high'], True)}] | {p['n_cases']} | "
                     f"{c['seeds_in_papers_direction']} of {c['seeds']} ({c['seeds_above_zero_in_papers_direction']}) "
                     f"| {p['verdict']} | {_over_seeds_cell(c)} | {c.get('over_seeds', {}).get('verdict', '–')} |")
    return "\n".join(lines)


def _over_seeds_cell(c: Mapping[str, Any], sep: str = " ") -> str:
    o = c.get("over_seeds")
    if not o:
        return "–"
    return f"{_num(o['mean'], True)}{sep}[{_num(o['low'], True)}, {_num(o['high'], True)}]"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:75em;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:.6em 0 1.4em 0;font-size:14px}
th,td{border-bottom:1px solid #ddd;padding:.3em .7em;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f4f4f4}.yes{color:#1b5e20;font-weight:600}.no{color:#777}.opp{color:#b71c1c;font-weight:600}
p.note{color:#555;max-width:60em}"""


def _verdict_class(v: str) -> str:
    return "yes" if v == "as in the papers" else "opp" if v.startswith("opposite") else "no"


def aggregate_html(aggregate: Mapping[str, Any]) -> str:
    """The repeated study's page: per-seed scores, then each comparison per seed and pooled."""
    e = html.escape
    seeds = [str(s) for s in aggregate["seeds"]]
    b = aggregate["bootstrap"]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(aggregate['study'])}: "
           f"{len(seeds)} seeds</title><style>{_CSS}</style></head><body>",
           f"<h1>{e(aggregate['study'])}: the study over {len(seeds)} seeds</h1>",
           f"<p class='note'>Each seed is a complete run ({e(', '.join(aggregate['vary']))} seed set to it); "
           "its own report: " + ", ".join(f"<a href='{e(aggregate['runs'][s])}/index.html'>seed {e(s)}</a>"
                                          for s in seeds) + ".</p>"]
    for metric in aggregate["metrics"]:
        out.append(f"<h2>Held-out mean {e(metric)} per model</h2><table><tr><th>model</th>"
                   + "".join(f"<th>seed {e(s)}</th>" for s in seeds) + "<th>mean ± sd over seeds</th></tr>")
        for m in aggregate["models"].values():
            cells = "".join(f"<td>{_num(m['per_seed'].get(s, {}).get(metric))}</td>" for s in seeds)
            out.append(f"<tr><td>{e(m['title'])}</td>{cells}<td>{_num(m.get(f'{metric} mean over seeds'))} ± "
                       f"{_num(m.get(f'{metric} sd over seeds'))}</td></tr>")
        out.append("</table>")
    out.append(f"<h2>Comparisons: paired differences over held-out cases</h2><p class='note'>Each cell is the "
               f"mean per-case difference (first model minus second) with its {b['level']:.0%} "
               f"bootstrap interval over cases (expanded percentiles) ({b['draws']} draws, seed {b['seed']}); pooled: every (seed, case) "
               "pair, cases resampled within each seed. Over seeds: the mean of the per-seed differences with a "
               "t interval over seeds (the seed as the unit, so it includes how much a result moves from one "
               "cohort and training seed to the next). A difference whose interval holds 0 is not "
               "distinguishable from zero.</p>".replace("%", " %"))
    for metric in aggregate["metrics"]:
        rows = [c for c in aggregate["comparisons"] if c["metric"] == metric]
        if not rows:
            continue
        out.append(f"<h3>{e(metric)}</h3><table><tr><th>comparison</th>"
                   + "".join(f"<th>seed {e(s)}</th>" for s in seeds)
                   + "<th>pooled</th><th>seeds in the papers' direction (above zero)</th>"
                   "<th>over seeds (t interval)</th></tr>")
        for c in rows:
            cells = []
            for s in [*seeds, None]:
                d = c["pooled"] if s is None else c["per_seed"].get(s)
                if d is None:
                    cells.append("<td>–</td>")
                    continue
                cells.append(f"<td class='{_verdict_class(d['verdict'])}'>{_num(d['mean'], True)}<br>"
                             f"[{_num(d['low'], True)}, {_num(d['high'], True)}]</td>")
            out.append(f"<tr><td>{e(c['question'])}<br><small>{e(c['model'])} − {e(c['baseline'])}</small></td>"
                       + "".join(cells) + f"<td>{c['seeds_in_papers_direction']} of {c['seeds']} "
                       f"({c['seeds_above_zero_in_papers_direction']})</td>"
                       f"<td class='{_verdict_class(c.get('over_seeds', {}).get('verdict', ''))}'>"
                       f"{_over_seeds_cell(c, '<br>')}</td></tr>")
        out.append("</table>")
    out.append(f"<p class='note'>Written {e(aggregate['written'])}. Machine-readable: {SEEDS_JSON}.</p></body></html>")
    return "\n".join(out)


def readme_tables(seeds_json: str | Path) -> str:
    """The README's tables (models per seed, comparisons pooled over seeds; DSC then NSD) from a
    `seeds.json`: `python -m flare_utils.study.repeat docs/results/demo_seeds.json` prints them."""
    aggregate = json.loads(Path(seeds_json).read_text())
    parts = []
    for metric in aggregate["metrics"]:
        parts += [f"Held-out mean {metric} per seed:", "", markdown_table(aggregate, metric), "",
                  f"Paired {metric} differences, pooled over the seeds:", "", markdown_comparisons(aggregate, metric), ""]
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    import sys
    print(readme_tables(sys.argv[1]), end="")
