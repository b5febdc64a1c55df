"""Load, validate and expand a conceptbench config. Torch-free: the Snakefile imports it at parse time.

A config names models, datasets and experiments; every experiment sweeps one hyperparameter, and
each value becomes a variant named `label-value` (e.g. `lambda-0.25`). `resolve_variant` turns an
(experiment, variant) pair into the plain dict a training job receives through `params:`, so a
changed value invalidates that variant's chain and nothing else. An experiment's `args` are checked
against the arguments its method declares (registry.py), with their defaults filled in.

    python -m conceptbench.config --describe dreambooth    # a method's arguments, inputs and cost
    python -m conceptbench.config --describe train         # a config section's keys (train, sampling, ...)
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
from importlib import resources
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators

from . import registry
from .describe import describe

# Package data, so an installed package (not only a checkout) finds it.
SCHEMA = resources.files("conceptbench") / "schemas" / "config.schema.yaml"
VARIANT_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# Methods whose experiments score against reference images need a subject dataset.
REFERENCE_METRICS = {"clip_i", "dino_i"}
# Model entry keys that say how a folder is loaded, not what it holds: a change reruns no fetch or build.
LOAD_OPTIONS = ("quick_gelu",)
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


def _describe(error, *prefix) -> str:
    # A oneOf failure is clearest through the branch that got furthest into the value; when no
    # branch got past the value itself, the schema's description says what was expected.
    key = _key([*prefix, *error.absolute_path])
    if error.context:
        best = max(error.context, key=lambda e: (len(e.relative_path), -len(e.message)))
        if not best.relative_path:
            return f"{key}: {error.schema.get('description', error.message).strip()}"
        return _describe(best, *prefix)
    return f"{key}: {error.message}"


@functools.cache
def load_schema(schema_path: Path = SCHEMA) -> dict:
    """The config schema (read once per process; treat it as read-only)."""
    return yaml.safe_load(Path(schema_path).read_text())


def defaults(section: str, schema_path: Path = SCHEMA) -> dict:
    """The schema's default of each key of a config section (train, sampling, evaluation, ...): the one
    place they are written; the training loop and sampling read them from here."""
    schema = load_schema(schema_path)
    node = schema["$defs"][section] if section in schema["$defs"] else schema["properties"][section]
    return {key: copy.deepcopy(spec["default"]) for key, spec in node["properties"].items() if "default" in spec}


def validate(config: dict, schema_path: Path = SCHEMA) -> dict:
    """Fill defaults into `config` in place and check it; raise ConfigError naming every bad key."""
    schema = load_schema(schema_path)
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_describe(e) for e in errors))
    _check_references(config, schema)
    return config


def check_args(method: str, declared: dict, args: dict, where: str) -> list[str]:
    """Problems of `args` against the arguments `method` declares, each naming its key; fills in defaults.

    A missing required argument is not among them: a sweep may supply it (see _method_problems)."""
    problems = [f"{where}.{key}: {registry.unknown_argument(method, key, declared)}" for key in args
                if key not in declared]
    validator = _Validator({"type": "object", "properties": declared})
    return problems + [_describe(e, where) for e in validator.iter_errors(args)]


def _method_problems(where: str, exp: dict, config: dict) -> list[str]:
    """The experiment's method exists; its args and a sweep over args.* fit what it declares; its inputs exist."""
    method, args = exp["method"], exp["args"]
    try:
        decl = registry.declaration(method)
    except (registry.UnknownMethod, ValueError) as e:
        return [f"{where}.method: {e}"]
    declared = decl["args"]
    problems = check_args(method, declared, args, f"{where}.args")
    section, key = exp["sweep"]["param"].split(".")
    if section == "args" and key not in declared:
        problems.append(f"{where}.sweep.param: {registry.unknown_argument(method, key, declared)}")
    for name, spec in declared.items():
        if "default" not in spec and name not in args and (section, key) != ("args", name):
            problems.append(f"{where}.args.{name}: required by {method} (no default): {spec['description']}")
    if "data" in decl["inputs"] and not exp["data"]:
        problems.append(f"{where}.data: method {method} needs a training dataset")
    if exp["class_images"]["count"] and "class_images" not in decl["inputs"]:
        problems.append(f"{where}.class_images.count: method {method} uses no class images (set it to 0)")
    variant_args = [{**args, key: v} for v in exp["sweep"]["values"]] if section == "args" else [args]
    roles = {kind for a in variant_args for kind in method_inputs(exp, a)} & set(config["metrics"])
    for role in sorted(roles):
        if config["metrics"][role] not in config["models"]:
            problems.append(f"metrics.{role}: {config['metrics'][role]!r} is not in models, but {where}'s method "
                            f"{method} takes it as input")
    return problems


