"""One self-contained HTML page that summarises a study's run folder (``<run_dir>/index.html``).

Collaborators get a run as an e-mail attachment or a zipped folder, so the page must open on
its own: pictures are embedded as base64 ``data:`` URIs, the stage notebooks' HTML reports are
linked with paths relative to the run folder (they keep working wherever the folder is copied),
the CSS is inline and there is no JavaScript.

Everything here only *reads* what the stages wrote (params.yaml, provenance.json, stages.json,
models.json, evaluation/, inference/, selection/, pseudo_labels/report/, learning curves); no
metric is computed except the comparison table's mean ± std over cases and the paired per-case
differences with their bootstrap intervals (flare_utils.evaluation.compare), both taken from each
model's per-case CSV. A run may be partial: a section whose inputs are missing says in one line
why ("not run in this study", "stage failed: see ..."), and a section whose input cannot be read
says that, so one broken file never costs the whole page.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import yaml

from flare_utils.data.io import atomic_write_text
from flare_utils.evaluation.compare import (COMPARISONS, LEVEL, MIN_CASES, N_BOOT, PairedDifference, case_scores,
                                            run_comparisons)
from flare_utils.layout import RunLayout
from flare_utils.study.params import STUDENT_VARIANTS
from flare_utils.semisup.selection import SUMMARY_FILE as SELECTION_SUMMARY
from flare_utils.study.report import PER_CASE_CSV, quality_per_round_figure, slug
from flare_utils.study.models import CANONICAL_ORDER as CANONICAL_MODELS

__all__ = ["CANONICAL_MODELS", "COMPARISON_PAIRS", "INDEX_NAME", "StageUnit", "build_index_html",
           "comparison_findings", "comparison_table", "paired_difference_table", "read_stages", "write_index"]

INDEX_NAME = "index.html"
# The Table-5 comparison's rows come in CANONICAL_MODELS order; other models follow in file order.
# (model, baseline, sentence start): the comparisons that answer "do pseudo labels help?".
COMPARISON_PAIRS = (
    ("student_selected", "student_labelled_only", "Student with selected pseudo labels vs student labelled only"),
    ("teacher_pseudo", "teacher", "Teacher with pseudo labels vs teacher labelled only"),
    ("student_selected", "student_all", "Student with selected pseudo labels vs student with all pseudo labels"),
)
COMPARISON_COLUMNS = ["title", "training data", "cases", "DSC mean", "DSC std", "NSD mean", "NSD std"]
MAX_EMBED_BYTES = 4 * 1024 * 1024     # larger pictures are linked, not embedded (the page stays mailable)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:72em;
     padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.1em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
.sub{color:#666;margin-top:0}nav a{margin-right:1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{padding:.25em .7em;border-bottom:1px solid #e2e2e2;text-align:left;vertical-align:top}
thead th{background:#f3f3f3}
.badge{display:inline-block;padding:0 .6em;border-radius:.8em;color:#fff;font-size:.85em}
.done{background:#2e7d32}.failed{background:#c62828}.skipped{background:#757575}
.pending{background:#ef8f00}.running{background:#1565c0}.interrupted{background:#6a1b9a}.unknown{background:#9e9e9e}
.missing{color:#777;font-style:italic}.findings li{margin:.2em 0}
figure{display:inline-block;margin:.4em 1em .8em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555;max-width:60em}img{max-width:100%}img.small{max-width:30em}
p.caption{font-size:.88em;color:#555;max-width:60em;margin-top:.2em}
pre{background:#f7f7f7;padding:.7em;overflow-x:auto;font-size:.85em}
"""


def _e(x: Any) -> str:
    """HTML-escaped text of anything (quotes too: the text may land in an attribute)."""
    return html.escape("" if x is None else str(x), quote=True)


# ----------------------------------------------------------------------------------------------
# reading the run folder

