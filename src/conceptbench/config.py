"""Load, validate and expand a conceptbench config. Torch-free: the Snakefile imports it at parse time.

A config names models, datasets and experiments; every experiment sweeps one hyperparameter, and
each value becomes a variant named `label-value` (e.g. `lambda-0.25`). `resolve_variant` turns an
(experiment, variant) pair into the plain dict a training job receives through `params:`, so a
changed value invalidates that variant's chain and nothing else.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
VARIANT_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# Methods whose experiments score against reference images need a subject dataset.
REFERENCE_METRICS = {"clip_i", "dino_i"}
# The untrained base model's variant, present in every experiment: every other variant's paired deltas
# are taken against it (aggregate.py). `baselines` may add more references (LCM's teacher at full steps).
BASE = "base"
# Prompt sets of a variant's samples: the evaluation prompts, and the class prompt (the prior probe).
EVAL_SET, PRIOR_SET = "eval", "prior"


class ConfigError(ValueError):
    """A config key or value that cannot work; the message names the key and what was expected."""


def _with_defaults(cls):
    # jsonschema's documented recipe: fill `default`s while validating `properties`.
    check_properties = cls.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return validators.extend(cls, {"properties": properties})


_Validator = _with_defaults(Draft202012Validator)


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error) -> str:
    # A oneOf failure is clearest through the branch that got furthest into the value; when no
    # branch got past the value itself, the schema's description says what was expected.
    if error.context:
        best = max(error.context, key=lambda e: (len(e.relative_path), -len(e.message)))
        if not best.relative_path:
            return f"{_key(error.absolute_path)}: {error.schema.get('description', error.message).strip()}"
        return _describe(best)
    return f"{_key(error.absolute_path)}: {error.message}"


def validate(config: dict, schema_path: Path = SCHEMA) -> dict:
    """Fill defaults into `config` in place and check it; raise ConfigError naming every bad key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_describe(e) for e in errors))
    _check_references(config)
    return config


def load(path: str | Path, schema_path: Path = SCHEMA) -> dict:
    """Read a YAML config file and validate it."""
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return validate(config, schema_path)


def _check_references(config: dict) -> None:
    problems = []
    models, datasets = config["models"], config["datasets"]
    for name, exp in enabled_experiments(config).items():
        where = f"experiments.{name}"
        base = models.get(exp["base_model"])
        if base is None:
            problems.append(f"{where}.base_model: {exp['base_model']!r} is not in models ({', '.join(models)})")
        elif base["kind"] != "diffusion":
            problems.append(f"{where}.base_model: {exp['base_model']!r} is a {base['kind']} model, expected diffusion")
        if exp["method"] != "ddpo" and not exp["data"]:
            problems.append(f"{where}.data: method {exp['method']} needs a training dataset")
        if exp["data"] and exp["data"] not in datasets:
            problems.append(f"{where}.data: {exp['data']!r} is not in datasets ({', '.join(datasets)})")
        needs_refs = REFERENCE_METRICS & set(exp["metrics"])
        if needs_refs and datasets.get(exp["data"], {}).get("kind") != "subject":
            problems.append(f"{where}.metrics: {sorted(needs_refs)} need a subject dataset as data")
        for metric, model in (("clip_t", "clip"), ("clip_i", "clip"), ("dino_i", "dino"), ("aesthetic", "aesthetic")):
            ref = config["metrics"][model]
            if metric in exp["metrics"] and ref not in models:
                problems.append(f"metrics.{model}: {ref!r} is not in models, but {where} reports {metric}")
        if exp["subject_phrase"]:
            for i, prompt in enumerate(exp["prompts"]):
                if exp["subject_phrase"] not in prompt:
                    problems.append(f"{where}.prompts.{i}: {prompt!r} lacks subject_phrase {exp['subject_phrase']!r}")
        ci = exp["class_images"]
        if ci["count"] and not ci["prompt"]:
            problems.append(f"{where}.class_images.prompt: needed when class_images.count > 0")
        problems += _retrieval_problems(where, exp, datasets)
        section, key = exp["sweep"]["param"].split(".")
        known = exp[section] if section != "args" else None
        if known is not None and key not in known:
            problems.append(f"{where}.sweep.param: {section} has no key {key!r} (known: {', '.join(known)})")
        names = [variant_name(exp, v) for v in exp["sweep"]["values"]]
        for n in names:
            if not VARIANT_RE.match(n):
                problems.append(f"{where}.sweep.values: variant name {n!r} has characters outside [A-Za-z0-9_.+-]")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"{where}.sweep.values: duplicate variant names {dupes}")
        problems += _baseline_problems(where, exp, names)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def check_output_dirs(config: dict) -> None:
    """Refuse, before any job runs, a results or resources folder that cannot be created or written."""
    for key in ("results", "resources"):
        path = Path(config[key]).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{key}: {config[key]} cannot be created: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {config[key]} is not writable ({existing} denies writing)")


