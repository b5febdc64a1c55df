"""The interface between the shared training loop and one way of teaching a concept.

A method says what is trainable, how a batch is drawn, what the loss of a batch is, how its
artifact is saved and how a pipeline for sampling is loaded back from it. The loop in core.py does
everything else (devices, precision, accumulation, clipping, schedules, checkpoints, logging).

Life cycle, as core.train drives it:

    method = MethodClass(spec["args"])
    method.setup(ctx)                       # load base models, cache what stays fixed
    groups = method.param_groups()         # fp32 tensors with requires_grad=True
    for step in range(start, steps * method.updates_per_step()):  # one update each (DDPO: several a step)
        for micro in range(accumulation):  # g: a CPU torch.Generator seeded from (seed, step, micro)
            batch = method.batch(step, g)  # under no_grad + autocast: data, noise, timesteps
            loss = method.loss(batch, g)   # under autocast, with grad
        ...optimizer step...
        method.after_step(step)            # e.g. restore frozen embedding rows
    method.save(artifact_dir)
    pipe = MethodClass.load_pipeline(artifact_dir, base_model, spec, device, dtype)

All randomness must come from the generator passed in, so a resumed run repeats an uninterrupted one.
The module also holds the small helpers most methods share (images, prompts, latents, targets);
captions of a prepared dataset come from `conceptbench.data.read_prepared`.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..images import DataError, center_square, image_files, load_rgb
from ..registry import declaration_of, unknown_argument
from .settings import train_config


class MethodError(ValueError):
    """A method's arguments or inputs cannot work; the message names the method and the key."""


@dataclass
class TrainContext:
    """What setup() gets: the spec, the inputs and where to compute."""

    spec: dict
    base_model: Path
    data_dir: Path | None  # None for methods that make their own data (DDPO)
    class_dir: Path | None
    device: torch.device
    mixed_precision: str  # "no" | "fp16" | "bf16": frozen modules may be held in this dtype
    gradient_checkpointing: bool = False
    # Every named input of the train rule (e.g. data_1, class_images_1 of a multi-concept run).
    inputs: dict[str, Path] = field(default_factory=dict)
    # A base pipeline already built, used instead of loading base_model (the speed benchmark's random weights).
    pipeline: Any = None
    # How the scoring models among the inputs are built, by role ({"clip": {"quick_gelu": True}}: config.clip_options).
    model_options: dict[str, dict] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int(self.spec["seed"])

    @property
    def resolution(self) -> int:
        return int(self.spec["resolution"])

    @property
    def train(self) -> dict:
        """The spec's training settings, defaults filled in (settings.train_config)."""
        return train_config(self.spec)

    @property
    def batch_size(self) -> int:
        return int(self.train["batch_size"])

    @property
    def random_flip(self) -> bool:
        """train.random_flip: mirror each drawn training image with probability 0.5."""
        return bool(self.train["random_flip"])


