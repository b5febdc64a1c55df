"""Sampling: seeded images are reproducible, the latency harness leaves warm-up out."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from conceptbench.io import read_json, read_jsonl
from conceptbench.methods.dreambooth import DreamBooth
from conceptbench.sample import generate_class_images, measure_latency, run_sampling, sample

PROMPTS = [{"prompt": "a photo of sks cat", "eval_prompt": "a photo of a cat"},
           {"prompt": "a sks cat on the beach", "eval_prompt": "a cat on the beach"}]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return DreamBooth.load_pipeline(tiny_pipeline_dir, tiny_pipeline_dir, {}, torch.device("cpu"))


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_same_seeds_give_identical_pngs(pipe, tmp_path):
    kw = dict(prompts=PROMPTS, seeds=[0, 1, 2], steps=2, guidance_scale=7.5, resolution=64)
    rows = sample(pipe, out_dir=tmp_path / "a", batch_size=2, **kw)
    sample(pipe, out_dir=tmp_path / "b", batch_size=2, **kw)
    sample(pipe, out_dir=tmp_path / "c", batch_size=1, **kw)

    assert [r["file"] for r in rows] == ["00_0.png", "00_1.png", "00_2.png", "01_0.png", "01_1.png", "01_2.png"]
    assert rows[3] == dict(file="01_0.png", prompt=PROMPTS[1]["prompt"], eval_prompt=PROMPTS[1]["eval_prompt"],
                           prompt_index=1, seed=0, prompt_set="eval")
    for r in rows:
        assert (tmp_path / "a" / r["file"]).read_bytes() == (tmp_path / "b" / r["file"]).read_bytes()
        # one generator per seed: an image does not depend on the batch it was drawn in
        assert np.abs(pixels(tmp_path / "a" / r["file"]) - pixels(tmp_path / "c" / r["file"])).max() <= 2
    assert (pixels(tmp_path / "a" / "00_0.png") != pixels(tmp_path / "a" / "00_1.png")).any()


def test_latency_excludes_warmup():
    calls = []

    def fn():
        time.sleep(0.3 if not calls else 0.01)
        calls.append(1)

    syncs = []
    stats = measure_latency(fn, warmup=1, repeats=3, sync=lambda: syncs.append(1))
    assert len(calls) == 4 and len(syncs) == 8
    assert stats["warmup_ms"][0] >= 300
    assert len(stats["all_ms"]) == 3 and stats["median_ms"] < 150


def test_run_sampling_writes_images_rows_and_latency(tiny_pipeline_dir, tmp_path):
    spec = {"experiment": "dreambooth", "variant": "base", "method": "dreambooth", "seed": 0, "resolution": 64}
    cfg = {"prompts": PROMPTS, "seeds": [7, 8], "steps": 2, "guidance_scale": 5.0, "batch_size": 2,
           "latency_repeats": 2}
    out = tmp_path / "samples"
    rows = run_sampling(spec, tiny_pipeline_dir, tiny_pipeline_dir, cfg, out, device="cpu")
    assert read_jsonl(out / "samples.jsonl") == rows
    assert sorted(p.name for p in out.glob("*.png")) == ["00_7.png", "00_8.png", "01_7.png", "01_8.png"]
    assert Image.open(out / "00_7.png").size == (64, 64)
    latency = read_json(out / "latency.json")
    assert latency["median_ms"] > 0 and len(latency["all_ms"]) == 2 and latency["steps"] == 2
    assert latency["variant"] == "base" and latency["method"] == "dreambooth"


def test_class_images_are_seeded_pngs_with_captions(tiny_pipeline_dir, tmp_path):
    cfg = {"prompt": "a photo of a cat", "count": 3, "steps": 2, "guidance_scale": 7.5, "resolution": 64, "seed": 5}
    assert generate_class_images(tiny_pipeline_dir, cfg, tmp_path / "a", device="cpu") == 3
    generate_class_images(tiny_pipeline_dir, {**cfg, "batch_size": 1}, tmp_path / "b", device="cpu")
    meta = read_jsonl(tmp_path / "a" / "metadata.jsonl")
    assert [m["file_name"] for m in meta] == ["000000.png", "000001.png", "000002.png"]
    assert [m["seed"] for m in meta] == [5, 6, 7] and {m["text"] for m in meta} == {cfg["prompt"]}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [*(m["file_name"] for m in meta), "metadata.jsonl"]
    for m in meta:
        diff = pixels(tmp_path / "a" / m["file_name"]) - pixels(tmp_path / "b" / m["file_name"])
        assert np.abs(diff).max() <= 2


def _with_safety_checker(base, out, flag_everything: bool):
    """A copy of the tiny pipeline folder with a tiny safety checker (flagging every image, or none)."""
    import shutil

    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    shutil.copytree(base, out)
    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # a concept is found where cosine − threshold > 0: a threshold of −2 finds it always
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(str(out / "safety_checker"))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(out / "feature_extractor"))
    return out


def test_the_safety_checker_blackens_what_it_flags_only_when_asked(tiny_pipeline_dir, tmp_path):
    from conceptbench.metrics.scores import degenerate_reason

    spec = {"experiment": "dreambooth", "variant": "base", "method": "dreambooth", "seed": 0, "resolution": 64}
    cfg = {"prompts": PROMPTS[:1], "seeds": [0, 1], "steps": 2, "guidance_scale": 5.0, "latency_repeats": 0}
    flagging = _with_safety_checker(tiny_pipeline_dir, tmp_path / "flagging", flag_everything=True)
    run_sampling(spec, flagging, None, {**cfg, "safety_checker": True}, tmp_path / "on", device="cpu")
    run_sampling(spec, flagging, None, cfg, tmp_path / "off", device="cpu")  # the default: no checker
    on, off = sorted((tmp_path / "on").glob("*.png")), sorted((tmp_path / "off").glob("*.png"))
    assert all(pixels(p).max() == 0 for p in on)  # flagged: black, as a stock pipeline returns them
    assert all(pixels(p).max() > 0 for p in off)
    assert all(degenerate_reason(Image.open(p)) == "black" for p in on)  # so evaluation flags them
    passing = _with_safety_checker(tiny_pipeline_dir, tmp_path / "passing", flag_everything=False)
    run_sampling(spec, passing, None, {**cfg, "safety_checker": True}, tmp_path / "passed", device="cpu")
    for a, b in zip(sorted((tmp_path / "passed").glob("*.png")), off):
        assert np.array_equal(pixels(a), pixels(b))
    with pytest.raises(FileNotFoundError, match="sampling.safety_checker is true, but the base model folder .* has no "
                                                "safety_checker or feature_extractor/"):
        run_sampling(spec, tiny_pipeline_dir, None, {**cfg, "safety_checker": True}, tmp_path / "none", device="cpu")
