# Config validation, wildcard constraints and input functions shared by every stage.
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
# Scripts run in child processes (and, under --sdm conda, in other environments): let them find
# the package even where it is not installed.
# (This sets PYTHONPATH for the children; it asks nothing of the user, so no envvars: directive.)
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [str(Path(workflow.basedir) / "src"), os.environ.get("PYTHONPATH")]))
)

from conceptbench import config as cb

cb.validate(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")

RESULTS = config["results"]
RESOURCES = config["resources"]
VARIANTS = cb.variants(config)
EXPERIMENTS = config["experiments"]
MODELS = config["models"]
DATASETS = config["datasets"]


def _alternatives(names):
    return "|".join(re.escape(n) for n in names) or "^$"


wildcard_constraints:
    experiment=_alternatives(VARIANTS),
    variant=_alternatives({v for vs in VARIANTS.values() for v in vs}),
    model=_alternatives(MODELS),
    dataset=_alternatives(DATASETS),


# --- models and data ------------------------------------------------------------------------


def model_dir(name):
    """Where model `name` lives: built tiny, fetched from the hub, or a user's local folder."""
    spec = MODELS[name]
    if spec.get("path"):
        return spec["path"]
    return f"{RESOURCES}/models/{'tiny' if spec.get('tiny') else 'hub'}/{name}"


def model_spec(wildcards):
    return MODELS[wildcards.model]


def dataset_spec(wildcards):
    return DATASETS[wildcards.dataset]


def raw_dataset(wildcards):
    """The raw input of prepare_dataset: a hub snapshot, a local folder, or nothing (scikit-image)."""
    spec = DATASETS[wildcards.dataset]
    if spec.get("path"):
        return {"raw": spec["path"]}
    if spec.get("repo"):
        return {"raw": f"{RESOURCES}/datasets/hub/{wildcards.dataset}"}
    return {}


def base_model_of(wildcards):
    return model_dir(EXPERIMENTS[wildcards.experiment]["base_model"])


def metric_models(wildcards):
    """The scoring models an experiment's metrics need, by role."""
    wanted = set(EXPERIMENTS[wildcards.experiment]["metrics"])
    roles = {"clip": True, "dino": "dino_i" in wanted, "aesthetic": "aesthetic" in wanted}
    return {role: model_dir(config["metrics"][role]) for role, needed in roles.items() if needed}


# --- per-experiment inputs ------------------------------------------------------------------


def train_inputs(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    inputs = {"base": model_dir(exp["base_model"])}
    if exp["data"]:
        inputs["data"] = f"{RESULTS}/data/{exp['data']}"
    if exp["class_images"]["count"]:
        inputs["class_images"] = f"{RESULTS}/class_images/{wildcards.experiment}"
    return inputs


def evaluate_inputs(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    inputs = {"samples": f"{RESULTS}/samples/{wildcards.experiment}/{wildcards.variant}", **metric_models(wildcards)}
    if cb.REFERENCE_METRICS & set(exp["metrics"]):
        inputs["references"] = f"{RESULTS}/references/{exp['data']}.safetensors"
    return inputs


def reference_models(wildcards):
    return {"clip": model_dir(config["metrics"]["clip"]), "dino": model_dir(config["metrics"]["dino"])}


# --- params: what a job computes from, so a changed value reruns exactly that job ----------------


def variant_spec(wildcards):
    """The training spec; sampling settings are left out so changing them reruns no training."""
    spec = cb.resolve_variant(config, wildcards.experiment, wildcards.variant)
    del spec["sampling"]
    return spec


def sampling_params(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return {
        "prompts": cb.eval_prompts(exp),
        "seeds": [config["seed"] + k for k in range(config["evaluation"]["seeds"])],
        "batch_size": config["evaluation"]["batch_size"],
        "latency_repeats": config["evaluation"]["latency_repeats"],
        "resolution": exp["resolution"],
        **cb.resolve_variant(config, wildcards.experiment, wildcards.variant)["sampling"],
    }


def class_image_params(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return {**exp["class_images"], "resolution": exp["resolution"], "seed": config["seed"]}


def experiment_table(wildcards=None):
    """What aggregate needs to know of each experiment (method, swept key and value per variant)."""
    return {
        name: {
            "method": EXPERIMENTS[name]["method"],
            "task": EXPERIMENTS[name]["task"],
            "metrics": EXPERIMENTS[name]["metrics"],
            "param": EXPERIMENTS[name]["sweep"]["param"],
            "variants": values,
        }
        for name, values in VARIANTS.items()
    }


def experiment_info(wildcards):
    return experiment_table()[wildcards.experiment]


def experiment_metric_files(wildcards):
    return [f"{RESULTS}/metrics/{wildcards.experiment}/{v}.csv" for v in VARIANTS[wildcards.experiment]]


# --- targets --------------------------------------------------------------------------------


def variant_files(pattern):
    return [pattern.format(experiment=e, variant=v) for e, vs in VARIANTS.items() for v in vs]


def final_targets(wildcards=None):
    return [
        f"{RESULTS}/tables/summary.csv",
        f"{RESULTS}/tables/summary.md",
        *[f"{RESULTS}/plots/{e}.png" for e in VARIANTS],
    ]
