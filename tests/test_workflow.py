"""The workflow as a user runs it: lint, the study's dry-run DAG, and the embedded default end to end."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from chromium import CHROMIUM, chromium, data_uri_payload, report_opening

from conceptbench import config as cb
from conceptbench.io import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())
TINY_VARIANTS_CFG = cb.validate(copy.deepcopy(TINY))
TINY_VARIANTS = cb.variants(TINY_VARIANTS_CFG)  # {experiment: {variant: value}} of the enabled experiments
TINY_BASELINES = cb.baselines(TINY_VARIANTS_CFG)  # {experiment: {baseline: sampling overrides}}


def snakemake(workdir, *args, check=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow/Snakefile"), "-d", str(workdir), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry-run, as {rule: count}."""
    counts, in_table = {}, False
    for line in output.splitlines():
        if line.startswith("Job stats"):
            in_table = True
        elif in_table:
            m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
            if m and m.group(1) != "total":
                counts[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                break
    return counts


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, "--lint", "--configfile", str(ROOT / "config/tiny.yaml"))
    out = proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition" in out


def test_study_dry_run_lists_the_whole_study(tmp_path):
    proc = snakemake(tmp_path, "-n", "--configfile", str(ROOT / "config/config.yaml"))
    counts = job_counts(proc.stdout)
    variants = 4 + 3 + 4 + 2 + 1 + 2 + 2  # DreamBooth λ, LoRA rank, TI vectors, CD params, CD multi-concept, LCM, DDPO
    baselines = 7 + 1  # an untrained base per experiment; LCM's teacher also at its full step count
    assert counts == {
        "fetch_model": 5,  # sd15, sd14, clip, dino, aesthetic
        "fetch_dataset": 5,  # dog (3 images), dog5, cat_toy, naruto, cc12m
        "prepare_dataset": 5,
        "generate_class_images": 1,  # once, shared by every λ
        "index_pool": 1,  # cc12m, the retrieval pool, embedded once
        "retrieve_class_images": 3,  # real dogs (CD, CD multi-concept) and toys (CD multi-concept), shared by variants
        "embed_references": 3,  # the three subjects scored with CLIP-I/DINO-I
        "embed_class_images": 3,  # what the prior probe (the class prompt's samples) is compared with
        "train": variants,  # baselines are never trained
        "sample": variants + baselines,
        "evaluate": variants + baselines,
        "score_references": 3,  # the real-image upper bound of each subject
        "aggregate": 1,
        "plot_sweep": 7,
        "plot_learning": 7,
        "plot_efficiency": 1,
        "plot_gallery": variants,
        "all": 1,
    }
    for name in ("lambda-0.25", "rank-16", "vectors-8", "params-crossattn_kv", "loss-huber", "lora-true"):
        assert f"/{name}/artifact" in proc.stdout
    for chain in ("samples/dreambooth/base", "samples/lcm/base-full", "metrics/ddpo/base.csv"):
        assert chain in proc.stdout
    assert "train/dreambooth/base" not in proc.stdout


