"""The config is validated at load: a wrong key or value is refused with the key named."""

import copy
from pathlib import Path

import pytest
import yaml

from conceptbench import config as cb

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())
STUDY = yaml.safe_load((ROOT / "config/config.yaml").read_text())


def test_shipped_configs_validate():
    for raw in (TINY, STUDY):
        cfg = cb.validate(copy.deepcopy(raw))
        assert cfg["evaluation"]["seeds"] >= 1  # defaults are filled in


def test_study_config_is_the_study():
    cfg = cb.validate(copy.deepcopy(STUDY))
    v = cb.variants(cfg)
    assert list(v["dreambooth"].values()) == [0.25, 0.5, 0.75, 1.0]
    assert list(v["lora"].values()) == [4, 8, 16]
    assert list(v["textual_inversion"].values()) == [1, 2, 4, 8]
    assert list(v["custom_diffusion"].values()) == ["crossattn", "crossattn_kv"]
    assert list(v["lcm"].values()) == ["l2", "huber"]
    assert list(v["ddpo"].values()) == [False, True]
    exps = cfg["experiments"]
    steps = {name: exps[name]["train"]["steps"] for name in exps}
    assert steps == {"dreambooth": 400, "lora": 15000, "textual_inversion": 800,
                     "custom_diffusion": 250, "custom_diffusion_multi": 500, "lcm": 10000, "ddpo": 200}
    lrs = {name: exps[name]["train"]["learning_rate"] for name in exps}
    assert lrs == {"dreambooth": 5e-6, "lora": 1e-4, "textual_inversion": 5e-4,
                   "custom_diffusion": 1e-5, "custom_diffusion_multi": 1e-5, "lcm": 1e-6, "ddpo": 3e-4}
    assert {n: e["sampling"]["steps"] for n, e in exps.items()}["lcm"] == 4
    assert exps["ddpo"]["sampling"]["steps"] == 50
    assert exps["custom_diffusion"]["base_model"] == "sd14"
    assert exps["dreambooth"]["class_images"]["count"] == 100
    for spec in cfg["models"].values():
        assert len(spec["revision"]) == 40  # every hub download is pinned


def test_tiny_has_the_same_experiments_and_sweeps():
    tiny, study = cb.validate(copy.deepcopy(TINY)), cb.validate(copy.deepcopy(STUDY))
    assert tiny["experiments"].keys() == study["experiments"].keys()
    for name in study["experiments"]:
        assert tiny["experiments"][name]["sweep"] == study["experiments"][name]["sweep"]
        assert tiny["experiments"][name]["method"] == study["experiments"][name]["method"]
    assert all(m.get("world") for m in tiny["models"].values())  # the toy world's models, shipped


def _broken(path, value):
    cfg = copy.deepcopy(TINY)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("experiments", "dreambooth", "train", "steps"), -5, "experiments.dreambooth.train.steps: -5 is less than the minimum of 1"),
        (("experiments", "dreambooth", "train", "learning_rate"), 0, "experiments.dreambooth.train.learning_rate: 0 is less than or equal to the minimum of 0"),
        (("experiments", "dreambooth", "method"), "hypernetwork", "experiments.dreambooth.method: 'hypernetwork' is not one of"),
        (("experiments", "dreambooth", "sweep", "values"), [], "experiments.dreambooth.sweep.values: [] should be non-empty"),
        (("experiments", "dreambooth", "sweep", "values"), [0.5, "0.5"], "duplicate variant names ['lambda-0.5']"),
        (("experiments", "dreambooth", "trian"), {}, "experiments.dreambooth: Additional properties are not allowed ('trian' was unexpected)"),
        (("experiments", "dreambooth", "base_model"), "sdxl", "experiments.dreambooth.base_model: 'sdxl' is not in models"),
        (("experiments", "dreambooth", "data"), "horse", "experiments.dreambooth.data: 'horse' is not in datasets"),
        (("experiments", "dreambooth", "sweep", "param"), "train.stepz", "experiments.dreambooth.sweep.param: train has no key 'stepz'"),
        (("experiments", "dreambooth", "prompts"), ["a dog in a bucket"], "lacks subject_phrase 'sks dog'"),
        (("models", "sd15"), {"kind": "diffusion", "repo": "x/y", "revision": "main"}, "models.sd15.revision: 'main' does not match"),
        (("models", "sd15"), {"kind": "diffusion"}, "models.sd15: A model, from exactly one source"),
        (("evaluation", "seeds"), 0, "evaluation.seeds: 0 is less than the minimum of 1"),
    ],
)
def test_bad_values_name_the_key(path, value, expected):
    with pytest.raises(cb.ConfigError) as err:
        cb.validate(_broken(path, value))
    assert expected in str(err.value)


