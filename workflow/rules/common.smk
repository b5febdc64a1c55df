# Config validation, wildcard constraints and input functions shared by every stage.
import math
import os
import re
import sys
from pathlib import Path

# The package of the checkout this file lives in (found from this file, not the working directory or
# the main Snakefile, so it holds when another workflow uses this one as a module); without one (a
# remote module), the installed package. Scripts run in child processes (and, under --sdm conda, in
# other environments): PYTHONPATH lets them find it too. It asks nothing of the user: no envvars:.
SRC = Path(str(workflow.current_basedir)).parents[1] / "src"
if (SRC / "conceptbench").is_dir():
    sys.path.insert(0, str(SRC))
    os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))

from conceptbench import config as cb
from conceptbench import registry, study

cb.validate(config)
cb.check_output_dirs(config)

RESULTS = config["results"]
RESOURCES = config["resources"]
VARIANTS = cb.variants(config)  # the trained variants: {experiment: {variant: swept value}}
BASELINES = cb.baselines(config)  # the untrained references: {experiment: {name: sampling overrides}}
EXPERIMENTS = config["experiments"]
MODELS = config["models"]
DATASETS = config["datasets"]


def _alternatives(names):
    return "|".join(re.escape(n) for n in names) or "^$"


wildcard_constraints:
    experiment=_alternatives(VARIANTS),
    variant=_alternatives({v for table in (VARIANTS, BASELINES) for vs in table.values() for v in vs}),
    model=_alternatives(MODELS),
    dataset=_alternatives(DATASETS),


# --- models and data ------------------------------------------------------------------------


def model_dir(name):
    """Where model `name` lives: the toy world's, built tiny, fetched from the hub, or a user's local folder."""
    spec = MODELS[name]
    if spec.get("path"):
        return spec["path"]
    source = "world" if spec.get("world") else "tiny" if spec.get("tiny") else "hub"
    return f"{RESOURCES}/models/{source}/{name}"


def model_spec(wildcards):
    """A model entry as its fetch, build or install job needs it: without the keys that only say how the
    folder is loaded (cb.LOAD_OPTIONS), so changing those reruns the jobs that load it, not the download."""
    return {k: v for k, v in MODELS[wildcards.model].items() if k not in cb.LOAD_OPTIONS}


def shipped_world_files(wildcards):
    """The files of the shipped toy-world model an install copies: when a rebuilt or pulled model changes
    them (`make world`, a pull), the install and everything that used it run again. Snakemake compares
    their checksums, so a checkout that only touches them reruns nothing."""
    from conceptbench.world.shipped import SHIPPED

    folder = SHIPPED / MODELS[wildcards.model]["world"]
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())


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
    """The base model and the inputs the method declares (registry.INPUT_KINDS), for this variant's args."""
    exp = EXPERIMENTS[wildcards.experiment]
    args = cb.resolve_variant(config, wildcards.experiment, wildcards.variant)["args"]
    inputs = {"base": model_dir(exp["base_model"])}
    for kind in cb.method_inputs(exp, args):
        if kind == "data":
            inputs["data"] = f"{RESULTS}/data/{exp['data']}"
        elif kind == "class_images":
            inputs["class_images"] = class_images_dir(wildcards.experiment, 0)
        elif kind == "extra_concepts":
            inputs.update(extra_concept_inputs(wildcards.experiment))
        else:  # a scoring model, by its role in `metrics` (e.g. DDPO's aesthetic reward)
            inputs[kind] = model_dir(config["metrics"][kind])
    return inputs


# --- class images: generated, or retrieved (Custom Diffusion's real-image regularization) --------


def class_images_dir(experiment, concept):
    """Class images of an experiment's concept (0: its own, i: args.extra_concepts[i-1])."""
    if EXPERIMENTS[experiment]["class_images"]["source"] == "retrieved":
        return f"{RESULTS}/retrieved/{experiment}/{concept}"
    return f"{RESULTS}/class_images/{experiment}"


def extra_concept_inputs(experiment):
    """data_i (and class_images_i) of each extra concept of a multi-concept experiment."""
    exp = EXPERIMENTS[experiment]
    inputs = {}
    for i, concept in enumerate(exp["args"].get("extra_concepts") or [], start=1):
        inputs[f"data_{i}"] = f"{RESULTS}/data/{concept['data']}"
        if exp["class_images"]["count"]:
            inputs[f"class_images_{i}"] = class_images_dir(experiment, i)
    return inputs


def retrieval_inputs(wildcards):
    """The faiss backend needs the pool, its index and the CLIP; the knn service needs nothing local."""
    ci = EXPERIMENTS[wildcards.experiment]["class_images"]
    if ci["backend"] != "faiss":
        return {}
    return {"pool": f"{RESULTS}/data/{ci['pool']}", "index": f"{RESULTS}/pools/{ci['pool']}",
            "clip": model_dir(config["metrics"]["clip"])}


