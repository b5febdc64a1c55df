"""Summary table, intervals, upper bounds, the study's numbers and the plots, on hand-made inputs."""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conceptbench import aggregate as agg
from conceptbench import study

STUDY_FILE = study.RESULTS_FILE
STUDY_TEXT = Path("/work/shared/study/personalizing-diffusion-models.txt")

EXPERIMENTS = {
    "dreambooth": {"method": "dreambooth", "task": "subject", "metrics": ["clip_t", "clip_i", "dino_i"],
                   "param": "args.prior_loss_weight", "variants": {"lambda-0.25": 0.25, "lambda-1.0": 1.0}},
    "lora": {"method": "lora", "task": "style", "metrics": ["clip_t"], "param": "args.rank",
             "variants": {"rank-16": 16}},
}


def per_image(rng, n_prompts=3, n_seeds=4, degenerate=()):
    rows = []
    for p in range(n_prompts):
        for s in range(n_seeds):
            rows.append({"file": f"{p:02d}_{s}.png", "prompt": f"sks dog prompt {p}", "eval_prompt": f"a dog prompt {p}",
                         "prompt_index": p, "seed": s, "clip_t": rng.normal(0.25, 0.02), "clip_i": rng.normal(0.8, 0.05),
                         "dino_i": rng.normal(0.5, 0.05), "aesthetic": math.nan, "degenerate": False})
    df = pd.DataFrame(rows)
    df.loc[list(degenerate), "degenerate"] = True
    df.loc[list(degenerate), "clip_t"] = -5.0  # a value that would drag the mean if it were kept
    return df


@pytest.fixture
def results(tmp_path):
    """metrics CSVs, train.json, sample folders (PNGs + latency.json) and one subject's LOO scores."""
    rng = np.random.default_rng(0)
    files = {"metrics": [], "train": [], "samples": []}
    for exp, info in EXPERIMENTS.items():
        for n, variant in enumerate(info["variants"]):
            m = tmp_path / "metrics" / exp / f"{variant}.csv"
            m.parent.mkdir(parents=True, exist_ok=True)
            df = per_image(rng, degenerate=[0, 5] if variant == "rank-16" else [])
            if exp == "lora":
                df[["clip_i", "dino_i"]] = math.nan
            df.to_csv(m, index=False)
            t = tmp_path / "train" / exp / variant / "train.json"
            t.parent.mkdir(parents=True)
            t.write_text(json.dumps({"trainable_params": 1000 * (n + 1), "artifact_bytes": 4000 * (n + 1),
                                     "train_seconds": 1.5, "peak_mem_bytes": 10**6}))
            s = tmp_path / "samples" / exp / variant
            s.mkdir(parents=True)
            (s / "latency.json").write_text(json.dumps({"median_ms": 12.5 + n}))
            for f in df["file"]:
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(s / f)
            files["metrics"].append(m), files["train"].append(t), files["samples"].append(s)
    refs = tmp_path / "references" / "dog.scores.csv"
    refs.parent.mkdir()
    pd.DataFrame({"file": ["a.png", "b.png", "c.png"], "clip_i": [0.9, 0.92, 0.94], "dino_i": [0.7, 0.75, 0.8]}).to_csv(refs, index=False)
    return tmp_path, files, refs


def run_aggregate(tmp_path, files, refs):
    out = tmp_path / "tables"
    table = agg.aggregate(EXPERIMENTS, files["metrics"], files["train"], files["samples"], out / "summary.csv",
                          out / "summary.md", subjects={"dog": ["dreambooth"]}, reference_files=[refs],
                          study_path=STUDY_FILE, html_path=out / "summary.html", comparison_path=out / "comparison.csv")
    return table, out