@pytest.mark.parametrize("on_submit_host", [True, False])
def test_downloads_run_on_the_submit_host_unless_told_otherwise(tmp_path, on_submit_host):
    """A dry-run never says which jobs are local, so this asks the parsed workflow (Snakemake's API)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    config = {"cluster": {"fetch_on_submit_host": on_submit_host}}
    with SnakemakeApi(OutputSettings(quiet=True)) as api:
        parsed = api.workflow(resource_settings=ResourceSettings(), storage_settings=StorageSettings(),
                              config_settings=ConfigSettings(configfiles=[ROOT / "config/config.yaml"], config=config),
                              snakefile=ROOT / "workflow/Snakefile", workdir=tmp_path)
        local = set(parsed._workflow._localrules)  # what a cluster executor runs in the snakemake process
    assert local == ({"fetch_model", "fetch_dataset"} if on_submit_host else set())


@pytest.mark.parametrize("section, key, value, expected", [
    ("train", "steps", -1, "experiments.dreambooth.train.steps: -1 is less than the minimum of 1"),
    ("sweep", "param", "args.prior_los_weight", "experiments.dreambooth.sweep.param: dreambooth has no argument "
                                                "'prior_los_weight'; did you mean 'prior_loss_weight'?"),
    ("args", "prior_loss_wieght", 0.3, "experiments.dreambooth.args.prior_loss_wieght: dreambooth has no argument "
                                       "'prior_loss_wieght'; did you mean 'prior_loss_weight'?"),
    ("args", "train_text_encoder", "maybe",
     "experiments.dreambooth.args.train_text_encoder: 'maybe' is not of type 'boolean'"),
    ("args", "prior_loss_weight", -1, "experiments.dreambooth.args.prior_loss_weight: -1 is less than the minimum of 0"),
])
def test_bad_config_stops_before_any_job(tmp_path, section, key, value, expected):
    cfg = copy.deepcopy(TINY)
    cfg["experiments"]["dreambooth"][section][key] = value
    proc = snakemake(tmp_path, "-n", "--configfile", str(write_config(tmp_path / "bad.yaml", cfg)), check=False)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr
    assert "rule " not in proc.stdout  # no job was listed


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The embedded default, run once end to end as `make demo` runs it."""
    work = tmp_path_factory.mktemp("tiny")
    config = write_config(work / "tiny.yaml", copy.deepcopy(TINY))
    snakemake(work, "--cores", "2", "--configfile", str(config))
    snakemake(work, "--configfile", str(config), "--report", str(work / "report.html"))
    return work, config


def test_tiny_run_scores_every_lambda(tiny_run):
    work, _ = tiny_run
    table = pd.read_csv(work / "results/tables/summary.csv")
    real = table[table["method"] == "real_images"]
    summary = table[(table["experiment"] == "dreambooth") & (table["role"] == "trained")]
    assert sorted(summary["variant"]) == ["lambda-0.25", "lambda-0.5", "lambda-0.75", "lambda-1.0"]
    for col in ("clip_t", "clip_i", "dino_i", "latency_ms", "trainable_params", "artifact_bytes"):
        assert summary[col].notna().all() and (summary[col].abs() < float("inf")).all(), col
    for m in ("clip_t", "clip_i", "dino_i"):
        assert (summary[f"{m}_lo"] <= summary[m]).all() and (summary[m] <= summary[f"{m}_hi"]).all(), m
    assert summary["aesthetic"].isna().all()  # not a DreamBooth metric
    subjects = {e["data"] for e in TINY_VARIANTS_CFG["experiments"].values() if e.get("enabled", True)
                and {"clip_i", "dino_i"} & set(e.get("metrics", []))}
    assert sorted(real["variant"]) == sorted(subjects) and real[["clip_i", "dino_i"]].notna().all().all()
    assert (work / "results/tables/summary.md").read_text().count("lambda-") >= 4
    assert (summary["n_images"] == 3 * TINY["evaluation"]["seeds"]).all()
    assert (work / "results/plots/dreambooth.png").stat().st_size > 0
    n_class = TINY["experiments"]["dreambooth"]["class_images"]["count"]
    assert len(list((work / "results/class_images/dreambooth").glob("*.png"))) == n_class


