"""Build the toy world's models from scratch: `python -m conceptbench.world.build OUT [--size reduced]`.

Stages, each saved in the layout of the real model it stands in for, each skipped when its folder
exists (delete a folder to rebuild it):
  vae        AutoencoderKL, 32x32 RGB <-> 4x8x8 latents (diffusers layout)
  clip       open_clip CLIP trained contrastively on captioned scenes (open_clip 'local-dir:' layout)
  sd         StableDiffusionPipeline: the CLIP text tower as text encoder (frozen, as in SD), the VAE
             above, a U-Net trained on the VAE's latents of captioned scenes
  dino       DINOv2 trained self-supervised: two views of one object agree, clean or as the VAE draws
             them (transformers layout)
  aesthetic  the LAION head's layout fitted to the world's ground-truth aesthetic on CLIP embeddings
  oracle     the small classifier behind the oracle's shape, subject, style and accessory reading
Every batch is a function of (seed, step): the same command gives the same weights on one machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as wd
from .scene import SUBJECTS, WORN, caption, sample_scene

log = logging.getLogger("conceptbench.world")


@dataclass
class Sizes:
    vae_steps: int = 2000
    vae_batch: int = 32
    clip_steps: int = 1500
    clip_batch: int = 128
    unet_steps: int = 4800
    unet_batch: int = 48
    unet_pool: int = 24000  # captioned scenes encoded once to latents
    dino_steps: int = 800
    dino_batch: int = 64
    aesthetic_samples: int = 4000
    oracle_steps: int = 1500
    oracle_batch: int = 64


SIZES = {
    "full": Sizes(),
    # The same builder end to end in a few minutes: models that load and run, not models that are good.
    "reduced": Sizes(vae_steps=30, clip_steps=30, unet_steps=30, unet_pool=256, dino_steps=20,
                     aesthetic_samples=256, oracle_steps=30),
}

VAE = dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16)


def _cosine(step: int, steps: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class CoreShare:
    """This process's torch threads: one while a worker of the build still runs beside it, every core after.

    On two cores, a U-Net step on two threads took 0.29 s alone, 1.31 s beside a busy one-thread process
    and 0.47 s on one thread beside it (2-core VM, 2026-12-03): two threads beside a worker oversubscribe
    the cores, and each waits for the other at every operation."""

    def __init__(self, procs=(), cores: int | None = None):
        self.procs, self.cores = list(procs), cores or torch.get_num_threads()

    def __call__(self) -> int:
        if not self.procs:  # nothing runs beside: the threads stay as set (a worker's one, or --threads)
            return torch.get_num_threads()
        n = 1 if any(p.poll() is None for p in self.procs) else self.cores
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
            log.info("torch threads: %d (%s)", n, "a worker runs beside" if n == 1 else "the workers are done")
        return n


SHARE = CoreShare()  # main() gives it the workers of a parallel build; fit() asks it every few steps


def fit(name: str, params, steps: int, lr: float, loss_of_step, weight_decay: float = 0.0) -> list[float]:
    """AdamW with warm-up and cosine decay; a progress bar and a log line every tenth of the run."""
    from tqdm import tqdm

    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps))
    losses, t0 = [], time.time()
    bar = tqdm(range(steps), desc=name, unit="step", mininterval=2.0)
    for step in bar:
        if step % 20 == 0:
            SHARE()
        loss = loss_of_step(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            recent = float(np.mean(losses[-50:]))
            bar.set_postfix(loss=f"{recent:.4f}")
            log.info("%s step %d/%d loss %.4f (%.0f s)", name, step + 1, steps, recent, time.time() - t0)
    return losses


# --- the autoencoder ---------------------------------------------------------------------------


def build_vae(root: Path, out: Path, sizes: Sizes, seed: int):
    from diffusers import AutoencoderKL

    from .scene import SIZE

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=SIZE, **VAE)

    def loss(step):
        x = wd.to_tensor(wd.autoencoder_batch(seed, step, sizes.vae_batch))
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        return torch.nn.functional.mse_loss(y, x) + 0.5 * (y - x).abs().mean() + 1e-4 * kl

    fit("vae", vae.parameters(), sizes.vae_steps, 2e-3, loss)
    vae.eval()
    # SD's scaling factor makes the latents unit-variance (0.18215 there); measure ours the same way.
    with torch.no_grad():
        x = wd.to_tensor(wd.autoencoder_batch(seed, 10**6, 256))
        z = vae.encode(x).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(str(out), safe_serialization=True)
    return vae


# --- the toy CLIP --------------------------------------------------------------------------------

CLIP = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=4, width=64, layers=3, head_width=16, mlp_ratio=4.0),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=3, mlp_ratio=4.0),
)


def clip_scene(rng):
    """Base scenes in the three styles (CLIP knows the ninja style, as real CLIP knows Naruto's),
    and the subjects now and then under their class names."""
    u = rng.random()
    style = "ninja" if u < 0.1 else None
    subject = str(rng.choice(list(SUBJECTS))) if 0.1 <= u < 0.15 else None
    return sample_scene(rng, style=style, subject=subject, omit_p=0.1)


def captioned_pool(seed: int, stream: str, n: int, draw) -> tuple[np.ndarray, list[str], list]:
    rng = wd.rng_for(seed, stream, 0)
    scenes = [draw(rng) for _ in range(n)]
    return wd.images(scenes), [caption(s) for s in scenes], scenes


def clip_image_tensor(imgs: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> the normalised tensor open_clip's preprocessing gives (OpenAI mean and std)."""
    import open_clip

    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# Per CLIP batch and per attribute: scenes that come with a twin differing in that attribute alone (hard
# negatives). Among random captions the words for position and shape hardly matter to the contrastive loss,
# and the text encoder barely told them apart: "at the top right" and "at the top" 6.8 apart in the 77
# states, the six class names at least 3.5 apart, against 19.1 for two colours. With the twins: 13.2 for
# the two positions (base position 95.5 %, was 86.5), still 2.9 for the closest class names (base shape
# 43 %, was 51.5; docs/toyworld.md). The shipped world was built with both.
TWINS = {"position": 16, "shape": 16}


def attribute_twin(rng: np.random.Generator, scene, attribute: str):
    """The scene with its one object changed in `attribute` alone: moved to a neighbouring grid cell
    ("position") or drawn as another class ("shape", never one of the held-out combinations). Its caption,
    made again, differs from the scene's in that attribute's words only."""
    import copy

    from .scene import CLASSES, HELD_OUT, _place

    twin = copy.deepcopy(scene)
    thing = twin.things[0]
    if attribute == "position":
        r, c = thing.cell
        cells = [(r + dr, c + dc) for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)) if 0 <= r + dr < 3 and 0 <= c + dc < 3]
        _place(rng, thing, cells[int(rng.integers(len(cells)))])
    elif attribute == "shape":
        if twin.accessory in WORN:
            raise ValueError("only dogs and toys wear sunglasses and bandanas: no other shape for this one")
        classes = [k for k in CLASSES if k != thing.cls and (k, thing.colour, twin.background) not in HELD_OUT]
        thing.cls = classes[int(rng.integers(len(classes)))]
    else:
        raise ValueError(f"no twin for {attribute!r}")
    return twin


