"""One row per experiment x variant: metric means with 95 % bootstrap intervals, paired deltas, cost and speed.

Every experiment has baseline rows (role "baseline": `base`, the untrained base model sampled with the
same prompts and seeds, and any further references such as LCM's teacher at full steps); every other
row carries, for each metric, its paired delta against `base` (paired.py). tables/deltas.csv holds
the deltas against every baseline. Also one real-image row per subject (its reference photos scored
against each other, leave-one-out: the upper bound a generated image can reach), and the study's
published numbers beside the measured ones. Torch-free, and read-only on its inputs: it never
changes a per-variant result.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from . import study as study_numbers
from .io import atomic_path, read_json
from .paired import (MAIN_SET, STUDY_METRICS, all_image_means, best_variant, counts, mean_with_interval,
                     paired_delta, paired_deltas, summarize, variant_scores)

METRICS = STUDY_METRICS  # always columns of summary.csv; other per-image metrics follow when present
COSTS = ["latency_ms", "trainable_params", "artifact_bytes", "train_seconds", "peak_mem_bytes"]
STATS = ("", "_lo", "_hi", "_delta", "_delta_lo", "_delta_hi")
FRONT = ["experiment", "method", "variant", "role", "param", "value", "n_images", "n_degenerate"]
TRAINED, BASELINE, REAL = "trained", "baseline", "real"  # the role column
BASE = "base"  # the baseline every delta in summary.csv is taken against
COMPARISON_COLUMNS = [
    "experiment", "method", "variant", "quantity", "study", "measured", "measured_lo", "measured_hi", "measured_band",
    "measured_all",
]
ALL = [f"{m}_all" for m in METRICS]  # means over all images, degenerate ones included (as the study averaged)
DELTA_COLUMNS = ["experiment", "method", "variant", "role", "reference", "metric", "n_pairs", "delta", "delta_lo",
                 "delta_hi"]
REAL_IMAGES = "real_images"  # the method name of the leave-one-out upper-bound rows


def columns(metrics: list[str]) -> list[str]:
    """summary.csv's columns for these metric names (and the study metrics' means over all images)."""
    return [*FRONT, *[f"{m}{s}" for m in metrics for s in STATS], *ALL, *COSTS]


COLUMNS = columns(METRICS)  # summary.csv's columns when the per-image CSVs hold only the study's metrics


def variant_keys(experiments: dict) -> list[tuple[str, str]]:
    """(experiment, variant) pairs in the order the workflow lists their files."""
    return [(e, v) for e, info in experiments.items() for v in info["variants"]]


def baseline_keys(experiments: dict) -> list[tuple[str, str]]:
    """(experiment, baseline) pairs in the order the workflow lists their files."""
    return [(e, b) for e, info in experiments.items() for b in info.get("baselines", [])]


def summarize_variant(per_image: pd.DataFrame, metrics: list[str], seed: int = 0) -> dict:
    """Means of the metrics that apply, over images that are not degenerate, with intervals.

    Each CSV row is one (prompt, seed) pair, so resampling rows resamples pairs.
    """
    scores = variant_scores(per_image, metrics)
    names = [*METRICS, *(n for n in scores if n not in METRICS)]
    return {**counts(per_image), **summarize(scores, names, seed)}


def reference_rows(subjects: dict, reference_files) -> list[dict]:
    """One upper-bound row per subject from its leave-one-out CSV (score_references)."""
    if len(subjects) != len(reference_files):
        raise ValueError("aggregate: one reference score file per subject expected")
    rows = []
    for (subject, used_by), path in zip(subjects.items(), reference_files):
        scores = pd.read_csv(path)
        row = {"experiment": "+".join(used_by), "method": REAL_IMAGES, "variant": subject, "role": REAL,
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
    for r in table[table["role"] == TRAINED].itertuples(index=False):
        value = experiments[r.experiment]["variants"][r.variant]
        for quantity, number in study_numbers.published(study, r.experiment, r.method, value).items():
            measured = getattr(r, quantity)
            rows.append({
                "experiment": r.experiment, "method": r.method, "variant": r.variant, "quantity": quantity,
                "study": number, "measured": measured,
                "measured_lo": getattr(r, f"{quantity}_lo", math.nan),
                "measured_hi": getattr(r, f"{quantity}_hi", math.nan),
                "measured_band": band_of(study, quantity, measured),
                "measured_all": getattr(r, f"{quantity}_all", math.nan),
            })
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def metric_names(scores) -> list[str]:
    """The study's four metrics, then every other metric some variant has values of, in order of appearance."""
    names = list(METRICS)
    for per_variant in scores:
        names += [n for n in per_variant if n not in names]
    return names


