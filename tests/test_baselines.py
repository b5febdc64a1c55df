"""The untrained base in every experiment: its config, its samples, and the paired deltas against it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conceptbench import aggregate as agg
from conceptbench import config as cb
from conceptbench import paired
from conceptbench.io import read_json

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())
STUDY = yaml.safe_load((ROOT / "config/config.yaml").read_text())


# --- config ---------------------------------------------------------------------------------


def test_every_experiment_has_a_base_and_lcm_also_its_full_step_teacher():
    # The teacher's full step count: the grid LCM distils in the study, the 20 everything samples in the toy world.
    for raw, full in ((TINY, 20), (STUDY, 50)):
        cfg = cb.validate(copy.deepcopy(raw))
        baselines = cb.baselines(cfg)
        assert baselines.keys() == cb.variants(cfg).keys()
        assert all(list(b)[0] == cb.BASE for b in baselines.values())
        assert baselines["lcm"] == {"base": {"scheduler": "ddim"}, "base-full": {"scheduler": "ddim", "steps": full}}
        assert baselines["dreambooth"] == {"base": {}}


def test_a_baseline_spec_is_the_experiment_untouched_with_its_sampling_overrides():
    cfg = cb.validate(copy.deepcopy(STUDY))
    base = cb.resolve_variant(cfg, "dreambooth", "base")
    trained = cb.resolve_variant(cfg, "dreambooth", "lambda-0.25")
    # The base keeps the experiment's own args (its method's declared default for the swept one): no sweep value.
    assert base["args"]["prior_loss_weight"] == cfg["experiments"]["dreambooth"]["args"]["prior_loss_weight"] == 1.0
    assert trained["args"]["prior_loss_weight"] == 0.25
    assert base["sampling"] == trained["sampling"] == cfg["experiments"]["dreambooth"]["sampling"]
    full = cb.resolve_variant(cfg, "lcm", "base-full")
    assert full["sampling"] == {**cfg["experiments"]["lcm"]["sampling"], "steps": 50, "scheduler": "ddim"}
    assert cb.resolve_variant(cfg, "lcm", "base")["sampling"]["steps"] == 4


@pytest.mark.parametrize("baselines, message", [
    ({"teacher": {}}, "experiments.lcm.baselines: must include 'base'"),
    ({"base": {}, "loss-l2": {}}, "experiments.lcm.baselines: 'loss-l2' is also the name of a swept variant"),
    ({"base": {}, "base full": {}}, "experiments.lcm.baselines: name 'base full' has characters outside"),
])
def test_bad_baselines_are_refused_by_name(baselines, message):
    cfg = copy.deepcopy(TINY)
    cfg["experiments"]["lcm"]["baselines"] = baselines
    with pytest.raises(cb.ConfigError, match=message):
        cb.validate(cfg)


def test_the_class_prompt_is_sampled_as_the_prior_probe_where_there_are_class_images():
    cfg = cb.validate(copy.deepcopy(STUDY))
    exps = cfg["experiments"]
    dreambooth = cb.sample_prompts(exps["dreambooth"])
    assert [p["prompt_set"] for p in dreambooth] == ["eval", "eval", "eval", "prior"]
    assert dreambooth[-1] == {"prompt": "a photo of a dog", "eval_prompt": "a photo of a dog", "prompt_set": "prior"}
    assert dreambooth[0]["eval_prompt"] == "a dog in a bucket"
    assert {p["prompt_set"] for p in cb.sample_prompts(exps["lora"])} == {"eval"}


# --- sampling a baseline --------------------------------------------------------------------


PROMPTS = [{"prompt": "<sks-cat> in a basket", "eval_prompt": "a cat toy in a basket", "prompt_set": "eval"},
           {"prompt": "a photo of a cat", "eval_prompt": "a photo of a cat", "prompt_set": "prior"}]


@pytest.mark.parametrize("method, given", [
    ("dreambooth", ["a cat toy in a basket", "a photo of a cat"]),  # the class phrase
    ("textual_inversion", ["toy in a basket", "a photo of a cat"]),  # the initializer word
])
def test_a_baseline_samples_the_base_model_with_the_placeholder_read_as_the_method_says(
        tiny_pipeline_dir, tmp_path, method, given):
    from conceptbench.sample import run_sampling

    spec = {"experiment": "e", "variant": "base", "method": method, "seed": 0, "resolution": 64,
            "args": {"placeholder_token": "<sks-cat>", "initializer_token": "toy"}}
    cfg = {"prompts": PROMPTS, "seeds": [3], "steps": 2, "guidance_scale": 5.0, "latency_repeats": 1}
    rows = run_sampling(spec, tiny_pipeline_dir, None, cfg, tmp_path / "s", device="cpu")
    assert [r["prompt"] for r in rows] == given
    assert [r["eval_prompt"] for r in rows] == [p["eval_prompt"] for p in PROMPTS]
    assert [r["prompt_set"] for r in rows] == ["eval", "prior"]


def test_a_ddim_baseline_replaces_the_models_own_scheduler(tiny_pipeline_dir, tmp_path):
    from diffusers import DDIMScheduler, PNDMScheduler

    from conceptbench.sample import load_for_sampling, run_sampling
    from conceptbench.train.method import load_base_pipeline

    pndm = tmp_path / "pndm-model"  # a base model whose own scheduler is PNDM, as SD v1.5's is
    pipe = load_base_pipeline(tiny_pipeline_dir)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(str(pndm))
    spec = {"experiment": "lcm", "variant": "base-full", "method": "lcm", "seed": 0, "resolution": 64}
    cfg = {"prompts": [{"prompt": "a cat", "eval_prompt": "a cat"}], "seeds": [0], "steps": 3,
           "guidance_scale": 8.0, "latency_repeats": 1, "dtype": "fp32"}
    own, _ = load_for_sampling(spec, pndm, None, {**cfg, "scheduler": "pipeline"}, "cpu")
    ddim, _ = load_for_sampling(spec, pndm, None, {**cfg, "scheduler": "ddim"}, "cpu")
    assert isinstance(own.scheduler, PNDMScheduler) and isinstance(ddim.scheduler, DDIMScheduler)
    assert dict(ddim.scheduler.config)["beta_schedule"] == dict(own.scheduler.config)["beta_schedule"]
    run_sampling(spec, pndm, None, {**cfg, "scheduler": "ddim"}, tmp_path / "s", device="cpu")
    latency = read_json(tmp_path / "s" / "latency.json")
    assert latency["scheduler"] == "DDIMScheduler" and latency["steps"] == 3
    with pytest.raises(ValueError, match="sampling.scheduler: 'euler'"):
        load_for_sampling(spec, pndm, None, {**cfg, "scheduler": "euler"}, "cpu")


# --- paired deltas --------------------------------------------------------------------------


def per_image(values: dict[str, np.ndarray], prompt_set="eval", degenerate=()) -> pd.DataFrame:
    """A metrics CSV of 3 prompts x 4 seeds with the given per-image columns."""
    n = len(next(iter(values.values())))
    df = pd.DataFrame({"file": [f"{i}.png" for i in range(n)], "prompt": "p", "eval_prompt": "p",
                       "prompt_index": np.arange(n) // 4, "seed": np.arange(n) % 4, "prompt_set": prompt_set,
                       **values, "degenerate": False})
    df.loc[list(degenerate), "degenerate"] = True
    return df


def test_the_paired_delta_is_the_mean_difference_over_shared_pairs():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.2, 12)  # a large spread between pairs...
    lift = 0.03 + rng.normal(0, 0.005, 12)  # ...and a small, steady lift within each pair
    scores = paired.variant_scores(per_image({"clip_i": base + lift}, degenerate=[5]), ["clip_i"])
    ref = paired.variant_scores(per_image({"clip_i": base}, degenerate=[0]), ["clip_i"])
    delta, lo, hi, n = paired.paired_delta(scores["clip_i"], ref["clip_i"])
    kept = [i for i in range(12) if i not in (0, 5)]  # a pair counts only where neither image is degenerate
    assert n == 10 and delta == pytest.approx(lift[kept].mean())
    assert 0 < lo < delta < hi < 0.04  # pairing removes the between-pair spread...
    unpaired = [paired.mean_with_interval(s["clip_i"]) for s in (scores, ref)]
    assert unpaired[0][1] < unpaired[1][2]  # ...which makes the two means' own intervals overlap


def test_a_variant_that_learnt_nothing_has_a_delta_interval_on_zero():
    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 0.1, 12)
    ref = paired.variant_scores(per_image({"clip_i": base}), ["clip_i"])
    same = paired.variant_scores(per_image({"clip_i": base.copy()}), ["clip_i"])
    assert paired.paired_delta(same["clip_i"], ref["clip_i"])[:3] == (0.0, 0.0, 0.0)
    noise = paired.variant_scores(per_image({"clip_i": base + rng.normal(0, 0.02, 12)}), ["clip_i"])
    _, lo, hi, _ = paired.paired_delta(noise["clip_i"], ref["clip_i"])
    assert lo < 0 < hi


def test_prompt_sets_other_than_eval_are_their_own_metrics():
    values = {"clip_i": np.linspace(0.1, 0.9, 12), "aesthetic": np.full(12, math.nan)}
    df = pd.concat([per_image(values), per_image({k: v + 1 for k, v in values.items()}, "prior")], ignore_index=True)
    scores = paired.variant_scores(df, ["clip_i", "aesthetic"])
    assert sorted(scores) == ["clip_i", "prior_clip_i"]  # no values, no metric
    assert scores["prior_clip_i"].mean() == pytest.approx(scores["clip_i"].mean() + 1)
    assert paired.counts(df) == {"n_images": 12, "n_degenerate": 0}  # counts are of the evaluation prompts


EXPERIMENTS = {
    "dreambooth": {"method": "dreambooth", "task": "subject", "metrics": ["clip_t", "clip_i", "dino_i"],
                   "param": "args.prior_loss_weight", "variants": {"lambda-0.25": 0.25, "lambda-1.0": 1.0},
                   "baselines": ["base"]},
    "lcm": {"method": "lcm", "task": "acceleration", "metrics": ["clip_t"], "param": "args.loss_type",
            "variants": {"loss-l2": "l2"}, "baselines": ["base", "base-full"]},
}
# per variant: the shift of every eval score over the base, and of the prior probe's similarity to the subject
SHIFT = {"base": 0.0, "lambda-0.25": 0.05, "lambda-1.0": 0.10, "base-full": 0.02, "loss-l2": 0.04}


@pytest.fixture
def results(tmp_path):
    """Metrics, train.json and latency of every variant and baseline; every per-image CSV also has an
    `oracle_subject` column, which no code names."""
    rng = np.random.default_rng(0)
    base = {m: rng.normal(0.5, 0.1, 12) for m in ("clip_t", "clip_i", "dino_i", "oracle_subject")}
    files = {k: [] for k in ("metrics", "train", "samples", "base_metrics", "base_samples")}
    for exp, info in EXPERIMENTS.items():
        for name in [*info["baselines"], *info["variants"]]:
            kind = "base_" if name in info["baselines"] else ""
            values = {m: v + SHIFT[name] + rng.normal(0, 0.002, 12) for m, v in base.items()}
            frames = [per_image(values)]
            if exp == "dreambooth":
                frames.append(per_image({m: v + 2 * SHIFT[name] for m, v in base.items()}, "prior"))
            m = tmp_path / "metrics" / exp / f"{name}.csv"
            m.parent.mkdir(parents=True, exist_ok=True)
            pd.concat(frames, ignore_index=True).to_csv(m, index=False)
            s = tmp_path / "samples" / exp / name
            s.mkdir(parents=True)
            (s / "latency.json").write_text(json.dumps({"median_ms": 10.0}))
            files[f"{kind}metrics"].append(m), files[f"{kind}samples"].append(s)
            if not kind:
                t = tmp_path / "train" / exp / name / "train.json"
                t.parent.mkdir(parents=True)
                t.write_text(json.dumps({"trainable_params": 10, "artifact_bytes": 40, "train_seconds": 1.0,
                                         "peak_mem_bytes": 100}))
                files["train"].append(t)
    return tmp_path, files


def run(tmp_path, files):
    out = tmp_path / "tables"
    table = agg.aggregate(EXPERIMENTS, files["metrics"], files["train"], files["samples"], out / "summary.csv",
                          out / "summary.md", html_path=out / "summary.html",
                          baseline_metrics_files=files["base_metrics"], baseline_sample_dirs=files["base_samples"],
                          deltas_path=out / "deltas.csv", learning_path=out / "learning.html")
    return table, out


def test_summary_has_base_rows_and_a_paired_delta_for_every_metric(results):
    table, out = run(*results)
    csv = pd.read_csv(out / "summary.csv").set_index(["experiment", "variant"])
    assert list(csv.index) == [("dreambooth", "base"), ("dreambooth", "lambda-0.25"), ("dreambooth", "lambda-1.0"),
                               ("lcm", "base"), ("lcm", "base-full"), ("lcm", "loss-l2")]
    assert csv["role"].tolist() == ["baseline", "trained", "trained", "baseline", "baseline", "trained"]
    assert (csv.loc[[("dreambooth", "base"), ("lcm", "base")], "trainable_params"] == 0).all()
    for name in ("clip_t", "oracle_subject", "prior_clip_i", "prior_oracle_subject"):  # the column no code names too
        assert {f"{name}{s}" for s in agg.STATS} <= set(csv.columns), name
    for (exp, variant), shift in (("dreambooth", "lambda-0.25"), 0.05), (("dreambooth", "lambda-1.0"), 0.10), \
                                 (("lcm", "loss-l2"), 0.04), (("lcm", "base-full"), 0.02):
        row = csv.loc[(exp, variant)]
        assert row["oracle_subject_delta"] == pytest.approx(shift, abs=0.003)
        assert row["clip_t_delta_lo"] < row["clip_t_delta"] < row["clip_t_delta_hi"]
        assert row["clip_t_delta_lo"] > 0
    assert csv.loc[("dreambooth", "lambda-1.0"), "prior_clip_i_delta"] == pytest.approx(0.20)
    assert csv.loc[("dreambooth", "base")][[c for c in csv.columns if c.endswith("_delta")]].isna().all()
    assert csv.loc[("lcm", "loss-l2")][["clip_i", "dino_i", "prior_clip_i"]].isna().all()  # not LCM metrics


def test_deltas_csv_holds_every_baseline_and_the_learning_page_the_best_variant(results):
    _, out = run(*results)
    deltas = pd.read_csv(out / "deltas.csv")
    lcm = deltas[(deltas["experiment"] == "lcm") & (deltas["metric"] == "clip_t")]
    assert sorted(zip(lcm["variant"], lcm["reference"])) == [("base-full", "base"), ("loss-l2", "base"),
                                                           ("loss-l2", "base-full")]
    against_full = lcm[(lcm["variant"] == "loss-l2") & (lcm["reference"] == "base-full")].iloc[0]
    assert against_full["delta"] == pytest.approx(0.02, abs=0.003) and against_full["n_pairs"] == 12
    page = (out / "learning.html").read_text()
    assert "lambda-1.0 (oracle_subject)" in page  # the highest interval on the ground truth, which comes first
    assert "loss-l2 (CLIP-T)" in page and "vs base-full: +0.0" in page
    assert "Does it learn?" in (out / "summary.md").read_text()


def test_the_plots_draw_the_baselines_and_the_learning_figure(results, tmp_path):
    from conceptbench import plots

    root, files = results
    _, out = run(root, files)
    for sample_dir in files["samples"] + files["base_samples"]:
        rows = [{"file": f"{p}_{s}.png", "prompt": f"prompt {p}", "eval_prompt": f"prompt {p}", "prompt_index": p,
                 "seed": s, "prompt_set": "eval"} for p in range(3) for s in range(4)]
        (sample_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for r in rows:
            Image.fromarray(np.full((16, 16, 3), 40 * r["prompt_index"] + 10 * r["seed"], np.uint8)).save(sample_dir / r["file"])
    artifact = root / "train" / "dreambooth" / "lambda-1.0" / "artifact"
    artifact.mkdir()
    (artifact / "rewards.json").write_text(json.dumps({"reward": "aesthetic", "epochs": [
        {"epoch": 0, "mean": 5.0, "std": 0.2}, {"epoch": 1, "mean": 5.3, "std": 0.2}]}))
    info = {**EXPERIMENTS["dreambooth"], "metrics": ["clip_t", "clip_i", "dino_i"]}
    plots.plot_sweep("dreambooth", info, out / "summary.csv", tmp_path / "sweep.png", artifacts=[artifact])
    plots.plot_learning("dreambooth", info, out / "summary.csv",
                        [files["base_samples"][0], *files["samples"][:2]], tmp_path / "learning.png")
    for name, wide in (("sweep", 4 * 200), ("learning", 8 * 90)):
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.width > wide and np.asarray(im.convert("L"), dtype=float).std() > 5, name
    with pytest.raises(ValueError, match="samples of 'base' and 'lambda-1.0' needed"):
        plots.plot_learning("dreambooth", info, out / "summary.csv", files["samples"][:2], tmp_path / "x.png")


def test_study_comparison_and_efficiency_plots_skip_the_baselines(results, tmp_path):
    from conceptbench import plots

    root, files = results
    table, out = run(root, files)
    study = {"source": "s", "metrics": {}, "variants": [
        {"experiment": "dreambooth", "method": "dreambooth", "value": 1.0, "clip_t": 0.27}]}
    comparison = agg.compare_with_study(table, EXPERIMENTS, study)
    assert comparison["variant"].tolist() == ["lambda-1.0"]
    plots.plot_efficiency(out / "summary.csv", tmp_path / "size.png", x="artifact_bytes")
    assert (tmp_path / "size.png").stat().st_size > 0


def test_sample_rows_carry_their_prompt_set(tiny_pipeline_dir, tmp_path):
    from conceptbench.sample import sample
    from conceptbench.train.method import load_base_pipeline

    pipe = load_base_pipeline(tiny_pipeline_dir)
    rows = sample(pipe, [{"prompt": "a cat"}, PROMPTS[1]], [0], steps=1, guidance_scale=1.0, resolution=64,
                  out_dir=tmp_path)
    assert [r["prompt_set"] for r in rows] == ["eval", "prior"]


def test_best_variant_is_the_one_whose_delta_lies_highest_on_the_tasks_first_target():
    """Catches the best variant chosen by the largest delta (a wide interval around it may cover zero while
    another variant's lies above it) or by a later target than the first one the table has."""
    from conceptbench.paired import best_variant

    rows = pd.DataFrame({"variant": ["wide", "sure", "none"], "oracle_subject_delta": [0.40, 0.20, float("nan")],
                         "oracle_subject_delta_lo": [-0.10, 0.05, float("nan")],
                         "dino_i_delta": [0.9, 0.1, 0.5], "dino_i_delta_lo": [0.5, 0.0, 0.2]})
    assert best_variant(rows, "subject") == ("sure", "oracle_subject")
    assert best_variant(rows.drop(columns=["oracle_subject_delta", "oracle_subject_delta_lo"]), "subject") == ("wide", "dino_i")
    tied = rows.assign(oracle_subject_delta_lo=[0.05, 0.05, float("nan")])
    assert best_variant(tied, "subject") == ("wide", "oracle_subject")  # equal lower ends: the larger delta
    assert best_variant(rows, "acceleration") == (None, None)
