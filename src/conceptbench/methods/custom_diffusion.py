"""Custom Diffusion: train the U-Net's cross-attention projections and a modifier-token embedding.

Variants (args.train_params, the names of diffusers' --freeze_model): `crossattn_kv` trains to_k and
to_v of every cross-attention layer, `crossattn` also to_q and to_out. Both train one embedding row
per modifier token ("<new1>", methods/_tokens.py). Regularization adds, to every batch, images of the
class (real ones retrieved by CLIP, or generated) with the class prompt, weighted by
λ = args.prior_loss_weight, as in DreamBooth (Kumari et al. 2023; the processor-based training and
file layout follow diffusers' examples/custom_diffusion).

Multi-concept joint training: args.extra_concepts lists further concepts, each
{data, modifier_token, initializer_token, instance_prompt, class_prompt}; concept i's images come as
the train rule's inputs data_i and class_images_i. All concepts share the trained projections.

Artifact: pytorch_custom_diffusion_weights.safetensors (processor state, diffusers' key layout) and
one modifier_<i>.safetensors per token in the textual-inversion format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..train.method import (
    Method,
    assemble_pipeline,
    MethodError,
    TrainContext,
    base_pipeline,
    encode_latent_distribution,
    load_base_pipeline,
    load_image_folder,
    noise_and_target,
    offload,
    sample_latents,
    tokenize,
)
from ._tokens import TrainableTokens
from .dreambooth import dreambooth_loss

WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"
TRAIN_Q_OUT = {"crossattn_kv": False, "crossattn": True}

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
        self.device, self.batch_size = ctx.device, ctx.batch_size
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

        # Per concept: instance latents (+ class latents when regularized) and the index of its prompts.
        self.instance, self.klass, prompts = [], [], []
        for c in concepts:
            self.instance.append(encode_latent_distribution(self.vae, load_image_folder(c["data_dir"], ctx.resolution),
                                                            ctx.device))
            prompts.append(c["instance_prompt"])
        with_class = [c["class_dir"] is not None for c in concepts]
        if any(with_class) and not all(with_class):
            raise MethodError(f"{self.name}: regularization images for some concepts but not all ({with_class})")
        if self.prior_weight > 0 and all(with_class):
            for c in concepts:
                if not c.get("class_prompt"):
                    raise MethodError(f"{self.name}: regularization images of {c['modifier_token']} need a class_prompt")
                self.klass.append(encode_latent_distribution(self.vae, load_image_folder(c["class_dir"], ctx.resolution),
                                                             ctx.device))
                prompts.append(c["class_prompt"])
        offload(self.vae)
        self.prompt_ids = tokenize(self.tokenizer, prompts).to(ctx.device)
        self.text_encoder.to(ctx.device)
        self.tokens.to(ctx.device)
        self.unet.to(ctx.device)
        if ctx.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def param_groups(self) -> list[dict]:
        projections = [p for proc in self.processors.values() for p in proc.parameters()]
        return [{"params": projections}, {"params": [self.tokens.vectors]}]

    def batch(self, step: int, generator: torch.Generator) -> dict:
        """batch_size instance images per concept, then as many class images per concept."""
        latents, which = [], []
        for i, (mean, std) in enumerate(self.instance + self.klass):
            idx = torch.randint(0, mean.shape[0], (self.batch_size,), generator=generator).to(mean.device)
            latents.append(sample_latents(mean[idx], std[idx], generator))
            which += [i] * self.batch_size
        noisy, timesteps, target = noise_and_target(self.noise_scheduler, torch.cat(latents), generator)
        return dict(noisy=noisy, timesteps=timesteps, target=target, n_instance=self.batch_size * len(self.instance),
                    prompt_index=torch.tensor(which, device=self.device))

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        cond = self.text_encoder(self.prompt_ids[batch["prompt_index"]])[0]
        pred = self.unet(batch["noisy"], batch["timesteps"], cond).sample
        return dreambooth_loss(pred, batch["target"], batch["n_instance"], self.prior_weight)

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