def _read_json(path: Path) -> Any:
    """The parsed JSON file, or None when it does not exist (a corrupt file raises)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_csv(path: Path, **kw) -> pd.DataFrame | None:
    return pd.read_csv(path, **kw) if path.is_file() else None


def _inside(run: Path, p: str | Path | None) -> str | None:
    """`p` (relative to the run folder, or absolute) as a POSIX path relative to the run folder,
    or None when it lies outside it (a link out of the folder breaks once the folder is sent)."""
    if not p:
        return None
    path = Path(p)
    full = path if path.is_absolute() else run / path
    try:
        return full.resolve().relative_to(run.resolve()).as_posix()
    except ValueError:
        return None


@dataclass(frozen=True)
class StageUnit:
    """One entry of stages.json; `report` is the relative path of its existing HTML, if any."""
    unit: str
    stage: str
    status: str
    seconds: float | None
    message: str | None
    notebook: str | None
    report: str | None
    peak_ram_mib: float | None = None
    peak_gpu_mib: float | None = None


def read_stages(run_dir: str | Path) -> list[StageUnit]:
    """The units of stages.json (empty when the file is missing), with each unit's report link.

    The link is the "html" entry when that file exists in the run folder; otherwise the rendered
    notebook beside "notebook" (its .partial.html first for a failed unit). Absolute paths (older
    runners wrote them) are made relative to the run folder. A "running" unit whose runner is gone
    (no live holder of the run's lock) reads "interrupted".
    """
    run = Path(run_dir)
    entries = _read_json(RunLayout(run).stages_file) or []
    from flare_utils.study.lock import holder_alive, read_lock
    runner_alive = holder_alive(read_lock(run))
    if isinstance(entries, dict):          # {"units": [...]} or {unit: {...}}
        entries = entries.get("units") or [{"unit": k, **v} for k, v in entries.items() if isinstance(v, dict)]
    units = []
    for d in entries:
        unit = str(d.get("unit") or d.get("stage") or "?")
        stage = str(d.get("stage") or unit.split(":")[0])
        status = str(d.get("status") or "unknown").lower()
        message = d.get("message")
        if status == "running" and not runner_alive:
            status, message = "interrupted", "the run stopped during this stage (its process is gone)"
        nb = d.get("notebook")
        candidates = [d.get("html")]
        if nb:
            partial = Path(nb).with_name(Path(nb).stem + ".partial.html")
            full = Path(nb).with_suffix(".html")
            candidates += [partial, full] if status == "failed" else [full, partial]
        report = next((rel for rel in (_inside(run, c) for c in candidates) if rel and (run / rel).is_file()), None)
        seconds = d.get("seconds")
        units.append(StageUnit(unit, stage, status, float(seconds) if seconds is not None else None,
                               message, _inside(run, nb) or (str(nb) if nb else None), report,
                               _number(d.get("peak_ram_mib")), _number(d.get("peak_gpu_mib"))))
    return units


def _link(rel: str, text: str | None = None) -> str:
    return f'<a href="{_e(quote(rel))}">{_e(text or rel)}</a>'


def _not_available(units: list[StageUnit], stage: str, what: str, file: str, unit: str | None = None) -> str:
    """The one line a section shows instead of its content: why `what` (read from `file`, relative to
    the run folder) is not there, judged from the status of the stage (or unit) that writes it."""
    mine = [u for u in units if stage in (u.stage, u.unit.split(":")[0])]
    if unit is not None:
        mine = [u for u in mine if u.unit == unit] or [u for u in mine if ":" not in u.unit]
    failed = [u for u in mine if u.status == "failed"]
    if failed:
        u = failed[0]
        see = _link(u.report) if u.report else _e(u.notebook or f"the {u.unit} stage's notebook")
        why = f" ({_e(u.message)})" if u.message else ""
        text = f"{_e(what)}: stage failed: see {see}{why}"
    elif any(u.status == "done" for u in mine):
        text = f"{_e(what)}: not produced, although the stage ran ({_e(file)} is missing)"
    elif any(u.status == "running" for u in mine):
        text = f"{_e(what)}: the stage is running now"
    elif any(u.status == "interrupted" for u in mine):
        text = f"{_e(what)}: the stage was interrupted; run the study again to finish it"
    elif any(u.status == "pending" for u in mine):
        text = f"{_e(what)}: not run yet (stage pending)"
    elif any(u.status == "skipped" for u in mine):
        text = f"{_e(what)}: skipped in this study"
    else:
        text = f"{_e(what)}: not run in this study"
    return f'<p class="missing">{text}</p>'


# ----------------------------------------------------------------------------------------------
# the Table-5-like comparison

def _mean_std(v: np.ndarray) -> tuple[float, float]:
    return (float(v.mean()), float(v.std(ddof=0))) if len(v) else (math.nan, math.nan)


def _models(run: Path) -> dict[str, dict]:
    models = _read_json(RunLayout(run).models_file) or {}
    return {str(k): (v if isinstance(v, dict) else {}) for k, v in models.items()}


def _ordered(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in CANONICAL_MODELS if n in names] + [n for n in names if n not in CANONICAL_MODELS]


def _titles(run: Path) -> dict[str, str]:
    return {name: str(m.get("title") or name) for name, m in _models(run).items()}


def comparison_table(run_dir: str | Path) -> pd.DataFrame:
    """Table 5 of the FLARE22 winner's paper for this run: one row per model (canonical order).

    Index: model name. Columns: title, training data, cases, DSC mean, DSC std, NSD mean, NSD std.
    Mean and std are over the held-out cases of each case's organ-averaged score (population std,
    ddof=0, as flare_utils.evaluation.evaluate), from evaluation/<folder>/metrics_per_case.csv. Without that
    file the mean comes from overview.csv (or the folder's summary.json) and the std is NaN. A model
    of models.json that was not evaluated has 0 cases and NaN scores.
    """
    run = Path(run_dir)
    models = _models(run)
    ev = RunLayout(run).evaluation
    overview = _read_csv(ev / "overview.csv")
    if overview is not None and "set" in overview.columns:
        overview = overview.assign(set=overview["set"].astype(str)).set_index("set")
    else:
        overview = None
    rows = {}
    for name in _ordered([*models, *(overview.index if overview is not None else [])]):
        m = models.get(name, {})
        ov = overview.loc[name] if overview is not None and name in overview.index else None
        if isinstance(ov, pd.DataFrame):
            ov = ov.iloc[0]
        row = {"title": str(m.get("title") or name),
               "training data": str(m.get("training_data") or m.get("training data") or ""),
               "cases": 0, "DSC mean": math.nan, "DSC std": math.nan, "NSD mean": math.nan, "NSD std": math.nan}
        folders = [str(ov["folder"])] if ov is not None and pd.notna(ov.get("folder")) else []
        folders += [slug(name), name]
        folder = next((ev / f for f in folders if (ev / f / PER_CASE_CSV).is_file()), None)
        if folder is not None:
            per_case = pd.read_csv(folder / PER_CASE_CSV)
            row["cases"] = len(per_case)
            for metric in ("DSC", "NSD"):
                row[f"{metric} mean"], row[f"{metric} std"] = _mean_std(case_scores(per_case, metric).to_numpy())
        elif ov is not None:
            row["cases"] = int(ov.get("cases", 0) or 0)
            row["DSC mean"] = float(ov.get("mean DSC", math.nan))
            row["NSD mean"] = float(ov.get("mean NSD", math.nan))
        else:
            summary = next((s for s in (_read_json(ev / f / "summary.json") for f in folders) if s),
                           None)
            if summary:
                row["cases"] = int(summary.get("n_cases") or 0)
                row["DSC mean"] = float(summary.get("mean_dsc") if summary.get("mean_dsc") is not None else math.nan)
                row["NSD mean"] = float(summary.get("mean_nsd") if summary.get("mean_nsd") is not None else math.nan)
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=COMPARISON_COLUMNS)
    table.index.name = "model"
    return table.astype({"cases": int, **{c: float for c in COMPARISON_COLUMNS[3:]}})


def _diff(metric: str, a: float, b: float) -> str:
    d = round(a - b, 3)
    sign = "+" if d > 0 else "-" if d < 0 else "±"
    return f"{metric} {sign}{abs(d):.3f} ({a:.3f} vs {b:.3f})"


def comparison_findings(table: pd.DataFrame) -> list[str]:
    """One plain sentence per comparison of COMPARISON_PAIRS whose two models both have a DSC.

    States the signed difference and both values (3 decimals), says when the difference is
    smaller than the spread over cases, and when the two were scored on different case counts.
    """
    out = []
    for a, b, lead in COMPARISON_PAIRS:
        if a not in table.index or b not in table.index:
            continue
        ra, rb = table.loc[a], table.loc[b]
        if not (np.isfinite(ra["DSC mean"]) and np.isfinite(rb["DSC mean"])):
            continue
        parts = [_diff("DSC", ra["DSC mean"], rb["DSC mean"])]
        if np.isfinite(ra["NSD mean"]) and np.isfinite(rb["NSD mean"]):
            parts.append(_diff("NSD", ra["NSD mean"], rb["NSD mean"]))
        text = f"{lead}: {', '.join(parts)}"
        ca, cb = int(ra["cases"]), int(rb["cases"])
        text += f"; {ca} held-out cases" if ca == cb else f"; {ca} vs {cb} held-out cases (not the same test set)"
        stds = [s for s in (ra["DSC std"], rb["DSC std"]) if np.isfinite(s)]
        if stds and abs(ra["DSC mean"] - rb["DSC mean"]) < max(stds):
            text += f"; the DSC difference is smaller than the spread over cases (std up to {max(stds):.3f})"
        out.append(text + ".")
    return out


PAIRED_COLUMNS = ["comparison", "metric", "difference [95 % CI]", "cases", "verdict"]
PAIRED_SEED = 0          # the bootstrap's seed: the same run folder always gives the same intervals
PAIRED_CAPTION = (
    "Each difference is the mean, over the held-out cases both models were scored on, of the per-case "
    "difference of the organ-averaged score (first model minus second), with its {level:.0%} confidence "
    "interval from a bootstrap over cases (expanded percentiles) ({n_boot} draws, seed {seed}); a difference whose "
    "interval holds 0 is not distinguishable from zero at this scale."
).format(level=LEVEL, n_boot=f"{N_BOOT:,}".replace(",", "\u00a0"), seed=PAIRED_SEED).replace("%", "\u00a0%")


def _signed(x: float, zero: str = "±") -> str:
    """A difference with its sign and 3 decimals; `zero` + 0.000 when it rounds to zero (± as _diff)."""
    if not math.isfinite(x):
        return "n/a"
    d = round(x, 3)
    return f"{'+' if d > 0 else '-' if d < 0 else zero}{abs(d):.3f}"


def paired_difference_table(run_dir: str | Path, titles: dict[str, str] | None = None) -> pd.DataFrame:
    """The paired differences the index shows under the Table-5 comparison.

    One row per comparison of flare_utils.evaluation.compare.COMPARISONS and metric (DSC, then NSD)
    whose two models were both scored on at least one common held-out case, in COMPARISONS order.
    Columns (PAIRED_COLUMNS): comparison (the question, then both models by title), metric, the mean
    per-case difference with its bootstrap interval ("+0.012 [-0.004, +0.027]", 3 decimals), cases,
    and the verdict: "not distinguishable from zero" when the interval holds 0, otherwise "above
    zero" / "below zero" followed by whether that is the papers' direction.
    """
    titles = titles if titles is not None else _titles(Path(run_dir))
    found = run_comparisons(run_dir, ("DSC", "NSD"), n_boot=N_BOOT, seed=PAIRED_SEED)
    if found.empty:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    order = {(c.model, c.baseline): i for i, c in enumerate(COMPARISONS)}
    found = found[found["cases"] > 0]
    found = found.assign(_pair=[order.get((m, b), len(order)) for m, b in zip(found["model"], found["baseline"])],
                         _metric=[0 if m == "DSC" else 1 for m in found["metric"]])
    rows = []
    for _, row in found.sort_values(["_pair", "_metric"], kind="stable").iterrows():
        d = PairedDifference(int(row["cases"]), float(row["difference"]), float(row["ci_low"]),
                             float(row["ci_high"]))
        bounded = math.isfinite(d.low) and math.isfinite(d.high)
        interval = (f"[{_signed(d.low, '')}, {_signed(d.high, '')}]" if bounded else
                    f"[no interval from fewer than {MIN_CASES} cases]")
        sign = d.sign()
        verdict = (f"too few cases to tell (fewer than {MIN_CASES})" if d.too_few_cases else
                   "not distinguishable from zero" if sign == 0
                   else f"{'above' if sign > 0 else 'below'} zero, {row['verdict']}")
        model, baseline = str(row["model"]), str(row["baseline"])
        rows.append({"comparison": f"{row['question']} ({titles.get(model, model)} vs "
                                   f"{titles.get(baseline, baseline)})",
                     "metric": str(row["metric"]), "difference [95 % CI]": f"{_signed(d.mean)} {interval}",
                     "cases": d.n_cases, "verdict": verdict})
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


# ----------------------------------------------------------------------------------------------
# HTML pieces

def _num(x: float) -> str:
    """Scores keep 4 decimals, large figures (seconds, MiB) one."""
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.4f}"


def _table(df: pd.DataFrame, cls: str = "data", index: bool = True) -> str:
    if index and df.index.name and df.columns.nlevels == 1:
        df = df.rename_axis(index=None, columns=df.index.name)   # index name in the corner, not a row
    return df.to_html(classes=cls, border=0, escape=True, index=index, na_rep="n/a", float_format=_num)


def _kv_table(items: Iterable[tuple[str, Any]]) -> str:
    def text(v: Any) -> str:
        return "none" if v is None else _num(v) if isinstance(v, float) and math.isfinite(v) else str(v)
    df = pd.DataFrame([(k, text(v)) for k, v in items], columns=["", "value"])
    return df.to_html(classes="kv", border=0, escape=True, index=False, header=False)


def _picture(run: Path, rel: str, caption: str | None = None, small: bool = False) -> str:
    """A <figure> with the PNG embedded (a relative link instead when it is too large to mail)."""
    path = run / rel
    cap = f"<figcaption>{_e(caption or rel)}</figcaption>"
    if path.stat().st_size > MAX_EMBED_BYTES:
        return f"<figure>{_link(rel)} (too large to embed){cap}</figure>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cls = ' class="small"' if small else ""
    return f'<figure><img{cls} src="data:image/png;base64,{data}" alt="{_e(caption or rel)}">{cap}</figure>'


def _pictures(run: Path, rels: Iterable[str], small: bool = False,
              captions: dict[str, str] | None = None) -> str:
    captions = captions or {}
    return "".join(_picture(run, r, captions.get(r), small=small) for r in rels if (run / r).is_file())


def _figure_html(fig, caption: str, dpi: int = 110) -> str:
    """A <figure> with a matplotlib Figure drawn here, embedded as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _number(v: Any) -> float | None:
    try:
        return None if v is None or isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        return None


def _fmt_gib(mib: float | None) -> str:
    return "" if mib is None else f"{mib / 1024:.2f} GiB"


def _fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "not evaluated"
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f} (std n/a)"