def test_summary_has_every_column_with_intervals_around_the_means(results):
    table, out = run_aggregate(*results)
    csv = pd.read_csv(out / "summary.csv")
    assert list(csv.columns) == agg.COLUMNS
    for m in ("clip_t", "clip_i", "dino_i", "aesthetic"):
        assert {f"{m}_lo", f"{m}_hi"} <= set(csv.columns)
    scored = csv[csv["method"] != agg.REAL_IMAGES]
    for m in ("clip_t",):
        assert (scored[f"{m}_lo"] <= scored[m]).all() and (scored[m] <= scored[f"{m}_hi"]).all()
        assert (scored[f"{m}_lo"] < scored[f"{m}_hi"]).all()
    db = scored[scored["experiment"] == "dreambooth"]
    assert db[["clip_i", "dino_i", "clip_i_lo", "dino_i_hi"]].notna().all().all()
    assert db["aesthetic"].isna().all() and db["aesthetic_lo"].isna().all()  # not an experiment metric
    lora = scored[scored["experiment"] == "lora"].iloc[0]
    assert math.isnan(lora["clip_i"]) and math.isnan(lora["dino_i_hi"])  # style task: no references
    assert scored["latency_ms"].tolist() == [12.5, 13.5, 12.5]
    assert scored["artifact_bytes"].tolist() == [4000, 8000, 4000]


def test_degenerate_images_are_counted_and_left_out(results):
    tmp_path, files, refs = results
    table, _ = run_aggregate(tmp_path, files, refs)
    lora = table[table["variant"] == "rank-16"].iloc[0]
    kept = pd.read_csv(files["metrics"][-1]).query("not degenerate")
    assert lora["n_images"] == 12 and lora["n_degenerate"] == 2
    assert lora["clip_t"] == pytest.approx(kept["clip_t"].mean())  # the -5.0 rows are out
    assert lora["clip_t_lo"] > 0


def test_real_image_row_is_the_leave_one_out_upper_bound(results):
    table, _ = run_aggregate(*results)
    real = table[table["method"] == agg.REAL_IMAGES]
    assert len(real) == 1
    row = real.iloc[0]
    assert row["variant"] == "dog" and row["experiment"] == "dreambooth" and row["n_images"] == 3
    assert row["clip_i"] == pytest.approx(0.92) and row["dino_i"] == pytest.approx(0.75)
    assert row["clip_i_lo"] <= 0.92 <= row["clip_i_hi"]
    assert math.isnan(row["clip_t"])


def test_study_numbers_sit_beside_the_measured_ones(results):
    table, out = run_aggregate(*results)
    comp = pd.read_csv(out / "comparison.csv")
    db = comp[(comp["variant"] == "lambda-0.25")].set_index("quantity")
    assert db.loc["dino_i", "study"] == pytest.approx(0.588)
    measured = table.set_index("variant").loc["lambda-0.25"]
    assert db.loc["dino_i", "measured"] == pytest.approx(measured["dino_i"])
    assert db.loc["trainable_params", "study"] == pytest.approx(8.6e8)  # the method-level "~860M"
    assert comp[comp["variant"] == "rank-16"].set_index("quantity").loc["clip_t", "study"] == pytest.approx(0.183)
    md = (out / "summary.md").read_text()
    html = (out / "summary.html").read_text()
    for text in (md, html):
        assert "lambda-0.25" in text and "rank-16" in text and "0.588" in text and "0.27-0.35 good" in text and "0.15-0.20 poor" in text
        assert "Nanuvala" in text  # the source is named
    assert html.count("<tr>") == 1 + 3 + 1 + 3 + 1 + 1 + 1 + len(comp)  # headers and rows of the four tables (all-image means the second)


def test_study_file_transcribes_the_study():
    numbers = study.load(STUDY_FILE)
    if not STUDY_TEXT.exists():
        pytest.skip(f"{STUDY_TEXT} is not on this machine")
    text = STUDY_TEXT.read_text()
    formats = {"clip_t": "{:.3f}", "clip_i": "{:.3f}", "dino_i": "{:.3f}", "aesthetic": "{:.2f}", "latency_ms": "{:,.0f}"}
    for row in numbers["variants"]:
        for key, fmt in formats.items():
            if key in row:
                assert fmt.format(row[key]) in text, (row, key)
    bands = study.band_text(numbers, "dino_i")
    assert bands == "below 0.45 poor, 0.45-0.65 moderate, 0.65-0.80 good"
    assert re.search(r"<0\.45\s+Poor", text) and "0.65-0.80" in text