def test_variant_spec_carries_the_swept_value():
    cfg = cb.validate(copy.deepcopy(TINY))
    spec = cb.resolve_variant(cfg, "dreambooth", "lambda-0.75")
    assert spec["args"]["prior_loss_weight"] == 0.75
    assert spec["args"]["class_prompt"] == "a photo of a dog"
    assert spec["train"]["steps"] == TINY["experiments"]["dreambooth"]["train"]["steps"]


def test_clip_t_prompt_replaces_the_placeholder():
    exp = cb.validate(copy.deepcopy(TINY))["experiments"]["dreambooth"]
    rows = cb.eval_prompts(exp)
    assert rows[0] == {"prompt": "sks dog in a bucket", "eval_prompt": "a dog in a bucket"}


def _one_problem(cfg) -> str:
    """The one line a bad config is refused with (after the 'invalid config:' header)."""
    with pytest.raises(cb.ConfigError) as err:
        cb.validate(cfg)
    header, *lines = str(err.value).splitlines()
    assert header == "invalid config:" and len(lines) == 1, str(err.value)
    return lines[0].strip()


DREAMBOOTH_KNOWN = "(known: class_prompt, instance_prompt, prior_loss_weight, train_text_encoder)"


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("experiments", "dreambooth", "sweep", "param"), "args.prior_los_weight",
         "experiments.dreambooth.sweep.param: dreambooth has no argument 'prior_los_weight'; "
         f"did you mean 'prior_loss_weight'? {DREAMBOOTH_KNOWN}"),
        (("experiments", "dreambooth", "args", "prior_loss_wieght"), 0.3,
         "experiments.dreambooth.args.prior_loss_wieght: dreambooth has no argument 'prior_loss_wieght'; "
         f"did you mean 'prior_loss_weight'? {DREAMBOOTH_KNOWN}"),
        (("experiments", "dreambooth", "args", "train_text_encoder"), "maybe",
         "experiments.dreambooth.args.train_text_encoder: 'maybe' is not of type 'boolean'"),
        (("experiments", "dreambooth", "args", "prior_loss_weight"), -1,
         "experiments.dreambooth.args.prior_loss_weight: -1 is less than the minimum of 0"),
        (("experiments", "dreambooth", "sweep", "values"), [0.5, -0.25],
         "experiments.dreambooth.sweep.values.1: -0.25 is less than the minimum of 0 (args.prior_loss_weight)"),
        (("experiments", "dreambooth", "sweep", "param"), "train.learning_rat",
         "experiments.dreambooth.sweep.param: train has no key 'learning_rat'; did you mean 'learning_rate'?"),
        (("experiments", "lcm", "args", "loss_type"), "hubber",
         "experiments.lcm.args.loss_type: 'hubber' is not one of ['l2', 'huber']"),
        (("experiments", "lora", "sweep", "param"), "args.snr_gamma",
         "experiments.lora.args.rank: required by lora (no default): r, the adapter's rank."),
        (("experiments", "lora", "class_images"), {"prompt": "a drawing", "count": 4},
         "experiments.lora.class_images.count: method lora uses no class images (set it to 0)"),
        (("experiments", "custom_diffusion_multi", "args", "extra_concepts"),
         [{"data": "cat_toy", "modifier_token": "<new2>", "class_prompt": "toy"}],
         "experiments.custom_diffusion_multi.args.extra_concepts.0: 'instance_prompt' is a required property"),
        (("experiments", "dreambooth", "method"), "dreambooh",
         "experiments.dreambooth.method: 'dreambooh' is not one of ['custom_diffusion', 'ddpo', 'dreambooth', 'lcm', "
         "'lora', 'textual_inversion']; did you mean 'dreambooth'?"),
        (("experiments", "dreambooth", "method"), "no_such_package.method",
         "experiments.dreambooth.method: 'no_such_package.method': no such module on the Python path"),
    ],
)
def test_method_arguments_are_checked_against_the_declaration(path, value, expected):
    assert _one_problem(_broken(path, value)).startswith(expected)