def test_tiny_run_scores_textual_inversion_and_custom_diffusion(tiny_run):
    """Every TI vector count and Custom Diffusion variant (multi-concept too) is trained, sampled and scored."""
    work, _ = tiny_run
    table = pd.read_csv(work / "results/tables/summary.csv")
    table = table[table["role"] == "trained"]
    for experiment in ("textual_inversion", "custom_diffusion", "custom_diffusion_multi"):
        rows = table[table["experiment"] == experiment]
        assert sorted(rows["variant"]) == sorted(TINY_VARIANTS[experiment]), experiment
        for col in ("clip_t", "clip_i", "dino_i", "latency_ms", "trainable_params", "artifact_bytes"):
            assert rows[col].notna().all() and (rows[col] > -float("inf")).all(), (experiment, col)
    ti = table[table["experiment"] == "textual_inversion"].set_index("variant")
    assert [ti.loc[f"vectors-{n}", "trainable_params"] for n in (1, 2, 4, 8)] == [32 * n for n in (1, 2, 4, 8)]
    cd = table[table["experiment"] == "custom_diffusion"].set_index("variant")
    assert cd.loc["params-crossattn", "trainable_params"] > cd.loc["params-crossattn_kv", "trainable_params"]
    n = TINY["experiments"]["custom_diffusion"]["class_images"]["count"]
    for concept in ("custom_diffusion/0", "custom_diffusion_multi/0", "custom_diffusion_multi/1"):
        assert len(list((work / "results/retrieved" / concept).glob("*.png"))) == n, concept
    assert not (work / "results/class_images/custom_diffusion").exists()  # real images, none generated
    multi = [r["eval_prompt"] for r in read_jsonl(work / "results/samples/custom_diffusion_multi/params-crossattn_kv/samples.jsonl")]
    assert "a dog next to a toy" in multi and not any("<" in p for p in multi)


def test_tiny_run_scores_lora_lcm_and_ddpo(tiny_run):
    work, _ = tiny_run
    table = pd.read_csv(work / "results/tables/summary.csv").set_index(["experiment", "variant"])
    rows = [("lora", "rank-4"), ("lora", "rank-8"), ("lora", "rank-16"), ("lcm", "loss-l2"), ("lcm", "loss-huber"),
            ("ddpo", "lora-false"), ("ddpo", "lora-true")]
    for key in rows:
        assert table.loc[key, "clip_t"] == table.loc[key, "clip_t"], key  # not NaN
    assert table.loc[("ddpo", "lora-false"), "aesthetic"] == table.loc[("ddpo", "lora-false"), "aesthetic"]
    ranks = [table.loc[("lora", f"rank-{r}"), "trainable_params"] for r in (4, 8, 16)]
    assert ranks[1] == 2 * ranks[0] and ranks[2] == 4 * ranks[0]  # LoRA parameters grow linearly with r


def test_tiny_run_has_a_base_and_paired_deltas_in_every_experiment(tiny_run):
    work, _ = tiny_run
    table = pd.read_csv(work / "results/tables/summary.csv")
    for experiment, baselines in TINY_BASELINES.items():
        rows = table[(table["experiment"] == experiment) & (table["role"] != "real")].set_index("variant")
        assert list(rows.index) == [*baselines, *TINY_VARIANTS[experiment]], experiment
        assert (rows.loc[list(baselines), "role"] == "baseline").all()
        trained = rows[rows["role"] == "trained"]
        assert trained["clip_t_delta"].notna().all(), experiment
        assert ((trained["clip_t_delta_lo"] <= trained["clip_t_delta"])
                & (trained["clip_t_delta"] <= trained["clip_t_delta_hi"])).all(), experiment
    dreambooth = table[(table["experiment"] == "dreambooth") & (table["role"] == "trained")]
    for column in ("prior_clip_i", "prior_dino_i", "prior_class_clip_i", "prior_clip_i_delta"):
        assert dreambooth[column].notna().all(), column
    ddpo = table[(table["experiment"] == "ddpo") & (table["role"] == "trained")]  # reward hacking, measured
    gap = ddpo["aesthetic_delta"] - ddpo["true_aesthetic_delta"]
    assert ddpo["aesthetic_excess_delta"].to_numpy() == pytest.approx(gap.to_numpy(), abs=1e-9)
    ti = read_jsonl(work / "results/samples/textual_inversion/base/samples.jsonl")
    assert ti[0]["prompt"] == "toy in a basket" and ti[0]["eval_prompt"] == "a toy in a basket"
    assert read_json(work / "results/samples/lcm/base-full/latency.json")["steps"] == 20  # tiny.yaml's base-full
    deltas = pd.read_csv(work / "results/tables/deltas.csv")
    assert {"base", "base-full"} == set(deltas[deltas["experiment"] == "lcm"]["reference"])
    assert "Does it learn?" in (work / "results/tables/learning.html").read_text()
    for experiment in TINY_VARIANTS:
        assert (work / f"results/plots/learning/{experiment}.png").stat().st_size > 0