def _retrieval_problems(where: str, exp: dict, datasets: dict) -> list[str]:
    """Retrieved class images need a pool; extra concepts (multi-concept) need datasets and, when
    regularized, retrieved class images (generated ones exist for the experiment's own class only)."""
    problems, ci = [], exp["class_images"]
    retrieved = ci["count"] and ci["source"] == "retrieved"
    if retrieved and ci["backend"] == "faiss" and ci["pool"] not in datasets:
        problems.append(f"{where}.class_images.pool: {ci['pool']!r} is not in datasets ({', '.join(datasets)})")
    extras = exp["args"].get("extra_concepts") or []
    if not isinstance(extras, list):
        return problems + [f"{where}.args.extra_concepts: expected a list of concepts"]
    for i, concept in enumerate(extras):
        if not isinstance(concept, dict) or concept.get("data") not in datasets:
            data = concept.get("data") if isinstance(concept, dict) else concept
            problems.append(f"{where}.args.extra_concepts.{i}.data: {data!r} is not in datasets")
        elif ci["count"] and not (retrieved and concept.get("class_prompt")):
            problems.append(f"{where}.args.extra_concepts.{i}: class images for extra concepts are retrieved "
                            "(class_images.source: retrieved) for their class_prompt")
    return problems


def _baseline_problems(where: str, exp: dict, variant_names: list[str]) -> list[str]:
    """`baselines` must hold `base`, with names that are valid and distinct from the sweep's variants."""
    names = list(exp["baselines"])
    problems = [] if BASE in names else [f"{where}.baselines: must include {BASE!r} (the untrained base model)"]
    for n in names:
        if not VARIANT_RE.match(n):
            problems.append(f"{where}.baselines: name {n!r} has characters outside [A-Za-z0-9_.+-]")
        if n in variant_names:
            problems.append(f"{where}.baselines: {n!r} is also the name of a swept variant")
    return problems


def enabled_experiments(config: dict) -> dict:
    return {name: exp for name, exp in config["experiments"].items() if exp.get("enabled", True)}


def _format_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def variant_name(exp: dict, value) -> str:
    label = exp["sweep"]["label"] or exp["sweep"]["param"].split(".")[1]
    return f"{label}-{_format_value(value)}"


def variants(config: dict) -> dict[str, dict[str, object]]:
    """{experiment: {variant name: swept value}} for every enabled experiment, in config order."""
    return {
        name: {variant_name(exp, v): v for v in exp["sweep"]["values"]}
        for name, exp in enabled_experiments(config).items()
    }


def baselines(config: dict) -> dict[str, dict[str, dict]]:
    """{experiment: {baseline name: its sampling overrides}} for every enabled experiment; `base` first."""
    return {
        name: {BASE: exp["baselines"][BASE], **{b: o for b, o in exp["baselines"].items() if b != BASE}}
        for name, exp in enabled_experiments(config).items()
    }


def is_baseline(config: dict, experiment: str, variant: str) -> bool:
    return variant in config["experiments"][experiment]["baselines"]


def resolve_variant(config: dict, experiment: str, variant: str) -> dict:
    """The plain-JSON spec a job receives: the experiment with the sweep value applied.

    A baseline (`base`, ...) is the experiment untouched, with the baseline's sampling overrides
    (steps, scheduler); it is never trained.
    """
    exp = config["experiments"][experiment]
    spec = {
        "experiment": experiment,
        "variant": variant,
        "method": exp["method"],
        "seed": config["seed"],
        "resolution": exp["resolution"],
        "train": copy.deepcopy(exp["train"]),
        "sampling": copy.deepcopy(exp["sampling"]),
        "args": copy.deepcopy(exp["args"]),
    }
    if is_baseline(config, experiment, variant):
        spec["sampling"].update(exp["baselines"][variant])
    else:
        section, key = exp["sweep"]["param"].split(".")
        spec[section][key] = variants(config)[experiment][variant]
    if exp["class_images"]["count"]:
        spec["args"].setdefault("class_prompt", exp["class_images"]["prompt"])
    return spec


def eval_prompts(exp: dict) -> list[dict]:
    """Each prompt with the form CLIP-T scores: the placeholder phrase replaced by the class phrase.

    "sks dog in a bucket" -> "a dog in a bucket". The placeholder is a made-up token CLIP has never
    seen, so scoring the literal prompt would measure how CLIP reads "sks", not the image.
    """
    rows = []
    for prompt in exp["prompts"]:
        scored = prompt
        if exp["subject_phrase"]:
            scored = prompt.replace(exp["subject_phrase"], exp["class_phrase"])
        for phrase, replacement in exp.get("extra_phrases", {}).items():  # multi-concept prompts
            scored = scored.replace(phrase, replacement)
        rows.append({"prompt": prompt, "eval_prompt": " ".join(scored.split())})
    return rows


def sample_prompts(exp: dict) -> list[dict]:
    """What a variant samples: the evaluation prompts (set "eval") and, for an experiment with class
    images, its class prompt (set "prior": the prior probe; does the class prompt now draw the subject?)."""
    rows = [{**row, "prompt_set": EVAL_SET} for row in eval_prompts(exp)]
    if exp["class_images"]["count"] and exp["class_images"]["prompt"]:
        prompt = exp["class_images"]["prompt"]
        rows.append({"prompt": prompt, "eval_prompt": prompt, "prompt_set": PRIOR_SET})
    return rows