def _identity(experiments: dict, experiment: str, variant: str, role: str) -> dict:
    info = experiments[experiment]
    return {"experiment": experiment, "method": info["method"], "variant": variant, "role": role,
            "param": info["param"], "value": info["variants"][variant] if role == TRAINED else math.nan}


def delta_table(experiments: dict, scores: dict, names: list[str]) -> pd.DataFrame:
    """Long table of paired deltas: every variant against every baseline of its experiment, and every
    baseline against `base` (LCM's teacher at full steps against it at 4)."""
    rows = []
    for exp, info in experiments.items():
        baselines = info.get("baselines", [])
        for reference in baselines:
            others = [(b, BASELINE) for b in baselines if reference == BASE and b != BASE]
            for variant, role in [*others, *((v, TRAINED) for v in info["variants"])]:
                for name in names:
                    if name in scores[exp, variant] and name in scores[exp, reference]:
                        delta, lo, hi, n = paired_delta(scores[exp, variant][name], scores[exp, reference][name])
                        rows.append({"experiment": exp, "method": info["method"], "variant": variant, "role": role,
                                     "reference": reference, "metric": name, "n_pairs": n, "delta": delta,
                                     "delta_lo": lo, "delta_hi": hi})
    return pd.DataFrame(rows, columns=DELTA_COLUMNS)


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
    baseline_metrics_files=(),
    baseline_sample_dirs=(),
    deltas_path=None,
    learning_path=None,
) -> pd.DataFrame:
    """Write summary.csv (+ .md, .html), the study comparison CSV (given the study file), deltas.csv
    and the "Does it learn?" page (learning.html). `experiments[e]["baselines"]` names the baselines
    whose metrics and samples come, in that order, in baseline_metrics_files and baseline_sample_dirs."""
    keys, bkeys = variant_keys(experiments), baseline_keys(experiments)
    if not len(keys) == len(metrics_files) == len(train_files) == len(sample_dirs):
        raise ValueError("aggregate: one metrics, train and samples input per variant expected")
    if not len(bkeys) == len(baseline_metrics_files) == len(baseline_sample_dirs):
        raise ValueError("aggregate: one metrics and samples input per baseline expected")
    scores, rows = {}, {}
    for (exp, name), m_file, s_dir in zip(bkeys, baseline_metrics_files, baseline_sample_dirs):
        per_image = pd.read_csv(m_file)
        scores[exp, name] = variant_scores(per_image, experiments[exp]["metrics"])
        rows[exp, name] = {**_identity(experiments, exp, name, BASELINE), **counts(per_image),
                           **all_image_means(per_image, experiments[exp]["metrics"]),
                           "latency_ms": read_json(Path(s_dir) / "latency.json")["median_ms"],
                           "trainable_params": 0, "artifact_bytes": 0, "train_seconds": 0.0}
    for (exp, variant), m_file, t_file, s_dir in zip(keys, metrics_files, train_files, sample_dirs):
        per_image, train = pd.read_csv(m_file), read_json(t_file)
        scores[exp, variant] = variant_scores(per_image, experiments[exp]["metrics"])
        rows[exp, variant] = {**_identity(experiments, exp, variant, TRAINED), **counts(per_image),
                              **all_image_means(per_image, experiments[exp]["metrics"]),
                              "latency_ms": read_json(Path(s_dir) / "latency.json")["median_ms"],
                              **{k: train[k] for k in ("trainable_params", "artifact_bytes", "train_seconds",
                                                       "peak_mem_bytes")}}
    names = metric_names(scores.values())
    for key, row in rows.items():
        row.update(summarize(scores[key], names))
        if (key[0], BASE) in scores and key[1] != BASE:
            row.update(paired_deltas(scores[key], scores[key[0], BASE], names))
    order = [(e, n) for e, info in experiments.items() for n in [*info.get("baselines", []), *info["variants"]]]
    table = pd.DataFrame([rows[k] for k in order] + reference_rows(subjects or {}, list(reference_files)),
                         columns=columns(names))
    deltas = delta_table(experiments, scores, names)
    study = study_numbers.load(study_path) if study_path else None
    comparison = compare_with_study(table, experiments, study) if study else None
    learning = learning_table(table, deltas, experiments)

    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    for path, frame in ((comparison_path, comparison), (deltas_path, deltas)):
        if path is not None and frame is not None:
            with atomic_path(path) as tmp:
                frame.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(to_markdown(table, comparison, study, learning), encoding="utf-8")
    if html_path is not None:
        with atomic_path(html_path) as tmp:
            tmp.write_text(to_html(table, comparison, study, learning), encoding="utf-8")
    if learning_path is not None:
        with atomic_path(learning_path) as tmp:
            tmp.write_text(html_page("Does it learn?", [learning], study), encoding="utf-8")
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