def twin_pool(seed: int, scenes: list, per_attribute: int) -> tuple[list[int], list, list[str]]:
    """(index of each twinned scene, its twin, the attribute changed): for each attribute, the first
    `per_attribute` single-object base scenes whose caption names it (a subject keeps its shape)."""
    rng = wd.rng_for(seed, "clip-twins", 0)
    names = {"position": lambda s: s.say["position"], "shape": lambda s: s.accessory not in WORN}
    index, twins, kinds = [], [], []
    for attribute in TWINS:
        eligible = [i for i, s in enumerate(scenes)
                    if len(s.things) == 1 and s.things[0].subject is None and names[attribute](s)]
        for i in eligible[:per_attribute]:
            index.append(i)
            twins.append(attribute_twin(rng, scenes[i], attribute))
            kinds.append(attribute)
    return index, twins, kinds


def build_clip(root: Path, out: Path, sizes: Sizes, seed: int):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**CLIP)
    n = max(sizes.clip_batch * 4, min(40000, sizes.clip_steps * sizes.clip_batch // 4))
    imgs, captions, scenes = captioned_pool(seed, "clip", n, clip_scene)
    index, twins, kinds = twin_pool(seed, scenes, n // 8)
    imgs = np.concatenate([imgs, wd.images(twins)])
    captions = captions + [caption(s) for s in twins]
    x_all, t_all = clip_image_tensor(imgs), open_clip.tokenize(captions)
    index, kinds = torch.tensor(index), np.array(kinds)
    by_kind = {a: torch.from_numpy(np.flatnonzero(kinds == a)) for a in TWINS}

    def loss(step):
        g = torch.Generator().manual_seed(seed * 100003 + step)
        picks = []
        for attribute, rows in by_kind.items():  # scenes and their twins, side by side in the batch
            k = min(TWINS[attribute], len(rows), sizes.clip_batch // (4 * len(TWINS)))
            picks.append(rows[torch.randperm(len(rows), generator=g)[:k]])
        pick = torch.cat(picks)
        rest = torch.randperm(n, generator=g)[: sizes.clip_batch - 2 * len(pick)]
        idx = torch.cat([index[pick], n + pick, rest])
        img = torch.nn.functional.normalize(model.encode_image(x_all[idx]), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(t_all[idx]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        # Identical captions in a batch are not negatives of each other.
        same = (t_all[idx][:, None, :] == t_all[idx][None, :, :]).all(-1)
        target = same.float() / same.sum(1, keepdim=True)
        return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target.T * logits.log_softmax(0), 0).mean())

    fit("clip", model.parameters(), sizes.clip_steps, 1e-3, loss, weight_decay=0.1)
    out.mkdir(parents=True)
    config = {"model_cfg": CLIP, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                    "std": list(open_clip.OPENAI_DATASET_STD)}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return model


def clip_text_to_transformers(clip_model):
    """open_clip's text tower as a transformers CLIPTextModel (SD's text encoder class), same numbers."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIP["text_cfg"]
    width = cfg["width"]
    config = CLIPTextConfig(vocab_size=cfg["vocab_size"], hidden_size=width, intermediate_size=int(width * cfg["mlp_ratio"]),
                            num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                            max_position_embeddings=cfg["context_length"], hidden_act="gelu", layer_norm_eps=1e-5,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=CLIP["embed_dim"])
    te = CLIPTextModel(config)
    src = clip_model.state_dict()
    dst = {"text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
           "text_model.final_layer_norm.weight": src["ln_final.weight"],
           "text_model.final_layer_norm.bias": src["ln_final.bias"]}
    for i in range(cfg["layers"]):
        a, b = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for name, w, bias in zip(("q_proj", "k_proj", "v_proj"), src[a + "attn.in_proj_weight"].chunk(3),
                                 src[a + "attn.in_proj_bias"].chunk(3)):
            dst[b + f"self_attn.{name}.weight"], dst[b + f"self_attn.{name}.bias"] = w, bias
        for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            dst[b + ours + ".weight"], dst[b + ours + ".bias"] = src[a + theirs + ".weight"], src[a + theirs + ".bias"]
    # transformers 5 names the text model's weights without the "text_model." prefix of 4.x.
    prefix = "text_model." if any(k.startswith("text_model.") for k in te.state_dict()) else ""
    dst = {prefix + k.removeprefix("text_model."): v.clone() for k, v in dst.items()}
    missing, unexpected = te.load_state_dict(dst, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise RuntimeError(f"text tower conversion: missing {missing}, unexpected {unexpected}")
    return te.eval()


def load_clip(folder: Path):
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval()


# --- the diffusion model -----------------------------------------------------------------------

UNET = dict(block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=CLIP["text_cfg"]["width"], attention_head_dim=8, norm_num_groups=16)


def sd_scene(rng):
    return sample_scene(rng)


def build_sd(root: Path, out: Path, sizes: Sizes, seed: int):
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ..models.tiny import SD15_SCHEDULE
    from ..models.tokenizer import build_clip_tokenizer

    vae = AutoencoderKL.from_pretrained(str(root / "vae")).eval()
    text_encoder = clip_text_to_transformers(load_clip(root / "clip"))
    tok_dir = out / "tokenizer"
    tokenizer = build_clip_tokenizer(tok_dir)
    imgs, captions, _ = captioned_pool(seed, "sd", sizes.unet_pool, sd_scene)
    with torch.no_grad():
        mean, std = [], []
        for i in range(0, len(imgs), 256):
            d = vae.encode(wd.to_tensor(imgs[i : i + 256])).latent_dist
            mean.append(d.mean), std.append(d.std)
        mean, std = torch.cat(mean), torch.cat(std)
        ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        states = torch.cat([text_encoder(ids[i : i + 512])[0] for i in range(0, len(ids), 512)])
    cond, uncond = states[:-1], states[-1]
    scale = vae.config.scaling_factor
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=mean.shape[-1], in_channels=4, out_channels=4, **UNET)
    noise_sched = DDPMScheduler.from_config(DDIMScheduler(**SD15_SCHEDULE).config)
    n = len(mean)

    def loss(step):
        g = torch.Generator().manual_seed(seed * 100003 + step)
        idx = torch.randint(0, n, (sizes.unet_batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=g)
        drop = torch.rand(len(idx), generator=g) < 0.1  # classifier-free guidance needs the empty caption
        c = torch.where(drop[:, None, None], uncond.expand_as(cond[idx]), cond[idx])
        pred = unet(noise_sched.add_noise(z, noise, t), t, c).sample
        return torch.nn.functional.mse_loss(pred, noise)

    fit("unet", unet.parameters(), sizes.unet_steps, 1e-3, loss, weight_decay=0.01)
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return pipe


# --- the toy DINO ------------------------------------------------------------------------------

DINO = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, patch_size=4, image_size=32)


def identity_views(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n objects, each photographed twice: same thing (class, colours, marking), another place,
    size, scene and drawing style. The only supervision is "these two are one object"."""
    from .scene import Scene, Thing, sample_scene as draw

    a, b = [], []
    for _ in range(n):
        s = draw(rng, pair_p=0.0, accessory_p=0.0)
        t = s.things[0]
        if rng.random() < 0.5:  # half the objects from beyond the base world: any colour, any marking
            t.colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            t.mark = tuple(int(v) for v in rng.integers(0, 256, 3))
            t.marking = str(rng.choice(["spot", "centre"]))
        views = []
        for _ in range(2):
            v = draw(rng, pair_p=0.0, accessory_p=0.0, style=str(rng.choice(["photo", "cartoon"])))
            u = v.things[0]
            views.append(Scene([Thing(t.cls, t.colour, None, u.radius, u.cx, u.cy, u.cell, t.mark, t.marking)],
                               v.background, v.style))
        a.append(views[0]), b.append(views[1])
    return wd.images(a), wd.images(b)


def dino_tensor(imgs: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


DINO_RECONSTRUCTED = 0.5  # of the DINO's views, the share it sees as the autoencoder's reconstruction


def dino_views(rng: np.random.Generator, n: int, vae) -> tuple[np.ndarray, np.ndarray]:
    """identity_views, each view independently replaced by the autoencoder's reconstruction of it with
    probability DINO_RECONSTRUCTED: the pairs are clean/clean, clean/drawn and drawn/drawn."""
    out = []
    for imgs in identity_views(rng, n):
        pick = rng.random(len(imgs)) < DINO_RECONSTRUCTED
        imgs = imgs.copy()
        if pick.any():
            imgs[pick] = wd.reconstruct(vae, imgs[pick])
        out.append(imgs)
    return out[0], out[1]


def build_dino(root: Path, out: Path, sizes: Sizes, seed: int):
    """Two views of one object agree, clean or as the autoencoder draws them: DINO-I compares generated
    images (the decoder's) with clean reference photographs. Trained on clean views alone, the DINO put the
    cat toy's reconstructions at 0.20 mean cosine to its photographs: nearer other toys (0.06) than other
    photographs of it (0.85)."""
    from diffusers import AutoencoderKL
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from .scene import SIZE

    vae = AutoencoderKL.from_pretrained(str(root / "vae")).eval()
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**DINO))

    def loss(step):
        a, b = dino_views(wd.rng_for(seed, "dino", step), sizes.dino_batch, vae)
        za = torch.nn.functional.normalize(model(pixel_values=dino_tensor(a)).pooler_output, dim=-1)
        zb = torch.nn.functional.normalize(model(pixel_values=dino_tensor(b)).pooler_output, dim=-1)
        logits = za @ zb.T / 0.1
        target = torch.arange(len(a))
        return 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))

    fit("dino", model.parameters(), sizes.dino_steps, 1e-3, loss, weight_decay=0.05)
    model.eval().save_pretrained(str(out), safe_serialization=True)
    BitImageProcessor(do_resize=True, size={"shortest_edge": SIZE}, do_center_crop=True,
                      crop_size={"height": SIZE, "width": SIZE}, do_normalize=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(str(out))
    return model


# --- the aesthetic head -----------------------------------------------------------------------

AESTHETIC_HIDDEN = (64, 32, 16, 8)
AESTHETIC_ACTIVATION = "gelu"  # the ground truth's contrast term is not linear in the embedding (metrics/aesthetic.py)


def aesthetic_data(clip_model, seed: int, stream: str, n: int):
    from .scene import aesthetic

    imgs, _, scenes = captioned_pool(seed, stream, n, lambda rng: sample_scene(rng, style=str(
        rng.choice(["photo", "cartoon", "ninja"], p=[0.6, 0.25, 0.15]))))
    with torch.no_grad():
        emb = torch.cat([clip_model.encode_image(clip_image_tensor(imgs[i : i + 256])) for i in range(0, n, 256)])
    return torch.nn.functional.normalize(emb, dim=-1), torch.tensor([aesthetic(s) for s in scenes])


def build_aesthetic(root: Path, out: Path, sizes: Sizes, seed: int):
    from safetensors.torch import save_file

    from ..metrics.aesthetic import AestheticMLP

    emb, target = aesthetic_data(load_clip(root / "clip"), seed, "aesthetic", sizes.aesthetic_samples)
    torch.manual_seed(seed)
    head = AestheticMLP(in_dim=emb.shape[1], hidden=AESTHETIC_HIDDEN, activation=AESTHETIC_ACTIVATION)

    def loss(step):
        g = torch.Generator().manual_seed(seed * 100003 + step)
        idx = torch.randint(0, len(emb), (256,), generator=g)
        return torch.nn.functional.mse_loss(head(emb[idx]), target[idx])

    fit("aesthetic", head.parameters(), 3000, 3e-3, loss)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"in_dim": int(emb.shape[1]), "hidden": list(AESTHETIC_HIDDEN),
                                                 "activation": AESTHETIC_ACTIVATION}))
    save_file(head.eval().state_dict(), str(out / "model.safetensors"))
    return head


