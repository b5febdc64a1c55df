"""The speed benchmark at tiny size: every row present, every number finite and positive (no timings asserted)."""

import json
import math

import pytest
import torch

from conceptbench import bench

NUMBERS = {"train": ("trainable_params", "step_ms", "steps_per_s", "peak_mem_bytes", "flops_per_step", "floor_ms",
                     "ratio_to_floor"),
           "sample": ("median_ms", "first_call_ms", "flops_per_image", "floor_ms", "ratio_to_floor")}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    bench.run(["--size", "tiny", "--device", "cpu", "--out", str(out), "--threads", "1", "--train-steps", "1",
               "--warmup", "1", "--repeats", "1"])
    torch.set_num_threads(threads)
    return out


def test_json_has_every_row_with_finite_positive_numbers(result):
    data = json.loads((result / "bench.json").read_text())
    assert [r["method"] for r in data["train"]] == list(bench.FAMILIES)
    assert {(r["sampler"], r["profile"]) for r in data["sample"]} == {
        (s, p) for s in bench.SAMPLERS for p in ("plain", "fast")}
    for section, keys in NUMBERS.items():
        for row in data[section]:
            for key in keys:
                assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (row, key)


def test_trainable_sets_match_the_method_families(result):
    rows = {r["method"]: r for r in json.loads((result / "bench.json").read_text())["train"]}
    te_width = bench.TINY_DIFFUSION["text"]["hidden_size"]
    assert rows["textual_inversion"]["trainable_params"] == te_width  # one embedding row
    assert rows["dreambooth"]["batch_latents"] == rows["custom_diffusion"]["batch_latents"] == 2  # prior batch
    assert rows["custom_diffusion"]["trainable_params"] < rows["dreambooth"]["trainable_params"]
    # A backward pass costs about twice the forward: DreamBooth's step (2 latents, weight grads) counts more
    # FLOPs than Textual Inversion's (1 latent), and sampling 30 steps with CFG more than LCM's 4.
    assert rows["dreambooth"]["flops_per_step"] > rows["textual_inversion"]["flops_per_step"]


def test_sampling_flops_follow_steps_and_guidance(result):
    rows = {(r["sampler"], r["profile"]): r for r in json.loads((result / "bench.json").read_text())["sample"]}
    assert rows[("cfg30", "plain")]["flops_per_image"] == rows[("cfg30", "fast")]["flops_per_image"]
    assert rows[("cfg30", "plain")]["flops_per_image"] > 10 * rows[("lcm4", "plain")]["flops_per_image"]
    assert rows[("lcm4", "fast")]["fast_paths"]["attention"] == "sdpa_fused"


def test_markdown_table_lists_every_row(result):
    md = (result / "bench.md").read_text()
    for family in bench.FAMILIES:
        assert f"| {family} (" in md
    assert md.count("| cfg30 |") == 2 and md.count("| lcm4 |") == 2