class Method:
    """Base class of a training method; subclasses live in conceptbench/methods/<name>.py."""

    name = "method"

    def __init__(self, args: dict):
        self.args = self.resolved_args(args)

    @classmethod
    def declared_args(cls) -> dict | None:
        """The ARGS declared by the module of this class (or of the nearest base class that has one)."""
        for klass in cls.__mro__:
            module = sys.modules.get(klass.__module__)
            if hasattr(module, "ARGS"):
                return declaration_of(Path(module.__file__))["args"]
        return None

    @classmethod
    def resolved_args(cls, args: dict | None) -> dict:
        """`args` with the declared defaults filled in; an undeclared key is a MethodError naming the closest.

        Types and ranges are checked with the config, before any job (config.check_args)."""
        args, declared = dict(args or {}), cls.declared_args()
        if declared is None:  # a class without declarations (a test's toy method) takes its args as given
            return args
        for key in args:
            if key not in declared:
                raise MethodError(f"{cls.name}: {unknown_argument(cls.name, key, declared)}")
        for key, spec in declared.items():
            if "default" in spec and key not in args:
                args[key] = copy.deepcopy(spec["default"])
        return args

    def arg(self, key: str):
        """args[key] (declared defaults filled in); a required argument that is missing is a MethodError."""
        if key not in self.args:
            raise MethodError(f"{self.name}: args.{key} is required")
        return self.args[key]

    def setup(self, ctx: TrainContext) -> None:
        """Load the base models onto ctx.device, freeze what is not trained, cache fixed inputs."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimizer param groups: {"params": [fp32 tensors], optional "lr", "weight_decay"}."""
        raise NotImplementedError

    def batch(self, step: int, generator: torch.Generator) -> Any:
        """Draw the inputs of one micro-batch; every random choice uses `generator` (CPU)."""
        raise NotImplementedError

    def loss(self, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of `batch` (kept on the device; the loop reads it only at log points)."""
        raise NotImplementedError

    def scaled_batch(self, batch_size: int) -> float:
        """The batch train.scale_lr multiplies the learning rate by (with the accumulation), counted as
        the method's reference script counts it; called after setup. Default: train.batch_size."""
        return batch_size

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (0-based `step`), outside autocast and without grad."""

    def updates_per_step(self) -> int:
        """Optimizer updates one of the config's `train.steps` makes (asked after setup): 1, except for a
        method whose step is an epoch of several updates (DDPO). batch(), loss() and after_step() then
        get the update's index; checkpoint_every, log_every and lr_warmup_steps still count steps."""
        return 1

    def state_dict(self) -> dict:
        """Extra state to checkpoint besides the trainable tensors (e.g. an EMA target)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""

    def save(self, artifact_dir: Path) -> None:
        """Write the artifact into the (new, empty) folder `artifact_dir`, in a stock diffusers format."""
        raise NotImplementedError

    @classmethod
    def load_pipeline(cls, artifact_dir: Path, base_model: Path, spec: dict,
                      device: torch.device, dtype: torch.dtype = torch.float32):
        """A ready-to-sample diffusers pipeline built from the artifact (and the base model)."""
        raise NotImplementedError

    @classmethod
    def base_prompt(cls, row: dict, args: dict) -> str:
        """What the untrained base model is given for a sample row (the `base` variant): the prompt as
        CLIP-T reads it, the placeholder replaced by the class phrase ("sks dog in a bucket" -> "a dog
        in a bucket"), since the base model has never seen the placeholder."""
        return row["eval_prompt"]


# ---------------------------------------------------------------- helpers methods share


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline from in-memory parts, without safety checker: how methods save a
    full pipeline folder or sample from what they trained."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_base_pipeline(base_model: Path, dtype: torch.dtype = torch.float32):
    """The base StableDiffusionPipeline on the CPU, without safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(base_model), safety_checker=None, requires_safety_checker=False, dtype=dtype
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_pipeline(ctx: TrainContext, dtype: torch.dtype = torch.float32):
    """The base pipeline a method trains from: ctx.pipeline if one was built, else loaded from ctx.base_model."""
    if ctx.pipeline is not None:
        return ctx.pipeline.to(dtype=dtype)
    return load_base_pipeline(ctx.base_model, dtype=dtype)


def offload(*modules) -> None:
    """Move modules needed again only to save the artifact off the training device (on the meta device,
    where the speed benchmark counts FLOPs on shapes alone, there is nothing to move)."""
    for module in modules:
        if next(module.parameters()).device.type != "meta":
            module.to("cpu")


def load_image_folder(folder: Path, resolution: int) -> torch.Tensor:
    """All images of a folder (sorted by name) as a float tensor [N, 3, R, R] in [-1, 1].

    Prepared datasets are already R x R RGB PNGs; anything else is center-cropped and resized.
    """
    files = image_files(folder)
    if not files:
        raise DataError(f"{folder}: no images")
    arrays = []
    for path in files:
        img = load_rgb(path)
        if img.size != (resolution, resolution):
            img = center_square(img, resolution)
        arrays.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_latent_distribution(vae, images: torch.Tensor, device: torch.device, chunk: int = 8):
    """(mean, std) of the VAE's latent distribution per image, already scaled for the U-Net."""
    vae.to(device)
    means, stds = [], []
    for part in images.split(chunk):
        dist = vae.encode(part.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (torch.cat(means) - shift) * scale, torch.cat(stds) * scale


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw latents from a cached (scaled) distribution, noise from the CPU generator."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device, non_blocking=True)
    return mean + std * eps


def flip_draws(n: int, generator: torch.Generator) -> torch.Tensor:
    """Which of n images to mirror (bool [n], probability 0.5 each), drawn from the step's generator."""
    return torch.randint(0, 2, (n,), generator=generator).bool()


def random_flips(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels [n, 3, H, W] with each image mirrored left-right with probability 0.5."""
    flip = flip_draws(pixels.shape[0], generator).view(-1, 1, 1, 1)
    return torch.where(flip, pixels.flip(-1), pixels)


class ImageLatents:
    """The latent distributions of a fixed image set, encoded once, drawn a random batch at a time.

    With `flip` the mirrored images are encoded too (rows N..2N-1) and each draw picks one of the two
    orientations: the exact latents of a flipped image, which the mirrored latent of the image is not.
    Without it a draw takes the generator's values exactly as before flips existed (indices, then noise).
    """

    def __init__(self, vae, images: torch.Tensor, device: torch.device, flip: bool = False):
        mean, std = encode_latent_distribution(vae, torch.cat([images, images.flip(-1)]) if flip else images, device)
        self.set(mean, std, images.shape[0], flip)

    @classmethod
    def encoded(cls, mean: torch.Tensor, std: torch.Tensor, n: int, flip: bool) -> "ImageLatents":
        """From distributions already encoded (n images, then their mirrors with flip), e.g. chunk by chunk."""
        self = cls.__new__(cls)
        self.set(mean, std, n, flip)
        return self

    def set(self, mean: torch.Tensor, std: torch.Tensor, n: int, flip: bool) -> None:
        if mean.shape[0] != n * (2 if flip else 1):
            raise ValueError(f"{mean.shape[0]} latent rows for {n} images (flip {flip})")
        self.mean, self.std, self.n, self.flip = mean, std, n, flip

    def __len__(self) -> int:
        return self.n

    def indices(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """k random rows (with replacement), mirrored ones among them with flip."""
        idx = torch.randint(0, self.n, (k,), generator=generator)
        if self.flip:
            idx = idx + self.n * flip_draws(k, generator).long()
        return idx

    def draw(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """k latents drawn from k random images' distributions."""
        return self.draw_rows(self.indices(k, generator), generator)

    def draw_rows(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents drawn from the distributions at `rows` (from indices(); row % len(self) is the image)."""
        rows = rows.to(self.mean.device)
        return sample_latents(self.mean[rows], self.std[rows], generator)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length (77 for SD v1.5)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden state for each prompt (what the U-Net cross-attends to)."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]


def noise_and_target(scheduler, latents: torch.Tensor, generator: torch.Generator):
    """(noisy latents, timesteps, regression target) for the DDPM objective.

    Timesteps are uniform over the training schedule; the target is the noise for epsilon
    prediction and the velocity for v_prediction, as the scheduler's config says.
    """
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, non_blocking=True)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    timesteps = timesteps.to(latents.device, non_blocking=True)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (expected epsilon or v_prediction)")
    return noisy, timesteps, target