@dataclass
class _Run:
    """What every section needs: the folder, its stage units and the models' titles."""
    root: Path
    units: list[StageUnit]
    titles: dict[str, str]
    stages_error: str | None = None    # why stages.json could not be read

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.root)

    def rel(self, path: Path) -> str:
        """A file of the run as the relative link the page uses."""
        return self.layout.relative(path)

    def missing(self, stage: str, what: str, file: str, unit: str | None = None) -> str:
        return _not_available(self.units, stage, what, file, unit)


# ----------------------------------------------------------------------------------------------
# sections: each returns its HTML body; build_index_html adds the heading

def _section_study(r: _Run) -> str:
    parts = []
    params_path = r.layout.params_file
    if params_path.is_file():
        text = params_path.read_text(encoding="utf-8")
        try:
            params = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            params = {}
            parts.append(f'<p class="missing">params.yaml is not valid YAML: {_e(err)}</p>')
        if isinstance(params, dict):
            parts.append(_kv_table([(k, params[k]) for k in ("name", "seed", "device", "stages") if k in params]))
        parts.append(f"<details><summary>params.yaml</summary><pre>{_e(text)}</pre></details>")
    else:
        parts.append('<p class="missing">params.yaml: not written (the runner did not start this study)</p>')
    prov = _read_json(r.layout.provenance_file)
    if isinstance(prov, dict):
        git = prov.get("git") or {}
        dev = prov.get("device") or {}
        items = [(k, prov.get(k)) for k in ("started", "command", "python", "platform", "hostname") if k in prov]
        if git:
            dirty = {True: " (uncommitted changes)", False: "", None: ""}.get(git.get("dirty"), "")
            items.append(("git", f"{git.get('commit') or 'not a git checkout'}{dirty}"))
        if dev:
            items.append(("device", f"{dev.get('requested', '?')} → {dev.get('resolved', '?')}"))
            items += [(f"device {k}", dev[k]) for k in ("cpu", "gpu", "torch_threads") if k in dev]
        if prov.get("seeds"):
            items.append(("seeds", ", ".join(f"{k}={v}" for k, v in prov["seeds"].items())))
        for i, (pkg, version) in enumerate((prov.get("packages") or {}).items()):
            items.append(("packages" if i == 0 else "", f"{pkg} {version}"))     # one line each
        parts.append("<h3>Provenance</h3>" + _kv_table(items))
    else:
        parts.append('<p class="missing">provenance.json: not written</p>')
    return "".join(parts)


