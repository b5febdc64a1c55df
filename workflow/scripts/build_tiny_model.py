"""Build a tiny model of the configured kind (the embedded default's stand-in for a hub model)."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.io import atomic_path
from conceptbench.jobs import job

with job(snakemake.log[0]) as log:
    from conceptbench.models.tiny import build_tiny

    spec = snakemake.params.spec
    with atomic_path(snakemake.output[0]) as tmp:
        build_tiny(spec["kind"], tmp, seed=spec["seed"])
    log.info("built tiny %s model %s", spec["kind"], snakemake.wildcards.model)