def test_arguments_get_the_declared_defaults_once():
    """The config fills in what the method declares, and the method built from the spec reads the same."""
    from conceptbench import registry

    cfg = cb.validate(copy.deepcopy(TINY))
    declared = registry.declaration("lcm")["args"]
    spec = cb.resolve_variant(cfg, "lcm", "loss-huber")
    assert spec["args"]["timestep_scaling"] == declared["timestep_scaling"]["default"] == 10.0
    assert spec["args"]["loss_type"] == "huber" and spec["args"]["w_max"] == TINY["experiments"]["lcm"]["args"]["w_max"]  # the sweep value; the config's
    assert set(spec["args"]) == set(declared)
    # Custom Diffusion's λ is DreamBooth's argument, declared once.
    assert registry.declaration("custom_diffusion")["args"]["prior_loss_weight"] == \
        registry.declaration("dreambooth")["args"]["prior_loss_weight"]


def test_the_reward_decides_ddpo_inputs():
    cfg = cb.validate(copy.deepcopy(TINY))
    exp = cfg["experiments"]["ddpo"]
    assert cb.method_inputs(exp, exp["args"]) == ["clip", "aesthetic"]
    assert cb.method_inputs(exp, {**exp["args"], "reward": "brightness"}) == []
    assert cb.method_inputs(cfg["experiments"]["dreambooth"], {}) == ["data", "class_images"]


def test_describe_lists_a_methods_arguments_with_defaults(capsys):
    from conceptbench.describe import describe

    text = describe(cb.load_schema(), "dreambooth")
    assert "prior_loss_weight   number >= 0, default 1.0: λ, the weight of the class images' loss" in text
    assert "instance_prompt     string, required:" in text
    assert "inputs besides the base model: data, class_images" in text
    assert "cost: 1 s per step on one H100" in text
    assert "checkpoint_every" in describe(cb.load_schema(), "train") and "dreambooth:" in describe(cb.load_schema())
    assert cb._main(["--describe", "dreambooth"]) == 0 and capsys.readouterr().out == text + "\n"
    assert cb._main(["--describe", "dreambooh"]) == 1
    assert "did you mean 'dreambooth'" in capsys.readouterr().out


def test_class_images_are_drawn_as_the_dreambooth_reference_draws_them():
    # diffusers examples/dreambooth/train_dreambooth.py calls pipeline(prompt): the pipeline's default 50 steps, 7.5.
    cfg = cb.validate(copy.deepcopy(STUDY))
    assert {k: cfg["experiments"]["dreambooth"]["class_images"][k] for k in ("steps", "guidance_scale")} == \
        {"steps": 50, "guidance_scale": 7.5}
    raw = copy.deepcopy(STUDY)
    for key in ("steps", "guidance_scale"):
        del raw["experiments"]["dreambooth"]["class_images"][key]
    left_out = cb.validate(raw)["experiments"]["dreambooth"]["class_images"]
    assert (left_out["steps"], left_out["guidance_scale"]) == (50, 7.5)


def test_ddpo_runs_as_trls_example_on_prompts_of_its_own():
    from conceptbench.methods.ddpo import PROMPT_SETS
    from conceptbench.world.scene import CLASSES

    study, tiny = cb.validate(copy.deepcopy(STUDY)), cb.validate(copy.deepcopy(TINY))
    exp = study["experiments"]["ddpo"]
    args = exp["args"]
    # trl examples/scripts/ddpo.py: 200 epochs of 24 samples (4 x 6), train batches of 3 -> 8 updates an epoch.
    assert (exp["train"]["steps"], args["samples_per_epoch"], args["sample_batch_size"], args["train_batch_size"]) == \
        (200, 24, 6, 3)
    assert exp["train"]["steps"] * args["samples_per_epoch"] // args["train_batch_size"] == 1600
    assert (args["guidance_scale"], args["eta"], args["clip_range"], args["adv_clip_max"]) == (5.0, 1.0, 1e-4, 5.0)
    assert (args["stat_buffer_size"], args["stat_min_count"], exp["train"]["adam_weight_decay"]) == (32, 16, 1e-4)
    assert args["prompts"] == "animals" and len(PROMPT_SETS["animals"]) == 27
    assert not set(PROMPT_SETS["animals"]) & set(exp["prompts"])
    toy = tiny["experiments"]["ddpo"]
    assert not set(toy["args"]["prompts"]) & set(toy["prompts"])  # trained apart from what is evaluated
    assert all(any(c in p.split() for c in CLASSES) for p in toy["args"]["prompts"])  # in the toy world's words