def _section_stages(r: _Run) -> str:
    if r.stages_error:
        return f'<p class="missing">stages.json could not be read: {_e(r.stages_error)}</p>'
    if not r.units:
        return '<p class="missing">stages.json: no stage has been run (or recorded) yet</p>'
    # Badges and links are markup, so this one table is built by hand; every text is escaped.
    any_gpu = any(u.peak_gpu_mib is not None for u in r.units)
    rows = []
    for u in r.units:
        status = u.status if u.status in ("done", "failed", "skipped", "pending", "running", "interrupted") else "unknown"
        report = _link(u.report) if u.report else '<span class="missing">no report</span>'
        message = f"<br>{_e(u.message)}" if u.message else ""
        gpu = f"<td>{_fmt_gib(u.peak_gpu_mib)}</td>" if any_gpu else ""
        rows.append(f"<tr><td>{_e(u.unit)}</td><td><span class=\"badge {status}\">{_e(u.status)}</span></td>"
                    f"<td>{_fmt_seconds(u.seconds)}</td><td>{_fmt_gib(u.peak_ram_mib)}</td>{gpu}"
                    f"<td>{report}{message}</td></tr>")
    gpu_head = "<th>peak GPU memory</th>" if any_gpu else ""
    return ('<table class="stages"><thead><tr><th>unit</th><th>status</th><th>time</th><th>peak RAM</th>'
            f'{gpu_head}<th>report</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '<p class="caption">Peak RAM: the most memory the stage\'s processes (runner, notebook kernel, '
            'data-augmentation and pool workers) held at once, summed over them as proportional set size '
            '(pages they share counted once), sampled every 0.5 s. A skipped stage shows the time and memory '
            'of the run that made it.</p>')


