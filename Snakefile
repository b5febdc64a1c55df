# conceptbench: six ways to teach Stable Diffusion a new concept, swept, sampled, scored and reported.
# Wiring only; the stages live in workflow/rules, the work in src/conceptbench.
from snakemake.utils import min_version

min_version("9.0")

# config/config.yaml is the study. `--configfile config/tiny.yaml` replaces it (rather than being
# merged into it), so the two worlds never mix.
if "experiments" not in config:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/retrieval.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    input:
        final_targets,
    default_target: True