def _delta(row, metric: str) -> str:
    """'+0.034 [+0.010, +0.058]': the paired delta to the base with its interval; '' where there is none."""
    if row.get("variant") == BASE and row.get("role") == BASELINE:
        return "reference"
    delta = row.get(f"{metric}_delta", math.nan)
    if pd.isna(delta):
        return ""
    return f"{delta:+.3f} [{row[f'{metric}_delta_lo']:+.3f}, {row[f'{metric}_delta_hi']:+.3f}]"


def _name(metric: str) -> str:
    return NAMES.get(metric, metric)


def learning_table(table: pd.DataFrame, deltas: pd.DataFrame, experiments: dict) -> tuple[str, list[str], list[list[str]]]:
    """"Does it learn?": per experiment, its base and its best variant on the same (prompt, seed) pairs,
    every metric with the paired delta, and the delta against any further baseline (LCM's full-step teacher)."""
    header = ["experiment", "best variant (chosen by the Δ interval of)", "metric", "base", "best", "Δ best − base",
              "Δ against the other baselines"]
    body = []
    for exp, info in experiments.items():
        rows = table[table["experiment"] == exp].set_index("variant")
        trained = table[(table["experiment"] == exp) & (table["role"] == TRAINED)]
        best, by = best_variant(trained, info.get("task", ""))
        if best is None or BASE not in rows.index:
            continue
        base_row, best_row = rows.loc[BASE], rows.loc[best]
        for metric in [c[: -len("_delta")] for c in table.columns if c.endswith("_delta")]:
            if pd.isna(base_row[metric]) or pd.isna(best_row[metric]):
                continue
            others = deltas[(deltas["experiment"] == exp) & (deltas["variant"] == best)
                            & (deltas["reference"] != BASE) & (deltas["metric"] == metric)]
            body.append([exp, f"{best} ({_name(by)})", _name(metric), _with_interval(base_row, metric),
                         _with_interval(best_row, metric), _delta(best_row, metric),
                         "; ".join(f"vs {o.reference}: {o.delta:+.3f} [{o.delta_lo:+.3f}, {o.delta_hi:+.3f}]"
                                   for o in others.itertuples())])
    title = ("Does it learn? Each experiment's untrained base and its best variant on the same (prompt, seed) "
             "pairs: mean [95 % bootstrap interval], Δ the paired difference [95 % paired bootstrap interval]")
    return title, header, body


