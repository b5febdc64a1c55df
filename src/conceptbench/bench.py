"""Speed benchmark: training steps/s, peak memory and sampling latency in SD v1.5's shapes.

    python -m conceptbench.bench --size full --device cuda --out results/bench
    python -m conceptbench.bench --size tiny --out /tmp/bench          # the CPU smoke test

Models are built from configs with random weights (speed does not depend on weight values, so no
hub is needed): `--size full` is SD v1.5's architecture, `--size tiny` the embedded default's tiny
components. Training runs the real method classes (DreamBooth, LoRA, Textual Inversion, Custom Diffusion)
in the real loop (train.core.train), each handed a freshly built pipeline (TrainContext.pipeline) and a
few random images to encode at setup; sampling times the stock pipeline through
sample.pipeline_latency, plain and with the fast paths (fastpaths.py). Each timing is set against
its FLOP floor: FLOPs counted with torch's FlopCounterMode on the same models built on the meta device
(shapes only: the same count on every machine, in seconds even at full size), divided by the device
peak given by --peak-flops: by default 800e12, the speed issue's figure and about what a large bf16
matrix product attains on an H100 (the datasheet's dense peak is 989e12). `--flops-only` writes the
counts and floors without timing anything.
Writes bench.json and bench.md into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import runtime
from .fastpaths import apply_fast_paths
from .io import write_json, write_jsonl, write_text
from .models.tiny import TINY_DIFFUSION, build_tiny_pipeline
from .registry import declaration, get_method
from .sample import pipeline_latency
from .train import TrainContext, train, train_config

# SD v1.5's architecture (unet/, vae/ and text_encoder/ config.json of the released pipeline).
SD15 = dict(
    resolution=512,
    unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
              attention_head_dim=8, norm_num_groups=32,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32),
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768),
)
SIZES = {"tiny": TINY_DIFFUSION, "full": SD15}
FAMILIES = ("dreambooth", "lora", "textual_inversion", "custom_diffusion")
SAMPLERS = {"cfg30": dict(steps=30, guidance_scale=7.5, lcm=False),  # the study's sampler
            "lcm4": dict(steps=4, guidance_scale=8.0, lcm=True)}    # LCM: guidance embedded, no CFG batch
PROMPT = "a photo of a dog in a bucket"
META = torch.device("meta")


def build(size: str, lcm: bool = False):
    """A StableDiffusionPipeline of `size` with random weights (seed 0) on the CPU; LCM's U-Net has its
    w-embedding (of the LCM method's default width)."""
    spec = copy.deepcopy(SIZES[size])
    if lcm:
        spec["unet"]["time_cond_proj_dim"] = declaration("lcm")["args"]["time_cond_proj_dim"]["default"]
    pipe = build_tiny_pipeline(None, seed=0, spec=spec)
    if lcm:
        from diffusers import LCMScheduler
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Each timed method's arguments (the rest: its declared defaults), the study's settings where they matter.
BENCH_ARGS = {
    "dreambooth": {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog"},
    "lora": {"rank": None},  # --lora-rank
    "textual_inversion": {"placeholder_token": "<bench>", "initializer_token": "dog"},
    "custom_diffusion": {"modifier_token": "<bench>", "instance_prompt": "a photo of <bench> dog",
                         "class_prompt": "a photo of a dog"},
}
FAMILIES = tuple(BENCH_ARGS)
DATA_IMAGES = 4  # random images per folder: what setup encodes, not what a step costs


def write_bench_data(root: Path, resolution: int) -> tuple[Path, Path]:
    """Instance (with captions, for LoRA) and class image folders of random pixels at `resolution`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folders = root / "data", root / "class"
    for folder in folders:
        folder.mkdir(parents=True)
        for i in range(DATA_IMAGES):
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        write_jsonl(folder / "metadata.jsonl", [{"file_name": f"{i}.png", "text": "a photo of a dog"}
                                                for i in range(DATA_IMAGES)])
    return folders


def bench_method(family: str, size: str, data: tuple[Path, Path], device: torch.device, rank: int, train: dict):
    """The real method of `family` and its training context on a freshly built pipeline of `size`
    (on the meta device when `device` is meta): what the training loop gets in a train job."""
    args = {k: rank if v is None else v for k, v in BENCH_ARGS[family].items()}
    spec = {"seed": 0, "resolution": SIZES[size]["resolution"], "train": train, "args": args}
    settings = train_config(spec)
    with torch.device(device) if device == META else contextlib.nullcontext():
        pipe = build(size)
    ctx = TrainContext(spec=spec, base_model=Path("."), data_dir=data[0], class_dir=data[1], device=device,
                       mixed_precision=settings["mixed_precision"],
                       gradient_checkpointing=settings["gradient_checkpointing"], pipeline=pipe)
    return get_method(family)(args), ctx


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_flops(family: str, size: str, rank: int, data: tuple[Path, Path]) -> dict:
    """FLOPs of one training step of `family` (drawing the batch and its forward and backward) and its
    trainable parameters and latents per step, counted on the meta device.

    Without gradient checkpointing's recompute: the model's own work. (On real CPU tensors FlopCounterMode
    would miss attention, whose CPU SDPA kernel it has no formula for.)
    """
    method, ctx = bench_method(family, size, data, META, rank, {"steps": 1, "learning_rate": 1e-6})
    with META:
        method.setup(ctx)
    latents = []

    def step():
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            batch = method.batch(0, g)
        latents.append(batch["noisy"].shape[0])
        method.loss(batch, g).backward()

    flops = count_flops(step)
    params = [p for group in method.param_groups() for p in group["params"]]
    return dict(batch_latents=latents[0], trainable_params=sum(p.numel() for p in params), flops_per_step=flops)


def sampling_flops(size: str, sampler: str) -> int:
    """FLOPs of one image, counted on the meta device: the U-Net forwards (two latents a step with CFG)
    plus one VAE decode; the text encoder runs once per prompt and is left out."""
    s, spec = SAMPLERS[sampler], SIZES[size]
    side = spec["resolution"] // 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    n = 1 if s["lcm"] else 2
    with META:
        pipe = build(size, lcm=s["lcm"])
        latent = torch.empty(n, 4, side, side)
        text = torch.empty(n, 77, pipe.unet.config.cross_attention_dim)
        extra = {"timestep_cond": torch.empty(n, pipe.unet.config.time_cond_proj_dim)} if s["lcm"] else {}
    with torch.no_grad():
        unet = count_flops(lambda: pipe.unet(latent, 500, text, **extra))
        vae = count_flops(lambda: pipe.vae.decode(latent[:1]))
    return s["steps"] * unet + vae


def bench_train(family: str, args, device: torch.device, data: tuple[Path, Path]) -> dict:
    """Steps/s (median step after warm-up) and peak memory of `family` in the real training loop."""
    steps = args.warmup + args.train_steps
    train_settings = dict(steps=steps, learning_rate=1e-6, mixed_precision=args.mixed_precision,
                          gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                          log_every=steps, checkpoint_every=0)
    method, ctx = bench_method(family, args.size, data, device, args.lora_rank, train_settings)
    stamps = []

    def stamp(step: int) -> None:
        runtime.synchronize(device)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as work:
        summary = train(method, ctx, train_config(ctx.spec), Path(work), on_step_end=stamp)
    step_ms = statistics.median((b - a) * 1000 for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:]))
    return dict(step_ms=step_ms, steps_per_s=1000 / step_ms, timed_steps=args.train_steps,
                peak_mem_bytes=summary["peak_mem_bytes"], peak_mem_source=summary["peak_mem_source"],
                mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                optimizer=args.optimizer)


def bench_sample(sampler: str, profile: str, args, device: torch.device) -> dict:
    """Latency per image (median call of --repeats after --sample-warmup, over --sample-batch images a call)
    with the plain or the fast settings."""
    s = SAMPLERS[sampler]
    fast = dict(dtype=args.fast_dtype, attention="sdpa_fused", channels_last=True, tf32=True,
                compile=args.compile, compile_mode=args.compile_mode)
    plain = dict(dtype="fp32", attention="classic", channels_last=False, tf32=False, compile=False)
    cfg = fast if profile == "fast" else plain
    pipe = build(args.size, lcm=s["lcm"]).to(device, runtime.torch_dtype(cfg["dtype"]))
    applied = apply_fast_paths(pipe, cfg)
    batch = args.sample_batch
    lat = pipeline_latency(pipe, PROMPT, s["steps"], s["guidance_scale"], SIZES[args.size]["resolution"],
                           warmup=args.sample_warmup, repeats=args.repeats, batch_size=batch)
    return dict(profile=profile, dtype=cfg["dtype"], batch_size=batch, median_ms=lat["median_ms"],
                ms_per_image=lat["median_ms"] / batch, repeats=args.repeats, first_call_ms=lat["warmup_ms"][0],
                compile_s=(lat["warmup_ms"][0] - lat["median_ms"]) / 1000 if cfg["compile"] else None,
                fast_paths=applied)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def machine(device: torch.device) -> dict:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return dict(device=str(device), device_name=name, cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                diffusers=diffusers.__version__, python=platform.python_version())


def _cell(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    """A table cell: the value formatted, or "–" where the row has none (e.g. no timings with --flops-only)."""
    value = row.get(key)
    return "–" if value is None else format(value if scale == 1 else value / scale, fmt)


def markdown(result: dict) -> str:
    m, a = result["machine"], result["settings"]
    timed = "" if not a["flops_only"] else " FLOPs only: nothing timed."
    lines = [f"Device: {m['device']} ({m['device_name']}), {m['cpu_threads']} CPU threads; torch {m['torch']}, "
             f"diffusers {m['diffusers']}. Size {a['size']}; floor at {a['peak_flops']:.3g} FLOP/s.{timed}"]
    if result["train"]:
        lines += ["", "| training | trainable params | steps/s | ms/step | peak memory (GiB) | TFLOP/step | floor (ms) "
                  "| × floor |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["train"]:
        lines.append(f"| {r['method']} ({r['batch_latents']} latent{'s' if r['batch_latents'] > 1 else ''}) | "
                     f"{r['trainable_params']:,} | {_cell(r, 'steps_per_s', '.3g')} | {_cell(r, 'step_ms', '.4g')} | "
                     f"{_cell(r, 'peak_mem_bytes', '.2f', 2**30)} | {_cell(r, 'flops_per_step', '.3g', 1e12)} | "
                     f"{_cell(r, 'floor_ms', '.3g')} | {_cell(r, 'ratio_to_floor', '.3g')} |")
    if result["sample"]:
        lines += ["", "| sampling | profile | batch | ms/image (median) | n | compile (s) | TFLOP/image | floor (ms) "
                  "| × floor |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["sample"]:
        profile = f"{r['profile']} ({r['dtype']}, {r['fast_paths']['attention']})" if "profile" in r else "–"
        lines.append(f"| {r['sampler']} ({r['steps']} steps) | {profile} | {_cell(r, 'batch_size', 'd')} | "
                     f"{_cell(r, 'ms_per_image', '.4g')} | {_cell(r, 'repeats', 'd')} | {_cell(r, 'compile_s', '.1f')} | "
                     f"{_cell(r, 'flops_per_image', '.3g', 1e12)} | {_cell(r, 'floor_ms', '.3g')} | "
                     f"{_cell(r, 'ratio_to_floor', '.3g')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m conceptbench.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--methods", default=",".join(FAMILIES))
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--profiles", default="plain,fast")
    ap.add_argument("--train-steps", type=int, default=None, help="timed steps (default 10 full, 3 tiny)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps")
    ap.add_argument("--repeats", type=int, default=None, help="timed images (default 10 full, 3 tiny)")
    ap.add_argument("--sample-warmup", type=int, default=1)
    ap.add_argument("--sample-batch", type=int, default=1, help="images per pipeline call (the study: 1)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                    help="training autocast (default bf16 on cuda, no on cpu)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    ap.add_argument("--fast-dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the U-Net in the fast profile")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--peak-flops", type=float, default=800e12,
                    help="device FLOP/s for the floor (default: an H100's attainable bf16 matmul rate)")
    ap.add_argument("--flops-only", action="store_true", help="count FLOPs and floors; time nothing")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    full = args.size == "full"
    args.train_steps = args.train_steps or (10 if full else 3)
    args.repeats = args.repeats or (10 if full else 3)
    if args.sample_batch < 1:
        ap.error("--sample-batch must be at least 1")
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the first step is never timed)")
    return args


def run(argv=None) -> dict:
    args = parse_args(argv)
    runtime.set_threads(args.threads)
    device = runtime.pick_device(args.device)
    args.mixed_precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    result = dict(machine=machine(device), settings={k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()}, train=[], sample=[])
    with tempfile.TemporaryDirectory() as tmp:
        data = write_bench_data(Path(tmp), SIZES[args.size]["resolution"])
        for family in filter(None, args.methods.split(",")):
            if family not in FAMILIES:
                raise SystemExit(f"--methods: unknown {family!r}; known: {', '.join(FAMILIES)}")
            row = dict(method=family, **train_flops(family, args.size, args.lora_rank, data))
            row["floor_ms"] = row["flops_per_step"] / args.peak_flops * 1000
            if not args.flops_only:
                row.update(bench_train(family, args, device, data))
                row["ratio_to_floor"] = row["step_ms"] / row["floor_ms"]
            result["train"].append(row)
            print(row, flush=True)
            free_memory(device)
    for sampler in filter(None, args.samplers.split(",")):
        if sampler not in SAMPLERS:
            raise SystemExit(f"--samplers: unknown {sampler!r}; known: {', '.join(SAMPLERS)}")
        flops = sampling_flops(args.size, sampler)
        base = dict(sampler=sampler, steps=SAMPLERS[sampler]["steps"], flops_per_image=flops,
                    floor_ms=flops / args.peak_flops * 1000)
        for profile in [] if args.flops_only else filter(None, args.profiles.split(",")):
            row = dict(base, **bench_sample(sampler, profile, args, device))
            row["ratio_to_floor"] = row["ms_per_image"] / row["floor_ms"]
            result["sample"].append(row)
            print(row, flush=True)
            free_memory(device)
        if args.flops_only:
            result["sample"].append(base)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench.json", result)
    write_text(args.out / "bench.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    run()
