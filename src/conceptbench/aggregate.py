"""One row per experiment x variant: metric means with 95 % bootstrap intervals, cost and speed.

Also one real-image row per subject (its reference photos scored against each other, leave-one-out:
the upper bound a generated image can reach), and the study's published numbers beside the
measured ones. Torch-free, and read-only on its inputs: it never changes a per-variant result.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import study as study_numbers
from .io import atomic_path, read_json
from .metrics.scores import bootstrap_ci

METRICS = ["clip_t", "clip_i", "dino_i", "aesthetic"]
COSTS = ["latency_ms", "trainable_params", "artifact_bytes", "train_seconds", "peak_mem_bytes"]
COLUMNS = [
    "experiment", "method", "variant", "param", "value", "n_images", "n_degenerate",
    *[f"{m}{s}" for m in METRICS for s in ("", "_lo", "_hi")], *COSTS,
]
COMPARISON_COLUMNS = [
    "experiment", "method", "variant", "quantity", "study", "measured", "measured_lo", "measured_hi", "measured_band",
]
REAL_IMAGES = "real_images"  # the method name of the leave-one-out upper-bound rows
N_BOOT = 1000


def variant_keys(experiments: dict) -> list[tuple[str, str]]:
    """(experiment, variant) pairs in the order the workflow lists their files."""
    return [(e, v) for e, info in experiments.items() for v in info["variants"]]


def mean_with_interval(values, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 95 % lo, 95 % hi) of the finite values; all NaN when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    lo, hi = bootstrap_ci(values, n_boot=N_BOOT, seed=seed)
    return float(values.mean()), lo, hi


def summarize_variant(per_image: pd.DataFrame, metrics: list[str], seed: int = 0) -> dict:
    """Means of the metrics that apply, over images that are not degenerate, with intervals.

    Each CSV row is one (prompt, seed) pair, so resampling rows resamples pairs.
    """
    degenerate = per_image["degenerate"].astype(bool)
    kept = per_image[~degenerate]
    row = {"n_images": int(len(per_image)), "n_degenerate": int(degenerate.sum())}
    for m in METRICS:
        applies = m in metrics and m in kept
        mean, lo, hi = mean_with_interval(kept[m] if applies else [], seed)
        row.update({m: mean, f"{m}_lo": lo, f"{m}_hi": hi})
    return row


def reference_rows(subjects: dict, reference_files) -> list[dict]:
    """One upper-bound row per subject from its leave-one-out CSV (score_references)."""
    if len(subjects) != len(reference_files):
        raise ValueError("aggregate: one reference score file per subject expected")
    rows = []
    for (subject, used_by), path in zip(subjects.items(), reference_files):
        scores = pd.read_csv(path)
        row = {"experiment": "+".join(used_by), "method": REAL_IMAGES, "variant": subject,
               "param": "subject", "value": subject, "n_images": len(scores), "n_degenerate": 0}
        for m in METRICS:
            mean, lo, hi = mean_with_interval(scores[m] if m in scores else [])
            row.update({m: mean, f"{m}_lo": lo, f"{m}_hi": hi})
        rows.append(row)
    return rows


def band_of(study: dict, metric: str, value: float) -> str:
    """The study's word for a measured value ('poor', 'good', ...); 'above 0.80' or 'below 0.15'
    outside its bands; '' where it gives none."""
    bands = study["metrics"].get(metric, {}).get("bands", [])
    if not bands or not isinstance(value, (int, float)) or math.isnan(value):
        return ""
    for lo, hi, word in bands:
        if (lo is None or value >= lo) and value < hi:
            return word
    return f"above {bands[-1][1]:.2f}" if value >= bands[-1][1] else f"below {bands[0][0]:.2f}"


def compare_with_study(table: pd.DataFrame, experiments: dict, study: dict) -> pd.DataFrame:
    """Long table: each number the study publishes for a variant, beside the measured one."""
    rows = []
    for r in table[table["method"] != REAL_IMAGES].itertuples(index=False):
        value = experiments[r.experiment]["variants"][r.variant]
        for quantity, number in study_numbers.published(study, r.experiment, r.method, value).items():
            measured = getattr(r, quantity)
            rows.append({
                "experiment": r.experiment, "method": r.method, "variant": r.variant, "quantity": quantity,
                "study": number, "measured": measured,
                "measured_lo": getattr(r, f"{quantity}_lo", math.nan),
                "measured_hi": getattr(r, f"{quantity}_hi", math.nan),
                "measured_band": band_of(study, quantity, measured),
            })
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def aggregate(
    experiments: dict,
    metrics_files,
    train_files,
    sample_dirs,
    csv_path,
    md_path,
    subjects: dict | None = None,
    reference_files=(),
    study_path=None,
    html_path=None,
    comparison_path=None,
) -> pd.DataFrame:
    """Write summary.csv (+ .md, .html) and, given the study file, the study comparison CSV."""
    keys = variant_keys(experiments)
    if not len(keys) == len(metrics_files) == len(train_files) == len(sample_dirs):
        raise ValueError("aggregate: one metrics, train and samples input per variant expected")
    rows = []
    for (exp, variant), m_file, t_file, s_dir in zip(keys, metrics_files, train_files, sample_dirs):
        info = experiments[exp]
        train = read_json(t_file)
        latency = read_json(Path(s_dir) / "latency.json")
        rows.append({
            "experiment": exp,
            "method": info["method"],
            "variant": variant,
            "param": info["param"],
            "value": info["variants"][variant],
            **summarize_variant(pd.read_csv(m_file), info["metrics"]),
            "latency_ms": latency["median_ms"],
            **{k: train[k] for k in ("trainable_params", "artifact_bytes", "train_seconds", "peak_mem_bytes")},
        })
    rows += reference_rows(subjects or {}, list(reference_files))
    table = pd.DataFrame(rows, columns=COLUMNS)
    study = study_numbers.load(study_path) if study_path else None
    comparison = compare_with_study(table, experiments, study) if study else None

    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    if comparison_path is not None and comparison is not None:
        with atomic_path(comparison_path) as tmp:
            comparison.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(to_markdown(table, comparison, study), encoding="utf-8")
    if html_path is not None:
        with atomic_path(html_path) as tmp:
            tmp.write_text(to_html(table, comparison, study), encoding="utf-8")
    return table


# --- presentation: the same tables as markdown and as a self-contained HTML page ------------------

NAMES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino_i": "DINO-I", "aesthetic": "aesthetic",
         "latency_ms": "latency (ms)", "trainable_params": "trainable params", "artifact_bytes": "artifact",
         "train_seconds": "train (s)", "peak_mem_bytes": "peak memory"}


def _human(n: float, unit: str = "") -> str:
    for step, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= step:
            return f"{n / step:.3g} {prefix}{unit}".strip()
    return f"{n:.4g} {unit}".strip()


def _number(quantity: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if quantity in ("artifact_bytes", "peak_mem_bytes"):
        return _human(float(value), "B")
    if quantity == "trainable_params":
        return _human(float(value))
    if quantity in ("latency_ms", "train_seconds"):
        return f"{float(value):.4g}"
    return f"{float(value):.3f}" if isinstance(value, float) else str(value)


def _with_interval(row, metric: str) -> str:
    mean = row[metric]
    if pd.isna(mean):
        return ""
    return f"{mean:.3f} [{row[f'{metric}_lo']:.3f}, {row[f'{metric}_hi']:.3f}]"


def display_tables(table: pd.DataFrame, comparison: pd.DataFrame | None) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table the markdown and HTML show."""
    measured = table[table["method"] != REAL_IMAGES]
    real = table[table["method"] == REAL_IMAGES]
    header = ["experiment", "method", "variant", "images (degenerate)", *[NAMES[m] for m in METRICS],
              *[NAMES[c] for c in COSTS]]
    body = [[r["experiment"], r["method"], r["variant"], f"{r['n_images']} ({r['n_degenerate']})",
             *[_with_interval(r, m) for m in METRICS], *[_number(c, r[c]) for c in COSTS]]
            for _, r in measured.iterrows()]
    tables = [("Measured: mean [95 % bootstrap interval] over (prompt, seed) pairs", header, body)]
    if len(real):
        tables.append((
            "Real images: each reference photo against the others (leave-one-out), the upper bound",
            ["subject", "used by", "photos", NAMES["clip_i"], NAMES["dino_i"]],
            [[r["variant"], r["experiment"], str(r["n_images"]), _with_interval(r, "clip_i"), _with_interval(r, "dino_i")]
             for _, r in real.iterrows()],
        ))
    if comparison is not None and len(comparison):
        rows = []
        for _, c in comparison.iterrows():
            measured_text = _number(c["quantity"], c["measured"])
            if not pd.isna(c["measured_lo"]):
                measured_text += f" [{c['measured_lo']:.3f}, {c['measured_hi']:.3f}]"
            rows.append([c["experiment"], c["variant"], NAMES[c["quantity"]], _number(c["quantity"], c["study"]),
                         measured_text, c["measured_band"]])
        tables.append(("Study vs measured", ["experiment", "variant", "quantity", "study", "measured", "band (study's)"], rows))
    return tables