# --- the oracle's classifier ------------------------------------------------------------------


IMPOSTORS = 0.15  # of the oracle's training renders: other classes in a subject's colours (oracle.impostor_scene)


def build_oracle(root: Path, out: Path, sizes: Sizes, seed: int):
    """The oracle's CNN, on clean renders and, every other step, on the autoencoder's reconstructions of
    them: every generated image is one of the decoder's, so the oracle must read the decoder's rendering of
    a thing as that thing (trained on slightly blurred renders instead, it read the cat toy in none of its
    reconstructions). Some renders are impostors, so a subject is its colours on its shape, not its colours."""
    from diffusers import AutoencoderKL

    from . import oracle as orc

    vae = AutoencoderKL.from_pretrained(str(root / "vae")).eval()
    torch.manual_seed(seed)
    net = orc.make_cnn()

    def loss(step):
        rng = wd.rng_for(seed, "oracle", step)
        scenes = [orc.impostor_scene(rng) if rng.random() < IMPOSTORS else orc.training_scene(rng)
                  for _ in range(sizes.oracle_batch)]
        x = wd.to_tensor(wd.images(scenes))
        if step % 2:
            x = wd.decoded(vae, x)
        out_ = net(x)
        return sum(torch.nn.functional.cross_entropy(out_[h], torch.tensor([orc.labels(s)[h] for s in scenes]))
                   for h in orc.HEADS)

    fit("oracle", net.parameters(), sizes.oracle_steps, 2e-3, loss, weight_decay=0.01)
    rng = wd.rng_for(seed, "oracle-test", 0)
    scenes = [orc.training_scene(rng) for _ in range(500)]
    o = orc.Oracle(net)
    report = orc.accuracy(o.read(list(wd.images(scenes))), [orc.truth(s) for s in scenes])
    log.info("oracle on 500 clean held-out renders: %s", report)
    o.save(out, report)
    return o


