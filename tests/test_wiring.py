"""What reaches each model: tests that pin the wiring a learning test cannot see.

Each test here fails for a one-line change of the code that every other test passes and that would
bias the study on real weights without a visible error: a prompt on the wrong rows, an adapter on
some of its layers, two terms swapped, images in the wrong range, a schedule that does nothing, an
interval at the wrong quantiles. The docstrings name the change each test catches.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conceptbench.train import TrainContext, train, train_config
from conceptbench.train.method import Method, encode_latent_distribution, tokenize


def context(spec, base, data=None, class_dir=None, inputs=None):
    spec = {**spec, "train": {"steps": 1, "learning_rate": 1e-3, **spec.get("train", {})}}
    return TrainContext(spec=spec, base_model=base, data_dir=data, class_dir=class_dir, device=torch.device("cpu"),
                        mixed_precision="no", inputs=inputs or {})


def conditioning_seen(unet) -> list[torch.Tensor]:
    """Records the encoder_hidden_states of each U-Net call."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]).detach().clone())

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# --- prompts on the right rows --------------------------------------------------------------


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_dreambooth_conditions_instance_rows_on_the_instance_prompt_and_class_rows_on_the_class_prompt(
        tiny_pipeline_dir, instance_dir, class_dir, dreambooth_spec, train_text_encoder):
    """Catches the prompts swapped between instance and class rows (either in the prompt list or the row index)."""
    from conceptbench.methods.dreambooth import DreamBooth

    dreambooth_spec["args"]["train_text_encoder"] = train_text_encoder
    dreambooth_spec["train"]["batch_size"] = 2
    method = DreamBooth(dreambooth_spec["args"])
    method.setup(context(dreambooth_spec, tiny_pipeline_dir, instance_dir, class_dir))
    seen = conditioning_seen(method.unet)
    g = torch.Generator().manual_seed(0)
    method.loss(method.batch(0, g), g)
    args = dreambooth_spec["args"]
    with torch.no_grad():
        expected = method.text_encoder(tokenize(method.tokenizer, [args["instance_prompt"], args["class_prompt"]]))[0]
    cond = seen[0]
    assert cond.shape[0] == 4  # 2 instance rows, then 2 class rows
    for row, prompt in enumerate([0, 0, 1, 1]):
        torch.testing.assert_close(cond[row], expected[prompt])


@pytest.mark.parametrize("augment", [False, True])
def test_custom_diffusion_conditions_each_concepts_rows_on_its_own_prompts(tiny_pipeline_dir, instance_dir, class_dir,
                                                                           augment):
    """Catches instance and class prompts swapped, and concept i's rows given concept j's prompt (with the
    augmentation's size words in front of an instance prompt, or none)."""
    from conceptbench.methods.custom_diffusion import CustomDiffusion

    args = {"modifier_token": "<new1>", "initializer_token": "cat", "instance_prompt": "photo of a <new1> cat",
            "class_prompt": "cat", "train_params": "crossattn_kv", "prior_loss_weight": 1.0, "augment": augment,
            "extra_concepts": [{"data": "toy", "modifier_token": "<new2>", "initializer_token": "toy",
                                "instance_prompt": "photo of a <new2> toy", "class_prompt": "toy"}]}
    spec = {"seed": 0, "resolution": 64, "train": {"batch_size": 1}, "args": args}
    method = CustomDiffusion(args)
    method.setup(context(spec, tiny_pipeline_dir, instance_dir, class_dir,
                         inputs={"data_1": instance_dir, "class_images_1": class_dir}))
    seen = conditioning_seen(method.unet)
    g = torch.Generator().manual_seed(0)
    batch = method.batch(0, g)
    method.loss(batch, g)
    prompts = [method.prompts[i] for i in batch["prompt_index"].tolist()]
    assert prompts[0].endswith("photo of a <new1> cat") and prompts[1].endswith("photo of a <new2> toy")
    assert prompts[2:] == ["cat", "toy"]  # instances, then classes (class_dir has no captions: the class prompt)
    if not augment:
        assert prompts[:2] == ["photo of a <new1> cat", "photo of a <new2> toy"]
    with torch.no_grad():
        expected = method.text_encoder(tokenize(method.tokenizer, prompts).to(method.device))[0]
    assert batch["n_instance"] == 2
    for row in range(4):
        torch.testing.assert_close(seen[0][row], expected[row])


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_textual_inversion_prompts_carry_every_vector_of_the_placeholder(tiny_pipeline_dir, instance_dir, num_vectors):
    """Catches the instance prompt tokenized without expanding the placeholder into its N tokens (only
    the first vector would ever be trained)."""
    from conceptbench.methods.textual_inversion import TextualInversion

    args = {"placeholder_token": "<sks-cat>", "initializer_token": "cat", "instance_prompt": "a photo of <sks-cat>",
            "num_vectors": num_vectors}
    method = TextualInversion(args)
    method.setup(context({"seed": 0, "resolution": 64, "args": args}, tiny_pipeline_dir, instance_dir))
    ids = method.prompt_ids[0].tolist()
    assert [i for i in ids if i in method.tokens.ids] == method.tokens.ids and len(method.tokens.ids) == num_vectors