def test_report_holds_the_table_and_samples(tiny_run):
    work, _ = tiny_run
    html = (work / "report.html").read_text(errors="replace")
    assert "summary.csv" in html and "dreambooth.png" in html and "00_0.png" in html
    assert "summary.html" in html and "efficiency_size.png" in html and "lambda-0.25.png" in html
    assert "learning.html" in html and "Does it learn?" in html
    assert "overview.png" in html and "quality.html" in html  # the toy world, before the methods


def test_nothing_reruns_when_nothing_changed(tiny_run):
    work, config = tiny_run
    proc = snakemake(work, "-n", "--configfile", str(config))
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_one_lambda_reruns_only_its_chain(tiny_run, tmp_path):
    work, _ = tiny_run
    cfg = copy.deepcopy(TINY)
    cfg["experiments"]["dreambooth"]["sweep"]["values"][0] = 0.3
    proc = snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "changed.yaml", cfg)))
    assert job_counts(proc.stdout) == {
        "train": 1, "sample": 1, "evaluate": 1, "aggregate": 1, "plot_gallery": 1, "plot_efficiency": 1, "all": 1,
        "plot_sweep": len(TINY_VARIANTS),  # every sweep plot reads summary.csv
        "plot_learning": len(TINY_VARIANTS),  # and so does every "Does it learn?" figure
    }
    assert "lambda-0.3/artifact" in proc.stdout


def test_changing_sampling_reruns_no_training(tiny_run, tmp_path):
    work, _ = tiny_run
    cfg = copy.deepcopy(TINY)
    cfg["evaluation"]["seeds"] += 1
    proc = snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "changed.yaml", cfg)))
    counts = job_counts(proc.stdout)
    n = sum(len(v) for v in TINY_VARIANTS.values()) + sum(len(b) for b in TINY_BASELINES.values())
    assert "train" not in counts and counts["sample"] == n and counts["evaluate"] == n


def test_another_first_evaluation_seed_redraws_the_samples_of_the_same_training(tiny_run, tmp_path):
    """evaluation.first_seed set to the top-level seed changes nothing (it is the default); set to another,
    every variant and baseline is sampled and scored again, and nothing is trained."""
    work, _ = tiny_run
    cfg = copy.deepcopy(TINY)
    cfg["evaluation"]["first_seed"] = TINY["seed"]
    proc = snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "same.yaml", cfg)))
    assert "Nothing to be done" in proc.stdout + proc.stderr
    cfg["evaluation"]["first_seed"] = TINY["seed"] + 100
    counts = job_counts(snakemake(work, "-n", "--configfile", str(write_config(tmp_path / "other.yaml", cfg))).stdout)
    n = sum(len(v) for v in TINY_VARIANTS.values()) + sum(len(b) for b in TINY_BASELINES.values())
    assert "train" not in counts and counts["sample"] == n and counts["evaluate"] == n, counts


