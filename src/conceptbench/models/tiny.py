"""Tiny components built locally from configs, so every rule runs offline on a CPU.

Each builder is deterministic under its seed and writes the same on-disk layout as the real
model it stands in for, so one loader serves both worlds:
- a StableDiffusionPipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/);
- an open_clip folder (open_clip_config.json + open_clip_model.safetensors), read with
  open_clip's 'local-dir:' schema like the hub's timm/vit_large_patch14_clip_224.openai;
- a DINOv2 folder (config.json, model.safetensors, preprocessor_config.json) like facebook/dinov2-small;
- an aesthetic head folder (config.json + model.safetensors), the LAION MLP's shape scaled down.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tokenizer import VOCAB_SIZE, build_clip_tokenizer

# SD v1.5's noise schedule (scheduler/scheduler_config.json of the real pipeline).
SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

TINY_DIFFUSION = dict(
    resolution=64,  # images are 64x64; the 2-level VAE makes 32x32 latents
    unet=dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    vae=dict(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8),
    text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
)


def build_tiny_pipeline(out_dir: Path | None = None, seed: int = 0, spec: dict | None = None):
    """Build (and optionally save) a tiny StableDiffusionPipeline with a real CLIP tokenizer."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = spec or TINY_DIFFUSION
    res = spec["resolution"]
    vae_levels = len(spec["vae"]["block_out_channels"])
    latent = res // 2 ** (vae_levels - 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        sample_size=res,
        **spec["vae"],
    )
    text_config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **spec["text"],
    )
    text_encoder = CLIPTextModel(text_config)
    tok_dir = Path(out_dir) / "tokenizer" if out_dir else Path(tempfile.mkdtemp()) / "tokenizer"
    tokenizer = build_clip_tokenizer(tok_dir)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD15_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out_dir is not None:
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return pipe


TINY_OPEN_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=VOCAB_SIZE, width=32, heads=2, layers=2),
)


def build_tiny_open_clip(out_dir: Path, seed: int = 0) -> Path:
    """A tiny open_clip CLIP saved in the layout open_clip's 'local-dir:' schema reads."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": TINY_OPEN_CLIP,
        "preprocess_cfg": {
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
        },
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))
    return out_dir


TINY_DINOV2 = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=28
)


def build_tiny_dinov2(out_dir: Path, seed: int = 0) -> Path:
    """A tiny DINOv2 (transformers) with the image processor settings of facebook/dinov2-small."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**TINY_DINOV2))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    side = TINY_DINOV2["image_size"]
    processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": side},
        do_center_crop=True,
        crop_size={"height": side, "width": side},
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_aesthetic(out_dir: Path, seed: int = 0, in_dim: int = TINY_OPEN_CLIP["embed_dim"]) -> Path:
    """A tiny aesthetic head: the LAION predictor's layer layout with smaller widths."""
    from safetensors.torch import save_file

    from ..metrics.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    hidden = (64, 32, 16, 8)
    model = AestheticMLP(in_dim=in_dim, hidden=hidden)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({"in_dim": in_dim, "hidden": list(hidden)}))
    save_file(model.state_dict(), str(out_dir / "model.safetensors"))
    return out_dir


BUILDERS = {
    "diffusion": build_tiny_pipeline,
    "open_clip": build_tiny_open_clip,
    "dinov2": build_tiny_dinov2,
    "aesthetic": build_tiny_aesthetic,
}


def build_tiny(kind: str, out_dir: Path, seed: int = 0) -> Path:
    if kind not in BUILDERS:
        raise ValueError(f"no tiny builder for model kind {kind!r}; known: {sorted(BUILDERS)}")
    BUILDERS[kind](out_dir=Path(out_dir), seed=seed)
    return Path(out_dir)