@pytest.mark.parametrize("cache_latents", [True, False])
def test_lora_pairs_each_image_with_its_own_caption(tiny_pipeline_dir, caption_dir, cache_latents):
    """Catches captions drawn apart from their images (another index, another draw)."""
    from conceptbench.methods.lora import LoRA
    from conceptbench.train.method import encode_prompts

    args = {"rank": 2, "cache_latents": cache_latents}
    method = LoRA(args)
    method.setup(context({"seed": 0, "resolution": 64, "train": {"batch_size": 3}, "args": args},
                         tiny_pipeline_dir, caption_dir))
    g = torch.Generator().manual_seed(0)
    batch = method.batch(0, g)
    drawn = torch.randint(0, len(method.data), (3,), generator=torch.Generator().manual_seed(0)).tolist()
    captions = [method.data.pairs[i][1] for i in drawn]
    assert len(set(captions)) == 3  # three different captions: any reordering shows
    with torch.no_grad():
        method.text_encoder.to(method.device)
        expected = encode_prompts(method.tokenizer, method.text_encoder, captions)
    torch.testing.assert_close(batch["cond"], expected)


# --- adapters where they were asked for -----------------------------------------------------


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"], ["to_k", "to_v"]])
def test_lora_adapts_every_layer_of_every_target_module_and_no_other(tiny_pipeline_dir, targets):
    """Catches an adapter attached to only some of target_modules (or some of their layers)."""
    from conceptbench.methods._lora import add_lora
    from conceptbench.train.method import load_base_pipeline

    unet = load_base_pipeline(tiny_pipeline_dir).unet
    wanted = {name: (m.in_features, m.out_features) for name, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and any(name.endswith(f".{t}") for t in targets)}
    params = add_lora(unet, 2, target_modules=targets)
    assert adapted_layers(unet) == set(wanted) and len(wanted) >= 2 * len(targets)
    assert sum(p.numel() for p in params) == sum(2 * (i + o) for i, o in wanted.values())