def test_a_changed_shipped_world_model_reruns_what_used_it(tiny_run):
    """A rebuilt or pulled oracle (`make world`, a pull): its install and every evaluation it scores run
    again, and no training or sampling."""
    from conceptbench.world.shipped import SHIPPED

    work, config = tiny_run
    shipped = SHIPPED / "oracle" / "config.json"
    before = shipped.read_bytes()
    try:
        # Changed content (still valid JSON). Snakemake compares checksums: a file merely touched reruns nothing.
        shipped.write_bytes(before + b"\n")
        counts = job_counts(snakemake(work, "-n", "--configfile", str(config)).stdout)
    finally:
        shipped.write_bytes(before)
    n = sum(len(v) for v in TINY_VARIANTS.values()) + sum(len(b) for b in TINY_BASELINES.values())
    assert counts["install_world_model"] == 1 and counts["evaluate"] == n, counts
    assert "train" not in counts and "sample" not in counts, counts


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_shows_the_table_and_images_in_chromium(tiny_run, tmp_path):
    """The report opens in headless chromium; its summary view holds the table, its galleries images."""
    from PIL import Image

    work, _ = tiny_run
    report = work / "report.html"
    assert re.search(r'<div id="app">\s*<div', chromium(report, tmp_path / "p0"))  # the app rendered itself
    table = report_opening(report, "tables/summary.html", tmp_path / "table.html")
    page = data_uri_payload(chromium(table, tmp_path / "p1"), "iframe", "text/html").decode()
    summary = pd.read_csv(work / "results/tables/summary.csv")
    assert page.count("<tr>") > len(summary) and all(f"<td>{v}</td>" in page for v in summary["variant"])
    gallery = report_opening(report, "gallery/dreambooth/lambda-0.25.png", tmp_path / "gallery.html")
    png = data_uri_payload(chromium(gallery, tmp_path / "p2"), "img", "image/png")
    assert png == (work / "results/plots/gallery/dreambooth/lambda-0.25.png").read_bytes()
    for name, page_file in (("table", table), ("gallery", gallery)):
        shot = tmp_path / f"screenshot_{name}.png"
        chromium(page_file, tmp_path / f"s_{name}", screenshot=shot)
        with Image.open(shot) as im:
            gray = im.convert("L")
        assert gray.getextrema()[0] < 100 and len(gray.getcolors(1 << 16) or []) > 20, name  # not blank


def test_a_failed_variant_is_redone_alone(tiny_run):
    """As after a failed evaluation: one variant's metrics and the summary missing. The rerun
    redoes that evaluation and what reads it, and no training or sampling."""
    work, config = tiny_run
    lost = [work / "results/metrics/dreambooth/lambda-0.5.csv", work / "results/tables/summary.csv"]
    kept = {p: p.read_bytes() for p in lost}
    for p in lost:
        p.unlink()
    try:
        proc = snakemake(work, "-n", "--configfile", str(config))
        counts = job_counts(proc.stdout)
        assert counts["evaluate"] == 1 and counts["aggregate"] == 1
        assert "train" not in counts and "sample" not in counts
        assert re.findall(r"output: (\S+/metrics/\S+)", proc.stdout) == ["results/metrics/dreambooth/lambda-0.5.csv"]
    finally:
        for p, data in kept.items():
            p.write_bytes(data)


# --- Does it learn? In the toy world the embedded default's methods must move what they teach -----
# On the base's own (prompt, seed) pairs, the best variant's paired delta has its 95 % bootstrap
# interval above zero. oracle_* are the toy world's ground truth (world/oracle.py): the subject drawn,
# the ninja style drawn, the share of what the prompt names that is drawn; true_aesthetic is the world's formula.
LEARNS = {
    "dreambooth": ["clip_i", "dino_i", "oracle_subject"],
    "textual_inversion": ["clip_i", "dino_i", "oracle_subject"],
    "custom_diffusion": ["clip_i", "dino_i", "oracle_subject"],
    "lora": ["oracle_ninja"],
    "lcm": ["oracle_prompt"],  # the student at 4 steps over the teacher at 4 DDIM steps
    "ddpo": ["aesthetic", "true_aesthetic"],
}
# What does not learn yet on the embedded default, each an explicit strict xfail (it fails the day it starts
# to learn, and then belongs in LEARNS proper). Empty: every target learns at tiny.yaml's seed, the one its
# settings were tuned at; at seeds 100, 200 and 300, 8, 7 and 8 of the 13 do (docs/toyworld.md).
NOT_YET: dict[tuple[str, str], str] = {}


