"""Sampling: seeded images for evaluation, a latency measurement, and DreamBooth's class images.

Every (prompt, seed) image is drawn from its own CPU torch.Generator seeded with `seed`, so a rerun
gives the same images, another batch size the same up to float rounding, and no image depends on
the device's RNG.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from . import runtime
from .config import defaults
from .fastpaths import apply_fast_paths
from .io import atomic_path, write_json, write_jsonl

log = logging.getLogger(__name__)


def image_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:02d}_{seed}.png"


def sample(pipe, prompts: list[dict], seeds: list[int], steps: int, guidance_scale: float, resolution: int,
           out_dir: Path, batch_size: int = 4, **call_kwargs) -> list[dict]:
    """Generate one image per (prompt, seed) into out_dir; return the samples.jsonl rows.

    prompts: [{"prompt": text given to the model, "eval_prompt": text CLIP-T scores against,
    "prompt_set": "eval" (default) or "prior" (the class prompt, DreamBooth's prior probe)}].
    Seeds of one prompt are batched `batch_size` at a time. Extra keyword arguments go to the pipeline.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, p in enumerate(prompts):
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start : start + batch_size]
            images = pipe(
                prompt=[p["prompt"]] * len(chunk),
                generator=[torch.Generator().manual_seed(int(s)) for s in chunk],
                num_inference_steps=steps, guidance_scale=guidance_scale,
                height=resolution, width=resolution, output_type="pil", **call_kwargs,
            ).images
            for seed, image in zip(chunk, images):
                name = image_name(i, seed)
                image.save(out_dir / name)
                rows.append(dict(file=name, prompt=p["prompt"], eval_prompt=p.get("eval_prompt", p["prompt"]),
                                 prompt_index=i, seed=int(seed), prompt_set=p.get("prompt_set", "eval")))
    return rows


def measure_latency(fn: Callable[[], object], warmup: int, repeats: int,
                    sync: Callable[[], None] | None = None) -> dict:
    """Time `fn()`: `warmup` untimed-for-the-median calls, then the median of `repeats` timed calls.

    `sync` runs after each call inside the timed region (default: CUDA synchronize when CUDA is in use).
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if sync is None:
        def sync():
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

    def timed() -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t) * 1000.0

    warmup_ms = [timed() for _ in range(warmup)]
    all_ms = [timed() for _ in range(repeats)]
    return dict(median_ms=statistics.median(all_ms), all_ms=all_ms, warmup_ms=warmup_ms)


def pipeline_latency(pipe, prompt: str, steps: int, guidance_scale: float, resolution: int, *,
                     warmup: int, repeats: int, seed: int = 0, batch_size: int = 1, **call_kwargs) -> dict:
    """Latency of one call making `batch_size` images (default 1) with `pipe`, end to end including VAE decode."""
    pipe.set_progress_bar_config(disable=True)

    def one_call():
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                    guidance_scale=guidance_scale, height=resolution, width=resolution,
                    num_images_per_prompt=batch_size, output_type="pil", **call_kwargs)

    device = pipe.device
    stats = measure_latency(one_call, warmup=warmup, repeats=repeats, sync=lambda: runtime.synchronize(device))
    return dict(stats, steps=steps, guidance_scale=guidance_scale, resolution=resolution, batch_size=batch_size,
                device=str(device), dtype=str(pipe.dtype).removeprefix("torch."))


LATENCY_WARMUP = 1  # untimed generations before the timed ones (the first pays for lazy setup)


def sampling_config(spec: dict, cfg: dict) -> dict:
    """`cfg` over the config schema's defaults: sampling.*, evaluation.batch_size and latency_repeats, and the
    spec's resolution."""
    evaluation = defaults("evaluation")
    return {**defaults("sampling"), "batch_size": evaluation["batch_size"],
            "latency_repeats": evaluation["latency_repeats"], "resolution": spec["resolution"], **cfg}


def attach_safety_checker(pipe, base_model: Path, device) -> None:
    """sampling.safety_checker: give `pipe` the base model folder's safety checker and feature extractor, so
    it blackens the images the checker flags, as a stock pipeline does."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    missing = [d for d in ("safety_checker", "feature_extractor") if not (Path(base_model) / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"sampling.safety_checker is true, but the base model folder {base_model} has no {' or '.join(missing)}/ "
            "(fetched hub models leave them out: add 'safety_checker/*' and 'feature_extractor/*' to the model's "
            "allow_patterns; the toy world's and tiny models have none): set sampling.safety_checker to false")
    checker = StableDiffusionSafetyChecker.from_pretrained(str(Path(base_model) / "safety_checker"))
    pipe.safety_checker = checker.to(device=device, dtype=pipe.unet.dtype).eval()
    pipe.feature_extractor = CLIPImageProcessor.from_pretrained(str(Path(base_model) / "feature_extractor"))


def load_for_sampling(spec: dict, base_model: Path, artifact_dir: Path | None, cfg: dict, device):
    """(pipeline, prompts): a trained variant through its method's loader, or, with no artifact, the
    untrained base model (a baseline) given each prompt as the method's base_prompt reads it.
    cfg["scheduler"] "ddim" swaps in a DDIMScheduler built from the pipeline's own config; cfg["safety_checker"]
    attaches the base model folder's safety checker (attach_safety_checker)."""
    from diffusers import DDIMScheduler

    from .methods import get_method
    from .train.method import load_base_pipeline

    method, dtype, prompts = get_method(spec["method"]), runtime.torch_dtype(cfg["dtype"]), cfg["prompts"]
    if artifact_dir is None:
        pipe = load_base_pipeline(Path(base_model), dtype=dtype).to(device)
        prompts = [{**p, "prompt": method.base_prompt(p, spec.get("args", {}))} for p in prompts]
    else:
        pipe = method.load_pipeline(Path(artifact_dir), Path(base_model), spec, device, dtype)
    if cfg.get("safety_checker"):
        attach_safety_checker(pipe, Path(base_model), device)
    scheduler = cfg.get("scheduler", "pipeline")  # set by a baseline (`baselines:` in the schema)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "pipeline":
        raise ValueError(f"sampling.scheduler: {scheduler!r} is neither 'pipeline' nor 'ddim'")
    return pipe, prompts


def run_sampling(spec: dict, base_model: Path, artifact_dir: Path | None, cfg: dict, out_dir: Path, *,
                 threads: int | None = None, device: str | None = None) -> list[dict]:
    """Sample a variant into out_dir: the PNGs, samples.jsonl and latency.json.

    The pipeline comes from the loader of spec["method"]; artifact_dir None samples the base model
    untouched (a baseline, see load_for_sampling). cfg: prompts ([{prompt, eval_prompt, prompt_set}]),
    seeds, steps, guidance_scale, batch_size, resolution (default spec["resolution"]),
    dtype ("fp32" | "fp16" | "bf16"), the fast paths, scheduler ("pipeline" | "ddim"),
    latency_repeats (0: no latency run, median_ms null); unset ones from sampling_config. out_dir appears only once complete.
    """
    cfg = sampling_config(spec, cfg)
    runtime.set_threads(threads)
    pipe, prompts = load_for_sampling(spec, base_model, artifact_dir, cfg, runtime.pick_device(device))
    fast_paths = apply_fast_paths(pipe, cfg)
    pipe.set_progress_bar_config(disable=True)
    common = dict(steps=cfg["steps"], guidance_scale=cfg["guidance_scale"], resolution=cfg["resolution"])

    with atomic_path(out_dir) as tmp:
        t = time.perf_counter()
        rows = sample(pipe, prompts, cfg["seeds"], batch_size=cfg["batch_size"], out_dir=tmp, **common)
        write_jsonl(tmp / "samples.jsonl", rows)
        log.info("sampled %d images in %.1f s", len(rows), time.perf_counter() - t)
        latency = dict(median_ms=None, all_ms=[], warmup_ms=[])
        if cfg["latency_repeats"] > 0:
            latency = pipeline_latency(pipe, prompts[0]["prompt"], warmup=LATENCY_WARMUP,
                                       repeats=cfg["latency_repeats"], **common)
        latency.update({k: spec.get(k) for k in ("experiment", "variant", "method", "seed")}, fast_paths=fast_paths,
                       scheduler=type(pipe.scheduler).__name__)
        write_json(tmp / "latency.json", latency)
    return rows


def generate_class_images(base_model: Path, cfg: dict, out_dir: Path, *, device: str | None = None) -> int:
    """DreamBooth's class images: cfg["count"] images of cfg["prompt"] drawn by the frozen base model.

    cfg: prompt, count, steps, guidance_scale, resolution, seed (image i uses seed + i),
    batch_size (default 4). Writes 000000.png ... and metadata.jsonl (the prompt as caption), atomically.
    """
    from .train.method import load_base_pipeline

    count, seed = int(cfg["count"]), int(cfg.get("seed", 0))
    pipe = load_base_pipeline(Path(base_model)).to(runtime.pick_device(device))
    with atomic_path(out_dir) as tmp:
        rows = sample(pipe, [{"prompt": cfg["prompt"]}], list(range(seed, seed + count)), steps=cfg["steps"],
                      guidance_scale=cfg["guidance_scale"], resolution=cfg["resolution"], out_dir=tmp,
                      batch_size=cfg.get("batch_size", 4))
        meta = []
        for i, row in enumerate(rows):
            name = f"{i:06d}.png"
            (tmp / row["file"]).rename(tmp / name)
            meta.append({"file_name": name, "text": cfg["prompt"], "seed": row["seed"]})
        write_jsonl(tmp / "metadata.jsonl", meta)
    return count