def adapted_layers(unet) -> set[str]:
    return {name for name, m in unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_lora_method_passes_its_target_modules_to_the_adapter(tiny_pipeline_dir, caption_dir):
    """Catches LoRA.setup ignoring args.target_modules (the default four instead)."""
    from conceptbench.methods.lora import LoRA

    for targets, count in ((None, 4), (["to_v"], 1)):
        args = {"rank": 2, **({"target_modules": targets} if targets else {})}
        method = LoRA(args)
        method.setup(context({"seed": 0, "resolution": 64, "args": args}, tiny_pipeline_dir, caption_dir))
        kinds = {"to_out.0" if name.endswith("to_out.0") else name.split(".")[-1] for name in adapted_layers(method.unet)}
        assert len(kinds) == count, kinds


# --- the consistency function and the EMA ---------------------------------------------------


def lcm_with_schedule(**args):
    from diffusers import DDIMScheduler, DDPMScheduler

    from conceptbench.methods.lcm import LCM
    from conceptbench.models.tiny import SD15_SCHEDULE

    method = LCM(args)
    method.scheduler = DDPMScheduler.from_config(DDIMScheduler(**SD15_SCHEDULE).config)  # as LCM.setup builds it
    method.alphas_cumprod = method.scheduler.alphas_cumprod
    method.timestep_scaling = 10.0
    return method


def test_lcm_consistency_function_scales_the_input_by_c_skip_and_the_x0_estimate_by_c_out():
    """Catches c_skip and c_out swapped where the consistency output is formed: at t = 0 the output must
    be the input itself (the boundary condition), between the two a fixed mix."""
    from conceptbench.methods.lcm import boundary_scalings, predicted_x0_eps

    method = lcm_with_schedule()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    stub = lambda x, t, cond, timestep_cond=None: SimpleNamespace(sample=eps)  # noqa: E731
    t = torch.tensor([0, 1, 3])
    out = method._consistency(stub, x, t, None, None)
    torch.testing.assert_close(out[0], x[0])  # f(x, 0) = x
    x0, _ = predicted_x0_eps(eps, t, x, method.alphas_cumprod, "epsilon")
    c_skip, c_out = boundary_scalings(t)
    assert abs(c_skip[2] - c_out[2]) > 0.5  # at t = 3 the two scalings are far apart, so a swap shows
    torch.testing.assert_close(out, c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0)


def test_lcm_ema_target_moves_a_fraction_one_minus_decay_towards_the_student():
    """Catches the EMA weights swapped (target := decay·student + (1 − decay)·target)."""
    method = lcm_with_schedule()
    method.ema_decay = 0.9
    method.student, method.target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    student, target = copy.deepcopy(method.student.state_dict()), copy.deepcopy(method.target.state_dict())
    with torch.no_grad():
        method.after_step(0)
    for k, v in method.target.state_dict().items():
        torch.testing.assert_close(v, 0.9 * target[k] + 0.1 * student[k])


def test_ddpo_guidance_moves_from_the_unconditional_towards_the_conditional_output():
    """Catches classifier-free guidance with its two halves swapped (c + s·(u − c))."""
    from conceptbench.methods._policy import guided_noise

    def unet(x, t, cond):  # the output is the conditioning's mean, per row
        return SimpleNamespace(sample=cond.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x))

    x = torch.zeros(2, 4, 8, 8)
    out = guided_noise(unet, x, torch.tensor(10), torch.ones(2, 77, 8), torch.zeros(1, 77, 8), guidance_scale=7.5)
    torch.testing.assert_close(out, torch.full_like(x, 7.5))  # u + s·(c − u) = 0 + 7.5·(1 − 0)


# --- images in [-1, 1] at the VAE ------------------------------------------------------------


@pytest.mark.parametrize("name", ["dreambooth", "textual_inversion", "custom_diffusion", "lora", "lora-uncached", "lcm"])
def test_training_images_reach_the_vae_in_minus_one_to_one(tiny_pipeline_dir, instance_dir, class_dir, caption_dir,
                                                            monkeypatch, name):
    """Catches images handed to the VAE in [0, 1] (or [0, 255]): SD's VAE was trained on [-1, 1]."""
    from diffusers import AutoencoderKL

    from conceptbench.methods import get_method

    ranges = []
    encode = AutoencoderKL.encode

    def spy(self, x, *args, **kwargs):
        ranges.append((x.min().item(), x.max().item()))
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", spy)
    args = {"dreambooth": {"instance_prompt": "a photo of sks cat", "class_prompt": "a photo of a cat"},
            "textual_inversion": {"placeholder_token": "<sks-cat>", "initializer_token": "cat"},
            "custom_diffusion": {"modifier_token": "<new1>", "instance_prompt": "photo of a <new1> cat",
                                 "class_prompt": "cat"},
            "lora": {"rank": 2}, "lora-uncached": {"rank": 2, "cache_latents": False},
            "lcm": {"time_cond_proj_dim": 8}}[name]
    captioned = name.startswith("lora") or name == "lcm"
    method = get_method(name.split("-")[0])(args)
    method.setup(context({"seed": 0, "resolution": 64, "args": args}, tiny_pipeline_dir,
                         caption_dir if captioned else instance_dir, None if captioned else class_dir))
    method.batch(0, torch.Generator().manual_seed(0))
    assert ranges
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    assert -1.0 <= low < -0.5 and 0.5 < high <= 1.0, (low, high)