def learned(summary: pd.DataFrame, experiment: str, metric: str) -> tuple[bool, dict]:
    """Whether some trained variant's paired delta on `metric` has its interval above zero, and the numbers of
    the variant whose interval lies highest (not the largest delta: a wide interval around it may cover zero
    while another variant's lies above it)."""
    rows = summary[(summary["experiment"] == experiment) & (summary["role"] == "trained")]
    best = rows.loc[rows[f"{metric}_delta_lo"].idxmax()]
    numbers = {k: round(float(best[f"{metric}{k}"]), 4) for k in ("_delta", "_delta_lo", "_delta_hi")}
    return bool(best[f"{metric}_delta_lo"] > 0), {"variant": best["variant"], **numbers}


def test_learned_asks_whether_some_variant_lies_above_its_base():
    rows = pd.DataFrame({"experiment": "x", "role": ["base", "trained", "trained"], "variant": ["base", "wide", "sure"],
                         "m_delta": [0.0, 0.30, 0.05], "m_delta_lo": [0.0, -0.10, 0.01], "m_delta_hi": [0.0, 0.70, 0.09]})
    assert learned(rows, "x", "m") == (True, {"variant": "sure", "_delta": 0.05, "_delta_lo": 0.01, "_delta_hi": 0.09})
    rows.loc[2, "m_delta_lo"] = -0.01
    assert learned(rows, "x", "m")[0] is False


@pytest.mark.parametrize("experiment,metric", [
    pytest.param(e, m, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[e, m])) if (e, m) in NOT_YET else (e, m)
    for e, ms in LEARNS.items() for m in ms])
def test_every_method_learns_in_the_toy_world(tiny_run, experiment, metric):
    work, _ = tiny_run
    ok, numbers = learned(pd.read_csv(work / "results/tables/summary.csv"), experiment, metric)
    assert ok, f"{experiment} does not move {metric} above its base: {numbers}"


def test_prior_preservation_keeps_the_class_prompt_off_the_subject(tiny_run):
    """The point of DreamBooth's λ, in ground truth: the class prompt ("a photo of a dog") draws the
    subject more often at the smallest λ than at the largest."""
    work, _ = tiny_run
    summary = pd.read_csv(work / "results/tables/summary.csv").set_index(["experiment", "variant"])
    lams = sorted(TINY_VARIANTS["dreambooth"], key=TINY_VARIANTS["dreambooth"].get)
    drift = [summary.loc[("dreambooth", v), "prior_oracle_subject"] for v in (lams[0], lams[-1])]
    assert drift[0] > drift[1], drift


def test_the_learning_test_fails_when_training_is_a_no_op(tmp_path):
    """DreamBooth with a learning rate too small to change one weight (the schema refuses 0): no delta's
    interval lies above zero. The untrained variant does not draw what the base draws: its prompts carry
    the identifier ("sks dog in a bucket"), the base's the class phrase ("a dog in a bucket"), and the
    identifier alone moves the images (DINO-I -0.13 [-0.26, -0.01], 2026-12-04; the oracle finds the subject in
    none of them)."""
    cfg = copy.deepcopy(TINY)
    cfg["experiments"] = {"dreambooth": cfg["experiments"]["dreambooth"]}
    exp = cfg["experiments"]["dreambooth"]
    exp["train"].update(steps=2, learning_rate=1.0e-12, checkpoint_every=1)
    exp["sweep"]["values"] = [1.0]
    exp["class_images"]["count"] = 2
    snakemake(tmp_path, "--cores", "2", "--configfile", str(write_config(tmp_path / "noop.yaml", cfg)))
    summary = pd.read_csv(tmp_path / "results/tables/summary.csv")
    for metric in LEARNS["dreambooth"]:
        ok, numbers = learned(summary, "dreambooth", metric)
        assert not ok, (metric, numbers)
