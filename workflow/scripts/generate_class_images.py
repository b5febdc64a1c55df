"""Generate an experiment's class images once with the frozen base model; every variant shares them."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]) as log:
    from conceptbench.sample import generate_class_images

    n = generate_class_images(snakemake.input.base, snakemake.params.cfg, snakemake.output[0])
    log.info("generated %d class images", n)