def _section_comparison(r: _Run) -> str:
    table = comparison_table(r.root)
    if table.empty or not table["DSC mean"].notna().any():
        return r.missing("evaluate", "Held-out scores of the models", r.rel(r.layout.evaluation / "overview.csv"))
    shown = pd.DataFrame({
        "model": table["title"],
        "training data": table["training data"],
        "mean DSC": [_pm(m, s) for m, s in zip(table["DSC mean"], table["DSC std"])],
        "mean NSD": [_pm(m, s) for m, s in zip(table["NSD mean"], table["NSD std"])],
        "held-out cases": table["cases"],
    })
    findings = comparison_findings(table)
    lines = "".join(f"<li>{_e(f)}</li>" for f in findings) or \
        "<li>No pair of models to compare (the pairs are: " + \
        _e("; ".join(lead for _, _, lead in COMPARISON_PAIRS)) + ").</li>"
    return (_table(shown, index=False)
            + "<p class=\"sub\">Mean ± std over held-out cases of each case's organ-averaged score "
              "(population std).</p>"
            + f'<ul class="findings">{lines}</ul>'
            + _paired_differences(r))


def _paired_differences(r: _Run) -> str:
    """The paired-difference table with its one-sentence explanation; nothing when no two compared
    models were both evaluated (the findings above already say so)."""
    try:
        paired = paired_difference_table(r.root, r.titles)
    except Exception as err:  # noqa: BLE001 - the Table-5 comparison above stays readable
        return (f'<p class="missing">Paired differences over held-out cases: could not be computed '
                f"({_e(type(err).__name__)}: {_e(err)})</p>")
    if paired.empty:
        return ""
    return ("<h3>Paired differences over held-out cases</h3>"
            f'<p class="caption">{_e(PAIRED_CAPTION)}</p>' + _plain_table(paired, index=False))


def _renamed(df: pd.DataFrame, titles: dict[str, str]) -> pd.DataFrame:
    return df.rename(columns=lambda c: titles.get(str(c), c))


