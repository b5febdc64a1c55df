"""The toy world at a glance: the base model's samples, the subjects and the style; the models' quality."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]):
    from conceptbench.world.overview import make_overview, quality_html
    from conceptbench.world.shipped import SHIPPED

    datasets = {name: path for name, path in snakemake.input.items() if name != "sd"}
    make_overview(snakemake.input.sd, datasets, snakemake.output.figure)
    quality_html(SHIPPED, snakemake.output.quality)