def test_study_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "study.yaml"
    bad.write_text("source: x\nmetrics: {}\nvariants:\n  - {experiment: lora, method: lora, value: 4, clip_x: 0.2}\n")
    with pytest.raises(ValueError, match=r"study.yaml: variants\[1\].*clip_x"):
        study.load(bad)


def test_bands_and_value_matching():
    numbers = study.load(STUDY_FILE)
    assert agg.band_of(numbers, "clip_t", 0.274) == "good"
    assert agg.band_of(numbers, "clip_i", 0.70) == "poor"
    assert agg.band_of(numbers, "aesthetic", 6.0) == ""
    assert agg.band_of(numbers, "dino_i", 0.95) == "above 0.80" and agg.band_of(numbers, "clip_t", -0.1) == "below 0.15"
    assert study.same_value(1, 1.0) and study.same_value(True, "true") and not study.same_value("l2", "huber")
    assert study.published(numbers, "ddpo", "ddpo", True)["aesthetic"] == pytest.approx(6.28)
    assert study.published(numbers, "custom_diffusion_multi", "custom_diffusion", "crossattn_kv") == {}


def test_aggregate_imports_no_torch():
    import subprocess

    code = "import sys, conceptbench.aggregate, conceptbench.plots; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_plots_write_pngs(results):
    from conceptbench import plots

    tmp_path, files, refs = results
    run_aggregate(tmp_path, files, refs)
    summary = tmp_path / "tables/summary.csv"
    plots.plot_sweep("dreambooth", EXPERIMENTS["dreambooth"], summary, tmp_path / "sweep.png", study_path=STUDY_FILE)
    plots.plot_efficiency(summary, tmp_path / "size.png", x="artifact_bytes")
    plots.plot_efficiency(summary, tmp_path / "latency.png", x="latency_ms")
    plots.plot_gallery("lora / rank-16", files["samples"][-1], files["metrics"][-1], tmp_path / "gallery.png")
    for name in ("sweep", "size", "latency", "gallery"):
        with Image.open(tmp_path / f"{name}.png") as im:
            pixels = np.asarray(im.convert("L"), dtype=float)
        assert im.width > 200 and pixels.std() > 5, name  # drawn on, not blank
    with Image.open(tmp_path / "gallery.png") as im:
        assert im.width > im.height  # 3 prompts down, 4 seeds across


def test_means_over_all_images_keep_the_black_ones_the_study_averaged(results):
    tmp_path, files, refs = results
    table, out = run_aggregate(tmp_path, files, refs)
    rank16 = table[table["variant"] == "rank-16"].iloc[0]
    per = pd.read_csv(files["metrics"][EXPERIMENTS["dreambooth"]["variants"].__len__()])  # lora's rank-16
    kept = per.loc[~per["degenerate"], "clip_t"]
    assert rank16["n_degenerate"] == 2
    assert rank16["clip_t"] == pytest.approx(kept.mean())  # the existing mean leaves them out
    assert rank16["clip_t_all"] == pytest.approx(per["clip_t"].mean())  # the study's: every image
    assert rank16["clip_t_all"] < rank16["clip_t"] - 0.5
    assert math.isnan(rank16["clip_i_all"])  # a metric the experiment does not report
    lam = table[table["variant"] == "lambda-0.25"].iloc[0]
    assert lam["clip_t_all"] == pytest.approx(lam["clip_t"]) and lam["dino_i_all"] == pytest.approx(lam["dino_i"])
    csv = pd.read_csv(out / "summary.csv")
    assert {"clip_t_all", "clip_i_all", "dino_i_all", "aesthetic_all"} <= set(csv.columns)
    comparison = pd.read_csv(out / "comparison.csv")
    row = comparison[(comparison["variant"] == "rank-16") & (comparison["quantity"] == "clip_t")].iloc[0]
    assert row["measured_all"] == pytest.approx(rank16["clip_t_all"])
    md = (out / "summary.md").read_text()
    assert "Over all images, degenerate ones (black, flat) included, as the study averaged" in md
    assert f"{rank16['clip_t_all']:.3f}" in md