def _section_organs(r: _Run) -> str:
    ev = r.layout.evaluation
    parts = []
    for metric in ("DSC", "NSD"):
        df = _read_csv(ev / f"organ_table_{metric}.csv", index_col=0)
        if df is None:
            parts.append(r.missing("evaluate", f"{metric} per organ", r.rel(ev / f"organ_table_{metric}.csv")))
        else:
            parts.append(f"<h3>{metric} per organ (mean ± std over cases)</h3>" + _table(_renamed(df, r.titles)))
    captions = {r.rel(ev / f"box_{m}.png"): f"{m} of each held-out case, one panel per organ and one box per model "
                                             f"(median, quartiles, whiskers to 1.5 IQR) — {r.rel(ev / f'box_{m}.png')}"
                for m in ("DSC", "NSD")}
    parts.append(_pictures(r.root, list(captions), captions=captions))
    return "".join(parts)


# Human names of the efficiency table's columns (flare_utils.study.report.efficiency_table) and of the
# inference summary's (flare_utils.inference.runs.predict_models); MiB columns are shown in GiB.
EFFICIENCY_COLUMNS = {
    "device": "device", "cases": "cases", "time (s)": "time per case (s)", "peak RAM (MiB)": "peak RAM (GiB)",
    "CPU util mean (%)": "CPU use, mean (%)", "CPU AUC (%·s)": "CPU use × time (%·s)",
    "GPU peak (MiB)": "peak GPU memory (GiB)", "GPU AUC (MiB·s)": "GPU memory × time (MiB·s)",
}
INFERENCE_COLUMNS = {
    "cases": "cases", "predicted now": "predicted in this run", "windows_evaluated": "windows run",
    "windows_nnunet_full": "windows of nnU-Net's full tiling", "mean_total_s": "time per case (s)",
    "mean_network_s": "network time per case (s)", "peak_rss_mib": "peak RAM (GiB)",
}
WINDOWS_CAPTION = (
    "Windows are summed over the cases. \u201cwindows run\u201d counts the network evaluations of the efficient "
    "sliding window (the FLARE22 winner's): along the head-foot axis it steps like nnU-Net, and at each step it "
    "runs the window at the body's in-plane centre and, only when that window finds an organ, its 8 neighbours "
    "(a 3\u00d73 band two patches wide). \u201cwindows of nnU-Net's full tiling\u201d is what nnU-Net's own "
    "sliding window (half-patch overlap over the whole image) would run on the same images.")
WINDOWS_MORE = (
    " Here the efficient scheme ran more windows than the full tiling: on small images (such as the demo's "
    "8 mm scans, narrower than two patches) nnU-Net's tiling needs only a few in-plane positions while the "
    "3\u00d73 band still places up to 9, clamped to the image. The saving shows on full-resolution scans, many "
    "patches wide, where the full tiling runs several times more windows than the band.")
WINDOWS_FEWER = " On full-resolution scans the gap is larger: the full tiling grows with the body's width, the band does not."


def _gib(v: Any) -> Any:
    """MiB as GiB with 2 decimals; text (e.g. "not measured") unchanged."""
    x = pd.to_numeric(v, errors="coerce")
    return round(float(x) / 1024.0, 2) if pd.notna(x) else v


def _short_float(v: Any) -> Any:
    """Seconds and percentages with two significant decimals at most (text unchanged)."""
    x = pd.to_numeric(v, errors="coerce")
    if pd.isna(x) or isinstance(v, (int, np.integer)):
        return v
    return round(float(x), 2 if abs(x) < 10 else 1)


def _plain_table(df: pd.DataFrame, index: bool = True) -> str:
    """Like _table, but numbers as they are (already rounded) rather than 4 decimals."""
    if index and df.index.name and df.columns.nlevels == 1:
        df = df.rename_axis(index=None, columns=df.index.name)
    return df.to_html(classes="data", border=0, escape=True, index=index, na_rep="n/a",
                      float_format=lambda x: f"{x:g}")


def efficiency_display(eff: pd.DataFrame, titles: dict[str, str]) -> pd.DataFrame:
    """evaluation/efficiency_table.csv as the index shows it: models by title, human column names, GiB."""
    out = eff.copy()
    out.index = [titles.get(str(i), i) for i in out.index]
    out.index.name = "model"
    for col in out.columns:
        if "MiB)" in col and "MiB·s" not in col:
            out[col] = [_gib(v) for v in out[col]]
        elif col not in ("device", "cases"):
            out[col] = [_short_float(v) for v in out[col]]
    return out.rename(columns=EFFICIENCY_COLUMNS)