STAGES = {"vae": build_vae, "clip": build_clip, "sd": build_sd, "dino": build_dino, "aesthetic": build_aesthetic,
          "oracle": build_oracle}
NEEDS = {"sd": ("vae", "clip"), "aesthetic": ("clip",), "oracle": ("vae",), "dino": ("vae",)}
# Two workers of one thread each, the VAE on one and the rest but the U-Net on the other (the DINO and the
# oracle, which read the VAE's reconstructions, last, waiting for it), while this process builds the U-Net as
# soon as the VAE and CLIP are there: on one thread while a worker still runs, on every core after (CoreShare).
# Run as a third stage of the first worker, the U-Net had one thread, and the other core idled through all
# but 27 s of its 42 min.
WORKERS = (("vae",), ("clip", "aesthetic", "dino", "oracle"))


def _wait_for(out: Path, names, poll: float = 10.0, procs=()) -> None:
    waited = 0.0
    while missing := [n for n in names if not (out / n).is_dir()]:
        if any(p.poll() for p in procs):  # a worker that would have built it failed
            raise SystemExit(f"a worker of the build failed while {', '.join(missing)} was awaited; see {out / 'build.log'}")
        if waited % 300 == 0:  # a line every five minutes, not every poll
            log.info("waiting for %s", ", ".join(missing))
        time.sleep(poll)
        waited += poll