def display_tables(table: pd.DataFrame, comparison: pd.DataFrame | None,
                   learning: tuple | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table the markdown and HTML show."""
    measured = table[table["role"] != REAL]
    real = table[table["role"] == REAL]
    header = ["experiment", "method", "variant", "images (degenerate)",
              *[h for m in METRICS for h in (NAMES[m], f"Δ {NAMES[m]}")], *[NAMES[c] for c in COSTS]]
    body = [[r["experiment"], r["method"], r["variant"], f"{r['n_images']} ({r['n_degenerate']})",
             *[cell for m in METRICS for cell in (_with_interval(r, m), _delta(r, m))],
             *[_number(c, r[c]) for c in COSTS]]
            for _, r in measured.iterrows()]
    tables = [("Measured: mean [95 % bootstrap interval] over (prompt, seed) pairs; Δ: paired difference to the "
               "experiment's untrained base on the same pairs [95 % paired bootstrap interval]", header, body)]
    tables.append(("Over all images, degenerate ones (black, flat) included, as the study averaged; the means above "
                   "leave them out", ["experiment", "variant", "images (degenerate)", *[NAMES[m] for m in METRICS]],
                   [[r["experiment"], r["variant"], f"{r['n_images']} ({r['n_degenerate']})",
                     *["" if pd.isna(r[f"{m}_all"]) else f"{r[f'{m}_all']:.3f}" for m in METRICS]]
                    for _, r in measured.iterrows()]))
    extra = [c[: -len("_delta")] for c in table.columns if c.endswith("_delta") and c[: -len("_delta")] not in METRICS]
    if extra:
        rows = [[r["experiment"], r["variant"], *[f"{_with_interval(r, m)}; Δ {_delta(r, m)}" if not pd.isna(r[m]) else ""
                                                  for m in extra]]
                for _, r in measured.iterrows() if r[extra].notna().any()]
        tables.append(("Beyond the study's metrics (prior_: samples of the class prompt, the prior probe; class_: "
                       "similarity to the class images): mean [95 %]; Δ to the base [95 %]",
                       ["experiment", "variant", *[_name(m) for m in extra]], rows))
    if learning is not None and learning[2]:
        tables.append(learning)
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
            everything = "" if pd.isna(c["measured_all"]) else _number(c["quantity"], c["measured_all"])
            rows.append([c["experiment"], c["variant"], NAMES[c["quantity"]], _number(c["quantity"], c["study"]),
                         measured_text, c["measured_band"], everything])
        tables.append(("Study vs measured (measured: over non-degenerate images; all images: degenerate ones included, "
                       "as the study averaged)",
                       ["experiment", "variant", "quantity", "study", "measured", "band (study's)", "all images"], rows))
    return tables


def _legend(study: dict | None) -> list[tuple[str, str]]:
    if not study:
        return []
    return [(f"{spec['name']}: {spec['meaning']}", study_numbers.band_text(study, m))
            for m, spec in study["metrics"].items()]


def to_markdown(table: pd.DataFrame, comparison: pd.DataFrame | None = None, study: dict | None = None,
                learning: tuple | None = None) -> str:
    """Plain GitHub-flavoured tables (no tabulate dependency)."""
    out = ["# conceptbench summary", ""]
    for title, header, rows in display_tables(table, comparison, learning):
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


def to_html(table: pd.DataFrame, comparison: pd.DataFrame | None = None, study: dict | None = None,
            learning: tuple | None = None) -> str:
    """A self-contained page with the same tables, for the report (it shows HTML, not CSV)."""
    return html_page("conceptbench summary", display_tables(table, comparison, learning), study)


def html_page(title: str, tables: list[tuple[str, list[str], list[list[str]]]], study: dict | None = None) -> str:
    """A self-contained HTML page of (title, header, rows) tables, with the metrics' legend."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"]
    for n, (caption, header, rows) in enumerate(tables):
        parts.append(f"<table id='table-{n}'><caption>{esc(caption)}</caption><thead><tr>")
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
