"""Custom Diffusion: train the U-Net's cross-attention projections and a modifier-token embedding.

Variants (args.train_params, the names of diffusers' --freeze_model): `crossattn_kv` trains to_k and
to_v of every cross-attention layer, `crossattn` also to_q and to_out. Both train one embedding row
per modifier token ("<new1>", methods/_tokens.py). Regularization adds, to every batch, images of the
class (real ones retrieved by CLIP, or generated), each with its own caption (args.class_captions:
a retrieved image's caption in the pool) or the class prompt, weighted by λ = args.prior_loss_weight
(Kumari et al. 2023; the processor-based training and file layout follow diffusers'
examples/custom_diffusion/train_custom_diffusion.py).

Augmentation as that script does it (args.augment, its default; --noaug turns it off): each instance
image is rescaled to a random size s, either smaller than the resolution R (s in [R/3, R], two
draws in three), placed at a random spot of a blank canvas, or larger (s in [1.2R, 1.4R)) and
cropped at a random spot; the instance loss counts only the latent cells inside the image (one cell
in from its edge when it is smaller than the canvas), summed over the latent channels and averaged
over those cells; and the prompt gets "a far away " or "very small " in front when s < 0.6R,
"zoomed in " or "close up " when s > R. train.random_flip mirrors instance and class images.

Multi-concept joint training: args.extra_concepts lists further concepts, each
{data, modifier_token, initializer_token, instance_prompt, class_prompt}; concept i's images come as
the train rule's inputs data_i and class_images_i. All concepts share the trained projections.

Artifact: pytorch_custom_diffusion_weights.safetensors (processor state, diffusers' key layout) and
one modifier_<i>.safetensors per token in the textual-inversion format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import read_prepared
from ..images import image_files
from ..train.method import (
    ImageLatents,
    Method,
    assemble_pipeline,
    MethodError,
    TrainContext,
    base_pipeline,
    load_base_pipeline,
    load_image_folder,
    noise_and_target,
    offload,
    tokenize,
)
from ._captioned import encode_batch
from ._tokens import TrainableTokens
from .dreambooth import dreambooth_loss

WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"
TRAIN_Q_OUT = {"crossattn_kv": False, "crossattn": True}
SMALL_PREFIXES = ("a far away ", "very small ")  # the reference's words for a shrunken instance image
LARGE_PREFIXES = ("zoomed in ", "close up ")  # and for an enlarged one

ARGS = {  # one JSON-schema fragment per argument (conceptbench/registry.py); no default: required
    "modifier_token": {"type": "string", "minLength": 1, "description": "The concept's new token, e.g. '<new1>'."},
    "initializer_token": {"type": "string", "minLength": 1, "default": "ktn",
                          "description": "The word the modifier token's embedding starts from (a rare one)."},
    "instance_prompt": {"type": "string", "minLength": 1,
                        "description": "The training prompt, with the modifier token, e.g. 'photo of a <new1> dog'."},
    "class_prompt": {"same_as": "dreambooth"},
    "train_params": {"enum": ["crossattn_kv", "crossattn"], "default": "crossattn_kv",
                     "description": "Cross-attention projections trained: to_k, to_v, or also to_q, to_out."},
    "prior_loss_weight": {"same_as": "dreambooth"},
    "augment": {"type": "boolean", "default": True,
                "description": "Random rescale of instance images with the masked instance loss and the size words "
                               "in the prompt (the reference's default); false: images as they are, plain MSE."},
    "class_captions": {"type": "boolean", "default": True,
                       "description": "Train each class image with its own caption (metadata.jsonl: a retrieved "
                                      "image's pool caption); false, or an image without one: class_prompt."},
    "extra_concepts": {
        "type": "array", "default": [],
        "items": {"type": "object", "additionalProperties": False,
                  "required": ["data", "modifier_token", "instance_prompt"],
                  "properties": {"data": {"type": "string"}, "modifier_token": {"type": "string"},
                                 "initializer_token": {"type": "string"}, "instance_prompt": {"type": "string"},
                                 "class_prompt": {"type": "string"}}},
        "description": "Further concepts trained jointly, each {data, modifier_token, instance_prompt, class_prompt, "
                       "initializer_token (default: args.initializer_token)}.",
    },
}
INPUTS = {"data": True, "class_images": True, "extra_concepts": True}
H100_SECONDS_PER_STEP = 1.0


def cross_attention_processors(unet, train_q_out: bool) -> dict:
    """Custom Diffusion processors for every cross-attention layer, initialised from its projections."""
    from diffusers.models.attention_processor import Attention, CustomDiffusionAttnProcessor2_0

    procs = {}
    for name, attn in unet.named_modules():
        if not (isinstance(attn, Attention) and name.endswith("attn2")):
            continue
        proc = CustomDiffusionAttnProcessor2_0(
            train_kv=True, train_q_out=train_q_out, hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features, out_bias=attn.to_out[0].bias is not None)
        weights = {"to_k_custom_diffusion.weight": attn.to_k.weight, "to_v_custom_diffusion.weight": attn.to_v.weight}
        if train_q_out:
            weights["to_q_custom_diffusion.weight"] = attn.to_q.weight
            weights.update({f"to_out_custom_diffusion.0.{k}": v for k, v in attn.to_out[0].state_dict().items()})
        proc.load_state_dict({k: v.detach().clone().float() for k, v in weights.items()})
        procs[f"{name}.processor"] = proc
    if not procs:
        raise MethodError("custom_diffusion: the U-Net has no cross-attention layers (attn2)")
    return procs


def install_custom_diffusion(unet, state_dict: dict[str, torch.Tensor]) -> None:
    """Put saved Custom Diffusion weights into a stock U-Net.

    Works around diffusers 0.42.1, where `unet.load_attn_procs(dir)` installs nothing unless the
    private `_pipeline=` argument is given, and safetensors saving drops the weightless self-attention
    entries that loader expects. Here: group the saved keys by processor, build each processor from
    its tensors (as unet._process_custom_diffusion does, but with the SDPA class), keep the default
    processor everywhere else, then set_attn_processor.
    """
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        proc_key, sep, sub = key.partition(".processor.")
        if not sep:
            raise MethodError(f"custom_diffusion: unexpected key {key!r} in {WEIGHT_NAME}")
        grouped.setdefault(proc_key + ".processor", {})[sub] = value
    procs = dict(unet.attn_processors)
    unknown = sorted(set(grouped) - set(procs))
    if unknown:
        raise MethodError(f"custom_diffusion: {WEIGHT_NAME} names layers this U-Net lacks: {unknown[:3]}")
    for key, weights in grouped.items():
        k = weights["to_k_custom_diffusion.weight"]
        proc = CustomDiffusionAttnProcessor2_0(
            train_kv=True, train_q_out="to_q_custom_diffusion.weight" in weights, hidden_size=k.shape[0],
            cross_attention_dim=k.shape[1], out_bias="to_out_custom_diffusion.0.bias" in weights)
        proc.load_state_dict(weights)
        procs[key] = proc.to(unet.device, unet.dtype)
    unet.set_attn_processor(procs)


def rescale_draws(n: int, size: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """(scale, top, left, word) of n instance images, as the reference draws them: scale in [size/3, size]
    with probability 0.66, else in [1.2 size, 1.4 size); top, left place the smaller image on the canvas
    (or the canvas in the larger image); word picks one of the two size words (used only where one applies)."""
    out = []
    for _ in range(n):
        if rng.uniform() < 0.66:
            scale = int(rng.integers(size // 3, size + 1))
        else:
            scale = int(rng.integers(int(1.2 * size), int(1.4 * size)))
        top, left = (int(v) for v in rng.integers(0, abs(scale - size) + 1, size=2))
        out.append((scale, top, left, int(rng.integers(0, 2))))
    return out


def rescale(image: torch.Tensor, scale: int, top: int, left: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image [3, R, R] in [-1, 1] resized to scale x scale and put on (or cropped to) the R x R canvas, and
    its mask over the latent cells [R/factor, R/factor]: the cells inside the image, less a one-cell border,
    when it is smaller than the canvas; every cell when it fills it."""
    size = image.shape[-1]
    resized = F.interpolate(image[None].float(), size=(scale, scale), mode="bilinear", align_corners=False,
                            antialias=scale < size)[0]
    cells = size // factor
    if scale > size:
        return resized[:, top : top + size, left : left + size], torch.ones(cells, cells)
    canvas = torch.zeros(3, size, size)  # 0 in [-1, 1]: the reference's blank canvas
    canvas[:, top : top + scale, left : left + scale] = resized
    mask = torch.zeros(cells, cells)
    mask[top // factor + 1 : (top + scale) // factor - 1, left // factor + 1 : (left + scale) // factor - 1] = 1.0
    return canvas, mask


def size_word(scale: int, size: int, word: int) -> int:
    """Which prompt an instance image of this scale is trained with: 0 the plain instance prompt,
    1-2 a SMALL_PREFIXES word (scale < 0.6 size), 3-4 a LARGE_PREFIXES word (scale > size)."""
    if scale < 0.6 * size:
        return 1 + word
    if scale > size:
        return 3 + word
    return 0


def custom_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Instance loss + prior_weight * class MSE; the first n_instance rows are instance images.

    Without a mask the instance loss is their MSE (DreamBooth's). With a mask [n_instance, 1, h, w] it is,
    as the reference computes it, each image's squared error summed over the masked cells and the latent
    channels, divided by the number of masked cells, averaged over images: C (4 in SD) times a masked
    MSE. An empty mask (possible only at toy resolutions) counts as one cell, not as a division by zero.
    """
    if mask is None:
        return dreambooth_loss(pred, target, n_instance, prior_weight)
    err = F.mse_loss(pred[:n_instance].float(), target[:n_instance].float(), reduction="none")
    loss = ((err * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1)).mean()
    if n_instance < pred.shape[0] and prior_weight:
        loss = loss + prior_weight * F.mse_loss(pred[n_instance:].float(), target[n_instance:].float())
    return loss


def class_captions(folder: Path, fallback: str) -> list[str]:
    """The caption of each image of a class-image folder, in file-name order (load_image_folder's): its
    metadata.jsonl text where it has one, else `fallback`."""
    folder = Path(folder)
    texts = {}
    if (folder / "metadata.jsonl").is_file():
        texts = {path.name: (text or "").strip() for path, text in read_prepared(folder)}
    return [texts.get(path.name) or fallback for path in image_files(folder)]


class CustomDiffusion(Method):
    name = "custom_diffusion"

    def concepts(self, ctx: TrainContext) -> list[dict]:
        """Every concept with its folders: the experiment's own first, then args.extra_concepts."""
        first = {k: self.args.get(k) for k in ("modifier_token", "initializer_token", "instance_prompt", "class_prompt")}
        out = [dict(first, data_dir=ctx.data_dir, class_dir=ctx.class_dir)]
        for i, extra in enumerate(self.arg("extra_concepts"), start=1):
            if f"data_{i}" not in ctx.inputs:
                raise MethodError(f"{self.name}: args.extra_concepts.{i - 1} has no input data_{i} (its image folder)")
            out.append(dict(extra, data_dir=ctx.inputs[f"data_{i}"], class_dir=ctx.inputs.get(f"class_images_{i}")))
        for i, c in enumerate(out):
            for key in ("modifier_token", "instance_prompt"):
                if not c.get(key):
                    where = f"args.{key}" if i == 0 else f"args.extra_concepts.{i - 1}.{key}"
                    raise MethodError(f"{self.name}: {where} is required")
            if c["modifier_token"] not in c["instance_prompt"]:
                raise MethodError(f"{self.name}: instance prompt {c['instance_prompt']!r} lacks {c['modifier_token']!r}")
            if c["data_dir"] is None:
                raise MethodError(f"{self.name}: concept {c['modifier_token']} needs a folder of instance images")
        return out

    def setup(self, ctx: TrainContext) -> None:
        from diffusers import DDPMScheduler

        variant = self.arg("train_params")
        if variant not in TRAIN_Q_OUT:
            raise MethodError(f"{self.name}: args.train_params must be one of {sorted(TRAIN_Q_OUT)} (got {variant!r})")
        self.prior_weight = float(self.arg("prior_loss_weight"))
        self.augment, self.flip = bool(self.arg("augment")), ctx.random_flip
        self.device, self.batch_size, self.resolution = ctx.device, ctx.batch_size, ctx.resolution
        concepts = self.concepts(ctx)

        pipe = base_pipeline(ctx)
        self.tokenizer, self.text_encoder, self.vae = pipe.tokenizer, pipe.text_encoder, pipe.vae
        self.unet, self.sample_scheduler = pipe.unet, pipe.scheduler
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False).eval()
        self.tokens = TrainableTokens(self.tokenizer, self.text_encoder, [c["modifier_token"] for c in concepts],
                                      [c.get("initializer_token") or self.arg("initializer_token") for c in concepts],
                                      self.name)
        self.processors = cross_attention_processors(self.unet, TRAIN_Q_OUT[variant])
        self.unet.set_attn_processor({**self.unet.attn_processors, **self.processors})

        # Per concept: its instance images (pixels when augmented, else cached latents) and class latents when
        # regularized. prompts: per concept its instance prompt and the four with a size word (0-4, size_word),
        # then every class image's caption; self.prompt_start[i] is where concept/class part i's prompts begin.
        self.instance, self.klass, prompts, self.prompt_start = [], [], [], []
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent cell
        for c in concepts:
            images = load_image_folder(c["data_dir"], ctx.resolution)
            self.instance.append(images if self.augment else ImageLatents(self.vae, images, ctx.device, self.flip))
            self.prompt_start.append(len(prompts))
            p = c["instance_prompt"]
            prompts += [p] + [w + p for w in SMALL_PREFIXES + LARGE_PREFIXES]
        with_class = [c["class_dir"] is not None for c in concepts]
        if any(with_class) and not all(with_class):
            raise MethodError(f"{self.name}: regularization images for some concepts but not all ({with_class})")
        if self.prior_weight > 0 and all(with_class):
            for c in concepts:
                if not c.get("class_prompt"):
                    raise MethodError(f"{self.name}: regularization images of {c['modifier_token']} need a class_prompt")
                self.klass.append(ImageLatents(self.vae, load_image_folder(c["class_dir"], ctx.resolution), ctx.device,
                                               self.flip))
                self.prompt_start.append(len(prompts))
                if self.arg("class_captions"):
                    prompts += class_captions(c["class_dir"], c["class_prompt"])
                else:
                    prompts += [c["class_prompt"]] * len(self.klass[-1])
        if not self.augment:
            offload(self.vae)  # augmented instance images are encoded every step
        self.prompts = prompts
        self.prompt_ids = tokenize(self.tokenizer, prompts).to(ctx.device)
        self.text_encoder.to(ctx.device)
        self.tokens.to(ctx.device)
        self.unet.to(ctx.device)
        if ctx.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def param_groups(self) -> list[dict]:
        projections = [p for proc in self.processors.values() for p in proc.parameters()]
        return [{"params": projections}, {"params": [self.tokens.vectors]}]

    def scaled_batch(self, batch_size: int) -> float:
        """train.scale_lr's batch: the instance images of a micro-batch (batch_size per concept), doubled
        with class images, as train_custom_diffusion.py doubles the scaled rate with prior preservation."""
        return batch_size * len(self.instance) * (2 if self.klass else 1)

    def _augmented(self, images: torch.Tensor, concept: int, generator: torch.Generator):
        """batch_size rescaled instance images: (latents, masks [n, 1, h, w], size-word index per image).

        The choices (image, flip, scale, place, word) are Python numbers: a numpy generator seeded by the
        step's generator and the concept draws them, so the loop reads no tensor on the host."""
        n, size = self.batch_size, self.resolution
        rng = np.random.default_rng([generator.initial_seed(), concept])
        idx = rng.integers(0, images.shape[0], size=n).tolist()
        flips = (rng.integers(0, 2, size=n) == 1).tolist() if self.flip else [False] * n
        pixels, masks, words = [], [], []
        for i, flip, (scale, top, left, word) in zip(idx, flips, rescale_draws(n, size, rng)):
            image = images[i].flip(-1) if flip else images[i]
            canvas, mask = rescale(image, scale, top, left, self.factor)
            pixels.append(canvas)
            masks.append(mask)
            words.append(size_word(scale, size, word))
        latents = encode_batch(self.vae, torch.stack(pixels), generator)
        return latents, torch.stack(masks)[:, None].to(latents.device), words

    def batch(self, step: int, generator: torch.Generator) -> dict:
        """batch_size instance images per concept, then as many class images per concept."""
        latents, which, masks = [], [], []  # which: each row's index into self.prompts (CPU tensors)
        for i, part in enumerate(self.instance):
            if self.augment:
                lat, mask, words = self._augmented(part, i, generator)
                masks.append(mask)
                which.append(self.prompt_start[i] + torch.tensor(words))
            else:
                lat = part.draw(self.batch_size, generator)
                which.append(torch.full((self.batch_size,), self.prompt_start[i]))
            latents.append(lat)
        for j, part in enumerate(self.klass):
            rows = part.indices(self.batch_size, generator)
            latents.append(part.draw_rows(rows, generator))
            which.append(self.prompt_start[len(self.instance) + j] + rows % len(part))
        noisy, timesteps, target = noise_and_target(self.noise_scheduler, torch.cat(latents), generator)
        return dict(noisy=noisy, timesteps=timesteps, target=target, n_instance=self.batch_size * len(self.instance),
                    prompt_index=torch.cat(which).to(self.device), mask=torch.cat(masks) if masks else None)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        cond = self.text_encoder(self.prompt_ids[batch["prompt_index"]])[0]
        pred = self.unet(batch["noisy"], batch["timesteps"], cond).sample
        return custom_diffusion_loss(pred, batch["target"], batch["n_instance"], self.prior_weight, batch["mask"])

    def pipeline(self):
        """The trained pipeline in memory (processors installed, modifier rows written)."""
        self.tokens.write_rows()
        return assemble_pipeline(self.vae.to(self.device), self.text_encoder, self.tokenizer, self.unet,
                                 self.sample_scheduler)

    def save(self, artifact_dir: Path) -> None:
        from safetensors.torch import save_file

        weights = {f"{key}.{k}": v.detach().cpu().contiguous()
                   for key, proc in self.processors.items() for k, v in proc.state_dict().items()}
        save_file(weights, str(Path(artifact_dir) / WEIGHT_NAME))
        for i, (token, vector) in enumerate(self.tokens.by_token().items()):
            save_file({token: vector}, str(Path(artifact_dir) / f"modifier_{i}.safetensors"))

    @classmethod
    def load_pipeline(cls, artifact_dir: Path, base_model: Path, spec: dict,
                      device: torch.device, dtype: torch.dtype = torch.float32):
        from safetensors.torch import load_file

        artifact_dir = Path(artifact_dir)
        pipe = load_base_pipeline(base_model, dtype=dtype)
        for path in sorted(artifact_dir.glob("modifier_*.safetensors")):
            pipe.load_textual_inversion(str(path))
        install_custom_diffusion(pipe.unet, load_file(str(artifact_dir / WEIGHT_NAME)))
        return pipe.to(device)


METHOD = CustomDiffusion