def _start_workers(args) -> list:
    import subprocess
    import sys

    base = [sys.executable, "-m", "conceptbench.world.build", str(args.out), "--size", args.size, "--seed",
            str(args.seed), "--threads", "1", "--wait"]
    return [subprocess.Popen([*base, "--stages", *w]) for w in WORKERS]


def _join(procs, args) -> None:
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker of the build failed (exit codes {codes}); see {args.out / 'build.log'}")


def build_stage(name: str, args, sizes: Sizes, procs=()) -> None:
    folder = args.out / name
    if folder.exists():
        log.info("%s: %s exists, kept", name, folder)
        return
    missing = [n for n in NEEDS.get(name, ()) if not (args.out / n).is_dir()]
    if missing and not args.wait:
        raise SystemExit(f"{name} needs {', '.join(missing)} in {args.out}: build those stages first")
    _wait_for(args.out, missing, procs=procs)
    t0 = time.time()
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    SHARE()  # what a stage prepares before its first step shares the cores too
    STAGES[name](args.out, tmp, sizes, args.seed)
    tmp.rename(folder)
    log.info("%s: built in %.0f s", name, time.time() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="folder for the models (one subfolder per stage)")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--parallel", action="store_true",
                    help="build in two one-thread workers (vae | clip, aesthetic, dino, oracle), and sd as soon as vae "
                         "and clip are built: on one thread while a worker runs, on every core after")
    ap.add_argument("--wait", action="store_true", help="wait for stages that another worker builds")
    ap.add_argument("--ship", type=Path, default=None, metavar="DIR",
                    help="then measure the models (quality.md) and export them in fp16 to DIR "
                         "(the repository's copy is src/conceptbench/world/models)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(args.out / "build.log"), logging.StreamHandler()])
    sizes = SIZES[args.size]
    log.info("building the toy world (%s, seed %d): %s", args.size, args.seed, json.dumps(asdict(sizes)))
    procs = []
    if args.parallel:
        procs, args.wait = _start_workers(args), True
        SHARE.procs, SHARE.cores = procs, torch.get_num_threads()
    in_workers = {name for w in WORKERS for name in w} if procs else set()
    try:
        for name in args.stages:
            if name not in in_workers:
                build_stage(name, args, sizes, procs)
    finally:
        if procs:
            _join(procs, args)
    if args.ship:
        from . import quality, shipped

        res = quality.measure(args.out)
        (args.out / "quality.json").write_text(json.dumps(res, indent=2))
        (args.out / "quality.md").write_text(quality.table(res) + "\n")
        log.info("quality of the build:\n%s", quality.table(res))
        shipped.export(args.out, args.ship)
        log.info("exported to %s", args.ship)


if __name__ == "__main__":
    main()
