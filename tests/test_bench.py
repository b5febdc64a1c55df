"""The speed benchmark at tiny size: every row present, every number finite and positive (no timings asserted);
FLOPs counted on the meta device, attention included, and SD v1.5's count against the published one."""

import json
import math

import pytest
import torch

from conceptbench import bench

NUMBERS = {"train": ("trainable_params", "step_ms", "steps_per_s", "peak_mem_bytes", "flops_per_step", "floor_ms",
                     "ratio_to_floor"),
           "sample": ("median_ms", "ms_per_image", "first_call_ms", "flops_per_image", "floor_ms", "ratio_to_floor")}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    bench.run(["--size", "tiny", "--device", "cpu", "--out", str(out), "--threads", "1", "--train-steps", "1",
               "--warmup", "1", "--repeats", "1", "--sample-batch", "2"])
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
    assert md.count("| cfg30 (30 steps) |") == 2 and md.count("| lcm4 (4 steps) |") == 2
    assert not [line for line in md.splitlines() if line.startswith("| dreambooth") and "–" in line]  # timed


def test_batched_sampling_reports_per_image_latency(result):
    for row in json.loads((result / "bench.json").read_text())["sample"]:
        assert row["batch_size"] == 2 and row["ms_per_image"] == pytest.approx(row["median_ms"] / 2)
        assert row["ratio_to_floor"] == pytest.approx(row["ms_per_image"] / row["floor_ms"])


def test_flops_only_times_nothing_and_counts_the_same(result, tmp_path):
    timed = json.loads((result / "bench.json").read_text())
    counted = bench.run(["--size", "tiny", "--flops-only", "--out", str(tmp_path)])
    assert [r["flops_per_step"] for r in counted["train"]] == [r["flops_per_step"] for r in timed["train"]]
    assert {r["sampler"]: r["flops_per_image"] for r in counted["sample"]} == {
        r["sampler"]: r["flops_per_image"] for r in timed["sample"]}
    assert not any("step_ms" in r for r in counted["train"]) and not any("median_ms" in r for r in counted["sample"])
    assert "FLOPs only" in (tmp_path / "bench.md").read_text()


def test_meta_count_includes_attention():
    """On real CPU tensors FlopCounterMode misses the SDPA kernel but counts the classic processor's explicit
    matmuls. The meta-device count equals the classic count on real tensors, so attention is in it."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = bench.build("tiny")
    spec = bench.TINY_DIFFUSION
    side = spec["resolution"] // 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    latent, text = torch.randn(2, 4, side, side), torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        sdpa_on_cpu = bench.count_flops(lambda: pipe.unet(latent, 500, text))
        pipe.unet.set_attn_processor(AttnProcessor())
        pipe.vae.set_attn_processor(AttnProcessor())
        unet = bench.count_flops(lambda: pipe.unet(latent, 500, text))
        vae = bench.count_flops(lambda: pipe.vae.decode(latent[:1]))
    assert sdpa_on_cpu < unet  # what counting on the meta device avoids
    assert bench.sampling_flops("tiny", "cfg30") == 30 * unet + vae


def test_sd15_sampling_count_matches_the_published_one():
    """SD v1.5 at 512²: 803 GFLOP per U-Net forward of one latent and 2.5 TFLOP per VAE decode (the speed
    issue's figures), so a 30-step CFG image is 30 × 2 × 0.803 + 2.5 ≈ 50.7 TFLOP and a 4-step LCM image 5.7."""
    assert bench.sampling_flops("full", "cfg30") == pytest.approx(30 * 2 * 803e9 + 2.5e12, rel=0.01)
    assert bench.sampling_flops("full", "lcm4") == pytest.approx(4 * 803e9 + 2.5e12, rel=0.01)