def test_latents_are_scaled_by_the_vaes_scaling_factor(tiny_pipeline_dir):
    """Catches latents left unscaled (SD's U-Net expects VAE latents times 0.18215)."""
    from conceptbench.train.method import load_base_pipeline

    vae = load_base_pipeline(tiny_pipeline_dir).vae
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = encode_latent_distribution(vae, images, torch.device("cpu"))
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    assert vae.config.scaling_factor != 1.0
    torch.testing.assert_close(mean, dist.mean * vae.config.scaling_factor)
    torch.testing.assert_close(std, dist.std * vae.config.scaling_factor)


# --- the learning-rate schedule is what the optimizer uses ------------------------------------


class ConstantGradient(Method):
    """One scalar with gradient 1 at every step: AdamW then moves it by (almost exactly) the step's lr."""

    name = "constant_gradient"

    def setup(self, ctx):
        self.w = torch.nn.Parameter(torch.zeros(()))

    def param_groups(self):
        return [{"params": [self.w]}]

    def batch(self, step, generator):
        return None

    def loss(self, batch, generator):
        return self.w * 1.0


@pytest.mark.parametrize("schedule, warmup", [("cosine", 0), ("cosine", 3), ("linear", 2)])
def test_the_lr_schedule_drives_the_optimizer_not_only_the_log(tmp_path, schedule, warmup):
    """Catches a cosine (or linear) schedule run as constant: the scheduler not built from the config,
    not stepped, or stepped on another optimizer."""
    steps, lr = 10, 0.01
    trajectory = []
    spec = {"seed": 0, "train": {"steps": steps, "learning_rate": lr, "lr_scheduler": schedule,
                                 "lr_warmup_steps": warmup, "adam_weight_decay": 0.0, "checkpoint_every": 0}}
    method = ConstantGradient({})
    train(method, context(spec, tmp_path), train_config(spec), tmp_path / "work",
          on_step_end=lambda step: trajectory.append(method.w.item()))
    moves = -np.diff([0.0, *trajectory])

    def expected(k):
        if k < warmup:
            return lr * k / warmup
        progress = (k - warmup) / (steps - warmup)
        return lr * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress)

    np.testing.assert_allclose(moves, [expected(k) for k in range(steps)], rtol=1e-4, atol=1e-9)


# --- the interval is the 95 % one -----------------------------------------------------------


def test_bootstrap_interval_is_the_central_95_percent():
    """Catches the interval taken at other quantiles than 2.5 % and 97.5 % (e.g. 5 % / 95 %, or one
    end moved): for a large normal sample the bootstrap interval of the mean is mean ± 1.96 standard errors."""
    from conceptbench.metrics.scores import bootstrap_ci

    values = np.random.default_rng(0).normal(0.0, 1.0, 1000)
    se = values.std() / math.sqrt(len(values))
    lo, hi = bootstrap_ci(values, n_boot=10000)  # each end within about 1.5 % of 1.96 se
    assert (values.mean() - lo) / se == pytest.approx(1.96, rel=0.04)
    assert (hi - values.mean()) / se == pytest.approx(1.96, rel=0.04)


def test_summary_and_delta_intervals_are_the_central_95_percent(monkeypatch):
    """The same for the intervals summary.csv reports: means and paired deltas (catches another alpha
    passed by aggregate)."""
    import pandas as pd

    from conceptbench import paired

    monkeypatch.setattr(paired, "N_BOOT", 10000)
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 1000), rng.normal(0, 1, 1000)
    index = pd.MultiIndex.from_arrays([np.arange(1000), np.zeros(1000, int)])
    for values, (mean, lo, hi) in ((a, paired.mean_with_interval(a)),
                                    (a - b, paired.paired_delta(pd.Series(a, index), pd.Series(b, index))[:3])):
        se = values.std() / math.sqrt(len(values))
        assert mean == pytest.approx(values.mean())
        assert (mean - lo) / se == pytest.approx(1.96, rel=0.04) and (hi - mean) / se == pytest.approx(1.96, rel=0.04)