def method_inputs(exp: dict, args: dict) -> list[str]:
    """The input kinds (registry.INPUT_KINDS) the experiment's method takes with these args."""
    kinds = []
    for kind, when in registry.declaration(exp["method"])["inputs"].items():
        if when is not True and any(args.get(k) != v for k, v in when.items()):
            continue
        if (kind == "class_images" and not exp["class_images"]["count"]) or (
                kind == "extra_concepts" and not args.get("extra_concepts")):
            continue
        kinds.append(kind)
    return kinds


def _sweep_problems(where: str, exp: dict, schema: dict) -> list[str]:
    """The swept key exists in its section and each value fits that key's schema."""
    section, key = exp["sweep"]["param"].split(".")
    if section == "args":
        try:
            known = registry.declaration(exp["method"])["args"]
        except (registry.UnknownMethod, ValueError):
            return []  # said by _method_problems
        if key not in known:
            return []  # said by _method_problems, with the method's name
    else:
        known = schema["$defs"][section]["properties"]
        if key not in known:
            return [f"{where}.sweep.param: {section} has no key {key!r}{registry.closest(key, known)} "
                    f"(known: {', '.join(known)})"]
    validator = Draft202012Validator(known[key])
    return [f"{where}.sweep.values.{i}: {e.message} ({section}.{key})"
            for i, value in enumerate(exp["sweep"]["values"]) for e in validator.iter_errors(value)]


def load(path: str | Path, schema_path: Path = SCHEMA) -> dict:
    """Read a YAML config file and validate it."""
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return validate(config, schema_path)


def _check_references(config: dict, schema: dict) -> None:
    problems = []
    models, datasets = config["models"], config["datasets"]
    for name, model in models.items():
        if "quick_gelu" in model and model["kind"] != "open_clip":
            problems.append(f"models.{name}.quick_gelu: only a model of kind open_clip has it (this one is {model['kind']})")
    for name, exp in enabled_experiments(config).items():
        where = f"experiments.{name}"
        base = models.get(exp["base_model"])
        if base is None:
            problems.append(f"{where}.base_model: {exp['base_model']!r} is not in models ({', '.join(models)})")
        elif base["kind"] != "diffusion":
            problems.append(f"{where}.base_model: {exp['base_model']!r} is a {base['kind']} model, expected diffusion")
        problems += _method_problems(where, exp, config)
        problems += _sweep_problems(where, exp, schema)
        if exp["sampling"].get("safety_checker") and base is not None and (base.get("world") or base.get("tiny")):
            problems.append(f"{where}.sampling.safety_checker: the base model {exp['base_model']!r} (the toy world's "
                            "or a tiny one) has no safety checker; set it false")
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


def clip_options(config: dict) -> dict:
    """How the metrics CLIP is built beyond what its folder says (ClipEncoder.load's keywords): its model
    entry's quick_gelu (None: the folder's open_clip_config.json decides)."""
    return {"quick_gelu": config["models"][config["metrics"]["clip"]].get("quick_gelu")}


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
        return problems  # said by check_args
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
    if exp["class_images"]["count"] and "class_prompt" in spec["args"] and spec["args"]["class_prompt"] is None:
        spec["args"]["class_prompt"] = exp["class_images"]["prompt"]  # a method taking class images declares it
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


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conceptbench.config",
                                     description="Check a config, or describe the methods and config sections.")
    parser.add_argument("config", nargs="?", type=Path, help="a config file to validate")
    parser.add_argument("--describe", nargs="?", const="", metavar="NAME",
                        help="a method (its arguments with defaults), a config section, or nothing: the list")
    args = parser.parse_args(argv)
    try:
        if args.describe is not None:
            print(describe(load_schema(), args.describe or None))
        if args.config is not None:
            load(args.config)
            print(f"{args.config}: valid")
    except (LookupError, ValueError) as e:  # ConfigError, UnknownMethod, a method's bad declarations
        print(f"error: {e}")
        return 1
    if args.describe is None and args.config is None:
        parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