def inference_display(inf: pd.DataFrame, titles: dict[str, str]) -> pd.DataFrame:
    """inference/summary.csv as the index shows it: one row per model (by title), human column names,
    the share of nnU-Net's windows, GiB; "predicted in this run" only when some cases were reused."""
    out = inf.copy()
    if "model" in out.columns:
        out = out.set_index("model")
    out.index = [titles.get(str(m), m) for m in out.index]
    out.index.name = "model"
    if "predicted now" in out.columns and "cases" in out.columns and (out["predicted now"] == out["cases"]).all():
        out = out.drop(columns="predicted now")
    if "peak_rss_mib" in out.columns:
        out["peak_rss_mib"] = [_gib(v) for v in out["peak_rss_mib"]]
    for col in ("mean_total_s", "mean_network_s"):
        if col in out.columns:
            out[col] = [_short_float(v) for v in out[col]]
    if {"windows_evaluated", "windows_nnunet_full"} <= set(out.columns):
        full = pd.to_numeric(out["windows_nnunet_full"], errors="coerce")
        share = pd.to_numeric(out["windows_evaluated"], errors="coerce") / full.where(full > 0)
        out.insert(out.columns.get_loc("windows_nnunet_full") + 1, "windows run / full tiling (%)",
                   [round(100 * v) if pd.notna(v) else "n/a" for v in share])
    return out.rename(columns=INFERENCE_COLUMNS)


def windows_caption(inf: pd.DataFrame) -> str:
    """The sentence under the inference table that explains the two window counts."""
    text = WINDOWS_CAPTION
    if {"windows_evaluated", "windows_nnunet_full"} <= set(inf.columns):
        run = pd.to_numeric(inf["windows_evaluated"], errors="coerce")
        full = pd.to_numeric(inf["windows_nnunet_full"], errors="coerce")
        if (run > full).any():
            text += WINDOWS_MORE
        elif (run < full).any():
            text += WINDOWS_FEWER
    return text


def _section_efficiency(r: _Run) -> str:
    parts = []
    eff = _read_csv(r.layout.evaluation / "efficiency_table.csv", index_col=0)
    if eff is None:
        parts.append(r.missing("evaluate", "Efficiency table (time, RAM, CPU/GPU)",
                                r.rel(r.layout.evaluation / "efficiency_table.csv")))
    else:
        parts.append("<h3>Efficiency (mean per case)</h3>" + _plain_table(efficiency_display(eff, r.titles))
                     + '<p class="caption">As the FLARE22 challenge measured it, per case: wall-clock time, peak '
                       "resident memory, CPU use (mean, and its area under the curve) and GPU memory "
                       "(\u201cnot measured\u201d on a CPU run).</p>")
    inf = _read_csv(r.layout.inference / "summary.csv")
    if inf is None:
        parts.append(r.missing("infer", "Inference summary", r.rel(r.layout.inference / "summary.csv")))
    else:
        parts.append("<h3>Inference</h3>" + _plain_table(inference_display(inf, r.titles))
                     + f'<p class="caption">{_e(windows_caption(inf))}</p>')
    return "".join(parts)


SELECTION_KEYS = {
    "n_cases": "unlabelled cases scored", "n_selected": "selected", "n_rejected": "rejected",
    "n_infinite": "unstable (u infinite: a round found no organ)", "n_empty_last": "empty in the last round",
    "u_min": "u, smallest", "u_median": "u, median", "u_max_finite": "u, largest finite",
}


TRUTH_KEYS = {
    "n_cases": "cases with ground truth", "quality_column": "quality measure", "spearman_rho": "Spearman rho(u, 1 - DSC)",
    "spearman_p": "Spearman p value", "n_selected": "selected", "n_rejected": "rejected",
    "mean_quality_selected": "mean DSC of the selected", "mean_quality_rejected": "mean DSC of the rejected",
}


def _rule_text(rule: Any) -> str:
    if isinstance(rule, dict):
        kind = rule.get("rule")
        if kind == "threshold":
            return f"u < {rule.get('threshold')}"
        if kind == "fraction":
            return f"most stable fraction {rule.get('fraction')}"
        return ", ".join(f"{k}={v}" for k, v in rule.items())
    return str(rule)


def _section_selection(r: _Run) -> str:
    sel = r.layout.selection
    summary = _read_json(sel / SELECTION_SUMMARY)
    if not isinstance(summary, dict):
        return r.missing("select", "Pseudo-label selection", r.rel(sel / SELECTION_SUMMARY))
    parts = [_kv_table([("rule", _rule_text(summary.get("rule")))]
                       + [(label, summary[k]) for k, label in SELECTION_KEYS.items() if k in summary])]
    truth = _read_json(sel / "selection_vs_truth.json")
    if isinstance(truth, dict):
        sentence = []
        qs, qr = truth.get("mean_quality_selected"), truth.get("mean_quality_rejected")
        if qs is not None and qr is not None:
            sentence.append(f"Selected pseudo labels have mean DSC {qs:.3f} against the truth, "
                            f"rejected ones {qr:.3f}.")
        rho = truth.get("spearman_rho")
        if rho is not None:
            sentence.append(f"Spearman rho(u, 1 - DSC) = {rho:.3f} over {truth.get('n_cases')} cases "
                            "(positive: the unstable cases are the worse ones).")
        parts.append("<h3>Selection against the truth</h3>"
                     + (f"<p>{_e(' '.join(sentence))}</p>" if sentence else "")
                     + _kv_table((TRUTH_KEYS.get(k, k), v) for k, v in truth.items()))
    else:
        parts.append('<p class="missing">Selection against the truth: not measured (no ground truth '
                     "for the unlabelled cases)</p>")
    parts.append(_pictures(r.root, [r.rel(sel / "u_histogram.png"), r.rel(sel / "u_vs_dsc.png")]))
    return "".join(parts)