def retrieval_params(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    concept = int(wildcards.concept)
    extras = exp["args"].get("extra_concepts") or []
    if concept > len(extras):
        raise ValueError(f"experiments.{wildcards.experiment}: no concept {concept} (it has {len(extras) + 1})")
    prompt = exp["class_images"]["prompt"] if concept == 0 else extras[concept - 1]["class_prompt"]
    keys = ("count", "backend", "knn_url", "knn_index")
    return {"prompt": prompt, "resolution": exp["resolution"], **{k: exp["class_images"][k] for k in keys}}


def pool_index_inputs(wildcards):
    return {"pool": f"{RESULTS}/data/{wildcards.dataset}", "clip": model_dir(config["metrics"]["clip"])}


def sample_inputs(wildcards):
    """The base model, and the trained artifact unless the variant is a baseline (the base model untouched)."""
    inputs = {"base": base_model_of(wildcards)}
    if not cb.is_baseline(config, wildcards.experiment, wildcards.variant):
        inputs["artifact"] = f"{RESULTS}/train/{wildcards.experiment}/{wildcards.variant}/artifact"
    return inputs


def has_prior_probe(experiment):
    """Whether the experiment's samples include its class prompt (the prior probe of cb.sample_prompts)."""
    return any(p["prompt_set"] == cb.PRIOR_SET for p in cb.sample_prompts(EXPERIMENTS[experiment]))


def evaluate_inputs(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    inputs = {"samples": f"{RESULTS}/samples/{wildcards.experiment}/{wildcards.variant}", **metric_models(wildcards)}
    if cb.REFERENCE_METRICS & set(exp["metrics"]):
        inputs["references"] = f"{RESULTS}/references/{exp['data']}.safetensors"
    if has_prior_probe(wildcards.experiment):
        inputs["class_references"] = f"{RESULTS}/references/class_images/{wildcards.experiment}.safetensors"
    if config["metrics"].get("oracle"):
        inputs["oracle"] = model_dir(config["metrics"]["oracle"])
    return inputs


def class_reference_inputs(wildcards):
    """What embed_class_images embeds: the experiment's (own concept's) class images, with both encoders."""
    return {**reference_models(wildcards), "images": class_images_dir(wildcards.experiment, 0)}


def world_subject(wildcards):
    """The toy-world subject an experiment teaches (its data's `world.subject`), for the oracle; else None."""
    exp = EXPERIMENTS[wildcards.experiment]
    data = DATASETS.get(exp.get("data") or "", {})
    return (data.get("world") or {}).get("subject") if exp["task"] == "subject" else None


def reference_models(wildcards):
    return {"clip": model_dir(config["metrics"]["clip"]), "dino": model_dir(config["metrics"]["dino"])}


# --- params: what a job computes from, so a changed value reruns exactly that job ----------------


def clip_options(wildcards=None):
    """How every job that loads the metrics CLIP builds it (its model entry's quick_gelu)."""
    return cb.clip_options(config)


def train_model_options(wildcards):
    """How the train job loads the scoring models it takes ({role: options}: DDPO's reward CLIP); empty for
    methods that take none, so a changed quick_gelu reruns only the training that reads CLIP."""
    return {"clip": cb.clip_options(config)} if "clip" in train_inputs(wildcards) else {}


def variant_spec(wildcards):
    """The training spec; sampling settings are left out so changing them reruns no training."""
    spec = cb.resolve_variant(config, wildcards.experiment, wildcards.variant)
    del spec["sampling"]
    return spec


def sampling_params(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    first = config["evaluation"]["first_seed"]
    return {
        "prompts": cb.sample_prompts(exp),
        "seeds": [(config["seed"] if first is None else first) + k for k in range(config["evaluation"]["seeds"])],
        "batch_size": config["evaluation"]["batch_size"],
        "latency_repeats": config["evaluation"]["latency_repeats"],
        "resolution": exp["resolution"],
        **cb.resolve_variant(config, wildcards.experiment, wildcards.variant)["sampling"],
    }


def class_image_params(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    generation = {k: exp["class_images"][k] for k in ("prompt", "count", "steps", "guidance_scale")}
    return {**generation, "resolution": exp["resolution"], "seed": config["seed"]}


def experiment_table(wildcards=None):
    """What aggregate needs to know of each experiment (method, swept key and value per variant)."""
    return {
        name: {
            "method": EXPERIMENTS[name]["method"],
            "task": EXPERIMENTS[name]["task"],
            "metrics": EXPERIMENTS[name]["metrics"],
            "param": EXPERIMENTS[name]["sweep"]["param"],
            "variants": values,
            "baselines": list(BASELINES[name]),
        }
        for name, values in VARIANTS.items()
    }


def experiment_info(wildcards):
    return experiment_table()[wildcards.experiment]


# --- summary, plots and report ------------------------------------------------------------

# The study's published numbers and metric bands, transcribed once (shown beside the measured ones).
STUDY_RESULTS = str(study.RESULTS_FILE)


def reference_subjects(wildcards=None):
    """{subject dataset: [experiments scored against it]}: one real-image upper-bound row each."""
    subjects = {}
    for name in VARIANTS:
        if cb.REFERENCE_METRICS & set(EXPERIMENTS[name]["metrics"]):
            subjects.setdefault(EXPERIMENTS[name]["data"], []).append(name)
    return subjects


def reference_score_files(wildcards=None):
    return [f"{RESULTS}/references/{subject}.scores.csv" for subject in reference_subjects()]


def method_of(wildcards):
    """The report category of an experiment's items: its method."""
    return EXPERIMENTS[wildcards.experiment]["method"]


def metric_notes(wildcards=None):
    """What each metric means and the study's bands for it, for the report captions."""
    numbers = study.load(STUDY_RESULTS)
    return {
        m: {"name": spec["name"], "meaning": spec["meaning"], "bands": study.band_text(numbers, m)}
        for m, spec in numbers["metrics"].items()
    }


# --- cluster resources: what a job asks SLURM for (profiles/slurm) ---------------------------------
# GPU rules ask for gpu=1 of the config's cluster.gpu_model, plus host CPUs (threads, which the SLURM
# executor passes as --cpus-per-task) and host memory sized for full-size models; jobs on tiny models
# (the embedded default) ask for one CPU and TINY_MEM_MB. A retry asks for more memory and time.

TINY_MEM_MB = 2000
TRAIN_SETUP_MINUTES = 15  # loading the models, saving the artifact, the last checkpoint


def _tiny_job(wildcards):
    """Whether a job runs on tiny components: its experiment's base model, else the scoring CLIP."""
    name = EXPERIMENTS[wildcards.experiment]["base_model"] if hasattr(wildcards, "experiment") else config["metrics"]["clip"]
    return bool(MODELS[name].get("tiny") or MODELS[name].get("world"))


def host_threads(full):
    """threads for a GPU rule: `full` host CPUs on full-size models, 1 on tiny ones."""

    def threads(wildcards):
        return 1 if _tiny_job(wildcards) else full

    return threads


def host_mem_mb(full):
    """mem_mb for a GPU rule: `full` MB on full-size models, TINY_MEM_MB on tiny ones; doubled per retry."""

    def mem_mb(wildcards, attempt):
        return (TINY_MEM_MB if _tiny_job(wildcards) else full) * attempt

    return mem_mb


def gpu_model(wildcards):
    """The GPU type SLURM should give (config cluster.gpu_model); None asks for any GPU."""
    return config["cluster"]["gpu_model"]


def train_runtime(wildcards, attempt):
    """Minutes for a training job: setup plus train.steps (DDPO: epochs) at the method's declared H100 seconds
    per step (an estimate with margin; the job's benchmark file has the real figure), scaled by pixels; more
    per retry."""
    exp = EXPERIMENTS[wildcards.experiment]
    steps = cb.resolve_variant(config, wildcards.experiment, wildcards.variant)["train"]["steps"]
    rate = registry.declaration(exp["method"])["h100_seconds_per_step"]
    seconds = steps * rate * (exp["resolution"] / 512) ** 2
    return (TRAIN_SETUP_MINUTES + math.ceil(seconds / 60)) * attempt


# --- targets --------------------------------------------------------------------------------


def variant_files(pattern):
    return [pattern.format(experiment=e, variant=v) for e, vs in VARIANTS.items() for v in vs]


def baseline_files(pattern):
    return [pattern.format(experiment=e, variant=b) for e, bs in BASELINES.items() for b in bs]


def experiment_artifacts(wildcards):
    """The trained artifacts of one experiment (plot_sweep reads DDPO's rewards.json from them)."""
    return [f"{RESULTS}/train/{wildcards.experiment}/{v}/artifact" for v in VARIANTS[wildcards.experiment]]


def experiment_samples(wildcards):
    """The sample folders of one experiment's baselines and variants (plot_learning picks base and best)."""
    names = [*BASELINES[wildcards.experiment], *VARIANTS[wildcards.experiment]]
    return [f"{RESULTS}/samples/{wildcards.experiment}/{v}" for v in names]


def world_overview_inputs(wildcards):
    """The toy world's base model and its subject and style datasets, as the experiments use them."""
    exps = list(EXPERIMENTS.values())
    inputs = {"sd": model_dir(exps[0]["base_model"])}
    for exp in exps:
        if exp["task"] in ("subject", "style"):
            inputs.setdefault(exp["data"], f"{RESULTS}/data/{exp['data']}")
    return inputs


def in_toy_world():
    return any(m.get("world") for m in MODELS.values())


def final_targets(wildcards=None):
    return [
        *([f"{RESULTS}/world/overview.png", f"{RESULTS}/world/quality.html"] if in_toy_world() else []),
        f"{RESULTS}/tables/summary.csv",
        f"{RESULTS}/tables/summary.md",
        f"{RESULTS}/tables/summary.html",
        *[f"{RESULTS}/plots/{e}.png" for e in VARIANTS],
        f"{RESULTS}/tables/learning.html",
        *[f"{RESULTS}/plots/learning/{e}.png" for e in VARIANTS],
        f"{RESULTS}/plots/efficiency_size.png",
        f"{RESULTS}/plots/efficiency_latency.png",
        *variant_files(f"{RESULTS}/plots/gallery/{{experiment}}/{{variant}}.png"),
    ]