def _legend(study: dict | None) -> list[tuple[str, str]]:
    if not study:
        return []
    return [(f"{spec['name']}: {spec['meaning']}", study_numbers.band_text(study, m))
            for m, spec in study["metrics"].items()]


def to_markdown(table: pd.DataFrame, comparison: pd.DataFrame | None = None, study: dict | None = None) -> str:
    """Plain GitHub-flavoured tables (no tabulate dependency)."""
    out = ["# conceptbench summary", ""]
    for title, header, rows in display_tables(table, comparison):
        out += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
        out.append("")
    for meaning, bands in _legend(study):
        out.append(f"- {meaning}" + (f". Study bands: {bands}." if bands else "."))
    if study:
        out += ["", f"Study numbers: {study['source']}", ""]
    return "\n".join(out)


STYLE = """body{font-family:sans-serif;margin:1em;color:#222}table{border-collapse:collapse;margin:0 0 1.5em}
th,td{border:1px solid #bbb;padding:3px 6px;font-size:13px;text-align:left}th{background:#eee}
caption{text-align:left;font-weight:bold;padding:4px 0}p,li{font-size:13px}"""


def to_html(table: pd.DataFrame, comparison: pd.DataFrame | None = None, study: dict | None = None) -> str:
    """A self-contained page with the same tables, for the report (it shows HTML, not CSV)."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>conceptbench summary</title>",
             f"<style>{STYLE}</style></head><body><h1>conceptbench summary</h1>"]
    for n, (title, header, rows) in enumerate(display_tables(table, comparison)):
        parts.append(f"<table id='table-{n}'><caption>{esc(title)}</caption><thead><tr>")
        parts += [f"<th>{esc(h)}</th>" for h in header]
        parts.append("</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in rows]
        parts.append("</tbody></table>")
    legend = _legend(study)
    if legend:
        parts.append("<ul>" + "".join(
            f"<li>{esc(m)}" + (f". Study bands: {esc(b)}." if b else ".") + "</li>" for m, b in legend) + "</ul>")
    if study:
        parts.append(f"<p>Study numbers: {esc(study['source'])}</p>")
    parts.append("</body></html>\n")
    return "".join(parts)