def _section_pseudo(r: _Run) -> str:
    report_dir = r.layout.pseudo_report
    df = _read_csv(report_dir / "quality_per_round.csv", index_col=0)
    per_case = _read_csv(report_dir / "quality_per_case.csv")
    if df is None and per_case is None:
        return r.missing("pseudo", "Pseudo-label DSC against the truth per round",
                         r.rel(report_dir / "quality_per_round.csv"))
    parts = ["<p>Mean DSC of the pseudo labels against the truth (known for the synthetic cohort's "
             "\u201cunlabelled\u201d cases), per round.</p>"]
    if per_case is not None and {"round", "mean_dsc"} <= set(per_case.columns) and per_case["mean_dsc"].notna().any():
        fig = quality_per_round_figure(per_case)
        parts.append(_figure_html(fig, "Each dot is a case; the points are the means with their 95 % confidence "
                                       "interval (t distribution). The axis spans the whole DSC range 0-1."))
    if df is not None:
        df = df.rename(columns={"mean": "mean DSC", "std": "std", "count": "cases"})
        df.index.name = df.index.name or "round"
        parts.append(_table(df))
    return "".join(parts)


def _section_overlays(r: _Run) -> str:
    ev = r.layout.evaluation
    rels = [r.rel(p) for which in ("best", "worst") for p in sorted(ev.glob(f"overlay_{which}_*.png"))]
    if not rels:
        return r.missing("evaluate", "Best and worst case pictures", r.rel(ev) + "/overlay_best_*.png")
    return _pictures(r.root, rels)


def _section_curves(r: _Run) -> str:
    parts = []
    teacher = r.rel(r.layout.teacher / "learning_curves.png")
    parts.append(_picture(r.root, teacher, "teacher") if (r.root / teacher).is_file()
                 else r.missing("teacher", "Teacher learning curves", teacher))
    found = {p.name for p in r.layout.student_training.glob("*") if p.is_dir()}
    for variant in [*STUDENT_VARIANTS, *sorted(found - set(STUDENT_VARIANTS))]:
        rel = r.rel(r.layout.student(variant) / "learning_curves.png")
        parts.append(_picture(r.root, rel, f"student, {variant.replace('_', ' ')}")
                     if (r.root / rel).is_file()
                     else r.missing("student", f"Student ({variant.replace('_', ' ')}) learning curves", rel,
                                    unit=f"student:{variant}"))
    return "".join(parts)


SECTIONS: tuple[tuple[str, str, Callable[[_Run], str]], ...] = (
    ("study", "Study", _section_study),
    ("stages", "Stages", _section_stages),
    ("comparison", "Do pseudo labels help?", _section_comparison),
    ("organs", "Per-organ scores", _section_organs),
    ("efficiency", "Efficiency", _section_efficiency),
    ("selection", "Pseudo-label selection", _section_selection),
    ("pseudo", "Pseudo-label quality per round", _section_pseudo),
    ("overlays", "Best and worst cases", _section_overlays),
    ("curves", "Learning curves", _section_curves),
)


def build_index_html(run_dir: str | Path) -> str:
    """The index page of a run folder as one HTML string (see the module docstring)."""
    root = Path(run_dir)
    try:
        units, stages_error = read_stages(root), None
    except (OSError, ValueError, TypeError, AttributeError) as err:
        units, stages_error = [], f"{type(err).__name__}: {err}"
    try:
        titles = _titles(root)
    except (OSError, ValueError, AttributeError):
        titles = {}                        # the comparison section reports the broken models.json
    r = _Run(root, units, titles, stages_error)
    try:
        name = (yaml.safe_load(RunLayout(root).params_file.read_text(encoding="utf-8")) or {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        name = None
    name = str(name or root.resolve().name)
    body = []
    for anchor, heading, render in SECTIONS:
        try:
            content = render(r)
        except Exception as err:  # noqa: BLE001 - one unreadable input must not cost the whole page
            why = f"{type(err).__name__}: {err}"
            content = f'<p class="missing">{_e(heading)}: could not read its inputs ({_e(why)})</p>'
        body.append(f'<section id="{anchor}"><h2>{_e(heading)}</h2>{content}</section>')
    nav = " ".join(f'<a href="#{a}">{_e(h)}</a>' for a, h, _ in SECTIONS)
    generated = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(name)}: study report</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(name)}</h1><p class=\"sub\">Run folder {_e(root.resolve().name)}; page generated "
            f"{_e(generated)}. Notebook reports are linked relative to the run folder.</p>"
            f"<nav>{nav}</nav>{''.join(body)}</body></html>\n")


def write_index(run_dir: str | Path) -> Path:
    """Write `<run_dir>/index.html` atomically (a reader never sees half a page); returns its path."""
    root = Path(run_dir)
    return atomic_write_text(root / INDEX_NAME, build_index_html(root))
