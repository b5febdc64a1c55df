"""Install a model of the toy world from the repository's shipped copy (fp16) as fp32 in its layout."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.io import atomic_path
from conceptbench.jobs import job

with job(snakemake.log[0]) as log:
    from conceptbench.world.shipped import install

    spec = snakemake.params.spec
    with atomic_path(snakemake.output[0]) as tmp:
        install(spec["world"], tmp, kind=spec["kind"])
    log.info("installed the toy world's %s model as %s", spec["world"], snakemake.wildcards.model)
